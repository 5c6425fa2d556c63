"""What the CLI adds to every run: a run summary for comparisons, a prediction writer, per-batch
seeding of the global generators, and crash-safe checkpoint files."""
from __future__ import annotations

import json
import math
import os
import random
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.data import extract_batch_size

from zoo.data.sampling import EpochSampler, _seed_int
from zoo.files import atomic_open, atomic_write_text

SUMMARY_FILE = "summary.json"


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunSummary(Callback):
    """Measures one fit and writes `<dir>/summary.json`: parameter count, wall time, training
    throughput (samples/s over training batches, data loading included, the first batch of each
    epoch excluded as warm-up), peak memory, and the final logged metrics.

    Peak memory: on CUDA, `torch.cuda.max_memory_allocated`; on CPU, the process's peak resident set
    size (`ru_maxrss`: data, model, framework and all). Not the training working set: the allocator
    reuses what data setup freed, so "peak during fit minus size at fit start" came out near 0 for some
    runs. A resumed run reports the peak over all its segments (each checkpoint carries the peak so
    far) and the wall time of fit summed over them (each checkpoint carries the time so far: a killed
    segment's time after its last checkpoint is lost, the steps it re-trains count); throughput is its
    last segment's.

    Metrics: each checkpoint also carries the metrics logged so far, which a resumed segment updates
    with what it logs itself. So a run killed after its last checkpoint, and resumed from it with no
    step left to train, still reports the final metrics rather than none.

    `val_step` is the step of the last validation, whose values the `val/` metrics are: a run that ends
    between validations has trained on since (`global_step`).

    Each checkpoint also carries the run's wandb run id (`wandb_id`), so a resumed fit continues that
    wandb run (`ZooCLI`) instead of starting another.
    """

    def __init__(self, dirpath: str | Path):
        self.path = Path(dirpath) / SUMMARY_FILE
        self.error: str | None = None
        self.earlier_peak_mb: float | None = None  # from the checkpoint a resumed run started from
        self.earlier_metrics: dict = {}  # likewise
        self.val_step: int | None = None  # likewise
        self.earlier_wall_s = 0.0  # likewise

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.trainer = trainer  # for state_dict

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.t0 = time.perf_counter()
        self.samples, self.train_time, self.last = 0, 0.0, None
        self.cuda, self.device = pl_module.device.type == "cuda", pl_module.device
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.train_time += now - self.last
            self.samples += extract_batch_size(batch)
        self.last = now

    def on_validation_start(self, trainer, pl_module) -> None:
        self.last = None  # validation time is not training time

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.error = "interrupted" if isinstance(exception, KeyboardInterrupt) else \
            f"{type(exception).__name__}: {exception}"
        if hasattr(self, "t0"):
            self._write(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)

    def _peak_mb(self) -> float | None:
        """The peak so far over this segment and the ones before it, MiB."""
        if getattr(self, "cuda", False):
            now = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return max(now, self.earlier_peak_mb or 0.0)

    def _metrics(self, trainer: Trainer) -> dict:
        """The run's metrics so far, plain data: this segment's over those of the segments before it."""
        now = {k: _plain(v) for k, v in trainer.callback_metrics.items()}
        return dict(sorted({**self.earlier_metrics, **now}.items()))

    def state_dict(self) -> dict:
        wandb_ids = [lg.version for lg in self.trainer.loggers if isinstance(lg, WandbLogger)]
        return {"peak_memory_mb": self._peak_mb(), "metrics": self._metrics(self.trainer),
                "wandb_id": wandb_ids[0] if wandb_ids else None, "val_step": self.val_step,
                "wall_time_s": self._wall_s()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.earlier_peak_mb = state_dict.get("peak_memory_mb")
        self.earlier_metrics = dict(state_dict.get("metrics", {}))
        self.val_step = state_dict.get("val_step")
        self.earlier_wall_s = state_dict.get("wall_time_s", 0.0)

    def _wall_s(self) -> float:
        return self.earlier_wall_s + time.perf_counter() - self.t0

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        mem = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "peak_memory_mb": self._peak_mb()}
        summary = {
            "status": "failed" if self.error else "ok",
            "error": self.error,
            "params": sum(p.numel() for p in pl_module.parameters()),
            "wall_time_s": self._wall_s(),
            "train_samples_per_s": self.samples / self.train_time if self.train_time > 0 else None,
            "global_step": trainer.global_step,
            "val_step": self.val_step,
            # epochs trained in, the last possibly partial: Lightning's epoch counter moves on when a
            # max_steps stop ends an epoch, but not in a resumed run with no step left to train
            "epochs": trainer.fit_loop.epoch_progress.current.started,
            "device": str(pl_module.device),
            "metrics": self._metrics(trainer),
            **mem,
        }
        atomic_write_text(self.path, json.dumps(summary, indent=2))
        if summary["status"] == "ok":
            self._log_hparams(trainer, pl_module, summary["metrics"])

    @staticmethod
    def _log_hparams(trainer: Trainer, pl_module: LightningModule, metrics: dict) -> None:
        """The run's hyper-parameters with its final metrics, for TensorBoard's HParams view."""
        params = {f"model/{k}": v for k, v in pl_module.hparams.items()}
        if trainer.datamodule is not None:
            params.update({f"data/{k}": v for k, v in trainer.datamodule.hparams.items()})
        params["seed"] = os.environ.get("PL_GLOBAL_SEED", "")
        final = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and final:
                logger.log_hyperparams(params, final)


class WritePredictions(BasePredictionWriter):
    """Hands each predicted batch to the task's `write_predictions(outputs, batch, out_dir)`; the
    files the task appends to (`prediction_files`) are started afresh, so they hold this run's only."""

    def __init__(self, out_dir: str | Path):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)

    def on_predict_start(self, trainer, pl_module) -> None:
        for name in getattr(pl_module, "prediction_files", ()):
            (self.out_dir / name).unlink(missing_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        pl_module.write_predictions(prediction, batch, self.out_dir)

    def on_predict_end(self, trainer, pl_module) -> None:
        print(f"predictions written to {self.out_dir}")


class ResumeSettings(Callback):
    """Carries in every checkpoint the settings outside the model's hyper-parameters that a resumed fit
    must keep (plain data): the seed, which draws the data order and every step's randomness, and an
    injected optimizer and schedule, whose state Lightning restores, so that a changed learning rate
    would be recorded and not used. `ZooCLI` refuses a resume that changes them."""

    def __init__(self, settings: dict):
        self.settings = settings

    def state_dict(self) -> dict:
        return {"settings": self.settings}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning warns that a loader without state_dict cannot resume mid-epoch; a resuming
        # EpochSampler's can (it skips by the fit loop's restored counters), any other's keeps the warning.
        loaders = getattr(trainer.fit_loop._combined_loader, "flattened", [])
        if loaders and all(isinstance(getattr(d, "sampler", None), EpochSampler) and d.sampler.skip for d in loaders):
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")


class StepSeed(Callback):
    """Seeds torch's (CPU and CUDA), NumPy's and Python's global generators before every training
    batch from (run seed, rank, batch number). Dropout and any other draw of a training step are then
    a function of where the run stands, not of what ran before it (validation, data loader start-up,
    a restart): a run resumed from a checkpoint draws what the uninterrupted run drew, and changing
    how often validation runs does not change training."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # total_batch_idx counts every batch of the run and is restored from the checkpoint on resume.
        s = _seed_int([self.seed, trainer.global_rank], trainer.fit_loop.total_batch_idx)
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)


class LastCheckpoint(ModelCheckpoint):
    """`<dirpath>/last.ckpt`, rewritten at every validation (Lightning's `save_last=True` rewrites it
    only when the monitored metric improved, so a resume could lose every step since the best one), and
    after the run's final batch when no validation follows it, so that the steps after the last
    validation are in it too: the weights `predict`, `export` and `zoo.load` use are those the run's
    summary describes, and a run shorter than one validation interval is a run.

    Saved there, inside the epoch, rather than when training ends, where Lightning has closed the epoch:
    training on from it (a larger max_steps) would skip the rest of that epoch. Never before a
    validation of the same step: Lightning resumes such a checkpoint past that validation."""

    def __init__(self, dirpath: str | Path):
        super().__init__(dirpath=dirpath, filename="last", save_top_k=1, enable_version_counter=False)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a resumed run starts at its checkpoint's step: that one is on disk (Lightning's record of the
        # step it last saved at, which it does not restore)
        self._last_global_step_saved = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        loop = trainer.fit_loop.epoch_loop
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        final = (trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps) or (
            last_epoch and loop.batch_progress.is_last_batch)
        if not final or self._should_skip_saving_checkpoint(trainer):
            return
        # the decision Lightning makes right after this hook (a private method: no public one says it)
        if not loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target, fsynced, then renamed over it: a kill
    at any moment leaves the previous or the new complete `last.ckpt`, never a truncated one. Loading
    is `weights_only` (plain data and tensors only)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote filesystems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_open(path, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location="cpu", weights_only=None) -> dict:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
