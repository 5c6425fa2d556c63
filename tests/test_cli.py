"""The entry point end to end on a tiny U-Net: fit, checkpoints, resume, seeds, predict, load, DDP."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from zoo.models.config import flat
from zoo.callbacks import RunSummary
from zoo.cli import ZooCLI, error_line, run_tags, wandb_mode
from zoo.export import export
from zoo.scaling import InputScaler
from zoo.tasks.segmentation import UNetSegmentation
from tests.conftest import ROOT, StopAfterFirstEpoch, default_sigint, assert_same_weights, interrupted_then_resumed, tiny_unet_args


def fit(root, *extra):
    return ZooCLI(args=["fit", *tiny_unet_args(root, *extra)])


def metrics_rows(root):
    (path,) = sorted((root / "csv").glob("version_*/metrics.csv"))[-1:]
    with open(path) as f:
        return list(csv.DictReader(f))


def test_fit_writes_run_dir_and_load_restores_model(tmp_path):
    cli = fit(tmp_path, "--model.net.norm=group", "--data.input_norm=robust")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["global_step"] == 4
    assert summary["params"] == sum(p.numel() for p in cli.model.parameters())
    assert summary["train_samples_per_s"] > 0 and "val/iou_fg" in summary["metrics"]
    assert any(r.get("train/loss") for r in metrics_rows(tmp_path))
    assert list((tmp_path / "samples").glob("*.png"))

    # Hyper-parameters are plain data; the norm is its name.
    raw = torch.load(ckpt, weights_only=True)
    hp = raw["hyper_parameters"]
    assert hp["net"]["norm"] == "group"
    plain = (str, int, float, bool, type(None))
    assert all(isinstance(v, plain) or isinstance(v, list) and all(isinstance(x, plain) for x in v)
               for v in flat(hp).values())
    assert hp["optimizer"]["class_path"] == "torch.optim.Adam"  # the config's, as it gave it

    model = zoo.load(ckpt)
    assert isinstance(model, UNetSegmentation) and not model.training
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    # The scaler travels with the model: equal to one fitted independently on the training split.
    dm = cli.datamodule
    ref = InputScaler(1, kind="robust").fit(dm.train_images())
    torch.testing.assert_close(model.input_scaler.shift, ref.shift)
    torch.testing.assert_close(model.input_scaler.scale, ref.scale)
    # Same weights, same outputs as the trained module.
    x = torch.rand(1, 1, 68, 68) * 255
    cli.model.eval()
    torch.testing.assert_close(model(x), cli.model(x))
    assert UNetSegmentation.load(ckpt).hparams.net["norm"] == "group"


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    fit(tmp_path / "a")
    fit(tmp_path / "b")
    fit(tmp_path / "c", "--seed_everything=1")
    loss = lambda root: [r["train/loss"] for r in metrics_rows(root) if r.get("train/loss")]  # noqa: E731
    assert loss(tmp_path / "a") == loss(tmp_path / "b")
    assert loss(tmp_path / "a") != loss(tmp_path / "c")


def test_resume_from_last_is_exact(tmp_path):
    # 8 training samples, batch 2: 4 steps an epoch. The same 3-epoch job straight through, and
    # interrupted after 1 epoch then relaunched with --ckpt_path last, must end with identical weights.
    common = ["--trainer.max_steps=-1", "--trainer.val_check_interval=null", "--model.optimizer=null",
              "--model.scheduler=cosine", "--model.weight_decay=0.01", "--trainer.max_epochs=3"]
    straight = fit(tmp_path / "straight", *common)
    first, resumed = interrupted_then_resumed(tiny_unet_args(tmp_path / "resumed", *common), tmp_path / "resumed")
    assert first["global_step"] == 4 and first["epoch"] == 0
    assert first["optimizer_states"][0]["state"] and first["lr_schedulers"][0]["last_epoch"] == 4
    assert resumed.trainer.global_step == straight.trainer.global_step == 12
    assert_same_weights(straight.model, resumed.model)
    # the interrupted segment's peak memory travels in the checkpoint: the summary's peak covers both
    first_peak = first["callbacks"]["RunSummary"]["peak_memory_mb"]
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert first_peak > 0 and summary["peak_memory_mb"] >= first_peak
    # and its wall time: the summary's is both segments'
    first_wall = first["callbacks"]["RunSummary"]["wall_time_s"]
    (run_summary,) = [c for c in resumed.trainer.callbacks if isinstance(c, RunSummary)]
    assert first_wall > 0 and run_summary.earlier_wall_s == first_wall
    assert summary["wall_time_s"] == pytest.approx(first_wall + time.perf_counter() - run_summary.t0, abs=0.5)


class StepOfLastCkptAtValidation(Callback):
    """Records, at the start of every validation, (the step, the step of the last.ckpt on disk)."""

    def __init__(self, path):
        self.path, self.seen = path, []

    def on_validation_start(self, trainer, pl_module):
        on_disk = torch.load(self.path, weights_only=True)["global_step"] if self.path.exists() else None
        self.seen.append((trainer.global_step, on_disk))


def test_last_ckpt_holds_the_steps_after_the_last_validation(tmp_path, capsys):
    """Validation at steps 2 and 4 of 5: last.ckpt is written once more after the final batch, so it
    holds the weights the summary describes (step 5). A run shorter than one validation interval has its last.ckpt too, so its folder
    is a run. Training on from a run that ended mid-epoch is the longer run."""
    cli = fit(tmp_path / "a", "--trainer.max_steps=5")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert (summary["global_step"], summary["val_step"]) == (5, 4)  # val/ metrics: of the step-4 validation
    export(last, tmp_path / "exported")
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "## Final metrics (step 5)" in card and "the run's last validation, at step 4" in card
    # an earlier checkpoint's card has its own validation's metrics, read back from the CSV log
    (best,) = (tmp_path / "a" / "checkpoints").glob("best-*.ckpt")
    step = torch.load(best, weights_only=True)["global_step"]
    rows = list(csv.DictReader(open(tmp_path / "a" / "csv" / "version_0" / "metrics.csv")))
    loss = [float(r["val/loss"]) for r in rows if r["val/loss"] and int(r["step"]) == step - 1]  # (CSV: step - 1)
    export(best, tmp_path / "best")
    card = (tmp_path / "best" / "README.md").read_text()
    assert f"## Metrics of this checkpoint (its validation at step {step})" in card and "went on to step 5" in card
    assert step in (2, 4) and len(loss) == 1 and f"| val/loss | {loss[0]:.4g} |" in card
    x = torch.rand(1, 1, 68, 68) * 255
    cli.model.eval()
    torch.testing.assert_close(zoo.load(last)(x), cli.model(x), rtol=0, atol=0)
    written = last.stat().st_mtime_ns
    # as if killed after that save, before the summary: the resume has nothing left to train, leaves
    # last.ckpt as it is, and reports what the run did
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    (tmp_path / "a" / "summary.json").unlink()
    fit(tmp_path / "a", "--trainer.max_steps=5", "--ckpt_path=last")
    assert f"{last} is at step 5, max_steps=5: nothing left to train" in capsys.readouterr().err
    assert last.stat().st_mtime_ns == written
    again = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert (again["metrics"], again["global_step"], again["epochs"], again["val_step"]) == (
        summary["metrics"], summary["global_step"], summary["epochs"], summary["val_step"])

    fit(tmp_path / "b", "--trainer.max_steps=1")  # before the first validation
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    with pytest.raises(FileExistsError, match="already holds a run"):
        fit(tmp_path / "b", "--trainer.max_steps=1")
    # trained on from step 3 (mid-epoch: 4 steps an epoch) to 5: the run of 5 steps
    fit(tmp_path / "c", "--trainer.max_steps=3")
    further = fit(tmp_path / "c", "--trainer.max_steps=5", "--ckpt_path=last")
    assert_same_weights(cli.model, further.model)


def test_last_ckpt_is_never_written_before_the_validation_of_its_step(tmp_path):
    """A run whose final step validates (4 of 4, validation every 2): last.ckpt of step 4 is written
    after that validation only. Written before it, a kill in between would leave a checkpoint that
    Lightning resumes past the validation, whose metrics would then be missing."""
    cli = ZooCLI(args=tiny_unet_args(tmp_path), run=False)
    spy = StepOfLastCkptAtValidation(tmp_path / "checkpoints" / "last.ckpt")
    cli.trainer.callbacks.append(spy)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert [step for step, _ in spy.seen] == [0, 2, 4]  # the sanity check, then steps 2 and 4
    assert all(on_disk is None or on_disk < step for step, on_disk in spy.seen), spy.seen
    assert torch.load(spy.path, weights_only=True)["global_step"] == 4


class StepRecorder(Logger):
    """A logger that records the steps of validation metrics and of images (as wandb would get them)."""
    name, version = "steps", 0

    def __init__(self):
        super().__init__()
        self.metric_steps, self.image_steps = [], []

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("val/") for k in metrics):
            self.metric_steps.append(step)

    def log_image(self, key, images, step=None):
        self.image_steps.append(step)


def test_sample_images_are_logged_at_their_validations_step(tmp_path):
    """In wandb a validation's sample images sit at the step of its metrics (Lightning logs those at
    the number of batches that stepped before, one less than global_step)."""
    cli = ZooCLI(args=tiny_unet_args(tmp_path), run=False)
    recorder = StepRecorder()
    cli.trainer.loggers = [*cli.trainer.loggers, recorder]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert recorder.metric_steps == [1, 3]  # validations after steps 2 and 4
    assert sorted(set(recorder.image_steps)) == recorder.metric_steps
    # both in epoch 0 (4 steps an epoch): a file each, not the second over the first
    saved = sorted(p.name.rsplit("_epoch", 1)[1] for p in (tmp_path / "samples").glob("*.png"))
    assert saved == ["000_step0000002.png", "000_step0000004.png"]


def test_ctrl_c_stops_fit_with_one_line_and_a_resumable_run(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "fit",
                             *tiny_unet_args(tmp_path, "--trainer.max_steps=400")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "last.ckpt").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)  # as a terminal's and a compare's: the second must not break the stop
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "error: interrupted; the same command with --ckpt_path last resumes it"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["error"]) == ("failed", "interrupted")


def test_evaluation_writes_beside_the_training_run_not_into_it(tmp_path):
    """validate / test of a run's checkpoint log to <run>/<stage>/ (CSV, config, samples): the training
    curves that compare and the dashboard read (csv/) and the training samples stay as they were."""
    fit(tmp_path)
    before = {p: p.read_bytes() for p in [*tmp_path.glob("csv/**/*"), *tmp_path.glob("samples/*")] if p.is_file()}
    assert any(p.parent.name == "samples" for p in before)
    for stage in ("validate", "test"):
        ZooCLI(args=[stage, *tiny_unet_args(tmp_path), "--ckpt_path=last"])
        rows = list(csv.DictReader(open(tmp_path / stage / "version_0" / "metrics.csv")))
        assert any(r.get(f"{stage[:4] if stage == 'test' else 'val'}/iou_fg") for r in rows)
        assert (tmp_path / stage / "version_0" / "config.yaml").is_file()
    assert list((tmp_path / "validate" / "samples").glob("*.png"))
    after = {p: p.read_bytes() for p in [*tmp_path.glob("csv/**/*"), *tmp_path.glob("samples/*")] if p.is_file()}
    assert after == before


def test_resume_drops_a_best_checkpoint_the_interrupted_segment_wrote_after_last(tmp_path):
    common = ["--trainer.max_steps=-1", "--trainer.val_check_interval=null", "--trainer.max_epochs=3"]
    fit(tmp_path / "straight", *common)  # checkpoints at steps 4, 8, 12
    args = tiny_unet_args(tmp_path / "resumed", *common)
    cli = ZooCLI(args=args, run=False)
    cli.trainer.callbacks.insert(0, StopAfterFirstEpoch())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpts = tmp_path / "resumed" / "checkpoints"
    # as a segment killed at step 8 between writing its best checkpoint and last.ckpt
    shutil.copy(ckpts / "last.ckpt", ckpts / "best-epoch=1-step=8.ckpt")
    ZooCLI(args=["fit", *args, "--ckpt_path=last"])
    names = lambda root: sorted(p.name for p in (root / "checkpoints").iterdir())  # noqa: E731
    assert names(tmp_path / "resumed") == names(tmp_path / "straight")


def test_an_integer_batch_limit_on_the_command_line_is_a_number_of_batches(tmp_path):
    """Lightning reads limit_val_batches=1 as one batch and 1.0 as all of them; its annotation
    (float first) made `--trainer.limit_val_batches 1` all of them."""
    for given, want in (("1", 1), ("3", 3), ("1.0", 1.0), ("0.5", 0.5)):
        trainer = ZooCLI(args=tiny_unet_args(tmp_path / given, "--trainer.limit_val_batches", given), run=False).trainer
        assert trainer.limit_val_batches == want and type(trainer.limit_val_batches) is type(want), given


def test_model_and_data_overrides_and_print_config(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", *tiny_unet_args(tmp_path, "--model.net.norm=instance"),
         "--print_config"], capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    assert "class_path: zoo.tasks.segmentation.UNetSegmentation" in out
    assert "norm: instance" in out and "crop_size: 28" in out and "seed_everything: 0" in out


def test_unknown_norm_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError) as raised:
        fit(tmp_path, "--model.net.norm=bogus")
    assert error_line(raised.value) == ("error: unknown norm kind 'bogus'; valid kinds: batch, layer, instance, group, rms, "
                                        "none (yours: register it with zoo.norm.register_norm, in a module that "
                                        "train.py imports with --import MODULE)")


def test_predict_writes_probability_maps_and_masks(tmp_path):
    fit(tmp_path / "run")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in [("a", (37, 53)), ("b", (64, 40))]:
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(images / f"{name}.png")
    out = tmp_path / "pred"
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the config's run directory (another one than the checkpoint's) gets nothing: predict writes to
        # its folder only, its config.yaml beside its outputs, and restores no checkpoint callback
        ZooCLI(args=["predict", *tiny_unet_args(tmp_path / "elsewhere"), f"--data.predict_dir={images}",
                     f"--predict_out={out}", f"--ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"])
    assert not (tmp_path / "elsewhere").exists() and (out / "config.yaml").is_file()
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    probs = np.load(out / "a_probs.npy")
    assert probs.shape == (2, 37, 53)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    assert Image.open(out / "a_mask.png").size == (53, 37)
    assert Image.open(out / "b_prob.png").size == (40, 64)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", *tiny_unet_args(tmp_path),
         "--trainer.strategy=ddp", "--trainer.devices=2", "--model.net.norm=batch"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["global_step"] == 4


def test_sync_batchnorm_converts_every_batch_norm():
    # What --trainer.sync_batchnorm does (it needs CUDA devices, so the CPU DDP test cannot use it).
    model = UNetSegmentation(net={"base_channels": 4, "depth": 3, "norm": "batch"})
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert n_bn == 2 * 5  # two convs per level: 3 down, 2 up
    assert sum(type(m) is torch.nn.SyncBatchNorm for m in converted.modules()) == n_bn
    assert not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())


def test_wandb_mode_is_decided_without_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    assert wandb_mode("disabled") == "disabled"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="sometimes"):
        wandb_mode()


def test_run_tags_name_model_and_norms():
    model = UNetSegmentation(net={"base_channels": 4, "depth": 3, "norm": "rms"})
    assert run_tags(model, None) == ["UNetSegmentation", "norm=rms"]
    from zoo.tasks.classification import ImageClassification

    classifier = ImageClassification("resnet10t", num_classes=2, norm="group",
                                     model_kwargs={"stem_width": 8, "channels": [8, 8, 8, 8]})
    assert run_tags(classifier, None) == ["ImageClassification", "resnet10t", "norm=group"]


def test_wandb_run_carries_job_type_resolved_config_and_tags(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the logger is only configured here
    cli = ZooCLI(args=tiny_unet_args(tmp_path, "--model.net.norm=group", "--wandb.job_type=compare",
                                     "--wandb.group=g", "--wandb.tags=[\"seed=3\"]", "--seed_everything=3"), run=False)
    from lightning.pytorch.loggers import WandbLogger

    (logger,) = [lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)]
    init = logger._wandb_init
    assert init["job_type"] == "compare" and init["group"] == "g"
    assert {"UNetSegmentation", "norm=group", "seed=3"} <= set(init["tags"])
    assert len(init["tags"]) == len(set(init["tags"])) and init["dir"] == str(tmp_path)  # each tag once
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "w"))  # wandb's own setting, honoured
    cli = ZooCLI(args=tiny_unet_args(tmp_path / "b", "--wandb.tags=[\"norm=group\"]", "--model.net.norm=group"),
                 run=False)
    (logger,) = [lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)]
    assert logger._wandb_init["dir"] == str(tmp_path / "w")
    assert sorted(logger._wandb_init["tags"]) == ["UNetSegmentation", "input_norm=zscore", "norm=group", "seed=0"]
    config = init["config"]  # the full resolved config, plain data
    assert config["model"]["init_args"]["net"]["norm"] == "group" and config["seed_everything"] == 3
    assert config["data"]["init_args"]["crop_size"] == 28


def test_resumed_fit_continues_its_wandb_run(tmp_path, monkeypatch):
    # wandb offline (files only): the run id travels in the checkpoint, so the resumed segment logs to
    # the same wandb run, as a wandb user expects of a resumed job; a new run gets a new id.
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")

    def wandb_ids(cli):
        wandb.finish()  # as `train.py` does at exit: the next run is a new process's
        return [lg.version for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)]

    first = fit(tmp_path / "run", "--trainer.max_steps=2")
    (run_id,) = wandb_ids(first)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"]["RunSummary"]["wandb_id"] == run_id
    resumed = fit(tmp_path / "run", "--ckpt_path=last")
    assert wandb_ids(resumed) == [run_id] and resumed.trainer.global_step == 4
    # wandb wrote both segments under that id
    assert {p.name.rsplit("-", 1)[-1] for p in (tmp_path / "run" / "wandb").glob("offline-run-*")} == {run_id}
    assert wandb_ids(fit(tmp_path / "other")) != [run_id]


def test_tensorboard_gets_hparams_with_final_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    fit(tmp_path, "--model.net.norm=group")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0}).Reload()
    summary = json.loads((tmp_path / "summary.json").read_text())
    for tag in ("val/loss", "val/iou_fg"):  # the final values, as the run summary has them
        assert events.Scalars(tag)[-1].value == pytest.approx(summary["metrics"][tag], rel=1e-6)
    content = events.PluginTagToContent("hparams")
    (session,) = [plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info
                  for c in content.values() if plugin_data_pb2.HParamsPluginData.FromString(c).HasField("session_start_info")]
    assert session.hparams["model/net/norm"].string_value == "group" and session.hparams["seed"].string_value == "0"
