"""What every zoo LightningModule shares: the fitted input scaler, the optimizer (zoo's parameter
groups into the task's paper preset or an injected optimizer and schedule) and the tag that lets
`zoo.load` recognise its checkpoints. (Sample images and texts for the dashboards: `zoo.samples`.)"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from zoo import checkpoint
from zoo.checkpoint import INJECTED
from zoo.data.contract import DataInfo, ZooDataModule
from zoo.models.config import flat
from zoo.optim import lr_schedule, param_groups

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Hyper-parameters that only the preset optimizer / schedule read (injected ones take their own init_args).
PRESET_KEYS = ("lr", "weight_decay", "betas", "eps", "momentum")
SCHEDULE_KEYS = ("scheduler", "warmup_steps", "min_lr_ratio", "min_lr", "decay_rate")


def preset_settings_set(task: type, values, keys: tuple[str, ...]) -> list[str]:
    """The `keys` (PRESET_KEYS or SCHEDULE_KEYS) that `values` (hparams or init_args) set away from the
    task class's defaults."""
    defaults = inspect.signature(task.__init__).parameters
    return [k for k in keys if k in values and k in defaults and flat({k: values[k]}) != flat({k: defaults[k].default})]


def _plain(value) -> bool:
    return isinstance(value, (str, int, float, bool, type(None))) or (
        isinstance(value, list) and all(map(_plain, value)))


class ZooModule(L.LightningModule):
    """Base class of zoo tasks.

    Subclasses call `self.save_hyperparameters()` with plain-data arguments only (a norm is its
    name; a network config, `zoo.models.config`, is stored as a dict), set `self.input_scaler` (a
    `zoo.scaling.InputScaler`) if their inputs are scaled, and may set `monitor = (metric, "min" |
    "max")` for the best-checkpoint callback. Defining a subclass registers it, so its checkpoints load
    (`zoo.checkpoint.task_class`). A subclass that keeps state of its own (class names, vocabularies)
    overrides `on_save_checkpoint` / `on_load_checkpoint` as plain data and calls
    `super().on_save_checkpoint(checkpoint)`, which tags the checkpoint as zoo's; its `optimizer` /
    `lr_scheduler` arguments are typed `Optional[OptimizerCallable]` / `Optional[LRSchedulerCallable]`,
    so that the CLI can inject them.
    """

    monitor: tuple[str, str] = ("val/loss", "min")
    optimizer_preset: str = "adamw"  # the paper's optimizer (a key of OPTIMIZERS), fed from the hparams
    schedule_preset: str = "none"  # the schedule when the hparams name none (`zoo.optim.SCHEDULES`)

    def __init__(self, optimizer: Optional[OptimizerCallable] = None,
                 lr_scheduler: Optional[LRSchedulerCallable] = None):
        super().__init__()
        self._optimizer_fn, self._scheduler_fn = optimizer, lr_scheduler

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        checkpoint.register_task(cls)  # checkpoints may name registered task classes only

    # Pixels of context per side the network consumes beyond its output (the valid-padding U-Net's);
    # the segmentation datamodule pads its training crops by it (`zoo.data.contract`).
    input_context: int = 0

    def data_info(self) -> DataInfo:
        """What the attached datamodule hands this task (`zoo.data.contract`); empty without one."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        return dm.info() if isinstance(dm, ZooDataModule) else DataInfo()

    def setup(self, stage: str) -> None:
        # The datamodule fits the scaler on its training split; the model carries it from here on,
        # so checkpoints hold it and inference takes raw inputs.
        scaler = self.data_info().scaler
        if stage == "fit" and scaler is not None and hasattr(self, "input_scaler"):
            have, want = scaler.num_channels, self.input_scaler.num_channels
            if have != want:
                arg = next((f"--model.{k}" for k in ("in_channels", "in_chans") if k in self.hparams), "the model's")
                raise ValueError(f"the training images have {have} channel(s), the model takes {want}; "
                                 f"set {arg} {have}")
            self.input_scaler.copy_from(scaler)

    def save_hyperparameters(self, *args, ignore=(), frame=None, logger: bool = True) -> None:
        """Lightning's, with network configs as dicts (so checkpoints load with weights_only), refusing
        preset settings that an injected optimizer or schedule would leave unused (checked here, before
        any work starts) and leaving them out, so that the hparams say what the run trains with: the
        injected one as the CLI gives it (class_path and init_args; a callable from Python is not plain
        data and is left out too)."""
        super().save_hyperparameters(*args, ignore=list(ignore), frame=frame or inspect.currentframe().f_back,
                                     logger=logger)
        if self._optimizer_fn is not None:
            self._refuse_preset_settings(PRESET_KEYS, "optimizer")
        if self._scheduler_fn is not None:
            self._refuse_preset_settings(SCHEDULE_KEYS, "lr_scheduler")
        unused = [*(PRESET_KEYS if self._optimizer_fn else ()), *(SCHEDULE_KEYS if self._scheduler_fn else ())]
        for hp in (self._hparams, self._hparams_initial):
            hp.update({k: dataclasses.asdict(v) for k, v in hp.items() if dataclasses.is_dataclass(v)})
            for k in [k for k in hp if k in unused or (k in INJECTED and not isinstance(hp[k], dict))]:
                del hp[k]
        for key, value in flat({k: v for k, v in self._hparams.items() if k not in INJECTED}).items():
            # an object (or the CLI's class_path for one) would not come back from a checkpoint
            if key.endswith(".class_path") or not _plain(value):
                raise TypeError(f"model argument {key.removesuffix('.class_path')} is an object "
                                f"({value if key.endswith('.class_path') else type(value).__name__}): hyper-parameters "
                                "must be plain data (numbers, strings, lists, dicts), which checkpoints load without "
                                "running code; take a name or its settings and build the object in the task")

    def configure_optimizers(self):
        """One optimizer over `param_groups` (no weight decay on norms, biases, embeddings):

        - the injected `optimizer` (LightningCLI style: `--model.optimizer SGD --model.optimizer.lr 0.1`,
          or `optimizer=lambda params: ...` from Python), else the task's paper preset
          `OPTIMIZERS[optimizer_preset]` with the hparams lr, weight_decay and, where the task has them,
          betas / eps / momentum;
        - the injected `lr_scheduler` (stepped per epoch, as LightningCLI does; ReduceLROnPlateau
          watches its own `monitor`, else the task's monitored metric, in the task's direction), else
          the preset per-step schedule named by the hparam `scheduler` (`zoo.optim.lr_schedule`;
          warmup_steps, min_lr_ratio, net.d_model, decay_rate).
        """
        hp = self.hparams
        if self._optimizer_fn is None:
            names = [k for k in PRESET_KEYS[2:] if k in hp]
            opt = OPTIMIZERS[self.optimizer_preset](param_groups(self, hp.get("weight_decay", 0.0)), lr=hp.lr,
                                                    **{k: tuple(hp[k]) if k == "betas" else hp[k] for k in names})
        else:
            # the decayed group (marked by decay 1) takes the optimizer's own weight_decay
            opt = self._optimizer_fn([{k: v for k, v in g.items() if k != "weight_decay"} if g["weight_decay"] else g
                                      for g in param_groups(self, 1.0)])
        if self._scheduler_fn is not None:
            sched = self._scheduler_fn(opt)
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                # the metric the scheduler names (Lightning's ReduceLROnPlateau has `monitor`), else the task's
                metric = getattr(sched, "monitor", None) or self.monitor[0]
                if metric == self.monitor[0] and sched.mode != self.monitor[1]:
                    raise ValueError(f"lr_scheduler ReduceLROnPlateau mode={sched.mode!r} watches {metric}, which "
                                     f"this task {'maximizes' if self.monitor[1] == 'max' else 'minimizes'}; set "
                                     f"--model.lr_scheduler.mode {self.monitor[1]}")
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": metric}}
            return {"optimizer": opt, "lr_scheduler": sched}
        name = hp.get("scheduler", self.schedule_preset)
        warmup = hp.get("warmup_steps", 0)
        if name == "none" and not warmup:
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        if name == "cosine" and warmup >= total:  # e.g. --trainer.fast_dev_run on a config made for a long run
            warmup = total // 2
            warnings.warn(f"warmup_steps={hp.warmup_steps} >= the run's {total} steps: warming up over {warmup}")
        # sketch-rnn gives its floor as an absolute min_lr, as the paper does
        floor = hp.min_lr / hp.lr if "min_lr" in hp else hp.get("min_lr_ratio", 0.0)
        sched = lr_schedule(opt, name, total_steps=total, warmup_steps=warmup, min_lr_ratio=floor,
                            d_model=hp.get("net", {}).get("d_model"), decay_rate=hp.get("decay_rate", 0.9999))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _refuse_preset_settings(self, keys: tuple[str, ...], injected: str) -> None:
        """An injected optimizer / scheduler ignores the preset's hparams `keys`: one of them set away
        from its default too would be silently unused, so it is refused."""
        changed = preset_settings_set(type(self), self.hparams, keys)
        if changed:
            raise ValueError(f"model {', '.join(changed)} set together with an injected {injected}, which ignores "
                             f"them; give them as its init_args (--model.{injected}.*) instead")

    def on_save_checkpoint(self, ckpt: dict) -> None:
        ckpt["zoo"] = {"task": f"{type(self).__module__}.{type(self).__qualname__}", "format": checkpoint.FORMAT}

    @classmethod
    def load(cls, path, map_location="cpu"):
        """`zoo.load` restricted to this task: a checkpoint of another model kind is refused."""
        return checkpoint.load(path, expected=cls, map_location=map_location)

    # The files `write_predictions` appends to: each predict run starts them afresh (`WritePredictions`).
    prediction_files: tuple[str, ...] = ()

    def write_predictions(self, outputs, batch, out_dir: Path) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not write predictions")

