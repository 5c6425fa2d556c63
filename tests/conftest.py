import fcntl
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

os.environ.setdefault("WANDB_MODE", "disabled")

from zoo import cpu_kernels  # noqa: E402
from zoo.cli import ZooCLI  # noqa: E402  (after the wandb mode is set)

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one core per worker: two threads each would oversubscribe the machine

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["cpp", "torch"])
def scan_path(request, monkeypatch):
    """Runs a test with zoo's C++ CPU kernels (zoo/csrc) and again with the pure-PyTorch paths."""
    monkeypatch.setattr(cpu_kernels, "ENABLED", request.param == "cpp")
    if request.param == "cpp":
        assert cpu_kernels.available(), "the C++ CPU kernels did not build (see the warning)"
    return request.param


def cli_args(config: str, root_dir, *extra: str) -> list[str]:
    """CLI arguments for a short CPU test run of `configs/<config>.yaml` in `root_dir`: 4 steps,
    validation every 2, everything logged; `extra` shrinks the model and data."""
    return [
        "--config", str(ROOT / "configs" / f"{config}.yaml"),
        f"--trainer.default_root_dir={root_dir}",
        "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
        *extra,
    ]


def tiny_unet_args(root_dir, *extra: str) -> list[str]:
    """A U-Net small enough for a CPU test: depth 3 (context 20 px per side), 4 base channels,
    training crops of 28 px (inputs 68 px) from 48 px synthetic images."""
    return cli_args(
        "unet", root_dir,
        "--model.net.base_channels=4", "--model.net.depth=3", "--model.seam_tile=16",
        "--data.crop_size=28", "--data.image_size=48", "--data.num_train=8", "--data.num_val=2",
        "--data.batch_size=2",
        *extra,
    )


class StopAfterFirstEpoch(Callback):
    """Simulates an interrupted job: stops cleanly after epoch 0, once last.ckpt is written."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def interrupted_then_resumed(args: list[str], root) -> tuple[dict, ZooCLI]:
    """Fits `args` (without the subcommand; default_root_dir `root`) stopped after epoch 0, then
    relaunches the same command with `--ckpt_path=last`. Returns the interrupted job's last checkpoint
    and the resumed CLI."""
    cli = ZooCLI(args=args, run=False)
    cli.trainer.callbacks.insert(0, StopAfterFirstEpoch())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    first = torch.load(Path(root) / "checkpoints" / "last.ckpt", weights_only=True)
    return first, ZooCLI(args=["fit", *args, "--ckpt_path=last"])


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    """Bit-identical parameters and buffers."""
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


@pytest.fixture
def python():
    return sys.executable


class KillAt(Callback):
    """Simulates a crash: SIGKILLs its own process at the start of a training batch, once the
    checkpoint of the step before it is on disk — after `step` optimizer steps, or at the first batch
    of epoch `epoch`; with `end`, when training ends (after the last checkpoint, before the run's
    summary). With `fresh_only`, only in a run that did not resume from a checkpoint. With `parent`,
    kills the process that started it instead (a compare launcher's worker); with `once`, a file path,
    only the first process of all to get there (the file marks it)."""

    def __init__(self, step: int | None = None, epoch: int | None = None, end: bool = False,
                 fresh_only: bool = False, parent: bool = False, once: str | None = None):
        self.step, self.epoch, self.end = step, epoch, end
        self.fresh_only, self.parent, self.once = fresh_only, parent, once

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step or (trainer.current_epoch == self.epoch and batch_idx == 0):
            self._kill(trainer)

    def on_train_end(self, trainer, pl_module):
        if self.end:
            self._kill(trainer)

    def _kill(self, trainer):
        if self.fresh_only and trainer.ckpt_path is not None:
            return
        if self.once is not None:
            try:
                os.close(os.open(self.once, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
        os.kill(os.getppid() if self.parent else os.getpid(), signal.SIGKILL)
        if self.parent:  # this process dies with it (PR_SET_PDEATHSIG) once the kernel has ended it, which
            time.sleep(120)  # can take longer on a loaded machine than a tiny run's remaining steps


def default_sigint() -> None:
    """preexec_fn of a process a test sends SIGINT as a terminal's Ctrl-C would: a test session started in
    the background by a non-interactive shell (`make test &`) ignores SIGINT, and so would every process
    it starts, where a terminal's foreground job does not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PauseAt(Callback):
    """Holds the run whose folder is named `run` for `seconds` at the start of the batch after `step`
    optimizer steps (that step's checkpoint on disk), once it has touched `<run dir>/paused`: a test
    kills its launcher there, mid-run whatever the machine's load. Not in a resumed run."""

    def __init__(self, step: int, run: str, seconds: float = 120):
        self.step, self.run, self.seconds = step, run, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        root = Path(trainer.default_root_dir)
        if trainer.global_step == self.step and root.name == self.run and trainer.ckpt_path is None:
            (root / "paused").touch()
            time.sleep(self.seconds)


@pytest.fixture(scope="session")
def sweep_reference(tmp_path_factory):
    """A function returning the folder of `compare` of the tiny U-Net over norm none, batch x seeds 0, 3,
    one run after another: the output every other launcher (--jobs 2, Ray on one or two nodes, retried
    runs) must reproduce. Made once per session by the first test to ask, across pytest-xdist workers
    too (a lock file in the session's shared temporary folder), so tests ask only once they need it."""
    from tests.test_compare import SWEEP, compare

    shared = _session_shared(tmp_path_factory)

    def reference() -> Path:
        out = shared / "sweep_reference"
        with open(shared / "sweep_reference.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "done").exists():
                shutil.rmtree(out, ignore_errors=True)  # a try that failed half-way
                compare(out, *SWEEP)
                (out / "done").touch()
        return out

    return reference


def _session_shared(tmp_path_factory) -> Path:
    """A folder of this test session shared by its pytest-xdist workers (each has its own basetemp in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture
def one_ray_at_a_time(tmp_path_factory):
    """Holds a lock for the test's duration, so that two pytest-xdist workers never start Ray together."""
    with open(_session_shared(tmp_path_factory) / "ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: two workers, handed one test at a time), tests marked `slow` (15 s
    or more, mostly processes started and killed) first, so that they spread over the workers instead
    of ending the run on one."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise
