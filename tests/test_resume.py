"""Exact resume after a crash, for every model: a `train.py fit` process SIGKILLed right after a
mid-epoch checkpoint, resumed with `--ckpt_path last`, killed again at an epoch end, resumed to the
end (the U-Net: killed there before writing its summary, and resumed once more) finishes with the
uninterrupted run's weights and metrics, bit for bit. Also: checkpoints
survive kills at any moment of their writing."""
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import zoo
from tests.conftest import ROOT, tiny_unet_args
from tests.test_mambavision_task import tiny_args as tiny_mambavision_args
from tests.test_sketch_rnn_cli import tiny_sketch_args
from tests.test_transformer_tasks import lm_args, s2s_args

# Each gives 4 training batches per epoch; 6 steps cross one epoch end. A checkpoint every 2 steps (val_check_interval=1 would be read by Lightning as "once per epoch").
MODELS = {
    "unet": (tiny_unet_args, []),
    "sketch_rnn": (tiny_sketch_args, ["--model.net.norm=layer"]),
    "transformer_lm": (lm_args, ["--data.max_chars=600", "--data.batch_size=8"]),
    "transformer_seq2seq": (s2s_args, []),
    "mambavision": (tiny_mambavision_args, []),
}
STEPS_PER_EPOCH, MAX_STEPS = 4, 6


def start(args, *extra, kill=None) -> subprocess.Popen:
    """`train.py fit` in its own process, started; `kill` = KillAt's init args (the process dies there)."""
    cmd = [sys.executable, "-m", "zoo.cli", "fit", *args, *extra]
    if kill:
        cmd.append("--trainer.callbacks+=" + json.dumps({"class_path": "tests.conftest.KillAt", "init_args": kill}))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # output to files: a pipe nobody reads while another process runs could fill and stall it
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
    proc.output = out, err
    return proc


def fit(args, *extra, kill=None) -> subprocess.CompletedProcess:
    return finish(start(args, *extra, kill=kill))


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    proc.wait(timeout=300)
    out, err = (f.seek(0) or f.read() for f in proc.output)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def final(root) -> tuple[dict, dict]:
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt, json.loads((root / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_killed_twice_and_resumed_equals_uninterrupted(tmp_path, model):
    make, extra = MODELS[model]
    common = [f"--trainer.max_steps={MAX_STEPS}", "--trainer.val_check_interval=2",
              "--trainer.check_val_every_n_epoch=null", "--trainer.limit_val_batches=2", *extra]
    straight = start(make(tmp_path / "straight", *common))  # beside the first interrupted one: 1 thread each
    run = make(tmp_path / "resumed", *common)
    mid = fit(run, kill={"step": 2})  # mid-epoch: after the step-2 checkpoint
    straight = finish(straight)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert mid.returncode == -9, mid.stderr[-3000:]
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    end = fit(run, "--ckpt_path=last", kill={"epoch": 1})  # at the epoch end: after the step-4 checkpoint
    assert end.returncode == -9, end.stderr[-3000:]
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS_PER_EPOCH
    if model == "unet":  # the summary is every model's (RunSummary): one model checks a kill at the very end
        last = fit(run, "--ckpt_path=last", kill={"end": True})  # after the final checkpoint, before the summary
        assert last.returncode == -9, last.stderr[-3000:]
    done = fit(run, "--ckpt_path=last")  # (U-Net: nothing left to train; the metrics come from the checkpoint)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not resumable" not in done.stderr + end.stderr

    (a, sa), (b, sb) = final(tmp_path / "straight"), final(tmp_path / "resumed")
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, x in a["state_dict"].items():
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(b["state_dict"][name], x, rtol=0, atol=0, msg=name)
        else:  # extra state (a scaler's kind): plain data
            assert b["state_dict"][name] == x, name
    timing = lambda m: {k: v for k, v in m.items() if "per_s" not in k}  # noqa: E731  (wall-clock rates)
    assert timing(sb["metrics"]) == timing(sa["metrics"]) and sa["metrics"]
    counts = ("status", "params", "global_step", "epochs")
    assert {k: sb[k] for k in counts} == {k: sa[k] for k in counts}


def test_checkpoint_writes_survive_kills_at_random_moments(tmp_path):
    """A process rewriting last.ckpt in a loop (TMPDIR on another filesystem) is killed at random
    moments: what is left is always a complete checkpoint of one of the written versions."""
    target = tmp_path / "last.ckpt"
    writer = ("import sys, torch\nfrom zoo.callbacks import AtomicCheckpointIO\nio = AtomicCheckpointIO()\n"
              "i = 0\nwhile True:\n    i += 1\n"
              "    io.save_checkpoint({'version': i, 'w': torch.full((1 << 20,), float(i))}, sys.argv[1])\n")
    tmpdir = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    env = {**os.environ, "TMPDIR": tmpdir, "PYTHONPATH": str(ROOT)}
    rng = random.Random(0)
    versions = []
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(target)], env=env, cwd=ROOT)
        deadline = time.time() + 60
        while not target.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        proc.wait()
        ckpt = torch.load(target, weights_only=True)
        assert torch.equal(ckpt["w"], torch.full((1 << 20,), float(ckpt["version"])))
        versions.append(ckpt["version"])
    assert max(versions) > 1  # the kills did land during rewrites


@pytest.mark.slow
def test_resume_after_a_kill_during_checkpointing(tmp_path):
    """A real run killed at a random moment (checkpoints written every 2 steps) resumes and finishes."""
    args = tiny_unet_args(tmp_path / "run", "--trainer.max_steps=8", "--trainer.val_check_interval=2",
                          "--trainer.check_val_every_n_epoch=null")
    ckpt_dir = tmp_path / "run" / "checkpoints"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "TMPDIR": "/dev/shm"}
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "fit", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (ckpt_dir / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(random.Random(1).uniform(0, 0.5))
    proc.kill()
    proc.wait()
    zoo.load(ckpt_dir / "last.ckpt")  # complete and loadable
    (ckpt_dir / ".last.ckpt.tmp-99999").write_bytes(b"half a checkpoint")  # as a writer killed mid-write leaves
    resumed = fit(args, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list(ckpt_dir.glob(".*.tmp-*"))  # strays of the killed writer are gone
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 8


SAMPLED_DATA = '''
from torch.utils.data import DataLoader

from tiny_ext import TinyData
from zoo.data.sampling import EpochSampler


class SampledData(TinyData):
    """TinyData whose training order is zoo's resumable EpochSampler."""

    def train_dataloader(self):
        return DataLoader(self.data, self.batch_size, sampler=EpochSampler.for_training(
            self, len(self.data), 0, self.batch_size, with_epoch=False))
'''


@pytest.mark.parametrize("data, warned", [("tiny_ext.TinyData", True), ("sampled.SampledData", False)])
def test_mid_epoch_resume_warning_only_for_loaders_that_cannot_resume(tmp_path, data, warned):
    """Lightning's 'dataloader is not resumable' warning on a mid-epoch resume is kept for a user's
    shuffled DataLoader (it cannot continue the interrupted order) and left out for a user's
    datamodule drawing with EpochSampler, which can, as zoo's own datamodules do."""
    from tests.test_new_model import CONFIG, MODULE

    (tmp_path / "tiny_ext.py").write_text(MODULE)
    (tmp_path / "sampled.py").write_text(SAMPLED_DATA)
    (tmp_path / "tiny.yaml").write_text(CONFIG)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}

    def run(steps, *extra):  # 8 batches an epoch: a checkpoint every 2 steps, each mid-epoch
        return subprocess.run([sys.executable, "-m", "zoo.cli", "fit", "--config", "tiny.yaml", f"--data={data}",
                               f"--trainer.max_steps={steps}", "--trainer.val_check_interval=2",
                               f"--trainer.default_root_dir={tmp_path / 'run'}", *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    first = run(2)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run(4, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("dataloader is not resumable" in " ".join(resumed.stderr.split())) is warned
