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

Declarations (`norm_spec(kind) -> NormSpec`): every kind states which layouts it builds, whether its
statistics pool over positions (H, W / L) and over the batch, and whether it can run per step inside a
recurrent cell. Models accept or refuse a kind from these (`check_norm`), never from its class:

    kind      layouts         pools positions  pools batch  recurrent
    batch     nchw, nlc, nc   yes              yes          yes (Sketch-RNN's recurrent batch norm)
    layer     nchw, nlc, nc   no               no           yes
    instance  nchw, nlc       yes              no           no
    group     nchw, nlc, nc   yes              no           no
    rms       nchw, nlc, nc   no               no           yes
    none      nchw, nlc, nc   no               no           yes

Register your own with `register_norm(name, factory, layouts=..., pools_positions=..., pools_batch=...,
recurrent=...)`; `NORM_KINDS` follows registrations. Undeclared properties take the safe side: a norm
is assumed to pool over positions and the batch and not to run in a recurrent cell, so causal and
recurrent models refuse it until you declare otherwise. Built-in kinds cannot be replaced.

Norm surgery: `replace_norms(model, kind, **kwargs)` turns every norm layer of an existing network
(torch's, timm's, zoo's) into `kind`, in place, and returns (name, old class, new class) rows. The
layout comes from the old module's class: BatchNorm2d, GroupNorm, LayerNorm2d, ... are nchw;
BatchNorm1d is nc; nn.LayerNorm / RMSNorm and timm's LayerNorm / RmsNorm are channels last of any
rank, built "nlc" inside `ChannelsLastNorm`. timm's norm+act layers become `NormAct(norm, drop, act)`.
eps and affine carry over, affine weight and bias are copied, running stats too within a kind.
"""
import copy
import inspect
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # timm's NCHW rms norm reduces over dim 1 in place; permute + F.rms_norm is ~2x slower on CPU
    from timm.layers.fast_norm import rms_norm2d as _rms_norm2d
except ImportError:  # older timm
    def _rms_norm2d(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor], eps: float) -> Tensor:
        return F.rms_norm(x.movedim(1, -1), normalized_shape, weight, eps).movedim(-1, 1)

__all__ = ["build_norm", "register_norm", "unregister_norm", "norm_kinds", "NORM_KINDS", "LAYOUTS", "NormSpec",
           "norm_spec", "accepted_kinds", "check_norm", "default_num_groups",
           "BatchNormNCHW", "BatchNormNC", "BatchNormNLC", "LayerNorm", "InstanceNorm", "GroupNorm",
           "RmsNorm", "replace_norms", "NormAct", "ChannelsLastNorm"]

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
        raise ValueError("instance norm is undefined for layout 'nc': vectors (N, C) have one value per sample and "
                         "channel; 'layer', 'group', 'rms' or 'batch' normalize vectors")
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
        fix = (f"pass num_groups as one of {_divisors(num_features, below=num_features)}, or use 'layer'"
               if num_features > 1 else "use 'rms' or 'batch' for 1 channel")
        raise ValueError(f"group norm on layout 'nc' with num_groups={num_groups} and num_features="
                         f"{num_features} normalizes groups of 1 value (the output would be constant); {fix}")
    return GroupNorm(num_groups, num_features, layout, eps=eps, affine=affine, device=device, dtype=dtype)


def _none(num_features, layout):
    return nn.Identity()


# ---------------------------------------------------------------------------------------------------
# registry

@dataclass(frozen=True)
class NormSpec:
    """What a norm kind declares about itself; models accept or refuse the kind from it.

    layouts: the layouts its factory builds ("nchw", "nlc", "nc"; a str is one layout).
    pools_positions: in training, its statistics for one position mix other positions of the sample
        (L of nlc, H and W of nchw): instance, group, batch. Per-position norms (layer, rms) do not.
    pools_batch: in training, its statistics for one sample mix other samples of the batch: batch.
    recurrent: it can normalize the (N, C) rows of one time step inside a recurrent cell, called once
        per step (so it needs "nc"). A per-row norm (neither pool) declaring it runs in Sketch-RNN's
        plain-PyTorch cell; the built-in kinds have their own fused cells.
    """

    layouts: tuple[str, ...] = LAYOUTS
    pools_positions: bool = True
    pools_batch: bool = True
    recurrent: bool = False

    def __post_init__(self):
        layouts = (self.layouts,) if isinstance(self.layouts, str) else tuple(self.layouts)
        if not layouts or any(layout not in LAYOUTS for layout in layouts):
            raise ValueError(f"NormSpec: layouts must be a non-empty subset of {LAYOUTS}, got {self.layouts!r}")
        object.__setattr__(self, "layouts", tuple(layout for layout in LAYOUTS if layout in layouts))
        for name in ("pools_positions", "pools_batch", "recurrent"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"NormSpec: {name} must be a bool, got {getattr(self, name)!r}")
        if self.recurrent and "nc" not in self.layouts:
            raise ValueError("NormSpec: recurrent=True needs layout 'nc' (a cell normalizes (N, C) rows)")


_PER_ROW = NormSpec(pools_positions=False, pools_batch=False, recurrent=True)
_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "batch": _batch, "layer": _layer, "instance": _instance, "group": _group, "rms": _rms, "none": _none,
}
_SPECS: dict[str, NormSpec] = {
    "batch": NormSpec(recurrent=True), "layer": _PER_ROW,
    "instance": NormSpec(("nchw", "nlc"), pools_batch=False),
    "group": NormSpec(pools_batch=False), "rms": _PER_ROW, "none": _PER_ROW,
}
_BUILT_IN = frozenset(_FACTORIES)  # models pick their fast paths for these by name: never replaced


def _check_kind(kind) -> None:
    if not isinstance(kind, str) or kind not in _FACTORIES:
        raise ValueError(f"unknown norm kind {kind!r}; valid kinds: {', '.join(_FACTORIES)} (yours: register it with "
                         "zoo.norm.register_norm, in a module that train.py imports with --import MODULE)")


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


def register_norm(name: str, factory: Optional[Callable[..., nn.Module]] = None, *,
                  layouts: Sequence[str] = LAYOUTS, pools_positions: bool = True, pools_batch: bool = True,
                  recurrent: bool = False, overwrite: bool = False):
    """Add a norm kind: `factory(num_features, layout, **kwargs) -> nn.Module`, with its declarations.

    The factory's keyword parameters are the kwargs `build_norm` accepts for it (anything, if it takes
    **kwargs). The declarations (see `NormSpec`) decide which models accept the kind; the defaults are
    the safe side for a norm of unknown behaviour:
        layouts=("nchw", "nlc", "nc"): the factory gets `layout` and must build each one it declares.
        pools_positions=True: assumed to mix positions, so causal models (the Transformer) refuse it;
            declare False for a per-position norm.
        pools_batch=True: assumed to mix samples, so models that need per-sample statistics (the
            Transformer, Sketch-RNN's cells) refuse it; declare False if it does not.
        recurrent=False: Sketch-RNN's cells refuse it; declare True for a per-row norm that can be
            called once per time step on (N, C) rows.
    Registering an existing name raises ValueError unless overwrite=True; built-in kinds are never
    replaced (models select their fast paths by name). Without a factory, returns a decorator:
    `@register_norm("mine", pools_positions=False, pools_batch=False)`.
    """
    spec_kw = dict(layouts=layouts, pools_positions=pools_positions, pools_batch=pools_batch, recurrent=recurrent)
    if factory is None:
        return lambda f: register_norm(name, f, **spec_kw, overwrite=overwrite)
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_norm: name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_norm({name!r}): factory must be callable, got {factory!r}")
    try:
        inspect.signature(factory).bind(1, LAYOUTS[0])
    except TypeError:  # found now rather than at the first build_norm
        raise TypeError(f"register_norm({name!r}): the factory must take (num_features, layout, **kwargs), "
                        f"got one with signature {inspect.signature(factory)}") from None
    except ValueError:  # a callable without a signature (some builtins): called as it is
        pass
    if name in _FACTORIES and (not overwrite or name in _BUILT_IN):
        why = ("it is built in (models pick their fast paths for it by name), so register yours under "
               "another name" if name in _BUILT_IN else "pass overwrite=True to replace it")
        raise ValueError(f"register_norm: norm kind {name!r} is already registered (registered kinds: "
                         f"{', '.join(_FACTORIES)}); {why}")
    _SPECS[name] = NormSpec(**spec_kw)  # validated before the factory is registered
    _FACTORIES[name] = factory
    return factory


def unregister_norm(name: str) -> None:
    """Remove a kind added with `register_norm` (built-in kinds cannot be removed)."""
    _check_kind(name)
    if name in _BUILT_IN:
        raise ValueError(f"unregister_norm: {name!r} is a built-in norm kind and cannot be removed")
    del _FACTORIES[name], _SPECS[name]


def norm_spec(kind: str) -> NormSpec:
    """The declarations of a registered norm kind (see `NormSpec`)."""
    _check_kind(kind)
    return _SPECS[kind]


# A model's rule beyond layouts: (kind, spec) -> why the model cannot use the kind, or None if it can.
Refusal = Callable[[str, NormSpec], Optional[str]]


def _check_layouts(layouts: Sequence[str] | str) -> tuple[str, ...]:
    """`layouts` as a tuple (a str is one layout); an unknown layout is a ValueError naming the valid ones."""
    layouts = (layouts,) if isinstance(layouts, str) else tuple(layouts)
    for layout in layouts:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; valid layouts: "
                             + ", ".join(f"{k!r} {v}" for k, v in _SHAPES.items()))
    return layouts


def _refusal(kind: str, layouts: Sequence[str], refuse: Optional[Refusal]) -> Optional[str]:
    spec = _SPECS[kind]
    missing = [layout for layout in _check_layouts(layouts) if layout not in spec.layouts]
    if missing:
        return (f"it cannot be built for {' or '.join(f'{m!r} {_SHAPES[m]}' for m in missing)} "
                f"(it declares layouts {', '.join(spec.layouts)})")
    return refuse(kind, spec) if refuse is not None else None


def accepted_kinds(*, layouts: Sequence[str] = (), refuse: Optional[Refusal] = None) -> tuple[str, ...]:
    """The registered kinds that declare every layout in `layouts` and that `refuse` lets through."""
    return tuple(kind for kind in _FACTORIES if _refusal(kind, layouts, refuse) is None)


def check_norm(kind: str, model: str, *, arg: str = "norm", layouts: Sequence[str] = (),
               refuse: Optional[Refusal] = None) -> NormSpec:
    """Return the spec of `kind` if `model` can use it: it declares every layout the model builds it in,
    and `refuse(kind, spec)` returns None. Otherwise raise one ValueError line naming the argument,
    model, reason and the accepted kinds, e.g. "norm='group' cannot be used in TransformerLM: its
    statistics pool over positions, a leak of the future (and of padding) into earlier tokens; accepted:
    batch, layer, rms, none" (accepted kinds in registration order). An unknown kind gets build_norm's "unknown norm
    kind" error."""
    _check_kind(kind)
    reason = _refusal(kind, layouts, refuse)
    if reason is not None:
        raise ValueError(f"{arg}={kind!r} cannot be used in {model}: {reason}; accepted: "
                         f"{', '.join(accepted_kinds(layouts=layouts, refuse=refuse))}")
    return _SPECS[kind]


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
    _check_kind(kind)
    _check_layouts([layout])
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
        raise ValueError(f"{kind} norm: num_features must be a positive int, got {num_features!r}")
    num_features = int(num_features)  # numpy's ints too, as torch's norm layers take them
    factory = _FACTORIES[kind]
    accepted = _accepted_kwargs(factory)
    if accepted is not None:
        for name in kwargs:
            if name not in accepted:
                raise TypeError(f"build_norm: unexpected keyword argument {name!r} for norm kind {kind!r}; "
                                f"{kind!r} accepts: {', '.join(accepted) or 'no keyword arguments'}")
    declared = _SPECS[kind].layouts
    if layout not in declared and kind not in _BUILT_IN:  # built-in factories explain their own refusals
        raise ValueError(f"norm kind {kind!r} declares layouts {', '.join(declared)}, not {layout!r} "
                         f"{_SHAPES[layout]}; register it with layouts=... to build it for that layout")
    module = factory(num_features, layout, **kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"norm factory for {kind!r} returned {type(module).__name__}, not an nn.Module")
    return module


# ---------------------------------------------------------------------------------------------------
# norm surgery: replace_norms(model, kind) turns the norm layers of an existing network into registry
# norms, in place

_CL = "channels_last"  # nn.LayerNorm's layout: channels last, any rank ((N, C), (N, L, C), (N, H, W, C))


class ChannelsLastNorm(nn.Module):
    """Runs an "nlc" registry norm on channels-last input of any rank, as nn.LayerNorm accepts it.

    (N, L, C) goes through as is; (N, C) is seen as (N, 1, C) and (N, *, C), e.g. (N, H, W, C), as
    (N, prod(*), C). So the "positions" are all middle dims: batch norm on (N, H, W, C) has per-channel
    statistics over (N, H, W), as BatchNorm2d on the NCHW tensor; instance and group norm reduce over
    (H, W); on (N, C) every kind computes what its "nc" layout would. Output: the input's shape.
    state_dict keys: `norm.*`.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            return self.norm(x)
        if x.dim() < 2:
            raise ValueError(f"{type(self.norm).__name__} (channels last): expected input of shape (N, *, C), "
                             f"got {x.dim()}-D input of shape {_shape_str(x)}")
        positions = _prod(list(x.shape[1:-1]))  # 1 for (N, C); explicit so that N = 0 reshapes too
        return self.norm(x.reshape(x.shape[0], positions, x.shape[-1])).reshape(x.shape)


class NormAct(nn.Module):
    """act(drop(norm(x))), the input's shape: a registry norm followed by the dropout and activation
    kept from the timm norm+act layer it replaced (BatchNormAct2d, GroupNormAct, LayerNormAct2d, ...).
    A module rather than nn.Sequential so that state_dict keys read `norm.*` and `act.*` (a PReLU's)."""

    def __init__(self, norm: nn.Module, drop: Optional[nn.Module] = None, act: Optional[nn.Module] = None):
        super().__init__()
        self.norm = norm
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(self.norm(x)))


# class -> (family, layout, has act). family: the kind it computes, compared with the target kind to
# carry kind-specific options and running stats. layout None: the module's own `.layout` (zoo.norm).
_TORCH_NORMS = {
    nn.BatchNorm1d: ("batch", "nc", False), nn.BatchNorm2d: ("batch", "nchw", False),
    nn.BatchNorm3d: ("batch", "nchw", False), nn.InstanceNorm2d: ("instance", "nchw", False),
    nn.InstanceNorm3d: ("instance", "nchw", False), nn.GroupNorm: ("group", "nchw", False),
    nn.LayerNorm: ("layer", _CL, False), nn.RMSNorm: ("rms", _CL, False),
    BatchNormNCHW: ("batch", "nchw", False), BatchNormNC: ("batch", "nc", False),
    BatchNormNLC: ("batch", "nlc", False), LayerNorm: ("layer", None, False), RmsNorm: ("rms", None, False),
    InstanceNorm: ("instance", None, False), GroupNorm: ("group", None, False),
}
# timm.layers classes by name (those an older timm lacks are left out). SyncBatchNormAct only comes
# from timm's conversion of BatchNormAct2d, so it is NCHW; a plain nn.SyncBatchNorm is refused.
_TIMM_NORMS = {
    "BatchNormAct2d": ("batch", "nchw"), "SyncBatchNormAct": ("batch", "nchw"),
    "GroupNorm": ("group", "nchw"), "GroupNorm1": ("group", "nchw"), "GroupNormAct": ("group", "nchw"),
    "GroupNorm1Act": ("group", "nchw"),
    "LayerNorm": ("layer", _CL), "LayerNormFp32": ("layer", _CL), "LayerNormAct": ("layer", _CL),
    "LayerNormActFp32": ("layer", _CL), "LayerNorm2d": ("layer", "nchw"), "LayerNorm2dFp32": ("layer", "nchw"),
    "LayerNormExp2d": ("layer", "nchw"), "LayerNormAct2d": ("layer", "nchw"),
    "LayerNormAct2dFp32": ("layer", "nchw"),
    "RmsNorm": ("rms", _CL), "RmsNormFp32": ("rms", _CL), "RmsNormAct": ("rms", _CL),
    "RmsNormActFp32": ("rms", _CL), "RmsNorm2d": ("rms", "nchw"), "RmsNorm2dFp32": ("rms", "nchw"),
    "RmsNormAct2d": ("rms", "nchw"), "RmsNormAct2dFp32": ("rms", "nchw"),
    # x / sqrt(var(x) + eps) over C, not centered: no registry kind computes it; its weight is carried
    "SimpleNorm": ("simple", _CL), "SimpleNormFp32": ("simple", _CL), "SimpleNorm2d": ("simple", "nchw"),
    "SimpleNorm2dFp32": ("simple", "nchw"),
}
_FROZEN = ("it is frozen (statistics and affine are buffers, nothing trains); unfreeze it first "
           "(timm.layers.unfreeze_batch_norm_2d)")
# why well-known classes are refused; by name, so that torchvision need not be imported
_REFUSED = {
    "SyncBatchNorm": "it takes any rank, so its layout is unknown; replace the norms before "
                     "nn.SyncBatchNorm.convert_sync_batchnorm",
    "InstanceNorm1d": "it normalizes (N, C, L) over L, which no zoo.norm layout is",
    "LazyInstanceNorm1d": "it normalizes (N, C, L) over L, which no zoo.norm layout is",
    "FrozenBatchNorm2d": _FROZEN, "FrozenBatchNormAct2d": _FROZEN,
}
_TORCH_NORM_BASES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
                     nn.LocalResponseNorm, nn.CrossMapLRN2d)
_WRAPPERS = (ChannelsLastNorm, NormAct)  # left by an earlier replace_norms: convert their `norm`
_KNOWN: Optional[dict] = None


def _known_norms() -> dict:
    """class -> (family, layout, has act) of every class replace_norms converts (built on first use)."""
    global _KNOWN
    if _KNOWN is None:
        known = dict(_TORCH_NORMS)
        try:
            import timm.layers.norm as timm_norm
            import timm.layers.norm_act as timm_norm_act
        except ImportError:  # no timm: torch's and zoo's classes only
            timm_norm = timm_norm_act = None
        for name, (family, layout) in _TIMM_NORMS.items():
            for module in (timm_norm_act, timm_norm):
                cls = getattr(module, name, None)
                if isinstance(cls, type) and issubclass(cls, nn.Module) and cls not in known:
                    known[cls] = (family, layout, "Act" in name)
        _KNOWN = known
    return _KNOWN


def _has_own_state(m: nn.Module) -> bool:
    return bool(m._parameters) or bool(m._buffers)


def _classify(m: nn.Module) -> tuple[str, object]:
    """("norm", (family, layout, has act)), ("refuse", reason) or ("descend", None) for module m."""
    if type(m) in _WRAPPERS:
        return "descend", None
    name = type(m).__name__
    if isinstance(m, _TORCH_NORM_BASES) and isinstance(m, nn.modules.lazy.LazyModuleMixin) \
            and m.has_uninitialized_params():  # becomes e.g. BatchNorm2d at its first forward
        return "refuse", "it is lazy and not initialized yet (no C); run one forward pass first"
    known = _known_norms()
    for cls in type(m).__mro__:
        if cls in known:
            # a subclass that overrides forward may compute anything (timm's LayerNorm2d subclasses
            # nn.LayerNorm but is NCHW): only a subclass that keeps its base's forward is that base
            if type(m).forward is not cls.forward:
                return "refuse", f"it subclasses {cls.__name__} with its own forward, so its layout is unknown"
            shape = getattr(m, "normalized_shape", None)
            if shape is not None and len(shape) != 1:
                return "refuse", (f"it normalizes over its last {len(shape)} dims (normalized_shape="
                                  f"{tuple(shape)}); registry norms normalize over one channel dim")
            return "norm", known[cls]
    if name in _REFUSED:
        return "refuse", _REFUSED[name]
    # a torch norm, or a leaf named like a norm (own parameters or buffers, or no children): a norm we
    # do not know. Norm-named containers (ConvNormAct, NormMlpClassifierHead, NormFreeBlock) are walked
    # (a norm+act layer's children hold no parameters; NormFreeBlock's own gain beside its convs is no norm)
    if isinstance(m, _TORCH_NORM_BASES) or ("norm" in name.lower() and not any(
            True for child in m.children() for _ in child.parameters()) and (_has_own_state(m) or not m._modules)):
        return "refuse", "replace_norms does not know this normalization class"
    return "descend", None


def _state_holder(m: nn.Module) -> nn.Module:
    """The module holding a norm's parameters and buffers: m, or its only child while m holds none
    (BatchNormNLC's `bn`, a wrapper's `norm`)."""
    while not _has_own_state(m) and len(m._modules) == 1:
        m = next(iter(m._modules.values()))
    return m


def _own_tensors(m: nn.Module) -> dict[str, Tensor]:
    return {k: v for d in (m._parameters, m._buffers) for k, v in d.items() if v is not None}


def _first_float(m: nn.Module) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    for t in (*m.parameters(), *m.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def _num_features(core: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(core, attr, None), int):
            return getattr(core, attr)
    return int(core.normalized_shape[0])


def _options(core: nn.Module, family: str, kind: str, kwargs: dict, device, dtype) -> dict:
    """build_norm kwargs: the old norm's eps and affine for any kind that takes them; its momentum,
    track_running_stats, num_groups and (layer) bias=False only for the same kind; device and dtype;
    then the caller's kwargs, which win. A factory taking **kwargs gets the caller's kwargs only:
    what it would make of ours is unknown."""
    accepted = _accepted_kwargs(_FACTORIES[kind])
    if accepted is None:
        return dict(kwargs)
    carry = {"device": device, "dtype": dtype,
             "affine": getattr(core, "affine", getattr(core, "elementwise_affine", None)),
             "eps": getattr(core, "eps", None)}
    if family == kind:
        carry.update({k: getattr(core, k) for k in ("momentum", "track_running_stats", "num_groups")
                      if hasattr(core, k)})
        if family == "layer" and carry["affine"] and getattr(core, "bias", 0) is None:
            carry["bias"] = False
    # None means "unset" except for the same kind's own eps=None (rms: the dtype's machine epsilon)
    # and momentum=None (batch: cumulative average)
    keep_none = ("eps", "momentum") if family == kind else ()
    carry = {k: v for k, v in carry.items() if k in accepted and (v is not None or k in keep_none)}
    if "affine" in kwargs or "elementwise_affine" in kwargs:  # the caller's choice, under either name
        carry.pop("affine", None)
    return {**carry, **kwargs}


def _convert(old: nn.Module, spec: tuple, kind: str, kwargs: dict, fallback: tuple) -> nn.Module:
    """The registry replacement for norm layer `old` (spec: its family, layout and has-act)."""
    family, layout, has_act = spec
    core = _state_holder(old) if isinstance(old, BatchNormNLC) else old
    layout = layout or old.layout
    device, dtype = _first_float(old)
    if device is None:  # a norm without parameters: the model's device and dtype
        device, dtype = fallback
    new = build_norm(kind, _num_features(core), "nlc" if layout == _CL else layout,
                     **_options(core, family, kind, kwargs, device, dtype))
    new.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None and k not in kwargs})
    src, dst = _own_tensors(_state_holder(core)), _own_tensors(_state_holder(new))
    with torch.no_grad():  # affine always; running stats (and anything else) only within a kind
        for name, t in dst.items():
            s = src.get(name)
            if s is not None and s.shape == t.shape and (family == kind or name in ("weight", "bias")):
                t.copy_(s)
                if isinstance(t, nn.Parameter):
                    t.requires_grad_(s.requires_grad)
    if layout == _CL and not isinstance(new, nn.Identity):
        new = ChannelsLastNorm(new)
    drop, act = getattr(old, "drop", None), getattr(old, "act", None)
    if has_act and not all(m is None or isinstance(m, nn.Identity) for m in (drop, act)):
        if isinstance(new, nn.Identity):  # returns its input itself: in-place ops after it would overwrite
            drop, act = (_not_inplace(m) for m in (drop, act))  # the block's input (a shortcut's, pre-act)
        new = NormAct(new, drop, act)
    return new.train(old.training)


def _not_inplace(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """A copy of an in-place activation or dropout that computes out of place; others as they are."""
    if not getattr(module, "inplace", False):
        return module
    module = copy.deepcopy(module)
    module.inplace = False
    return module


def replace_norms(model: nn.Module, kind: str, *, skip=(), **kwargs) -> list[tuple[str, str, str]]:
    """Turn every normalization layer of `model` into `build_norm(kind, C, layout, **kwargs)`, in place.

    Each norm is swapped on its parent (setattr), like nn.SyncBatchNorm.convert_sync_batchnorm, and
    keeps its number of features C, device, dtype and train/eval mode. Nothing is changed if anything
    raises: every replacement is built before the first swap.

    Args:
        model: the network; its norms are replaced, not the model itself.
        kind: a registered norm kind (NORM_KINDS), e.g. "batch", "group", "none".
        skip: classes (matched by isinstance) or class names of modules to leave as they are,
            children included; e.g. skip=(nn.LayerNorm,) converts only the other norms.
        **kwargs: build_norm options for every new norm (e.g. num_groups=8, eps=1e-6).

    Returns one row per replaced module (a module shared by several parents once), in
    `model.named_modules()` order: (qualified name, old class name, class name of the new module).

    Layouts, from the old module's class (exact, or a subclass that keeps that class's forward):
        nchw (N, C, H, W) (3d: (N, C, D, H, W)): nn.BatchNorm2d/3d, nn.InstanceNorm2d/3d,
            nn.GroupNorm (which takes any (N, C, *), but is used on maps in image models); timm's
            BatchNormAct2d, SyncBatchNormAct, GroupNorm(1)(Act), LayerNorm2d, LayerNormAct2d,
            RmsNorm2d, RmsNormAct2d, SimpleNorm2d (and their Fp32 / Exp variants).
        nc (N, C): nn.BatchNorm1d. Its usual use in image models is on vectors; for one applied to
            (N, C, L) the new norm raises the registry's shape ValueError at the first forward.
        channels last, any rank (N, *, C): nn.LayerNorm and nn.RMSNorm over one dim, timm's LayerNorm,
            LayerNormAct, RmsNorm, RmsNormAct, SimpleNorm. The layout follows the class, never the data
            (nn.LayerNorm is always channels last, timm's LayerNorm2d always NCHW); the new norm is
            built "nlc" inside a `ChannelsLastNorm`, which takes (N, C), (N, L, C) and (N, H, W, C).
        zoo.norm's own modules: their `.layout` (so a converted model converts again).
    timm's norm+act layers keep their `drop` and `act`: the replacement is `NormAct(norm, drop, act)`
    (keys `norm.*`, `act.*`), or the bare norm when both are nn.Identity. nn.Identity (a norm slot
    already "none") is neither replaced nor reported.

    Carried over (`**kwargs` win): eps and affine to any kind that accepts them; momentum,
    track_running_stats, num_groups and a layer norm's bias=False only when `kind` is the old norm's
    own kind. A registered factory taking **kwargs gets the caller's kwargs only. Copied: weight and
    bias whenever the new norm has a parameter of that name and shape (so layer -> rms keeps the
    weight and drops the bias), with their requires_grad; running statistics and other buffers only
    within a kind, so batch -> batch computes the same outputs, in eval and in train mode.

    Raises:
        ValueError naming each module (up to 3 per class) and why, for norms it cannot convert:
            classes it does not know that are torch norms or norm-named leaves (own parameters or
            no children; e.g. EvoNorm, FilterResponseNorm, GlobalResponseNorm: pass `skip=` to keep
            them), nn.SyncBatchNorm, frozen batch norms, nn.InstanceNorm1d, a LayerNorm over several
            trailing dims, a subclass that overrides its base's forward, an uninitialized lazy norm.
        ValueError when `model` is itself a norm, has nothing to replace ("model has no
            normalization layers to replace", naming the families it converts; or `skip` leaves out
            all), an entry of `skip` matches no module (naming the model's norm classes), or `kind`
            is unknown.
        ValueError / TypeError from build_norm, prefixed with the module's name: bad kwargs, or a C
            and layout the kind refuses (instance on nc, num_groups not dividing C, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_norms: model must be an nn.Module, got {type(model).__name__}")
    _check_kind(kind)
    skip = tuple(skip) if isinstance(skip, (list, tuple, set, frozenset)) else (skip,)
    if any(not isinstance(s, (str, type)) for s in skip):
        raise TypeError(f"skip: give classes or class names, got {skip!r}")

    verdict, info = _classify(model)
    if verdict == "norm":
        raise ValueError(f"the model is itself a normalization layer ({type(model).__name__}); replace_norms "
                         "swaps submodules on their parents, so build its replacement with build_norm")
    problems: dict[tuple[str, str], list[str]] = {}  # (class name, reason) -> qualified names
    if verdict == "refuse":
        problems[type(model).__name__, info] = ["(the model itself)"]
    slots: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, old norm)
    found: dict[int, tuple[str, nn.Module, tuple]] = {}  # id(old norm) -> (qualified name, old, spec)
    walked = {id(model)}
    skipped = set()  # ids of the modules `skip` leaves out

    def matches(m: nn.Module, entry) -> bool:
        return type(m).__name__ == entry if isinstance(entry, str) else isinstance(m, entry)

    def walk(parent: nn.Module, prefix: str) -> None:
        for attr, child in parent._modules.items():
            if child is not None and any(matches(child, entry) for entry in skip):
                skipped.add(id(child))
            if child is None or id(child) in skipped:
                continue
            if id(child) in found:  # shared norm: swap it here too, report it once
                slots.append((parent, attr, child))
                continue
            if id(child) in walked:
                continue
            verdict, info = _classify(child)
            if verdict == "norm":
                found[id(child)] = (prefix + attr, child, info)
                slots.append((parent, attr, child))
                continue
            walked.add(id(child))
            if verdict == "refuse":
                problems.setdefault((type(child).__name__, info), []).append(prefix + attr)
            else:
                walk(child, prefix + attr + ".")

    if verdict == "descend":
        walk(model, "")
    unused = [getattr(e, "__name__", e) for e in skip if not any(matches(m, e) for m in model.modules())]
    if unused:  # a misspelt class name would leave the norms it meant converted
        norms = sorted({type(m).__name__ for m in model.modules() if _classify(m)[0] != "descend"})
        raise ValueError(f"skip: no module of the model is a {', '.join(map(repr, unused))} (its normalization layers: "
                         f"{', '.join(norms) or 'none'}); give classes or class names of its modules")
    if problems:  # one entry per class and reason, naming up to 3 modules
        e = ValueError("replace_norms cannot convert " + "; ".join(
            f"{cls} at {', '.join(names[:3])}{f' (and {len(names) - 3} more)' if len(names) > 3 else ''}: {why}"
            for (cls, why), names in problems.items()))
        # a note: callers that do not expose `skip` (the classifier's --model.norm) leave it out
        e.add_note("pass skip=(class or class name, ...) to leave such modules as they are")
        raise e
    if not found:
        known = _known_norms()
        *families, last = dict.fromkeys(family for family, _, _ in known.values())
        families = f"{', '.join(families)} and {last}"
        if skipped:
            raise ValueError(f"nothing left to replace: skip leaves out every normalization layer of the model "
                             f"({len(skipped)} modules skipped)")
        raise ValueError(f"model has no normalization layers to replace (replace_norms converts {len(known)} torch, timm "
                         f"and zoo classes of the {families} families, e.g. BatchNorm2d, LayerNorm2d, BatchNormAct2d)")

    fallback = _first_float(model)
    new, rows = {}, []
    for key, (qual, old, spec) in found.items():  # build everything before swapping anything
        try:
            new[key] = _convert(old, spec, kind, kwargs, fallback)
        except (ValueError, TypeError) as e:
            raise (TypeError if isinstance(e, TypeError) else ValueError)(
                f"replace_norms: {qual} ({type(old).__name__}): {e}") from e
        rows.append((qual, type(old).__name__, type(new[key]).__name__))
    for parent, attr, old in slots:
        setattr(parent, attr, new[id(old)])
    return rows
