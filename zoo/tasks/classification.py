"""Image classification with MambaVision (`zoo.models.mambavision`).

Training as the official recipe, scaled down: cross-entropy with label smoothing, AdamW with norm
weights, biases, layer scales and the SSM's A_log / D excluded from weight decay (`zoo.optim`), a
per-step cosine schedule with linear warm-up (`zoo.optim.lr_schedule`). Validation reports loss and
top-1 / top-k accuracy (torchmetrics) and saves a grid of validation images with their predicted
and true classes each epoch. `predict` writes `predictions.csv` (one row per image: name, then the
top-k class names and probabilities). Class names travel in the checkpoint.
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchmetrics.classification import MulticlassAccuracy

import zoo.models.mambavision as mambavision
from zoo.norm import NORM_KINDS
from zoo.optim import lr_schedule
from zoo.scaling import InputScaler
from zoo.tasks.base import ZooModule

__all__ = ["ImageClassification", "image_grid"]


def image_grid(images: torch.Tensor, captions: list[str], correct: list[bool], columns: int = 8) -> np.ndarray:
    """Raw images (N, 3, H, W) (min-max stretched per image) -> (rows * (H + 12), columns * W, 3) uint8,
    each tile framed green (correct) or red (wrong) with its caption below."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = Image.new("RGB", (columns * w, rows * (h + 12)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x = images[i].float()
        x = ((x - x.min()) / (x.max() - x.min()).clamp_min(1e-8) * 255).round().byte()
        r, c = divmod(i, columns)
        left, top = c * w, r * (h + 12)
        canvas.paste(Image.fromarray(x.permute(1, 2, 0).cpu().numpy()), (left, top))
        draw.rectangle([left, top, left + w - 1, top + h - 1], outline=(0, 170, 0) if correct[i] else (220, 0, 0))
        draw.text((left + 1, top + h), captions[i][: max(1, w // 6)], fill=(0, 0, 0))
    return np.asarray(canvas)


class ImageClassification(ZooModule):
    """MambaVision image classifier.

    Args:
        variant: a registered MambaVision variant ("mambavision_t", ..., "mambavision_l3").
        num_classes, in_chans: head size and input channels.
        conv_norm: norm of the stem, conv stages and final norm (`zoo.norm` kind; official: batch).
        token_norm: norm of the mixer/attention blocks (official: layer).
        norm: shorthand that sets both conv_norm and token_norm (None: use those two).
        dim, in_dim, depths, num_heads, window_size, drop_path_rate, layer_scale: override the
            variant's value when given (None: the variant's).
        drop_rate: MLP / attention-projection dropout.
        scan_backend: `zoo.models.ssm.selective_scan` backend ("auto", "chunked", "sequential", "cuda").
        grad_checkpointing: recompute block activations in backward (less memory, ~1/3 more compute).
        label_smoothing: of the training cross-entropy (official 0.1).
        lr, weight_decay, betas: AdamW (official: 5e-3 for batch 4096, 0.05).
        scheduler: "cosine" (per step, linear warm-up over `warmup_steps`, down to min_lr_ratio * lr) or "none".
        top_k: the k of the top-k accuracy (clipped to num_classes) and of the predict CSV.
        sample_images: validation images in the grid saved each epoch (0: none).
    """

    monitor = ("val/top1", "max")

    def __init__(
        self,
        variant: str = "mambavision_t",
        num_classes: int = 1000,
        in_chans: int = 3,
        conv_norm: str = "batch",
        token_norm: str = "layer",
        norm: Optional[str] = None,
        dim: Optional[int] = None,
        in_dim: Optional[int] = None,
        depths: Optional[list[int]] = None,
        num_heads: Optional[list[int]] = None,
        window_size: Optional[list[int]] = None,
        drop_path_rate: Optional[float] = None,
        layer_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        scan_backend: str = "auto",
        grad_checkpointing: bool = False,
        label_smoothing: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: str = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.01,
        top_k: int = 5,
        sample_images: int = 16,
    ):
        super().__init__()
        if variant not in mambavision.VARIANTS:
            raise ValueError(f"variant {variant!r} is not one of {tuple(mambavision.VARIANTS)}")
        if norm is not None:
            conv_norm = token_norm = norm
        for name, kind in (("conv_norm", conv_norm), ("token_norm", token_norm)):
            if kind not in NORM_KINDS:
                raise ValueError(f"{name}={kind!r} is not a norm kind; expected one of {tuple(NORM_KINDS)}")
        if scheduler not in ("cosine", "none"):
            raise ValueError(f"scheduler {scheduler!r} is not one of 'cosine', 'none'")
        if num_classes < 2 or top_k < 1:
            raise ValueError(f"need num_classes >= 2 and top_k >= 1, got {num_classes} and {top_k}")
        self.save_hyperparameters()
        # the norms actually built, whichever way they were given
        self.hparams.conv_norm, self.hparams.token_norm = conv_norm, token_norm
        overrides = dict(dim=dim, in_dim=in_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                         drop_path_rate=drop_path_rate, layer_scale=layer_scale)
        self.net = timm.create_model(
            variant, num_classes=num_classes, in_chans=in_chans, conv_norm=conv_norm, token_norm=token_norm,
            drop_rate=drop_rate, scan_backend=scan_backend, **{k: v for k, v in overrides.items() if v is not None})
        self.net.set_grad_checkpointing(grad_checkpointing)
        self.input_scaler = InputScaler(in_chans)
        self.class_names = [str(k) for k in range(num_classes)]
        k = min(top_k, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_topk = MulticlassAccuracy(num_classes, top_k=k, average="micro")

    # ------------------------------------------------------------------ model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) raw images -> (B, num_classes) logits."""
        return self.net(self.input_scaler(x))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        names = getattr(self.trainer.datamodule, "classes", None) if self._trainer is not None else None
        if stage == "fit" and names is not None:
            if len(names) != self.hparams.num_classes:
                raise ValueError(f"the data has {len(names)} classes ({names[:5]}...), the model "
                                 f"num_classes={self.hparams.num_classes}")
            self.class_names = list(names)

    def on_save_checkpoint(self, ckpt: dict) -> None:
        super().on_save_checkpoint(ckpt)
        ckpt["class_names"] = list(self.class_names)

    def on_load_checkpoint(self, ckpt: dict) -> None:
        if "class_names" in ckpt:
            self.class_names = list(ckpt["class_names"])

    # ------------------------------------------------------------------ steps

    def training_step(self, batch, batch_idx):
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        self.log("train/top1", acc, batch_size=len(logits))
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["image"])
        labels = batch["label"]
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True, batch_size=len(logits))
        self.val_top1.update(logits, labels)
        self.val_topk.update(logits, labels)
        n = self.hparams.sample_images
        if batch_idx == 0 and n:
            pred = logits[:n].argmax(1).tolist()
            true = labels[:n].tolist()
            captions = [self.class_names[p] for p in pred]
            self.log_image("val/samples (predicted; green = right)",
                           image_grid(batch["image"][:n], captions, [p == t for p, t in zip(pred, true)]))

    def on_validation_epoch_end(self) -> None:
        self.log("val/top1", self.val_top1.compute(), prog_bar=True)
        self.log(f"val/top{self.val_topk.top_k}", self.val_topk.compute())
        self.val_top1.reset()
        self.val_topk.reset()

    def predict_step(self, batch, batch_idx):
        return {"probs": self(batch["image"]).float().softmax(-1), "name": batch["name"]}

    def on_predict_start(self) -> None:
        self._csv_path = None

    def write_predictions(self, outputs, batch, out_dir: Path) -> None:
        """Appends to `<out_dir>/predictions.csv`: name, label_1, prob_1, ..., label_k, prob_k (most
        probable first); the file is started afresh at each predict run."""
        k = min(self.hparams.top_k, self.hparams.num_classes)
        probs, idx = outputs["probs"].topk(k, dim=-1)
        new = getattr(self, "_csv_path", None) is None
        self._csv_path = Path(out_dir) / "predictions.csv"
        with open(self._csv_path, "w" if new else "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["name"] + [c for i in range(1, k + 1) for c in (f"label_{i}", f"prob_{i}")])
            for name, p, j in zip(outputs["name"], probs.tolist(), idx.tolist()):
                writer.writerow([name] + [v for lp in zip([self.class_names[c] for c in j], [f"{x:.6f}" for x in p])
                                          for v in lp])

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.param_groups(hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas))
        if hp.scheduler == "none":
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        warmup = hp.warmup_steps
        if warmup >= total:  # e.g. a short test run of a config made for a long one
            warmup = total // 2
            warnings.warn(f"warmup_steps={hp.warmup_steps} >= the run's {total} steps: warming up over {warmup}")
        sched = lr_schedule(opt, "cosine", total_steps=total, warmup_steps=warmup, min_lr_ratio=hp.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
