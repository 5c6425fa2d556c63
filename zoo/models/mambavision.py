"""MambaVision: the hybrid Mamba / self-attention vision backbone of Hatamizadeh & Kautz, "MambaVision:
A Hybrid Mamba-Transformer Vision Backbone" (CVPR 2025), with pluggable norms.

    import zoo.models.mambavision, timm
    model = timm.create_model("mambavision_t")                  # official T, random weights
    feats = timm.create_model("mambavision_t", features_only=True)(x)   # 4 maps, strides 4/8/16/32

Network (B images, C = `dim`):
    stem        (B, 3, H, W) -> conv3x3 s2 -> norm -> ReLU -> conv3x3 s2 -> norm -> ReLU -> (B, C, H/4, W/4)
    stages 0-1  residual conv blocks: conv3x3 -> norm -> GELU(tanh) -> conv3x3 -> norm, + drop path
    stages 2-3  the map is zero-padded to a multiple of the window, cut into windows (raster order,
                padded tokens not masked), and each window's tokens (B * windows, w*w, C_i) run through
                `depth` blocks x + dp(g1 * mixer(norm(x))); x + dp(g2 * MLP(norm(x))): the first half of
                the blocks mix with a MambaVisionMixer, the rest with self-attention; then merged, cropped
    downsample  conv3x3 s2 (no bias, no norm) doubling the channels after stages 0-2
    head        norm -> global average pool -> Linear

Fidelity: parameter and buffer names and shapes equal the official NVlabs model's (strict
`load_state_dict` of their checkpoints into the default norms), and so do its outputs, including
its quirks, kept as defaults: the mixer's depthwise conv1d layers have no bias (`conv1d_bias=False`;
the official code builds them with `bias=True // 2`), the dt projection's bias is added twice, in the
projection and again as the scan's `delta_bias` (`delta_bias_twice=True`), and the model-level init
(truncated normal 0.02 and zero bias for every Linear) overrides Mamba's dt initialisation, as in the
official code. `load_official_checkpoint` reads the official `.pth.tar` files, and
`timm.create_model("mambavision_t", pretrained=True)` downloads NVIDIA's (see "pretrained weights" below).

Norms: `conv_norm` (stem, conv stages, final norm; default "batch") and `token_norm` (both norms of
every token block; default "layer") take any `zoo.norm` kind that declares the layout they are built
in, "nchw" and "nlc" (windows are not causal, so kinds that pool over positions are fine). Other
values change the architecture (and the state dict), so official weights then load only partially.

The selective scan is `zoo.models.ssm.selective_scan` (`scan_backend`: "auto" = mamba_ssm's CUDA
kernel for CUDA tensors when installed, else the chunked fast path: a C++ kernel on CPU, pure PyTorch
elsewhere and while tracing; it runs in float32 under autocast and exports to ONNX).
"""
from __future__ import annotations

import argparse
import http.client
import logging
import os
import urllib.error
import urllib.parse
import warnings
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import (adapt_input_conv, build_model_with_cfg, generate_default_cfgs, register_model,
                         resolve_pretrained_cfg)
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from zoo.models.ssm import BACKENDS, selective_scan
from zoo.norm import build_norm, check_norm, replace_norms

__all__ = ["MambaVision", "MambaVisionMixer", "Attention", "Block", "ConvBlock", "MambaVisionLayer",
           "PatchEmbed", "Downsample", "window_partition", "window_reverse", "attention_blocks",
           "load_official_checkpoint", "convert_norms", "VARIANTS"]

log = logging.getLogger(__name__)


def _norm(kind: str, num_features: int, layout: str, bn_eps: float = 1e-5) -> nn.Module:
    """A `zoo.norm` layer; `bn_eps` is the official eps of the batch norm this one replaces (other
    kinds keep their registry default)."""
    return build_norm(kind, num_features, layout, eps=bn_eps) if kind == "batch" else build_norm(kind, num_features, layout)


# ----------------------------------------------------------------------------------------------------
# windows

def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, C, H, W), H and W multiples of `window` -> (B * H/w * W/w, w*w, C), windows in raster order."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // window, window, w // window, window)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of `window_partition`: (B * H/w * W/w, w*w, C) -> (B, C, H, W)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, c, h, w)


def attention_blocks(depth: int) -> range:
    """Indices of the self-attention blocks of a token stage of `depth` blocks (the rest are mixers):
    the second half, which for odd depths is the smaller half, as in the official code."""
    return range(depth // 2 + 1, depth) if depth % 2 else range(depth // 2, depth)


# ----------------------------------------------------------------------------------------------------
# blocks

class PatchEmbed(nn.Module):
    """Stem: (B, in_chans, H, W) -> (B, dim, ceil(H/4), ceil(W/4)). Two conv3x3 stride 2 (no bias),
    each followed by `norm` (batch norm eps 1e-4 officially) and ReLU."""

    def __init__(self, in_chans: int = 3, in_dim: int = 64, dim: int = 96, norm: str = "batch"):
        super().__init__()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False), _norm(norm, in_dim, "nchw", 1e-4), nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False), _norm(norm, dim, "nchw", 1e-4), nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        in_chans = self.conv_down[0].in_channels
        if x.dim() != 4 or x.shape[1] != in_chans:  # torch's conv would take 3-D input as one unbatched image
            raise ValueError(f"MambaVision expects images of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
        return self.conv_down(x)


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, 2C, ceil(H/2), ceil(W/2)): conv3x3 stride 2, no bias, no norm."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(x)


class ConvBlock(nn.Module):
    """Residual conv block, (B, C, H, W) -> same: x + dp(g * norm(conv(GELU_tanh(norm(conv(x))))))."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: Optional[float] = None, norm: str = "batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm1 = _norm(norm, dim, "nchw")
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm2 = _norm(norm, dim, "nchw")
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)


class MambaVisionMixer(nn.Module):
    """The MambaVision token mixer, (B, L, C) -> (B, L, C).

    in_proj (C -> C) splits into x and z (C/2 each). SSM branch: x -> depthwise conv1d (kernel
    `d_conv`, 'same' padding: non-causal) -> SiLU -> selective scan with input-dependent dt, B, C
    (x_proj: C/2 -> dt_rank + 2 d_state; dt_proj: dt_rank -> C/2; softplus). Symmetric branch: z ->
    depthwise conv1d -> SiLU, no scan. The two are concatenated (not gated) and projected by out_proj.
    A = -exp(A_log), A_log (C/2, d_state) starts at log(1..d_state); D (C/2,) starts at 1.
    """

    def __init__(self, d_model: int, d_state: int = 8, d_conv: int = 3, expand: int = 1,
                 dt_rank: Union[int, str] = "auto", conv1d_bias: bool = False, delta_bias_twice: bool = True,
                 scan_backend: str = "auto"):
        super().__init__()
        d_inner = expand * d_model
        if d_inner % 2:
            raise ValueError(f"MambaVisionMixer: expand * d_model = {d_inner} must be even (split into x and z)")
        if scan_backend not in BACKENDS:
            raise ValueError(f"scan_backend {scan_backend!r} is not one of {BACKENDS}")
        half = d_inner // 2
        self.d_state, self.delta_bias_twice, self.scan_backend = d_state, delta_bias_twice, scan_backend
        self.dt_rank = -(-d_model // 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, d_inner, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(half, 1))
        self.D = nn.Parameter(torch.ones(half))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=conv1d_bias)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=conv1d_bias)

    def forward(self, x: Tensor) -> Tensor:
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)                 # (B, C/2, L) each
        x = F.silu(self.conv1d_x(x))
        z = F.silu(self.conv1d_z(z))
        dt, b, c = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt).transpose(1, 2)                                  # (B, C/2, L), bias added once
        y = selective_scan(
            x, dt, -torch.exp(self.A_log.float()), b.transpose(1, 2), c.transpose(1, 2), self.D.float(),
            delta_bias=self.dt_proj.bias.float() if self.delta_bias_twice else None, delta_softplus=True,
            backend=self.scan_backend)
        return self.out_proj(torch.cat([y, z], dim=1).transpose(1, 2))


class Attention(nn.Module):
    """Multi-head self-attention over the tokens of a window, (B, L, C) -> (B, L, C); no positional
    embedding."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """Token block, (B, L, C) -> same: x + dp(g1 * mixer(norm1(x))), then x + dp(g2 * mlp(norm2(x))).
    The mixer is `Attention` if `attention` else `MambaVisionMixer`; the MLP is timm's (ratio 4, GELU)."""

    def __init__(self, dim: int, num_heads: int, attention: bool, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale: Optional[float] = None, norm: str = "layer", **mixer_kwargs):
        super().__init__()
        self.norm1 = _norm(norm, dim, "nlc")
        if attention:
            self.mixer = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        else:
            self.mixer = MambaVisionMixer(dim, **mixer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _norm(norm, dim, "nlc")
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        use_scale = layer_scale is not None
        self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim)) if use_scale else None
        self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim)) if use_scale else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.mixer(self.norm1(x))
        x = x + self.drop_path(y * self.gamma_1 if self.gamma_1 is not None else y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y * self.gamma_2 if self.gamma_2 is not None else y)


class MambaVisionLayer(nn.Module):
    """One stage: `depth` conv blocks (`conv=True`) or windowed token blocks, (B, C, H, W) -> same.

    `forward` runs the blocks only; the stage's `downsample` (None for the last stage) is applied by
    `MambaVision`, so that feature maps can be taken before it.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, conv: bool, downsample: bool,
                 drop_path: Sequence[float], layer_scale: Optional[float] = None,
                 layer_scale_conv: Optional[float] = None, conv_norm: str = "batch", token_norm: str = "layer",
                 **block_kwargs):
        super().__init__()
        self.conv, self.window_size, self.grad_checkpointing = conv, window_size, False
        if conv:
            blocks = [ConvBlock(dim, drop_path[i], layer_scale_conv, conv_norm) for i in range(depth)]
        else:
            attn = attention_blocks(depth)
            blocks = [Block(dim, num_heads, i in attn, drop_path=drop_path[i], layer_scale=layer_scale,
                            norm=token_norm, **block_kwargs) for i in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.downsample = Downsample(dim) if downsample else None

    def _run_blocks(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if self.conv:
            return self._run_blocks(x)
        h, w = x.shape[-2:]
        ws = self.window_size
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = window_reverse(self._run_blocks(window_partition(x, ws)), ws, h + pad_b, w + pad_r)
        return x[:, :, :h, :w].contiguous() if pad_b or pad_r else x


# ----------------------------------------------------------------------------------------------------
# network

class MambaVision(nn.Module):
    """MambaVision, (B, in_chans, H, W) -> (B, num_classes) logits; any H, W (a multiple of 32 keeps
    every stage map whole; windows are padded as in the official code).

    Args:
        dim, in_dim: stage-0 width and stem hidden width; stage i has dim * 2**i channels.
        depths, num_heads, window_size: per stage (heads and windows matter for stages 2-3 only).
        mlp_ratio, qkv_bias, drop_rate (MLP and attention-projection dropout), attn_drop_rate.
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks.
        layer_scale, layer_scale_conv: initial layer-scale of token / conv blocks (None: none).
        conv_norm, token_norm: `zoo.norm` kinds (module docstring).
        d_state, d_conv: mixer state size and conv1d kernel (official 8, 3).
        conv1d_bias, delta_bias_twice: the official quirks (module docstring); the defaults are official.
        scan_backend: `zoo.models.ssm.selective_scan` backend.
        global_pool: "avg" or "" (no pooling, forward_head returns the map).
    """

    def __init__(self, dim: int = 80, in_dim: int = 32, depths: Sequence[int] = (1, 3, 8, 4),
                 num_heads: Sequence[int] = (2, 4, 8, 16), window_size: Sequence[int] = (8, 8, 14, 7),
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.2, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 layer_scale: Optional[float] = None, layer_scale_conv: Optional[float] = None,
                 conv_norm: str = "batch", token_norm: str = "layer", d_state: int = 8, d_conv: int = 3,
                 conv1d_bias: bool = False, delta_bias_twice: bool = True, scan_backend: str = "auto"):
        super().__init__()
        if not len(depths) == len(num_heads) == len(window_size) == 4:
            raise ValueError(f"depths, num_heads and window_size need 4 entries (one per stage), got "
                             f"{list(depths)}, {list(num_heads)}, {list(window_size)}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool {global_pool!r} is not one of 'avg', ''")
        check_norm(conv_norm, type(self).__name__, arg="conv_norm", layouts=("nchw",))
        check_norm(token_norm, type(self).__name__, arg="token_norm", layouts=("nlc",))
        self.num_classes, self.global_pool, self.grad_checkpointing = num_classes, global_pool, False
        self.num_features = self.head_hidden_size = dim * 8
        self.patch_embed = PatchEmbed(in_chans, in_dim, dim, conv_norm)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.levels = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(depths):
            width = dim * 2**i
            self.levels.append(MambaVisionLayer(
                width, depth, num_heads[i], window_size[i], conv=i < 2, downsample=i < 3,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], layer_scale=layer_scale,
                layer_scale_conv=layer_scale_conv, conv_norm=conv_norm, token_norm=token_norm, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate, d_state=d_state, d_conv=d_conv,
                conv1d_bias=conv1d_bias, delta_bias_twice=delta_bias_twice, scan_backend=scan_backend))
            self.feature_info.append(dict(num_chs=width, reduction=4 * 2**i, module=f"levels.{i}"))
        self.norm = _norm(conv_norm, self.num_features, "nchw")
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # as the official model: it runs after the mixers' own init, so dt_proj ends up here too
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The SSM's A_log and D, as in Mamba (zoo.optim.param_groups reads this)."""
        return {"*A_log", "*.D"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for level in self.levels:
            level.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=r"^levels\.(\d+)" if coarse else
                    [(r"^levels\.(\d+)\.blocks\.(\d+)", None), (r"^levels\.(\d+)\.downsample", (0,)),
                     (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new, re-initialised head for `num_classes` (0: none; forward then returns pooled features)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool {global_pool!r} is not one of 'avg', ''")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(self._init_weights)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, 8 dim, H/32, W/32), after the final norm, before pooling."""
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
            if level.downsample is not None:
                x = level.downsample(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, C, h, w) -> (B, num_classes) logits, or (B, C) pooled features if `pre_logits`."""
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Stage maps before downsampling (stage i: (B, dim * 2**i, H / 2**(i+2), W / 2**(i+2))).

        indices: stages to return (int n: the last n; None: all). norm: apply the final norm to the
        last stage's map. Returns the maps, or (final features, maps) unless `intermediates_only`.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt {output_fmt!r} is not one of 'NCHW', 'NHWC'")
        take, max_index = feature_take_indices(len(self.levels), indices)
        levels = self.levels[:max_index + 1] if stop_early else self.levels
        intermediates = []
        x = self.patch_embed(x)
        for i, level in enumerate(levels):
            x = level(x)
            if i in take:
                y = self.norm(x) if norm and i == len(self.levels) - 1 else x
                intermediates.append(y.permute(0, 2, 3, 1) if output_fmt == "NHWC" else y)
            if level.downsample is not None:
                if intermediates_only and i >= max_index:
                    break
                x = level.downsample(x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages (and the last kept stage's downsample) after the last of `indices`."""
        take, max_index = feature_take_indices(len(self.levels), indices)
        self.levels = self.levels[:max_index + 1]
        self.levels[-1].downsample = None
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def load_pretrained(self, path: str) -> None:
        """timm's hook for `pretrained=True` (the pretrained_cfg's `custom_load`): strict-loads the
        official file that timm downloaded from the cfg's `url` into its cache (or the cfg's `file`)
        with `load_official_checkpoint`; a head for another number of classes is re-initialised. Errors
        name the file and where it came from."""
        cfg = self.pretrained_cfg
        try:
            load_official_checkpoint(self, path, strict=True)
        except (ValueError, RuntimeError) as e:
            came = (f"downloaded from {cfg['url']}; delete it to download it again" if cfg.get("url") and
                    not cfg.get("file") else "the pretrained_cfg file")
            raise type(e)(f"pretrained weights of {cfg.get('architecture')}: {e} ({came})") from e


# ----------------------------------------------------------------------------------------------------
# official checkpoints

def _official_state_dict(checkpoint: dict) -> dict:
    """The weights of an official checkpoint dict: its `state_dict` (or `model`) entry, or the dict
    itself, with DataParallel's `module.` prefixes removed."""
    sd = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if not isinstance(sd, dict):
        raise ValueError(f"the checkpoint's weights are a {type(sd).__name__}, not a dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def checkpoint_filter_fn(state_dict: dict, model: MambaVision) -> dict:
    """timm's `pretrained_filter_fn`: official checkpoint dict -> our state dict."""
    return _official_state_dict(state_dict)


def load_official_checkpoint(model: MambaVision, path: Union[str, Path], strict: bool = True,
                             trusted: bool = False) -> dict:
    """Load an official NVlabs `.pth.tar` (or `.pth`) into `model`.

    Reads the `state_dict` (or `model`) entry and strips `module.` prefixes. When the checkpoint's head
    has another number of classes than `model`, the head weights are skipped and the model's head is
    re-initialised (reported); a stem for other input channels is adapted as timm does
    (`adapt_input_conv`). The file is read with `torch.load(weights_only=True)`, allowing the
    argparse `Namespace` that timm's training script stores as `args`; a file holding other pickled
    objects is refused unless `trusted=True` (only for files from a source you trust: unpickling can
    run code). A file that is no readable checkpoint (truncated, corrupt, an HTML page) is a ValueError.

    Returns {"missing": [...], "unexpected": [...], "mismatched": [...], "head_reinitialised": bool}
    (mismatched: keys whose shapes differ, left out). Any key in the three lists raises RuntimeError,
    as `load_state_dict` does; with `strict=False` it is a warning and what matches is loaded (e.g.
    official weights into a model with other norms).
    NVIDIA's weights are under CC-BY-NC-SA-4.0: using them is the caller's choice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as e:
        if "Unsupported global" in str(e):  # weights_only met a pickled object it does not allow
            raise ValueError(f"{path} holds pickled objects that weights_only loading refuses ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]}); if you trust its source, pass trusted=True") from None
        why = (f"{type(e).__name__}: {str(e).splitlines()[0]}" if zipfile.is_zipfile(path) else
               "not the zip archive that torch.save writes")
        raise ValueError(f"{path} cannot be read as a PyTorch checkpoint ({why}): it is truncated, corrupt or "
                         "not a checkpoint") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} does not hold a dict of weights (got {type(ckpt).__name__})")
    try:
        sd = _official_state_dict(ckpt)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    own = model.state_dict()
    head_reinit = False
    head_w = sd.get("head.weight")
    if head_w is not None and head_w.shape[0] != model.num_classes:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        model.reset_classifier(model.num_classes)
        head_reinit = True
        log.warning("load_official_checkpoint: checkpoint head has %d classes, the model %d: head re-initialised",
                    head_w.shape[0], model.num_classes)
    stem = "patch_embed.conv_down.0.weight"
    if stem in sd and stem in own and sd[stem].shape[1] != own[stem].shape[1]:
        sd[stem] = adapt_input_conv(own[stem].shape[1], sd[stem])  # the RGB weights for other input channels
    mismatched = [k for k, v in sd.items() if k in own and getattr(v, "shape", None) != own[k].shape]
    result = model.load_state_dict({k: v for k, v in sd.items() if k not in mismatched}, strict=False)
    missing = [k for k in result.missing_keys if k not in mismatched and not (head_reinit and k.startswith("head."))]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected or mismatched:
        msg = f"load_official_checkpoint({path}): " + ", ".join(
            f"{len(keys)} {what} {keys[:8]}{'...' if len(keys) > 8 else ''}"
            for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                               ("keys of other shapes", mismatched)) if keys)
        if strict:
            raise RuntimeError(msg)
        warnings.warn(msg, stacklevel=2)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched, "head_reinitialised": head_reinit}


def convert_norms(model: MambaVision, conv_norm: str, token_norm: str) -> None:
    """Turns the norms of `model` into `conv_norm` (stem, conv stages, final norm) and `token_norm`
    (token blocks) in place, by `zoo.norm.replace_norms`: what the kinds share is copied (the affine
    weights; everything within one kind). A model built with the official norms and NVIDIA's weights
    then has the state dict layout of one built with these norms, e.g. to fine-tune them from there."""
    for part in model.levels[2:]:
        replace_norms(part, token_norm)
    for part in (model.patch_embed, *model.levels[:2]):
        replace_norms(part, conv_norm)
    replace_norms(model, conv_norm, skip=(PatchEmbed, MambaVisionLayer))  # the final norm


# ----------------------------------------------------------------------------------------------------
# variants

# depths, heads, windows, drop path and layer scale of the official variants
VARIANTS = {
    "mambavision_t": dict(dim=80, in_dim=32, depths=(1, 3, 8, 4), num_heads=(2, 4, 8, 16), window_size=(8, 8, 14, 7),
                          drop_path_rate=0.2),
    "mambavision_t2": dict(dim=80, in_dim=32, depths=(1, 3, 11, 4), num_heads=(2, 4, 8, 16),
                           window_size=(8, 8, 14, 7), drop_path_rate=0.2),
    "mambavision_s": dict(dim=96, in_dim=64, depths=(3, 3, 7, 5), num_heads=(2, 4, 8, 16), window_size=(8, 8, 14, 7),
                          drop_path_rate=0.2),
    "mambavision_b": dict(dim=128, in_dim=64, depths=(3, 3, 10, 5), num_heads=(2, 4, 8, 16),
                          window_size=(8, 8, 14, 7), drop_path_rate=0.3, layer_scale=1e-5),
    "mambavision_l": dict(dim=196, in_dim=64, depths=(3, 3, 10, 5), num_heads=(4, 8, 16, 32),
                          window_size=(8, 8, 14, 7), drop_path_rate=0.3, layer_scale=1e-5),
    "mambavision_l2": dict(dim=196, in_dim=64, depths=(3, 3, 12, 5), num_heads=(4, 8, 16, 32),
                           window_size=(8, 8, 14, 7), drop_path_rate=0.3, layer_scale=1e-5),
    "mambavision_l3": dict(dim=256, in_dim=64, depths=(3, 3, 20, 10), num_heads=(4, 8, 16, 32),
                           window_size=(8, 8, 16, 8), drop_path_rate=0.5, layer_scale=1e-5),
    # L2 and L3 as their 512 px ImageNet-21K weights: windows as large as the stage 2-3 maps at 512 px
    "mambavision_l2_512": dict(dim=196, in_dim=64, depths=(3, 3, 12, 5), num_heads=(4, 8, 16, 32),
                               window_size=(8, 8, 32, 16), drop_path_rate=0.3, layer_scale=1e-5),
    "mambavision_l3_512": dict(dim=256, in_dim=64, depths=(3, 3, 20, 10), num_heads=(4, 8, 16, 32),
                               window_size=(8, 8, 32, 16), drop_path_rate=0.5, layer_scale=1e-5),
}

# ----------------------------------------------------------------------------------------------------
# pretrained weights
#
# NVIDIA's published files, as the official code's `default_cfgs` (NVlabs/MambaVision
# mambavision/models/mamba_vision.py) and README list them: one `.pth.tar` per Hugging Face repo
# nvidia/MambaVision-*, a timm training checkpoint ({"state_dict": ..., "optimizer": ..., "args": ...})
# in the official layout. `timm.create_model(name, pretrained=True)` downloads the cfg's `url` into
# timm's cache ($TORCH_HOME/hub/checkpoints, or `cache_dir`) once, then hands the file to
# `MambaVision.load_pretrained` (`custom_load`), which strict-loads it with `load_official_checkpoint`.
# A `url` rather than an `hf_hub_id`: with one timm would fetch through huggingface_hub instead.
# Evaluation transform: bicubic resize to input_size / crop_pct, then crop (center or squash), ImageNet
# mean/std. The 21K files are ImageNet-21K pretrained, fine-tuned on ImageNet-1K (1000 classes).

_HF = "https://huggingface.co/nvidia"
_LICENSE = "NVIDIA Source Code License-NC (code), CC-BY-NC-SA-4.0 (weights)"


def _cfg(repo: str, file: str, **kwargs) -> dict:
    return {"url": f"{_HF}/{repo}/resolve/main/{file}", "custom_load": True, "num_classes": 1000,
            "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 1.0, "crop_mode": "center",
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.conv_down.0", "classifier": "head", "license": _LICENSE,
            "origin_url": "https://github.com/NVlabs/MambaVision", "paper_ids": "arXiv:2407.08083", **kwargs}


_512 = dict(input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=0.93, crop_mode="squash")

# the first tag of a model is what pretrained=True loads; name.tag picks another
default_cfgs = generate_default_cfgs({
    "mambavision_t.nvlabs_in1k": _cfg("MambaVision-T-1K", "mambavision_tiny_1k.pth.tar"),
    "mambavision_t2.nvlabs_in1k": _cfg("MambaVision-T2-1K", "mambavision_tiny2_1k.pth.tar", crop_pct=0.98),
    "mambavision_s.nvlabs_in1k": _cfg("MambaVision-S-1K", "mambavision_small_1k.pth.tar", crop_pct=0.93),
    "mambavision_b.nvlabs_in1k": _cfg("MambaVision-B-1K", "mambavision_base_1k.pth.tar"),
    "mambavision_b.nvlabs_in21k_ft_in1k": _cfg("MambaVision-B-21K", "mambavision_base_21k.pth.tar"),
    "mambavision_l.nvlabs_in1k": _cfg("MambaVision-L-1K", "mambavision_large_1k.pth.tar"),
    "mambavision_l.nvlabs_in21k_ft_in1k": _cfg("MambaVision-L-21K", "mambavision_large_21k.pth.tar"),
    "mambavision_l2.nvlabs_in1k": _cfg("MambaVision-L2-1K", "mambavision_large2_1k.pth.tar"),
    "mambavision_l2_512.nvlabs_in21k_ft_in1k": _cfg("MambaVision-L2-512-21K", "mambavision_L2_21k_240m_512.pth.tar",
                                                    **_512),
    "mambavision_l3.nvlabs_in21k_ft_in1k": _cfg("MambaVision-L3-256-21K", "mambavision_L3_21k_740m_256.pth.tar",
                                                input_size=(3, 256, 256), pool_size=(8, 8)),
    "mambavision_l3_512.nvlabs_in21k_ft_in1k": _cfg("MambaVision-L3-512-21K", "mambavision_L3_21k_740m_512.pth.tar",
                                                    **_512),
})

_DOWNLOAD_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def _download_failed(variant: str, kwargs: dict, e: Exception) -> str:
    """One line for a failed download: the url, why, where the cache looked and how to supply the file."""
    url = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")).url
    cached = os.path.join(kwargs.get("cache_dir") or os.path.join(torch.hub.get_dir(), "checkpoints"),
                          os.path.basename(urllib.parse.urlparse(url).path))
    why = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
    return (f"pretrained weights of {variant}: downloading {url} failed ({why}) and the cache has no {cached}; "
            "without internet, download that file elsewhere and put it there (the cache follows TORCH_HOME), or "
            "build the model without pretrained and call zoo.models.mambavision.load_official_checkpoint(model, file)")


def _create(variant: str, pretrained: bool = False, **kwargs) -> MambaVision:
    model_args = {**VARIANTS[variant], **kwargs}
    # timm assumes a `url` or `file` given in pretrained_cfg_overlay holds a plain state dict
    # (custom_load=False); our loader reads official files and plain state dicts alike
    model_args["pretrained_cfg_overlay"] = {"custom_load": True, **(kwargs.get("pretrained_cfg_overlay") or {})}
    try:
        return build_model_with_cfg(MambaVision, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                    feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **model_args)
    except _DOWNLOAD_ERRORS as e:
        if not pretrained:
            raise
        raise RuntimeError(_download_failed(variant, kwargs, e)) from e


@register_model
def mambavision_t(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-T: 31.8M parameters, 82.3% ImageNet top-1 (official)."""
    return _create("mambavision_t", pretrained, **kwargs)


@register_model
def mambavision_t2(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-T2: 35.1M parameters, 82.7% ImageNet top-1 (official)."""
    return _create("mambavision_t2", pretrained, **kwargs)


@register_model
def mambavision_s(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-S: 50.1M parameters, 83.3% ImageNet top-1 (official)."""
    return _create("mambavision_s", pretrained, **kwargs)


@register_model
def mambavision_b(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-B: 97.7M parameters, 84.2% ImageNet top-1 (official)."""
    return _create("mambavision_b", pretrained, **kwargs)


@register_model
def mambavision_l(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L: 227.9M parameters, 85.0% ImageNet top-1 (official)."""
    return _create("mambavision_l", pretrained, **kwargs)


@register_model
def mambavision_l2(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L2: 241.5M parameters, 85.3% ImageNet top-1 (official)."""
    return _create("mambavision_l2", pretrained, **kwargs)


@register_model
def mambavision_l3(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L3 (256 px windows [8, 8, 16, 8]): 739.6M parameters (official)."""
    return _create("mambavision_l3", pretrained, **kwargs)


@register_model
def mambavision_l2_512(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L2 with the windows [8, 8, 32, 16] of its 512 px weights: 241.5M parameters (official)."""
    return _create("mambavision_l2_512", pretrained, **kwargs)


@register_model
def mambavision_l3_512(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L3 with the windows [8, 8, 32, 16] of its 512 px weights: 739.6M parameters (official)."""
    return _create("mambavision_l3_512", pretrained, **kwargs)
