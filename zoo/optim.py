"""Optimizer parameter groups (weight decay for weights, none for biases, norms and embeddings) and
the learning-rate schedules the zoo's tasks share (`lr_schedule`).

Rule (a trainable parameter gets NO weight decay if any of these holds):
  1. it has 0 or 1 dimensions (biases, norm affines, layer-scale gammas, scalar temperatures);
  2. its own attribute name is `bias`, `bias_*` or `*_bias` (e.g. MultiheadAttention's
     `in_proj_bias`, `bias_k`, which is 3-D);
  3. it belongs directly to a normalization module: an instance of torch's `_NormBase` (BatchNorm*,
     InstanceNorm*, SyncBatchNorm), `nn.LayerNorm`, `nn.GroupNorm`, `nn.RMSNorm`, or any module
     whose class name (or a base class's name) contains "Norm" (timm's `LayerNorm2d`, `RmsNorm`,
     `BatchNormAct2d`, custom `MyRMSNorm`, ...). Only the module's own parameters count, not its
     children's, so a wrapper like timm's `NormMlpClassifierHead` still decays its Linear weight;
  4. it belongs directly to an `nn.Embedding` / `nn.EmbeddingBag`;
  5. a module defines timm's `no_weight_decay()` hook and the parameter's name relative to that
     module matches one of the returned names (fnmatch patterns, e.g. ViT's `pos_embed`, `cls_token`).
A parameter shared by several modules gets no decay if any owner says so. Frozen parameters
(`requires_grad=False`) are left out. Everything else is decayed.

We do not use `timm.optim.param_groups_weight_decay`: it decides by dimension and name only, so it
decays 2-D embedding tables, and it puts everything into the no-decay group when weight_decay is 0.
"""
from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

_NORM_TYPES: tuple[type, ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
_EMBEDDING_TYPES: tuple[type, ...] = (nn.Embedding, nn.EmbeddingBag)


def is_norm_module(module: nn.Module) -> bool:
    """True for torch norm layers and any module whose class (or a base class) name contains "Norm"."""
    return isinstance(module, _NORM_TYPES) or any("Norm" in cls.__name__ for cls in type(module).__mro__)


def _is_bias_name(name: str) -> bool:
    return name == "bias" or name.startswith("bias_") or name.endswith("_bias")


def _hook_patterns(module: nn.Module) -> list[str]:
    """Names returned by a timm-style `no_weight_decay()` hook, or [] when there is none."""
    hook = getattr(module, "no_weight_decay", None)
    return list(hook()) if callable(hook) else []


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split `module`'s trainable parameters into a decayed and a no-decay group (rule: module doc).

    Returns `[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]`
    in `named_parameters()` order, each parameter in exactly one group; an empty group is dropped.
    Ready for `torch.optim.AdamW(groups, lr=...)`, `SGD`, etc.
    """
    no_decay: set[int] = set()  # ids of parameters that any owner excludes from decay
    for mod in module.modules():
        whole_module = is_norm_module(mod) or isinstance(mod, _EMBEDDING_TYPES)
        for local, p in mod.named_parameters(recurse=False):
            if whole_module or _is_bias_name(local) or p.ndim <= 1:
                no_decay.add(id(p))
        patterns = _hook_patterns(mod)
        if patterns:
            for rel, p in mod.named_parameters():
                if any(fnmatch.fnmatchcase(rel, pat) for pat in patterns):
                    no_decay.add(id(p))

    decay_params, no_decay_params = [], []
    for _, p in module.named_parameters():  # deduplicates shared parameters
        if not p.requires_grad:
            continue
        (no_decay_params if id(p) in no_decay else decay_params).append(p)

    groups = [
        {"params": decay_params, "weight_decay": float(weight_decay)},
        {"params": no_decay_params, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


SCHEDULES = ("none", "cosine", "noam", "exponential")


def check_schedule(name: str, allowed: tuple[str, ...] = SCHEDULES) -> None:
    """Refuses a schedule name a task does not offer, before any work starts."""
    if name not in allowed:
        raise ValueError(f"scheduler {name!r} is not one of {', '.join(map(repr, allowed))}")


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    name: str = "none",
    total_steps: int | None = None,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    d_model: int | None = None,
    decay_rate: float = 0.9999,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule as a `LambdaLR` multiplier of each group's base lr (step it every batch).

    - `none`: constant (after an optional linear warm-up over `warmup_steps`).
    - `cosine`: linear warm-up, then cosine decay from the base lr to `min_lr_ratio` * lr at
      `total_steps`.
    - `noam`: Vaswani et al. 2017, Eq. 3: d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (steps
      counted from 1); with base lr 1.0 this is the paper's rate exactly.
    - `exponential`: Ha & Eck 2017 (sketch-rnn): (lr - min_lr) * decay_rate^step + min_lr, with
      min_lr = `min_lr_ratio` * lr.
    """
    check_schedule(name)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def warm(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0

    if name == "none":
        factor = warm
    elif name == "cosine":
        if not total_steps or total_steps <= warmup_steps:
            raise ValueError(f"cosine needs total_steps > warmup_steps, got total_steps={total_steps}, "
                             f"warmup_steps={warmup_steps}")

        def factor(step: int) -> float:
            if step < warmup_steps:
                return warm(step)
            progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif name == "noam":
        if not d_model or not warmup_steps:
            raise ValueError(f"noam needs d_model and warmup_steps > 0, got d_model={d_model}, "
                             f"warmup_steps={warmup_steps}")

        def factor(step: int) -> float:
            n = step + 1
            return d_model**-0.5 * min(n**-0.5, n * warmup_steps**-1.5)
    else:
        def factor(step: int) -> float:
            return (1 - min_lr_ratio) * decay_rate**step + min_lr_ratio
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
