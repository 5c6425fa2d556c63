"""What every zoo LightningModule shares: the fitted input scaler, optimizer parameter groups,
sample images for the dashboards and the tag that lets `zoo.load` recognise its checkpoints."""
from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import numpy as np
from PIL import Image

from zoo import checkpoint
from zoo.optim import param_groups


class ZooModule(L.LightningModule):
    """Base class of zoo tasks.

    Subclasses call `self.save_hyperparameters()` with plain-data arguments only (a norm is its
    name), set `self.input_scaler` (a `zoo.scaling.InputScaler`) if their inputs are scaled, and
    may set `monitor = (metric, "min" | "max")` for the best-checkpoint callback. Defining a
    subclass registers it, so its checkpoints load (`zoo.checkpoint.task_class`).
    """

    monitor: tuple[str, str] = ("val/loss", "min")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        checkpoint.register_task(cls)  # checkpoints may name registered task classes only

    def setup(self, stage: str) -> None:
        # The datamodule fits the scaler on its training split; the model carries it from here on,
        # so checkpoints hold it and inference takes raw inputs.
        scaler = getattr(self.trainer.datamodule, "scaler", None) if self._trainer is not None else None
        if stage == "fit" and scaler is not None and hasattr(self, "input_scaler"):
            self.input_scaler.copy_from(scaler)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Parameter groups with norm weights, biases and embeddings excluded from weight decay."""
        return param_groups(self, weight_decay)

    def on_save_checkpoint(self, ckpt: dict) -> None:
        ckpt["zoo"] = {"task": f"{type(self).__module__}.{type(self).__qualname__}", "format": checkpoint.FORMAT}

    @classmethod
    def load(cls, path, map_location="cpu"):
        """`zoo.load` restricted to this task: a checkpoint of another model kind is refused."""
        return checkpoint.load(path, expected=cls, map_location=map_location)

    def _sample_path(self, key: str, suffix: str) -> Path | None:
        """`<run dir>/samples/<key>_epoch<N><suffix>`, or None where samples are not written
        (no trainer, sanity check, not rank zero)."""
        if self._trainer is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return None
        stem = re.sub(r"[^\w.=-]+", "_", key).strip("_")  # a plain file name: it is linked from report.md
        path = Path(self.trainer.default_root_dir) / "samples" / f"{stem}_epoch{self.current_epoch:03d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def log_image(self, key: str, image: np.ndarray) -> Path | None:
        """Saves an (H, W, 3) uint8 image as `<run dir>/samples/<key>_epoch<N>.png` and logs it to
        image-capable loggers (wandb). Rank zero only."""
        path = self._sample_path(key, ".png")
        if path is None:
            return None
        Image.fromarray(image).save(path)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=key, images=[image], step=self.global_step)
        return path

    def log_text(self, key: str, columns: list[str], rows: list[list[str]]) -> Path | None:
        """Saves text samples (e.g. prompt / continuation) as `<run dir>/samples/<key>_epoch<N>.txt`
        (one block per row) and logs them as a table to text-capable loggers (wandb). Rank zero only."""
        path = self._sample_path(key, ".txt")
        if path is None:
            return None
        blocks = ["\n".join(f"{c}: {v}" for c, v in zip(columns, row)) for row in rows]
        path.write_text("\n\n".join(blocks) + "\n")
        for logger in self.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text(key=key, columns=columns, data=rows, step=self.global_step)
        return path

    def write_predictions(self, outputs, batch, out_dir: Path) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not write predictions")
