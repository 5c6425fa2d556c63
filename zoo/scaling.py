"""Data-side input scalings, fitted per channel on the training split and carried in checkpoints.

`InputScaler` is an `nn.Module` so its statistics are buffers (saved in the state dict, moved with
`.to(device)`) and its `kind` and `fitted` flag travel as plain extra state. A datamodule fits one on
its training split; the LightningModule `copy_from`s it and applies it in `forward`, so inference
takes raw inputs.

Kinds (statistics per channel, over the whole training split):

| kind     | shift            | scale                              | effect on training data      |
|----------|------------------|------------------------------------|------------------------------|
| "none"   | 0                | 1                                  | identity                     |
| "minmax" | min              | max - min                          | exactly [0, 1] (no clipping) |
| "zscore" | mean             | population std (ddof=0)            | mean 0, std 1                |
| "robust" | median           | IQR = q75 - q25 (linear interp.)   | median 0, IQR 1              |

forward: `(x - shift) / scale`; inverse: `y * scale + shift`.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

SCALER_KINDS = ("none", "minmax", "zscore", "robust")

# torch.quantile has refused inputs of more than 2**24 elements (the limit is gone on CPU in recent
# torch, but not documented as lifted everywhere). We keep the cap regardless: it bounds the float64
# sort and gives the same statistics whatever torch version or device computes them.
QUANTILE_MAX_VALUES = 2**24


def _check_kind(kind: str) -> str:
    if kind not in SCALER_KINDS:
        raise ValueError(f"unknown scaler kind {kind!r}; expected one of {SCALER_KINDS}")
    return kind


class InputScaler(nn.Module):
    """Per-channel affine input scaling `(x - shift) / scale`, fitted on the training split.

    Args:
        num_channels: C, the number of channels.
        kind: one of `SCALER_KINDS` ("none", "minmax", "zscore", "robust").
        channel_dim: the channel axis of the tensors given to `forward`/`inverse`/`fit`, e.g. 1 for
            images (N, C, H, W), -1 for sequences (N, L, C). Not saved in the state dict: it is a
            property of the layout the owner feeds in, like `num_channels`.

    Buffers `shift`, `scale`: (C,) float32, initialised to 0 and 1, so a scaler built before fitting
    can load any fitted state dict with the same C (the state dict also restores `kind`/`fitted`).
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, num_channels: int, kind: str = "none", channel_dim: int = 1):
        super().__init__()
        if not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        self.num_channels = num_channels
        self.kind = _check_kind(kind)
        self.channel_dim = channel_dim
        # "none" needs no statistics; every other kind must see the training split first.
        self.fitted = kind == "none"
        self.register_buffer("shift", torch.zeros(num_channels, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(num_channels, dtype=torch.float32))

    # ---------------------------------------------------------------- apply

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: any rank, C at `channel_dim` -> `(x - shift) / scale`, same shape, in the scaler's dtype
        (the model's: float32 unless it was converted), whatever the input's: uint8 images and float64
        arrays (numpy's default) go into a float32 network as they are."""
        self._check_usable()
        shift, scale = self._broadcast(x)
        return ((x - shift) / scale).to(self.shift.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """y: any rank, C at `channel_dim` -> `y * scale + shift`, same shape (undoes `forward`)."""
        self._check_usable()
        shift, scale = self._broadcast(y)
        return y * scale + shift

    def _check_usable(self) -> None:
        if not self.fitted:
            raise RuntimeError(
                f"InputScaler(kind={self.kind!r}) is not fitted: call .fit(...) on the training split "
                "(or copy_from a fitted scaler / load a fitted state dict) before using it"
            )

    def _broadcast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """shift, scale viewed as (1, .., C, .., 1) to broadcast against x along `channel_dim`."""
        dim = self._channel_axis(x, self.channel_dim)
        shape = [1] * x.ndim
        shape[dim] = self.num_channels
        return self.shift.view(shape), self.scale.view(shape)

    def _channel_axis(self, x: torch.Tensor, channel_dim: int) -> int:
        """The non-negative channel axis of x, after checking it exists and has size C."""
        if not -x.ndim <= channel_dim < x.ndim:
            raise ValueError(
                f"InputScaler expects {self.num_channels} channels at channel_dim={channel_dim}, "
                f"got a tensor of shape {tuple(x.shape)} with no such axis"
            )
        dim = channel_dim % x.ndim
        if x.shape[dim] != self.num_channels:
            raise ValueError(  # a checkpoint's model meeting other data: say what it takes
                f"the input has {x.shape[dim]} channel(s) (shape {tuple(x.shape)}, channel_dim={channel_dim}), "
                f"the model takes {self.num_channels}: its input scaler holds statistics of {self.num_channels} "
                f"channel(s); give {self.num_channels}-channel inputs"
            )
        return dim

    # ---------------------------------------------------------------- fit

    def fit(self, data: torch.Tensor | Iterable[torch.Tensor], *, unbatched: bool = False) -> InputScaler:
        """Compute shift/scale per channel from the training split, in float64. Returns self.

        Args:
            data: one tensor, or an iterable of tensors (e.g. a list of images of different sizes,
                or a generator over batches; it is consumed once). Each tensor has C at `channel_dim`,
                the same layout `forward` sees, e.g. (N, C, H, W) or (1, C, H, W) chunks.
            unbatched: if True, each tensor is a single sample without the leading batch axis, e.g.
                (C, H, W) images for a `channel_dim=1` scaler: its channel axis is then
                `channel_dim - 1` (a negative `channel_dim` is used as is).

        Every value of every tensor counts once (images of different sizes are weighted by pixel).
        Constant channels (zero spread) get scale 1 and a warning; NaN/inf raises ValueError.
        """
        dim = self.channel_dim
        if unbatched and dim >= 0:
            if dim == 0:
                raise ValueError("unbatched=True needs a batch axis before the channel axis; channel_dim is 0")
            dim -= 1
        single = isinstance(data, (torch.Tensor, np.ndarray))
        chunks = (data,) if single else data

        stats = _Streaming(self.num_channels) if self.kind in ("none", "minmax", "zscore") else None
        rows: list[torch.Tensor] = []  # robust: every value, (C, n_i) per chunk, kept in input dtype
        for i, chunk in enumerate(chunks):
            if not isinstance(chunk, torch.Tensor):
                chunk = torch.as_tensor(chunk)
            axis = self._channel_axis(chunk, dim)
            flat = chunk.detach().movedim(axis, 0).reshape(self.num_channels, -1)  # (C, n_i)
            if flat.shape[1] == 0:
                continue
            bad = ~torch.isfinite(flat).all(dim=1) if flat.is_floating_point() else None
            if bad is not None and bad.any():
                raise ValueError(
                    f"InputScaler.fit: non-finite values (NaN/inf) in channel(s) "
                    f"{bad.nonzero().flatten().tolist()}" + ("" if single else f" of data item {i}")
                )
            if stats is not None:
                stats.update(flat.to(torch.float64))
            else:
                rows.append(flat.cpu())

        empty = stats.count == 0 if stats is not None else not rows
        if empty:
            raise ValueError("InputScaler.fit: got no values to fit on (empty data)")

        if self.kind == "none":
            shift = torch.zeros(self.num_channels, dtype=torch.float64)
            scale = torch.ones(self.num_channels, dtype=torch.float64)
        elif self.kind == "minmax":
            shift, scale = stats.min, stats.max - stats.min
        elif self.kind == "zscore":
            shift, scale = stats.mean, (stats.m2 / stats.count).sqrt()  # population std (ddof=0)
            # Rounding in the mean can leave a tiny nonzero std on a constant channel; max == min is exact.
            scale = torch.where(stats.max == stats.min, torch.zeros_like(scale), scale)
        else:
            shift, scale = self._robust(torch.cat(rows, dim=1))

        zero = scale == 0
        if zero.any():
            spread = {"minmax": "max == min", "zscore": "std == 0", "robust": "IQR = q75 - q25 == 0"}[self.kind]
            warnings.warn(
                f"InputScaler(kind={self.kind!r}).fit: channel(s) {zero.nonzero().flatten().tolist()} "
                f"have zero spread ({spread}); using scale 1 for them (they are only shifted)",
                stacklevel=2,
            )
            scale = torch.where(zero, torch.ones_like(scale), scale)

        self.shift.copy_(shift)
        self.scale.copy_(scale)
        self.fitted = True
        return self

    def _robust(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """values: (C, M) -> (median, IQR), each (C,) float64."""
        m = values.shape[1]
        if m > QUANTILE_MAX_VALUES:
            # Deterministic, evenly strided subsample: every `stride`-th value, at most the cap.
            stride = math.ceil(m / QUANTILE_MAX_VALUES)
            values = values[:, ::stride]
            warnings.warn(
                f"InputScaler(kind='robust').fit: {m} values per channel exceed the quantile limit of "
                f"{QUANTILE_MAX_VALUES}; median/IQR are computed on an evenly strided subsample "
                f"(one value in every {stride}, {values.shape[1]} per channel), so they are approximate",
                stacklevel=3,
            )
        q = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        # One channel at a time keeps each quantile call under the cap and the float64 copy small.
        per_channel = torch.stack([torch.quantile(row.to(torch.float64), q) for row in values])  # (C, 3)
        return per_channel[:, 1], per_channel[:, 2] - per_channel[:, 0]

    # ---------------------------------------------------------------- state

    def copy_from(self, other: InputScaler) -> InputScaler:
        """Take kind, fitted flag, shift and scale from another scaler (e.g. the datamodule's).

        `channel_dim` is kept: each owner states its own layout. Returns self.
        """
        if not isinstance(other, InputScaler):
            raise TypeError(f"copy_from expects an InputScaler, got {type(other).__name__}")
        if other.num_channels != self.num_channels:
            raise ValueError(
                f"copy_from: this scaler has {self.num_channels} channels, the other has {other.num_channels}"
            )
        self.kind = other.kind
        self.fitted = other.fitted
        with torch.no_grad():
            self.shift.copy_(other.shift)
            self.scale.copy_(other.scale)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        # Plain str/bool only, so torch.load(weights_only=True) reads it back.
        return {"kind": self.kind, "fitted": self.fitted}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.kind = _check_kind(state["kind"])
        self.fitted = bool(state["fitted"])

    def extra_repr(self) -> str:
        return (f"num_channels={self.num_channels}, kind={self.kind!r}, channel_dim={self.channel_dim}, "
                f"fitted={self.fitted}")


class _Streaming:
    """Running per-channel count, min, max, mean and M2 (sum of squared deviations), float64.

    Chunks are merged with Chan et al.'s parallel update, which avoids the cancellation of a naive
    sum-of-squares on large, offset data (e.g. raw 0..255 images).
    """

    def __init__(self, num_channels: int):
        self.count = 0
        self.min = torch.full((num_channels,), math.inf, dtype=torch.float64)
        self.max = torch.full((num_channels,), -math.inf, dtype=torch.float64)
        self.mean = torch.zeros(num_channels, dtype=torch.float64)
        self.m2 = torch.zeros(num_channels, dtype=torch.float64)

    def update(self, flat: torch.Tensor) -> None:
        """flat: (C, n) float64 values of one chunk (any device; statistics are kept on the CPU)."""
        n = flat.shape[1]
        mean = flat.mean(dim=1)
        m2 = ((flat - mean[:, None]) ** 2).sum(dim=1).cpu()
        mean = mean.cpu()
        self.min = torch.minimum(self.min, flat.amin(dim=1).cpu())
        self.max = torch.maximum(self.max, flat.amax(dim=1).cpu())
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total
