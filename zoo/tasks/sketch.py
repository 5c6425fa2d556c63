"""Sketch-RNN training (Ha & Eck 2017) as a zoo task.

Loss = L_R + eta_step * max(L_KL, kl_tolerance), L_R = L_s + L_p (`zoo.models.sketch_rnn`), with the
official per-step schedules: eta_step = kl_weight - (kl_weight - kl_weight_start) * kl_decay_rate^step
and lr_step = (lr - min_lr) * decay_rate^step + min_lr (`zoo.optim.lr_schedule(..., "exponential")`).
Adam; the official per-element gradient clipping to +-1 is the trainer's `gradient_clip_val: 1.0`,
`gradient_clip_algorithm: value` (configs/sketch_rnn.yaml).

Batches carry raw offsets; the module divides them by `scale_factor`, a buffer copied from the
datamodule (the std of the training offsets) in setup("fit") and saved in the checkpoint, and
multiplies generated offsets by it, so a loaded checkpoint takes and returns raw pen offsets.

Logged: train/L_R, train/L_s, train/L_p, train/L_KL (before the tolerance floor), train/kl_weight,
train/loss; val/L_R (pen loss masked to real steps, as the official evaluation), val/L_s, val/L_p,
val/L_KL, val/loss = val/L_R + kl_weight * max(val/L_KL, kl_tolerance) (the final weight, so epochs
compare). Each validation epoch logs images: inputs above their reconstructions, and samples.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from PIL import Image

from zoo.data.sketches import render_sketches, sketches_to_svg, stroke5_to_stroke3
from zoo.models.sketch_rnn import SketchRNNConfig, kl_divergence, kl_weight_schedule, reconstruction_loss
from zoo.samples import log_image
from zoo.tasks.base import ZooModule


class SketchRNNTask(ZooModule):
    """Sketch-RNN VAE task. Defaults are magenta's `get_default_hparams()`.

    Args:
        net: the network's architecture (`zoo.models.sketch_rnn.SketchRNNConfig`: enc_rnn_size,
            dec_rnn_size, z_size, num_mixture, norm, recurrent_dropout, conditional).
        max_seq_len: the longest sketch, the network's max_seq_len (follows data.max_seq_len).
        lr, min_lr, decay_rate: Adam learning rate and its exponential decay per step (the preset).
        optimizer, lr_scheduler: injected instead of the preset (`ZooModule.configure_optimizers`).
        kl_weight, kl_weight_start, kl_decay_rate, kl_tolerance: the KL term's annealed weight and floor.
        temperature: sampling temperature of the validation images and `predict`.
        num_images: sketches per validation image (inputs, reconstructions, samples).
        sigma_temperature: "paper" (variance * tau) or "official" (sigma * tau) when sampling.
    """

    monitor = ("val/loss", "min")
    optimizer_preset, schedule_preset = "adam", "exponential"

    def __init__(
        self,
        net: SketchRNNConfig = SketchRNNConfig(),
        max_seq_len: int = 250,
        lr: float = 1e-3,
        min_lr: float = 1e-5,
        decay_rate: float = 0.9999,
        kl_weight: float = 0.5,
        kl_weight_start: float = 0.01,
        kl_decay_rate: float = 0.99995,
        kl_tolerance: float = 0.2,
        temperature: float = 0.25,
        num_images: int = 8,
        sigma_temperature: str = "paper",
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ):
        super().__init__(optimizer, lr_scheduler)
        if not 0 < min_lr <= lr:
            raise ValueError(f"need 0 < min_lr <= lr, got lr={lr}, min_lr={min_lr}")
        net = SketchRNNConfig.of(net)
        self.save_hyperparameters()
        self.net = net.build(max_seq_len=max_seq_len)
        self.register_buffer("scale_factor", torch.tensor(1.0))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        info = self.data_info()
        if stage == "fit" and info.scale_factor is not None:
            self.scale_factor.fill_(float(info.scale_factor))
        steps = info.seq_len
        if steps is not None and steps > self.hparams.max_seq_len + 1:
            raise ValueError(f"the data's longest sketch needs {steps} decoder steps but the model's max_seq_len="
                             f"{self.hparams.max_seq_len} allows {self.hparams.max_seq_len + 1}; set "
                             "--model.max_seq_len to the data's --data.max_seq_len")

    # ---- units
    def normalize(self, strokes: torch.Tensor) -> torch.Tensor:
        """Raw stroke-5 offsets -> model units (dx, dy divided by the scale factor); `denormalize` inverts."""
        return torch.cat([strokes[..., :2] / self.scale_factor, strokes[..., 2:]], -1)

    def denormalize(self, strokes: torch.Tensor) -> torch.Tensor:
        return torch.cat([strokes[..., :2] * self.scale_factor, strokes[..., 2:]], -1)

    def forward(self, strokes: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw stroke-5 batch (B, N + 1, 5), lengths (B,) -> SketchRNN outputs (model units)."""
        return self.net(self.normalize(strokes), lengths)

    # ---- losses
    def losses(self, batch, mask_pen: bool, kl_weight: float) -> dict[str, torch.Tensor]:
        """L_s, L_p, L_R, L_KL (VAE only) and loss = L_R + kl_weight * max(L_KL, kl_tolerance)."""
        strokes = self.normalize(batch["strokes"])
        out = self.net(strokes, batch["lengths"])
        l_s, l_p = reconstruction_loss(self.net.params(out["out"]), strokes[:, 1:], mask_pen=mask_pen)
        result = {"L_s": l_s, "L_p": l_p, "L_R": l_s + l_p, "loss": l_s + l_p}
        if self.net.conditional:
            result["L_KL"] = kl_divergence(out["mu"], out["presig"])
            result["loss"] = result["L_R"] + kl_weight * torch.clamp(result["L_KL"], min=self.hparams.kl_tolerance)
        return result

    def _log_losses(self, parts: dict[str, torch.Tensor], stage: str, batch_size: int) -> None:
        for k, v in parts.items():
            self.log(f"{stage}/{k}", v, batch_size=batch_size, prog_bar=k == "L_R" or (stage, k) == ("train", "L_KL"))

    def training_step(self, batch, batch_idx):
        # Recurrent dropout and the draw of z: the CLI's StepSeed seeds them per batch for exact resume.
        hp = self.hparams
        klw = kl_weight_schedule(self.global_step, hp.kl_weight, hp.kl_weight_start, hp.kl_decay_rate)
        parts = self.losses(batch, mask_pen=False, kl_weight=klw)
        if self.net.conditional:
            self.log("train/kl_weight", klw, batch_size=len(batch["lengths"]))
        self._log_losses(parts, "train", len(batch["lengths"]))
        return parts["loss"]

    def _evaluate(self, batch, stage: str):
        parts = self.losses(batch, mask_pen=True, kl_weight=self.hparams.kl_weight)  # the final weight: epochs compare
        self._log_losses(parts, stage, len(batch["lengths"]))

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")
        if batch_idx == 0:
            self._log_images(batch)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    # ---- generation (raw units in and out)
    def _decode(self, decode, *args, temperature: Optional[float] = None, **kw) -> list[np.ndarray]:
        """A decoding method of the network at the task's sampling settings -> raw stroke-3 sketches."""
        t = self.hparams.temperature if temperature is None else temperature
        out, n = decode(*args, temperature=t, sigma_temperature=self.hparams.sigma_temperature, **kw)
        return stroke5_to_stroke3(self.denormalize(out), n)

    def generate(self, num: int, **kw) -> list[np.ndarray]:
        """Unconditional samples (z ~ N(0, I) for the VAE; or given `z`) -> raw stroke-3 sketches;
        `temperature`, `generator` and the network's other sampling arguments as keywords."""
        return self._decode(self.net.sample, num=num, **kw)

    def reconstruct(self, strokes: torch.Tensor, lengths: torch.Tensor, **kw) -> list[np.ndarray]:
        """Conditional reconstructions of a raw stroke-5 batch -> raw stroke-3 sketches."""
        return self._decode(self.net.reconstruct, self.normalize(strokes), lengths, **kw)

    def interpolate(self, strokes: torch.Tensor, lengths: torch.Tensor, steps: int = 8, **kw) -> list[np.ndarray]:
        """Sketches decoded along the latent path between the first two sketches of a raw batch."""
        return self._decode(self.net.interpolate, self.normalize(strokes), lengths, steps, **kw)

    def _log_images(self, batch) -> None:
        if self._trainer is None or self.trainer.sanity_checking:
            return
        k = min(self.hparams.num_images, len(batch["lengths"]))
        g = torch.Generator(device=self.device).manual_seed(0)
        samples = self.generate(k, generator=g)
        log_image(self, "val/samples", render_sketches(samples, columns=k))
        if self.net.conditional:
            inputs = stroke5_to_stroke3(batch["strokes"][:k, 1:], batch["lengths"][:k])
            recon = self.reconstruct(batch["strokes"][:k], batch["lengths"][:k], generator=g)
            log_image(self, "val/reconstructions",  # inputs in the top row, reconstructions below
                           render_sketches(inputs + recon, columns=k))

    # ---- predict
    def predict_step(self, batch, batch_idx):
        g = torch.Generator(device=self.device).manual_seed(batch_idx)
        B = len(batch["lengths"])
        out = {"batch_idx": batch_idx, "inputs": stroke5_to_stroke3(batch["strokes"][:, 1:], batch["lengths"]),
               "samples": self.generate(B, generator=g)}
        if self.net.conditional:
            out["reconstructions"] = self.reconstruct(batch["strokes"], batch["lengths"], generator=g)
            if B >= 2:
                out["interpolation"] = self.interpolate(batch["strokes"], batch["lengths"], generator=g)
        return out

    def write_predictions(self, outputs, batch, out_dir: Path) -> None:
        """Per predicted batch i: `batch{i:03d}_{inputs,reconstructions,samples,interpolation}.svg|.png`
        grids of raw-unit sketches, and the generated stroke-3 sketches in `batch{i:03d}_generated.npz`:
        `samples` / `reconstructions` (P, 3) float32, their points end to end, and `samples_lengths` /
        `reconstructions_lengths` (N,) int64, each sketch's number of points."""
        i = outputs["batch_idx"]
        for key in ("inputs", "reconstructions", "samples", "interpolation"):
            if key in outputs:
                sketches = outputs[key]
                columns = len(sketches) if key == "interpolation" else 10
                (out_dir / f"batch{i:03d}_{key}.svg").write_text(sketches_to_svg(sketches, columns=columns))
                Image.fromarray(render_sketches(sketches, columns=columns)).save(out_dir / f"batch{i:03d}_{key}.png")
        # plain number arrays (points end to end, and each sketch's length), so that reading them back
        # needs no pickle: np.split(f["samples"], np.cumsum(f["samples_lengths"])[:-1])
        arrays = {}
        for k in ("reconstructions", "samples"):
            if k in outputs:
                arrays[k] = np.concatenate([np.zeros((0, 3), np.float32), *outputs[k]]).astype(np.float32)
                arrays[f"{k}_lengths"] = np.array([len(s) for s in outputs[k]], dtype=np.int64)
        np.savez_compressed(out_dir / f"batch{i:03d}_generated.npz", **arrays)
