"""Training augmentation of the U-Net paper (Ronneberger et al. 2015, Sec. 3.1), as torchvision v2
transforms: shifts, rotations, gray-value changes, and elastic deformation from random displacement
vectors on a coarse 3x3 grid (std 10 px), interpolated to every pixel bicubically.

Inputs are torchvision tv_tensors, transformed jointly with the same random parameters:

- `tv_tensors.Image` (C, H, W) raw intensities (any range, not [0, 1]): resampled bilinearly;
  gray-value changes apply to it.
- `tv_tensors.Mask` (H, W) or (N, H, W) class or instance ids: resampled with nearest neighbour, so
  only existing label values come out.
- `WeightMap` (a `tv_tensors.Image` subclass) (1, H, W) loss weights: resampled bilinearly (a weight
  is a smooth per-pixel quantity; nearest would make the thin high-weight membrane ridges blocky),
  left alone by gray-value changes.

Geometric transforms sample the input at `p + d(p)` for each output pixel p (the content moves by
-d), with mirror reflection beyond the border (grid_sample "reflection", align_corners=True: the
edge pixel is not repeated, like numpy's "reflect"), as the paper extrapolates missing context by
mirroring. torchvision's own `ElasticTransform` draws a Gaussian-smoothed per-pixel field, and
`RandomAffine` fills with a constant, so the geometric transforms here are written on a common
`GridWarp` base; `RandomWarp` composes rotation + shift + elastic grid into one resampling.

Randomness: each transform draws from its `generator` (a `torch.Generator`; None -> torch's global
RNG); `set_generator(transform, g)` sets it on a transform and everything it wraps.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = [
    "WeightMap", "GridWarp", "ElasticGrid", "RandomRigid", "RandomWarp", "GrayValue",
    "warp", "elastic_displacement", "rigid_displacement", "paper_augmentation", "set_generator",
]


class WeightMap(tv_tensors.Image):
    """A per-pixel loss weight map, (1, H, W) ((H, W) input gets the channel axis): resampled
    bilinearly by geometric transforms like an image, untouched by gray-value transforms."""


def _is_geometric_input(x: Any) -> bool:
    return isinstance(x, (tv_tensors.Image, tv_tensors.Mask)) or type(x) is torch.Tensor


def _spatial_size(flat_inputs: list[Any]) -> tuple[int, int]:
    sizes = {tuple(x.shape[-2:]) for x in flat_inputs if isinstance(x, torch.Tensor)}
    if len(sizes) != 1:
        raise ValueError(f"all images/masks/weights must share one spatial size (H, W); got {sorted(sizes)}")
    return sizes.pop()


def warp(x: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample x at p + displacement(p) with mirror reflection beyond the border.

    Args:
        x: (..., H, W) any dtype; integer tensors (masks) need mode="nearest".
        displacement: (2, H, W) (dy, dx) in pixels; output[..., y, x] = x[..., y + dy, x + dx].
        mode: "bilinear" or "nearest" ("nearest" returns the input's values only, same dtype).

    Returns:
        (..., H, W), same dtype as x.
    """
    h, w = x.shape[-2:]
    if displacement.shape != (2, h, w):
        raise ValueError(f"displacement must be (2, {h}, {w}), got {tuple(displacement.shape)}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode {mode!r} is not 'bilinear' or 'nearest'")
    if not x.is_floating_point() and mode != "nearest":
        raise ValueError(f"integer tensors ({x.dtype}) must be resampled with mode='nearest'")
    work = torch.float64 if (not x.is_floating_point() or x.dtype == torch.float64) else torch.float32
    ys = torch.arange(h, dtype=work).view(h, 1) + displacement[0].to(work)
    xs = torch.arange(w, dtype=work).view(1, w) + displacement[1].to(work)
    grid = torch.stack([2 * xs / max(w - 1, 1) - 1, 2 * ys / max(h - 1, 1) - 1], -1)[None]  # (1, H, W, 2)
    flat = x.reshape(1, -1, h, w).to(work)
    out = F.grid_sample(flat, grid, mode=mode, padding_mode="reflection", align_corners=True)
    if not x.is_floating_point():
        out = out.round()
    return out.to(x.dtype).reshape(x.shape)


def elastic_displacement(size: tuple[int, int], std: float = 10.0, grid: int = 3,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's elastic field: (dy, dx) vectors ~ N(0, std^2) px on a coarse grid x grid set of
    nodes spanning the image (corners included), upsampled bicubically to every pixel.
    Returns (2, H, W) float32; at the nodes it equals the sampled vectors."""
    h, w = size
    nodes = torch.randn(1, 2, grid, grid, generator=generator) * std
    return F.interpolate(nodes, size=(h, w), mode="bicubic", align_corners=True)[0]


def rigid_displacement(size: tuple[int, int], angle: float, shift: tuple[float, float]) -> torch.Tensor:
    """(2, H, W) displacement of a rotation by `angle` degrees about the image centre followed by a
    translation by `shift` = (dy, dx) px: the content rotates counter-clockwise (as displayed, y down)
    and moves by +shift."""
    h, w = size
    cy, cx = (h - 1) / 2, (w - 1) / 2
    ys = torch.arange(h, dtype=torch.float64).view(h, 1).expand(h, w) - cy - shift[0]
    xs = torch.arange(w, dtype=torch.float64).view(1, w).expand(h, w) - cx - shift[1]
    a = math.radians(angle)
    # source = R(angle) (p - c - shift) + c, in (x, y) with y down
    sx = math.cos(a) * xs - math.sin(a) * ys + cx
    sy = math.sin(a) * xs + math.cos(a) * ys + cy
    p_y = torch.arange(h, dtype=torch.float64).view(h, 1)
    p_x = torch.arange(w, dtype=torch.float64).view(1, w)
    return torch.stack([sy - p_y, sx - p_x]).float()


class GridWarp(v2.Transform):
    """Base of the geometric transforms: subclasses return a (2, H, W) displacement (or None for the
    identity, which returns the inputs unchanged) from `displacement(size, generator)`; every Image,
    WeightMap and Mask is resampled through it (bilinear / bilinear / nearest)."""

    _transformed_types = (_is_geometric_input,)

    def __init__(self, generator: torch.Generator | None = None):
        super().__init__()
        self.generator = generator

    def displacement(self, size: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor | None:
        raise NotImplementedError

    def check_inputs(self, flat_inputs: list[Any]) -> None:
        for x in flat_inputs:
            if isinstance(x, tv_tensors.TVTensor) and not isinstance(x, (tv_tensors.Image, tv_tensors.Mask)):
                raise TypeError(f"{type(self).__name__} handles Image, Mask and WeightMap, not {type(x).__name__}")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"displacement": self.displacement(_spatial_size(flat_inputs), self.generator)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        d = params["displacement"]
        if d is None:
            return inpt
        mode = "nearest" if isinstance(inpt, tv_tensors.Mask) else "bilinear"
        out = warp(inpt.as_subclass(torch.Tensor), d, mode=mode)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class ElasticGrid(GridWarp):
    """The paper's elastic deformation: displacement vectors ~ N(0, std^2) px on a coarse grid x grid
    grid spanning the image, bicubically interpolated (see `elastic_displacement`). std=0: identity."""

    def __init__(self, std: float = 10.0, grid: int = 3, generator: torch.Generator | None = None):
        super().__init__(generator)
        if std < 0 or grid < 2:
            raise ValueError(f"need std >= 0 and grid >= 2, got std={std}, grid={grid}")
        self.std, self.grid = float(std), int(grid)

    def displacement(self, size, generator):
        if self.std == 0:
            return None
        return elastic_displacement(size, self.std, self.grid, generator)


class RandomRigid(GridWarp):
    """Rotation by U(-degrees, degrees) about the centre and shift by U(-max_shift, max_shift) px per
    axis, mirror-extended beyond the border."""

    def __init__(self, degrees: float = 180.0, max_shift: float = 10.0, generator: torch.Generator | None = None):
        super().__init__(generator)
        self.degrees, self.max_shift = float(degrees), float(max_shift)

    def _draw(self, generator) -> tuple[float, tuple[float, float]]:
        r = torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1
        return float(r[0]) * self.degrees, (float(r[1]) * self.max_shift, float(r[2]) * self.max_shift)

    def displacement(self, size, generator):
        if self.degrees == 0 and self.max_shift == 0:
            return None
        angle, shift = self._draw(generator)
        return rigid_displacement(size, angle, shift)


class RandomWarp(RandomRigid):
    """Rotation + shift (`RandomRigid`) and the 3x3-grid elastic deformation (`ElasticGrid`) in one
    resampling: output(p) = input(A(p + e(p))), A the rigid map, e the elastic field."""

    def __init__(self, elastic_std: float = 10.0, grid: int = 3, degrees: float = 180.0, max_shift: float = 10.0,
                 generator: torch.Generator | None = None):
        super().__init__(degrees, max_shift, generator)
        if elastic_std < 0 or grid < 2:
            raise ValueError(f"need elastic_std >= 0 and grid >= 2, got {elastic_std}, {grid}")
        self.elastic_std, self.grid = float(elastic_std), int(grid)

    def displacement(self, size, generator):
        rigid = self.degrees != 0 or self.max_shift != 0
        if not rigid and self.elastic_std == 0:
            return None
        h, w = size
        e = (elastic_displacement(size, self.elastic_std, self.grid, generator) if self.elastic_std
             else torch.zeros(2, h, w))
        if not rigid:
            return e
        angle, shift = self._draw(generator)
        # A(q) for q = p + e(p): A(q) = R(q - c - shift) + c
        a = math.radians(angle)
        cy, cx = (h - 1) / 2, (w - 1) / 2
        qy = torch.arange(h, dtype=torch.float32).view(h, 1) + e[0] - cy - shift[0]
        qx = torch.arange(w, dtype=torch.float32).view(1, w) + e[1] - cx - shift[1]
        sy = math.sin(a) * qx + math.cos(a) * qy + cy
        sx = math.cos(a) * qx - math.sin(a) * qy + cx
        return torch.stack([sy - torch.arange(h, dtype=torch.float32).view(h, 1),
                            sx - torch.arange(w, dtype=torch.float32).view(1, w)])


def _is_gray_input(x: Any) -> bool:
    return (isinstance(x, tv_tensors.Image) and not isinstance(x, WeightMap)) or type(x) is torch.Tensor


class GrayValue(v2.Transform):
    """Random gray-value changes of raw-intensity images (any range): with lo, hi the image's own
    min and max, x -> t = (x - lo) / (hi - lo); t -> t^gamma (gamma log-uniform in
    [1/(1+gamma), 1+gamma]); t -> mean + c (t - mean) (c ~ U(1-contrast, 1+contrast)); t -> t + b
    (b ~ U(-brightness, brightness), a fraction of the range); back to lo + (hi - lo) t. Not clipped.
    Masks and WeightMaps pass through unchanged."""

    _transformed_types = (_is_gray_input,)

    def __init__(self, brightness: float = 0.1, contrast: float = 0.2, gamma: float = 0.3,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.brightness, self.contrast, self.gamma = float(brightness), float(contrast), float(gamma)
        self.generator = generator

    def make_params(self, flat_inputs):
        r = torch.rand(3, generator=self.generator, dtype=torch.float64) * 2 - 1
        return {"gamma": math.exp(float(r[0]) * math.log1p(self.gamma)),
                "contrast": 1 + float(r[1]) * self.contrast, "brightness": float(r[2]) * self.brightness}

    def transform(self, inpt, params):
        x = inpt.as_subclass(torch.Tensor)
        if not x.is_floating_point():
            x = x.float()
        lo, hi = x.min(), x.max()
        span = (hi - lo).clamp_min(1e-12)
        t = ((x - lo) / span).clamp(0, 1) ** params["gamma"]
        t = t.mean() + params["contrast"] * (t - t.mean()) + params["brightness"]
        out = lo + span * t
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def paper_augmentation(elastic_std: float = 10.0, grid: int = 3, degrees: float = 180.0, max_shift: float = 10.0,
                       gray: bool = True, generator: torch.Generator | None = None) -> v2.Compose:
    """The paper's augmentation: `RandomWarp` (rotation, shift, 3x3-grid elastic field, one
    resampling) then `GrayValue` on the image."""
    ts: list = [RandomWarp(elastic_std, grid, degrees, max_shift, generator)]
    if gray:
        ts.append(GrayValue(generator=generator))
    return v2.Compose(ts)


def set_generator(transform: Any, generator: torch.Generator | None) -> Any:
    """Set `generator` on `transform` and every transform it wraps (v2.Compose etc.). Returns it."""
    seen = set()

    def visit(t):
        if id(t) in seen:
            return
        seen.add(id(t))
        if hasattr(t, "generator"):
            t.generator = generator
        for child in getattr(t, "transforms", ()) or ():
            visit(child)
        if isinstance(t, torch.nn.Module):
            for child in t.children():
                visit(child)

    visit(transform)
    return transform
