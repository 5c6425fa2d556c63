"""Semantic segmentation with the U-Net of Ronneberger et al. 2015.

Training follows the paper: pixel-wise softmax cross-entropy weighted by the weight map w(x)
(class balance + border term, computed by the datamodule), with the minus sign that Eq. 1 as printed
omits. Validation, test and predict segment whole images of any size with overlap-tile inference
(`zoo.models.unet.tiled_predict`), so they see what a user of the trained model sees.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from PIL import Image
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.segmentation import DiceScore

from zoo.models.unet import UNetConfig, seam_error, tiled_predict
from zoo.optim import check_schedule
from zoo.samples import colorize, log_image, to_rgb
from zoo.scaling import InputScaler
from zoo.tasks.base import ZooModule


class UNetSegmentation(ZooModule):
    """U-Net segmentation task.

    Args:
        net: the network's architecture (`zoo.models.unet.UNetConfig`: base_channels, depth, padding,
            padding_mode, norm, dropout); the default is the paper's network.
        in_channels, num_classes: the data's (num_classes follows data.num_classes).
        lr, momentum, weight_decay: the paper's SGD with momentum (norm weights and biases get no decay).
        scheduler: "none" or "cosine" (over the whole run).
        optimizer, lr_scheduler: injected instead of the preset (`ZooModule.configure_optimizers`),
            e.g. `--model.optimizer Adam --model.optimizer.lr 0.001`.
        tile: output tile side for overlap-tile inference in validation/test/predict (None: the
            function's default).
        seam_tile: tile side used to measure the seam error (tiled vs whole-image pass) on the first
            validation image each epoch; None skips it.
    """

    monitor = ("val/loss", "min")
    optimizer_preset = "sgd"

    def __init__(
        self,
        net: UNetConfig = UNetConfig(),
        in_channels: int = 1,
        num_classes: int = 2,
        lr: float = 0.01,
        momentum: float = 0.99,
        weight_decay: float = 0.0,
        scheduler: str = "none",
        tile: int | None = None,
        seam_tile: int | None = None,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ):
        super().__init__(optimizer, lr_scheduler)
        check_schedule(scheduler, ("none", "cosine"))
        net = UNetConfig.of(net)
        self.save_hyperparameters()
        self.net = net.build(in_channels=in_channels, num_classes=num_classes)
        self.input_scaler = InputScaler(in_channels)
        metrics = MetricCollection({
            "iou": MulticlassJaccardIndex(num_classes, average="none"),
            "dice": DiceScore(num_classes, average="none", input_format="index", aggregation_level="global"),
            "pixel_acc": MulticlassAccuracy(num_classes, average="micro"),
        })
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    # The network's geometry: the datamodule pads training crops by input_context (`zoo.data.contract`),
    # and `tiled_predict` / `seam_error` take the task itself, whose forward scales raw images.
    input_context = property(lambda self: self.net.input_context)
    stride = property(lambda self: self.net.stride)
    padding = property(lambda self: self.net.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) raw images -> (N, num_classes, H - 2c, W - 2c) logits (c = input_context)."""
        return self.net(self.input_scaler(x))

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) raw images of any size -> (N, num_classes, H, W) probabilities (overlap-tile; the
        scaler acts per pixel, so scaling first gives every tile what it would see scaled alone)."""
        return tiled_predict(self.net, self.input_scaler(images), tile=self.hparams.tile)

    @staticmethod
    def weighted_nll(log_probs: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The paper's energy: -mean over pixels of w(x) log p_l(x)(x)."""
        return (F.nll_loss(log_probs, mask, reduction="none") * weight).mean()

    def training_step(self, batch, batch_idx):
        logits = self(batch["image"])
        if logits.shape[-2:] != batch["mask"].shape[-2:]:
            raise ValueError(
                f"network output {tuple(logits.shape[-2:])} does not match the target crop "
                f"{tuple(batch['mask'].shape[-2:])}: the datamodule must add {self.input_context} px of "
                "context per side to each training crop"
            )
        loss = self.weighted_nll(F.log_softmax(logits, 1), batch["mask"], batch["weight"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def _evaluate(self, batch, metrics, stage: str) -> torch.Tensor:
        probs = self.predict_proba(batch["image"])
        loss = self.weighted_nll(probs.clamp_min(1e-12).log(), batch["mask"], batch["weight"])
        metrics.update(probs.argmax(1), batch["mask"])
        self.log(f"{stage}/loss", loss, batch_size=len(probs), prog_bar=stage == "val")
        return probs

    def _log_metrics(self, metrics, stage: str) -> None:
        values = metrics.compute()
        metrics.reset()
        iou, dice = values[f"{stage}/iou"], values[f"{stage}/dice"]
        fg = slice(1, None) if len(iou) > 1 else slice(None)
        self.log(f"{stage}/iou_fg", iou[fg].mean(), prog_bar=True)
        self.log(f"{stage}/dice_fg", dice[fg].mean())
        self.log(f"{stage}/pixel_acc", values[f"{stage}/pixel_acc"])
        for k in range(len(iou)):
            self.log(f"{stage}/iou_class{k}", iou[k])

    def validation_step(self, batch, batch_idx):
        probs = self._evaluate(batch, self.val_metrics, "val")
        if batch_idx == 0:
            image, mask, pred = batch["image"][0], batch["mask"][0], probs[0].argmax(0)
            panel = np.concatenate([to_rgb(image), colorize(mask.cpu().numpy()),
                                    colorize(pred.cpu().numpy())], axis=1)
            log_image(self, "val/image_truth_prediction", panel)
            if self.hparams.seam_tile:
                first = self.input_scaler(batch["image"][:1])
                self.log("val/seam_error", seam_error(self.net, first, self.hparams.seam_tile), batch_size=1)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch, batch_idx):
        return {"probs": self.predict_proba(batch["image"]), "name": batch["name"]}

    def write_predictions(self, outputs, batch, out_dir: Path) -> None:
        """Per image: `<name>_probs.npy` (num_classes, H, W) float32 probabilities, `<name>_mask.png`
        (colored argmax), and for two classes `<name>_prob.png` (foreground probability, 8-bit)."""
        for probs, name in zip(outputs["probs"], outputs["name"]):
            stem = Path(name).stem
            np.save(out_dir / f"{stem}_probs.npy", probs.float().cpu().numpy())
            Image.fromarray(colorize(probs.argmax(0).cpu().numpy())).save(out_dir / f"{stem}_mask.png")
            if probs.shape[0] == 2:
                fg = (probs[1] * 255).round().byte().cpu().numpy()
                Image.fromarray(fg).save(out_dir / f"{stem}_prob.png")
