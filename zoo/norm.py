"""Normalization layers by name: `build_norm(kind, num_features, layout)`.

A norm is passed around the zoo as a plain string and built here, so a model can swap batch norm for
group norm (or your own) from the command line. Every module is a thin, shape-checked wrapper around
the fused kernel torch or timm already has (F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm,
F.rms_norm, timm's rms_norm2d); there are no hand-written reductions here.

Layouts (C = `num_features`):
    "nchw": conv feature maps (N, C, H, W); any (N, C, *spatial) with 2+ spatial dims, e.g. (N, C, D, H, W)
    "nlc":  token sequences (N, L, C)
    "nc":   vectors (N, C)

Kinds (statistics are computed over, per layout nchw / nlc / nc):
    batch     per channel, over (N, H, W) / (N, L) / (N); running stats for eval. An `nn.BatchNorm2d`
              (nchw) or `nn.BatchNorm1d` (nc) subclass, so `nn.SyncBatchNorm.convert_sync_batchnorm`
              converts it and checkpoints keep torch's keys. For nlc it is `BatchNormNLC`, a transpose
              around a child `nn.BatchNorm1d` (keys `bn.*`): converting a `_BatchNorm` subclass whose
              forward transposes would silently drop the transpose, converting the child keeps it.
    layer     per sample and position, over C (for nchw, over C at each pixel, like timm's LayerNorm2d).
    instance  per sample and channel, over (H, W) / (L); refused for nc (one value per statistic).
    group     per sample and channel group, over (C/G, H, W) / (C/G, L) / (C/G).
    rms       like layer, without centering: x / sqrt(mean(x**2 over C) + eps) * weight.
    none      nn.Identity.

Defaults that differ from the torch class each kind wraps:
    instance  affine=True (torch: False), so it is a drop-in learned layer like group norm;
              track_running_stats=False as in torch (statistics always come from the input).
    group     num_groups = largest divisor of C that is <= 32 (C=64 -> 32, C=48 -> 24, C=7 -> 7).
    rms       eps=1e-6 as in timm (torch's None means the dtype's machine epsilon, 0.0078 in bf16).
    layer     eps=1e-5 as torch's nn.LayerNorm, for every layout (timm's LayerNorm2d uses 1e-6).
Layer and rms take `affine=` as an alias of torch's `elementwise_affine=`, so one keyword turns the
affine transform off for every kind.

A norm that would normalize a single value (batch norm on (1, C) in training, group norm with one
channel per group on nc, ...) raises a ValueError saying so instead of torch's cryptic error or a
silently constant output.

Register your own with `register_norm(name, factory)`; `NORM_KINDS` follows registrations.
"""
import inspect
from collections.abc import Sequence
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # timm's NCHW rms norm reduces over dim 1 in place; permute + F.rms_norm is ~2x slower on CPU
    from timm.layers.fast_norm import rms_norm2d as _rms_norm2d
except ImportError:  # older timm
    def _rms_norm2d(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor], eps: float) -> Tensor:
        return F.rms_norm(x.movedim(1, -1), normalized_shape, weight, eps).movedim(-1, 1)

__all__ = ["build_norm", "register_norm", "norm_kinds", "NORM_KINDS", "LAYOUTS", "default_num_groups",
           "BatchNormNCHW", "BatchNormNC", "BatchNormNLC", "LayerNorm", "InstanceNorm", "GroupNorm",
           "RmsNorm"]

LAYOUTS = ("nchw", "nlc", "nc")
_SHAPES = {"nchw": "(N, C, H, W)", "nlc": "(N, L, C)", "nc": "(N, C)"}


# ---------------------------------------------------------------------------------------------------
# input checks (shape-only, so they cost nothing under torch.compile)

def _shape_str(x: Tensor) -> str:
    return "(" + ", ".join([str(s) for s in x.shape]) + ")"


def _prod(sizes: List[int]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def _check_input(x: Tensor, num_features: int, layout: str, kind: str) -> None:
    """Raise ValueError unless x has the layout's rank and `num_features` channels."""
    ndim = x.dim()
    if layout == "nchw":
        ok, channels = ndim >= 4, 1
        expected = "(N, C, H, W) (or (N, C, *spatial) with 2+ spatial dims)"
    elif layout == "nlc":
        ok, channels, expected = ndim == 3, 2, "(N, L, C)"
    else:
        ok, channels, expected = ndim == 2, 1, "(N, C)"
    if not ok:
        raise ValueError(f"{kind} norm (layout '{layout}'): expected input of shape {expected}, "
                         f"got {ndim}-D input of shape {_shape_str(x)}")
    if x.shape[channels] != num_features:
        raise ValueError(f"{kind} norm (layout '{layout}'): expected {num_features} channels at dim "
                         f"{channels}, got {x.shape[channels]} in input of shape {_shape_str(x)}")


def _check_stat_size(n: int, x: Tensor, kind: str, per: str, hint: str) -> None:
    """Raise ValueError when a statistic would be computed from n == 1 value."""
    if n == 1:
        raise ValueError(f"{kind} norm: input of shape {_shape_str(x)} gives 1 value per {per}, and the "
                         f"variance of one value is undefined (the output would be constant). {hint}")


def _check_batch_stats(n: int, x: Tensor) -> None:
    _check_stat_size(n, x, "batch", "channel", "Use more than one sample (or position) per channel, "
                     "or a norm without batch statistics: 'group' or 'layer'.")


# ---------------------------------------------------------------------------------------------------
# modules

class BatchNormNCHW(nn.BatchNorm2d):
    """Batch norm for (N, C, H, W) (or (N, C, *spatial)): per-channel statistics over N and spatial.

    torch's BatchNorm2d with clearer input checks; same state_dict keys and SyncBatchNorm conversion.
    """

    def _check_input_dim(self, x: Tensor) -> None:  # called first thing by _BatchNorm.forward
        _check_input(x, self.num_features, "nchw", "batch")
        if self.training or self.running_mean is None:  # statistics come from this batch
            _check_batch_stats(x.shape[0] * _prod(x.shape[2:]), x)


class BatchNormNC(nn.BatchNorm1d):
    """Batch norm for vectors (N, C): per-channel statistics over N. torch's BatchNorm1d, checked."""

    def _check_input_dim(self, x: Tensor) -> None:
        _check_input(x, self.num_features, "nc", "batch")
        if self.training or self.running_mean is None:
            _check_batch_stats(x.shape[0], x)


class BatchNormNLC(nn.Module):
    """Batch norm for sequences (N, L, C): per-channel statistics over N and L.

    Runs the child `bn` (an nn.BatchNorm1d on (N, C, L)) between two transposes. The batch norm is
    a child rather than this module's base class so that SyncBatchNorm conversion, which replaces
    each _BatchNorm with a plain SyncBatchNorm, keeps the transposes. state_dict keys: `bn.*`.
    """

    def __init__(self, num_features: int, **kwargs):
        super().__init__()
        self.num_features = num_features
        self.bn = nn.BatchNorm1d(num_features, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_features, "nlc", "batch")
        if self.training or self.bn.running_mean is None:
            _check_batch_stats(x.shape[0] * x.shape[1], x)
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class LayerNorm(nn.LayerNorm):
    """Layer norm over channels: (N, C, H, W) at each pixel (like timm's LayerNorm2d), (N, L, C) at
    each position, or (N, C). Output has the input's shape."""

    def __init__(self, num_features: int, layout: str, **kwargs):
        super().__init__(num_features, **kwargs)
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.normalized_shape[0], self.layout, "layer")
        if self.layout == "nchw":  # move C last for the fused kernel, as timm's LayerNorm2d does
            x = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
            return x.movedim(-1, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout!r}"


class RmsNorm(nn.RMSNorm):
    """RMS norm over channels, no centering: x / sqrt(mean(x**2 over C) + eps) * weight.

    (N, C, H, W) at each pixel (timm's rms_norm2d), (N, L, C) at each position, or (N, C) (F.rms_norm).
    `eps=None` means the input dtype's machine epsilon, as in torch.
    """

    def __init__(self, num_features: int, layout: str, **kwargs):
        super().__init__(num_features, **kwargs)
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.normalized_shape[0], self.layout, "rms")
        if self.layout != "nchw":
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        # timm's kernel takes 4-D; reducing over dim 1 is unchanged by merging trailing spatial dims
        x4 = x.flatten(3) if x.dim() > 4 else x
        return _rms_norm2d(x4, list(self.normalized_shape), self.weight, eps).view_as(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout!r}"


class InstanceNorm(nn.modules.instancenorm._InstanceNorm):
    """Instance norm: per sample and channel, over positions: (N, C, H, W) (or (N, C, *spatial)) over
    spatial, or (N, L, C) over L. torch's InstanceNormNd options and state; `layout` picks the dims."""

    def __init__(self, num_features: int, layout: str, **kwargs):
        super().__init__(num_features, **kwargs)
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_features, self.layout, "instance")
        use_input_stats = self.training or not self.track_running_stats
        if use_input_stats:
            positions = x.shape[1] if self.layout == "nlc" else _prod(x.shape[2:])
            _check_stat_size(positions, x, "instance", "sample and channel",
                             "Use a larger feature map (or longer sequence), or 'group' or 'layer'.")
        momentum = self.momentum if self.momentum is not None else 0.0  # as torch's _InstanceNorm
        if self.layout == "nlc":
            x = x.transpose(1, 2)
        x = F.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            use_input_stats, momentum, self.eps)
        return x.transpose(1, 2) if self.layout == "nlc" else x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout!r}"


class GroupNorm(nn.GroupNorm):
    """Group norm: per sample, over each group of C / num_groups channels and all positions.

    (N, C, H, W) (or (N, C, *spatial)), (N, L, C) (transposed to (N, C, L) for the kernel), or (N, C).
    """

    def __init__(self, num_groups: int, num_features: int, layout: str, **kwargs):
        super().__init__(num_groups, num_features, **kwargs)
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_channels, self.layout, "group")
        positions = x.shape[1] if self.layout == "nlc" else _prod(x.shape[2:])
        _check_stat_size(self.num_channels // self.num_groups * positions, x, "group", "group",
                         "Use fewer groups (num_groups) or 'layer'.")
        if self.layout == "nlc":
            x = x.transpose(1, 2)
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return x.transpose(1, 2) if self.layout == "nlc" else x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout!r}"


# ---------------------------------------------------------------------------------------------------
# factories: factory(num_features, layout, **kwargs) -> nn.Module. Their keyword-only parameters are
# the kwargs build_norm accepts for that kind.

def default_num_groups(num_channels: int, max_groups: int = 32) -> int:
    """The largest divisor of num_channels that is <= max_groups (64 -> 32, 48 -> 24, 7 -> 7)."""
    return max(g for g in range(1, min(num_channels, max_groups) + 1) if num_channels % g == 0)


def _divisors(n: int, below: Optional[int] = None) -> str:
    return ", ".join(str(d) for d in range(1, below or n + 1) if n % d == 0)


def _resolve_affine(kind: str, elementwise_affine: Optional[bool], affine: Optional[bool]) -> bool:
    if elementwise_affine is not None and affine is not None and elementwise_affine != affine:
        raise TypeError(f"build_norm({kind!r}): got elementwise_affine={elementwise_affine} and "
                        f"affine={affine}; they are the same option, pass one")
    return next((v for v in (elementwise_affine, affine) if v is not None), True)


def _batch(num_features, layout, *, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
           device=None, dtype=None):
    kw = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
              device=device, dtype=dtype)
    cls = {"nchw": BatchNormNCHW, "nc": BatchNormNC, "nlc": BatchNormNLC}[layout]
    return cls(num_features, **kw)


def _layer(num_features, layout, *, eps=1e-5, elementwise_affine=None, affine=None, bias=True,
           device=None, dtype=None):
    if num_features == 1:
        raise ValueError("layer norm over num_features=1 channel normalizes a single value (the output "
                         "would be constant); use 'rms', 'batch' or 'instance' for 1 channel")
    affine = _resolve_affine("layer", elementwise_affine, affine)
    return LayerNorm(num_features, layout, eps=eps, elementwise_affine=affine, bias=bias,
                     device=device, dtype=dtype)


def _rms(num_features, layout, *, eps=1e-6, elementwise_affine=None, affine=None, device=None, dtype=None):
    affine = _resolve_affine("rms", elementwise_affine, affine)
    return RmsNorm(num_features, layout, eps=eps, elementwise_affine=affine, device=device, dtype=dtype)


def _instance(num_features, layout, *, eps=1e-5, momentum=0.1, affine=True, track_running_stats=False,
              device=None, dtype=None):
    if layout == "nc":
        raise ValueError("instance norm is undefined for layout 'nc': (N, C) has one value per sample and "
                         "channel; use 'layer', 'group' or 'batch' for vectors, or layout 'nchw' / 'nlc'")
    return InstanceNorm(num_features, layout, eps=eps, momentum=momentum, affine=affine,
               track_running_stats=track_running_stats, device=device, dtype=dtype)


def _group(num_features, layout, *, num_groups=None, eps=1e-5, affine=True, device=None, dtype=None):
    if num_groups is None:
        num_groups = default_num_groups(num_features)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 \
            or num_features % num_groups:
        raise ValueError(f"group norm: num_groups={num_groups!r} does not divide num_features="
                         f"{num_features}; valid num_groups: {_divisors(num_features)}")
    if layout == "nc" and num_groups == num_features:
        raise ValueError(f"group norm on layout 'nc' with num_groups={num_groups} and num_features="
                         f"{num_features} normalizes groups of 1 value (the output would be constant); pass "
                         f"num_groups as one of {_divisors(num_features, below=num_features)}, or use 'layer'")
    return GroupNorm(num_groups, num_features, layout, eps=eps, affine=affine, device=device, dtype=dtype)


def _none(num_features, layout):
    return nn.Identity()


# ---------------------------------------------------------------------------------------------------
# registry

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "batch": _batch, "layer": _layer, "instance": _instance, "group": _group, "rms": _rms, "none": _none,
}


class _KindNames(Sequence):
    """Read-only, tuple-like view of the registered kinds that follows `register_norm`, so that
    `from zoo.norm import NORM_KINDS` done before a registration still sees it."""

    def __getitem__(self, i):
        return tuple(_FACTORIES)[i]

    def __len__(self):
        return len(_FACTORIES)

    def __contains__(self, name):
        return isinstance(name, str) and name in _FACTORIES

    def __iter__(self):
        return iter(tuple(_FACTORIES))

    def __eq__(self, other):
        return isinstance(other, (tuple, list, _KindNames)) and tuple(self) == tuple(other)

    __hash__ = None

    def __repr__(self):
        return repr(tuple(_FACTORIES))


NORM_KINDS = _KindNames()


def norm_kinds() -> tuple[str, ...]:
    """The registered norm kinds, in registration order (a snapshot)."""
    return tuple(_FACTORIES)


def register_norm(name: str, factory: Optional[Callable[..., nn.Module]] = None, *, overwrite: bool = False):
    """Add a norm kind: `factory(num_features, layout, **kwargs) -> nn.Module`.

    The factory's keyword parameters are the kwargs `build_norm` accepts for it (anything, if it takes
    **kwargs). Registering an existing name raises ValueError unless overwrite=True. Without a factory,
    returns a decorator: `@register_norm("mine")`.
    """
    if factory is None:
        return lambda f: register_norm(name, f, overwrite=overwrite)
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_norm: name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_norm({name!r}): factory must be callable, got {factory!r}")
    if name in _FACTORIES and not overwrite:
        raise ValueError(f"register_norm: norm kind {name!r} is already registered (registered kinds: "
                         f"{', '.join(_FACTORIES)}); pass overwrite=True to replace it")
    _FACTORIES[name] = factory
    return factory


def _accepted_kwargs(factory) -> Optional[list[str]]:
    """Names of the kwargs after (num_features, layout), or None if the factory takes **kwargs."""
    params = list(inspect.signature(factory).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params[2:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def build_norm(kind: str, num_features: int, layout: str = "nchw", **kwargs) -> nn.Module:
    """A norm layer by name.

    Args:
        kind: one of NORM_KINDS ("batch", "layer", "instance", "group", "rms", "none", or registered).
        num_features: C, the number of channels.
        layout: "nchw" for (N, C, H, W) maps, "nlc" for (N, L, C) sequences, "nc" for (N, C) vectors.
        **kwargs: options of that kind (torch's names): eps, affine, momentum, track_running_stats
            (batch, instance), num_groups (group), elementwise_affine and bias (layer), device, dtype.

    Returns a module mapping a tensor of the layout's shape to one of the same shape.
    """
    if not isinstance(kind, str) or kind not in _FACTORIES:
        raise ValueError(f"unknown norm kind {kind!r}; valid kinds: {', '.join(_FACTORIES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts: "
                         + ", ".join(f"{k!r} {v}" for k, v in _SHAPES.items()))
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"{kind} norm: num_features must be a positive int, got {num_features!r}")
    factory = _FACTORIES[kind]
    accepted = _accepted_kwargs(factory)
    if accepted is not None:
        for name in kwargs:
            if name not in accepted:
                raise TypeError(f"build_norm: unexpected keyword argument {name!r} for norm kind {kind!r}; "
                                f"{kind!r} accepts: {', '.join(accepted) or 'no keyword arguments'}")
    module = factory(num_features, layout, **kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"norm factory for {kind!r} returned {type(module).__name__}, not an nn.Module")
    return module
