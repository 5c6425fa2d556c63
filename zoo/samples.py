"""What a run shows of its predictions while it trains: images and text samples saved under
`<run dir>/samples/` (linked from the report) and logged to the loggers that take them (wandb), and
the renderings the image tasks use for them."""
from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw

# Colors for class ids 0..7 in mask PNGs and sample panels (background black).
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240]], dtype=np.uint8)


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8."""
    return PALETTE[mask % len(PALETTE)]


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) raw image -> (H, W, 3) uint8, min-max stretched for display (C != 3: the channel mean, gray)."""
    x = image.float().mean(0, keepdim=True).expand(3, -1, -1) if image.shape[0] != 3 else image.float()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    return (x * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def image_grid(images: torch.Tensor, captions: list[str], correct: list[bool], columns: int = 8) -> np.ndarray:
    """Raw images (N, C, H, W) -> (rows * (H + 12), columns * W, 3) uint8 (`to_rgb` tiles), each tile
    framed green (correct) or red (wrong) with its caption below."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = Image.new("RGB", (columns * w, rows * (h + 12)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, columns)
        left, top = c * w, r * (h + 12)
        canvas.paste(Image.fromarray(to_rgb(images[i])), (left, top))
        draw.rectangle([left, top, left + w - 1, top + h - 1], outline=(0, 170, 0) if correct[i] else (220, 0, 0))
        draw.text((left + 1, top + h), captions[i][: max(1, w // 6)], fill=(0, 0, 0))
    return np.asarray(canvas)


def _sample_path(module: L.LightningModule, key: str, suffix: str) -> Path | None:
    """`<run dir>/samples/<key>_epoch<E>_step<S><suffix>` in fit, `<run dir>/<stage>/samples/...` in
    validate or test (which must not overwrite the training run's), or None where samples are not
    written (no trainer, sanity check, not rank zero)."""
    if module._trainer is None or module.trainer.sanity_checking or not module.trainer.is_global_zero:
        return None
    stem = re.sub(r"[^\w.=-]+", "_", key).strip("_")  # a plain file name: it is linked from report.md
    stage = module.trainer.state.fn.value  # fit, validate, test
    folder = Path(module.trainer.default_root_dir) / ("" if stage == "fit" else stage) / "samples"
    # one file per validation (several may fall in one epoch); sorted by name, the newest comes last
    path = folder / f"{stem}_epoch{module.current_epoch:03d}_step{module.global_step:07d}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _logger_step(module: L.LightningModule) -> int:
    """The step Lightning logs this moment's metrics at (the batches that stepped before the current
    one, private: no public name), so that a validation's samples sit at its metrics' step in wandb."""
    return module.trainer.fit_loop.epoch_loop._batches_that_stepped


def log_image(module: L.LightningModule, key: str, image: np.ndarray) -> Path | None:
    """Saves an (H, W, 3) uint8 image as `<run dir>/samples/<key>_epoch<E>_step<S>.png` and logs it to
    image-capable loggers (wandb). Rank zero only."""
    path = _sample_path(module, key, ".png")
    if path is None:
        return None
    Image.fromarray(image).save(path)
    for logger in module.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[image], step=_logger_step(module))
    return path


def log_text(module: L.LightningModule, key: str, columns: list[str], rows: list[list[str]]) -> Path | None:
    """Saves text samples (e.g. prompt / continuation) as `<run dir>/samples/<key>_epoch<E>_step<S>.txt`
    (one block per row) and logs them as a table to text-capable loggers (wandb). Rank zero only."""
    path = _sample_path(module, key, ".txt")
    if path is None:
        return None
    blocks = ["\n".join(f"{c}: {v}" for c, v in zip(columns, row)) for row in rows]
    path.write_text("\n\n".join(blocks) + "\n")
    for logger in module.loggers:
        if hasattr(logger, "log_text"):
            logger.log_text(key=key, columns=columns, data=rows, step=_logger_step(module))
    return path
