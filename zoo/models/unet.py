"""U-Net (Ronneberger, Fischer, Brox 2015, arXiv:1505.04597) and overlap-tile inference.

The network
    `UNet()` with its defaults is the paper's network: per level two unpadded ("valid") 3x3
    convolutions + ReLU, 2x2 max-pooling between levels (channels double, 64 -> 1024 over 5 levels),
    2x2 up-convolutions (ConvTranspose2d, stride 2) that halve the channels, the encoder map of the
    same level center-cropped and concatenated, and a 1x1 convolution to `num_classes`. A 572x572
    input gives a 388x388 output; 23 convolutions, 31,030,658 parameters. Options:

    padding="same" (with padding_mode "zeros" or "reflect"): the common modern variant; output size
        = input size, which must be a multiple of `stride` = 2**(depth-1).
    norm: a `zoo.norm` kind name put after every 3x3 convolution, before its ReLU ("none" in the
        paper); any kind that declares the "nchw" layout. A convolution followed by a norm with a
        learnable shift (a `bias` parameter: batch, instance, group, layer) has no bias of its own,
        since the norm's shift replaces it; rms (which scales but does not shift) and none keep the
        convolution bias.
    dropout: probability of the (element-wise) dropout at the end of the contracting path, i.e. on
        the bottom level's output. The paper uses dropout there without giving p; 0.0 by default so the
        module is deterministic, and 0.5 (Caffe's usual value) in the paper preset
        (configs/unet_paper.yaml).

    Weights are initialised as in the paper (He et al.): Gaussian with std sqrt(2 / N), N = the
    number of inputs of one output unit, biases zero. For a k x k convolution N = k*k*C_in; for the
    2x2 stride-2 up-convolution each output pixel is reached by exactly one kernel tap per input
    channel, so N = C_in * (k_h*k_w) / (s_h*s_w) = C_in (torch's own fan-in for ConvTranspose2d
    would use C_out * k*k, the fan-in of the adjoint).

Sizes (valid padding)
    Every valid 3x3 conv removes 1 px per side at its level's scale and every max-pool needs an even
    size, so the legal inputs of a depth-D net form the progression `first + stride*k` and the output
    is `input - 2*input_context`, with stride = 2**(D-1) and input_context = 6*stride - 4 (92 px for
    the paper net: legal inputs 188 + 16k, output = input - 184). `valid_input_sizes()` returns that
    progression, `output_size`, `input_size_for_output` and `check_input_size` use it, and
    `UNet.forward` refuses an illegal height or width, naming the nearest legal sizes.

Overlap-tile inference
    `tiled_predict(model, images, tile)` segments images of any size: the image is mirror-padded by
    the context the network needs, the output is cut into tiles placed on the pooling grid, and each
    output pixel comes from exactly one tile. For a valid-padding net in eval mode with a norm that
    does not pool over space, this equals one pass over the whole mirror-padded image
    (`whole_image_predict`) up to float rounding; `seam_error` measures the difference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from timm.models import register_model
from torch import Tensor, nn

from zoo.models.config import network_config
from zoo.norm import build_norm, check_norm

__all__ = [
    "UNet", "UNetConfig", "DoubleConv", "Down", "Up",
    "InputSizes", "valid_input_sizes", "output_size", "input_size_for_output", "check_input_size",
    "tiled_predict", "whole_image_predict", "seam_error", "mirror_pad", "default_tile",
    "PADDINGS", "PADDING_MODES", "DEFAULT_TILE",
]

PADDINGS = ("valid", "same")
PADDING_MODES = ("zeros", "reflect")
DEFAULT_TILE = 388  # the paper's output tile (572x572 input tiles for the paper net)

Size = Union[int, Sequence[int]]


# ---------------------------------------------------------------------------------------------------
# Size arithmetic

@dataclass(frozen=True)
class InputSizes:
    """The legal input sizes (per spatial dimension) of a U-Net: `first + step*k`, k = 0, 1, 2, ...;
    output = input - 2*context.

    Paper net (depth 5, valid): InputSizes(first=188, step=16, context=92): 188, 204, ..., 572, ...
    Same padding: first = step = stride (2*stride for padding_mode="reflect", which needs >= 2 px at
    the bottom level), context 0.
    """

    first: int
    step: int
    context: int

    def __contains__(self, size: object) -> bool:
        return isinstance(size, int) and size >= self.first and (size - self.first) % self.step == 0

    def output(self, size: int) -> int:
        """The output size of a legal input size."""
        return size - 2 * self.context

    def neighbors(self, size: int) -> tuple[Optional[int], int]:
        """The largest legal size <= size (None if there is none) and the smallest legal size >= size."""
        if size < self.first:
            return None, self.first
        k = (size - self.first) // self.step
        below = self.first + k * self.step
        return below, below if below == size else below + self.step

    def input_for_output(self, out: int) -> int:
        """The smallest legal input whose output is >= out."""
        return self.neighbors(max(int(out), 1) + 2 * self.context)[1]

    def up_to(self, max_size: int) -> list[int]:
        """All legal input sizes <= max_size."""
        return list(range(self.first, max_size + 1, self.step))

    def __str__(self) -> str:
        out = f"output = input - {2 * self.context}" if self.context else "output = input"
        return f"{self.first} + {self.step}k (k >= 0); {out}"


def _check_arch(depth: int, padding: str, padding_mode: str) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1 (number of resolution levels), got {depth!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding {padding!r} is not one of {', '.join(map(repr, PADDINGS))}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode {padding_mode!r} is not one of {', '.join(map(repr, PADDING_MODES))}")


def valid_input_sizes(depth: int = 5, padding: str = "valid", padding_mode: str = "zeros") -> InputSizes:
    """Which input sizes (per spatial dimension) a U-Net of this depth and padding accepts, and the
    output size each gives. See `InputSizes`.

    Valid padding, depth D, stride S = 2**(D-1): going up from the bottom level, whose input is m px,
    each level above has input 2*(its lower level's input) + 4 (two convs remove 4 px before the
    pool halves), so the network input is S*m + 4*(S-1); the output is S*(m-4) - 4*(S-1), so the
    context per side is 6*S - 4 and the smallest legal input is the one with output >= 1.
    """
    _check_arch(depth, padding, padding_mode)
    s = 2 ** (depth - 1)
    if padding == "same":
        return InputSizes(first=2 * s if padding_mode == "reflect" else s, step=s, context=0)
    m = 4 + math.ceil((4 * s - 3) / s)  # smallest bottom-level input with output S*(m-4) - 4*(S-1) >= 1
    return InputSizes(first=s * m + 4 * (s - 1), step=s, context=6 * s - 4)


def _pair(size: Size, name: str = "size") -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, Sequence) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"{name} must be an int or a (height, width) pair of ints, got {size!r}")


def check_input_size(size: int, depth: int = 5, padding: str = "valid", padding_mode: str = "zeros",
                     what: str = "input size") -> int:
    """Return the output size of a legal input size; raise ValueError naming the nearest legal sizes
    below and above otherwise."""
    sizes = valid_input_sizes(depth, padding, padding_mode)
    if size in sizes:
        return sizes.output(size)
    below, above = sizes.neighbors(size)
    if padding == "same":
        rule = f"a multiple of {sizes.step} = 2**(depth-1), at least {sizes.first}"
    else:
        rule = f"{sizes.first} + {sizes.step}k, giving output = input - {2 * sizes.context}"
    near = (f"{below} (output {sizes.output(below)}) or {above} (output {sizes.output(above)})"
            if below is not None else f"none below; {above} (output {sizes.output(above)}) above")
    raise ValueError(f"{what} {size} is not legal for a U-Net with depth={depth}, padding={padding!r}: "
                     f"legal sizes are {rule}; nearest legal: {near}")


def output_size(input_size: Size, depth: int = 5, padding: str = "valid",
                padding_mode: str = "zeros") -> Union[int, tuple[int, int]]:
    """Output size for a legal input size (an int, or an (h, w) pair -> pair). ValueError if illegal."""
    if isinstance(input_size, int):
        return check_input_size(input_size, depth, padding, padding_mode)
    h, w = _pair(input_size, "input_size")
    return (check_input_size(h, depth, padding, padding_mode, "input height"),
            check_input_size(w, depth, padding, padding_mode, "input width"))


def input_size_for_output(out: Size, depth: int = 5, padding: str = "valid",
                          padding_mode: str = "zeros") -> Union[int, tuple[int, int]]:
    """The smallest legal input size whose output is >= out (an int, or an (h, w) pair -> pair)."""
    sizes = valid_input_sizes(depth, padding, padding_mode)
    if isinstance(out, int):
        return sizes.input_for_output(out)
    h, w = _pair(out, "out")
    return sizes.input_for_output(h), sizes.input_for_output(w)


# ---------------------------------------------------------------------------------------------------
# Building blocks (the norm travels as its name and is built by zoo.norm.build_norm)

def _has_shift(norm: nn.Module) -> bool:
    """Whether a norm layer adds a learnable per-channel shift (which makes a conv bias redundant)."""
    return isinstance(getattr(norm, "bias", None), Tensor)


class DoubleConv(nn.Module):
    """(3x3 conv -> norm -> ReLU) x 2: one U-Net level.

    (N, in_channels, H, W) -> (N, out_channels, H - 4, W - 4) for padding="valid", (..., H, W) for "same".
    """

    def __init__(self, in_channels: int, out_channels: int, padding: str = "valid",
                 padding_mode: str = "zeros", norm: str = "none"):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        pad = 0 if padding == "valid" else 1
        self.norm1 = build_norm(norm, out_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=pad, padding_mode=padding_mode,
                               bias=not _has_shift(self.norm1))
        self.act1 = nn.ReLU(inplace=True)
        self.norm2 = build_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=pad, padding_mode=padding_mode,
                               bias=not _has_shift(self.norm2))
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.norm1(self.conv1(x)))
        return self.act2(self.norm2(self.conv2(x)))


class Down(nn.Module):
    """2x2 max-pool (stride 2) then DoubleConv: one step down the contracting path.

    (N, in_channels, H, W) -> (N, out_channels, H/2 - 4, W/2 - 4) (valid; H, W even) or (..., H/2, W/2).
    """

    def __init__(self, in_channels: int, out_channels: int, padding: str = "valid",
                 padding_mode: str = "zeros", norm: str = "none"):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_channels, out_channels, padding, padding_mode, norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """2x2 up-convolution (stride 2) halving the channels, concatenation with the center-cropped
    encoder map of the level above, then DoubleConv: one step up the expansive path.

    x: (N, in_channels, h, w), skip: (N, in_channels - out_channels, H, W) with H >= 2h, W >= 2w
    -> (N, out_channels, 2h - 4, 2w - 4) (valid) or (N, out_channels, 2h, 2w) (same).
    """

    def __init__(self, in_channels: int, out_channels: int, padding: str = "valid",
                 padding_mode: str = "zeros", norm: str = "none", skip_channels: Optional[int] = None):
        super().__init__()
        skip_channels = out_channels if skip_channels is None else skip_channels
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = DoubleConv(skip_channels + out_channels, out_channels, padding, padding_mode, norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)
        h, w = x.shape[-2:]
        top, left = (skip.shape[-2] - h) // 2, (skip.shape[-1] - w) // 2
        skip = skip[..., top:top + h, left:left + w]
        return self.conv(torch.cat([skip, x], dim=1))


# ---------------------------------------------------------------------------------------------------
# The network

class UNet(nn.Module):
    """U-Net; the defaults give the paper's network (572x572 -> 388x388, 31,030,658 parameters).

    Args:
        in_channels: input channels C.
        num_classes: output channels K (logits; the paper applies a pixel-wise softmax in the loss).
        base_channels: channels of the first level; level i has base_channels * 2**i.
        depth: number of resolution levels (the paper: 5, i.e. 4 max-pools).
        padding: "valid" (the paper: unpadded convs, output smaller than input) or "same".
        padding_mode: "zeros" or "reflect", the conv padding for padding="same" (unused for "valid").
        norm: `zoo.norm` kind after every 3x3 conv ("none", "batch", "group", "instance", "layer", "rms", or
            a registered kind that declares "nchw").
        dropout: dropout probability at the end of the contracting path (see the module docstring).

    Shapes: forward (N, in_channels, H, W) -> (N, num_classes, H - 2c, W - 2c) logits, c =
    `input_context` (0 for same padding). H and W must be legal (`valid_input_sizes`).

    Attributes: input_context (c, px of context per side: 92 for the paper net, 0 for same padding),
    stride (2**(depth-1): the pooling grid), receptive_radius (px per side beyond which no input
    affects an output pixel), sizes (`InputSizes`), num_features (channels of forward_features).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 64, depth: int = 5,
                 padding: str = "valid", padding_mode: str = "zeros", norm: str = "none", dropout: float = 0.0):
        super().__init__()
        _check_arch(depth, padding, padding_mode)
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("base_channels", base_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        check_norm(norm, type(self).__name__, layouts=("nchw",))
        self.in_channels, self.num_classes, self.base_channels = in_channels, num_classes, base_channels
        self.depth, self.padding, self.padding_mode, self.norm = depth, padding, padding_mode, norm
        self.sizes = valid_input_sizes(depth, padding, padding_mode)
        self.stride = 2 ** (depth - 1)
        self.input_context = self.sizes.context
        # Per side, the receptive field reaches 6*stride - 4 px (the valid context) plus up to
        # stride - 1 px more, depending on where the pixel sits in the pooling grid.
        self.receptive_radius = 7 * self.stride - 5
        self.num_features = base_channels

        widths = [base_channels * 2 ** i for i in range(depth)]
        blocks = dict(padding=padding, padding_mode=padding_mode, norm=norm)
        # encoder[0]: first level; encoder[i]: pool + level i; encoder[-1] is the bottom level
        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels, widths[0], **blocks)]
            + [Down(widths[i - 1], widths[i], **blocks) for i in range(1, depth)])
        self.dropout = nn.Dropout(dropout)  # end of the contracting path
        # decoder[j] goes from level depth-1-j up to level depth-2-j
        self.decoder = nn.ModuleList([Up(widths[i], widths[i - 1], **blocks) for i in range(depth - 1, 0, -1)])
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.reset_parameters()

    # -- init ----------------------------------------------------------------------------------------

    @staticmethod
    def fan_in(module: nn.Module) -> float:
        """N of the paper's init: inputs of one output unit (see the module docstring)."""
        if isinstance(module, nn.ConvTranspose2d):
            kh, kw = module.kernel_size
            sh, sw = module.stride
            return module.in_channels // module.groups * (kh * kw) / (sh * sw)
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw

    def reset_parameters(self) -> None:
        """He init: every conv / up-conv weight ~ N(0, 2/N), biases 0. Norm layers keep their own
        init (weight 1, shift 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / self.fan_in(m)))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- sizes ---------------------------------------------------------------------------------------

    def valid_input_sizes(self) -> InputSizes:
        """The legal input sizes of this network (per spatial dimension)."""
        return self.sizes

    def output_size(self, input_size: Size) -> Union[int, tuple[int, int]]:
        """Output size of a legal input size (int or (h, w)); ValueError if illegal."""
        return output_size(input_size, self.depth, self.padding, self.padding_mode)

    def input_size_for_output(self, out: Size) -> Union[int, tuple[int, int]]:
        """Smallest legal input size whose output is >= out (int or (h, w))."""
        return input_size_for_output(out, self.depth, self.padding, self.padding_mode)

    def check_input(self, x: Tensor) -> None:
        """ValueError unless x is (N, in_channels, H, W) with legal H and W."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects input of shape (N, in_channels={self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        for what, size in (("input height", x.shape[2]), ("input width", x.shape[3])):
            if size not in self.sizes:
                check_input_size(int(size), self.depth, self.padding, self.padding_mode, what)

    # -- forward -------------------------------------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> (N, base_channels, H - 2c, W - 2c): the last decoder map."""
        self.check_input(x)
        skips = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        x = self.dropout(skips.pop())
        for up in self.decoder:
            x = up(x, skips.pop())
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, base_channels, h, w) -> (N, num_classes, h, w) logits (the 1x1 conv); x itself if pre_logits."""
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> (N, num_classes, H - 2c, W - 2c) logits."""
        return self.forward_head(self.forward_features(x))

    # -- timm-style classifier access ----------------------------------------------------------------

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new, He-initialised 1x1 output conv for num_classes classes."""
        self.num_classes = num_classes
        self.head = nn.Conv2d(self.base_channels, num_classes, 1).to(self.head.weight.device)
        nn.init.normal_(self.head.weight, 0.0, math.sqrt(2.0 / self.fan_in(self.head)))
        nn.init.zeros_(self.head.bias)

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, padding={self.padding!r}, padding_mode={self.padding_mode!r}, "
                f"norm={self.norm!r}, input_context={self.input_context}, stride={self.stride}")


# ---------------------------------------------------------------------------------------------------
# timm registry: timm.create_model("unet", ...) / ("unet_same", ...)

UNetConfig = network_config(UNet, given=("in_channels", "num_classes"))


def _create_unet(name: str, pretrained: bool, defaults: dict, kwargs: dict) -> UNet:
    if pretrained:
        raise ValueError(f"timm.create_model({name!r}, pretrained=True): zoo has no pretrained U-Net "
                         "weights; use pretrained=False (and zoo.load for a checkpoint you trained)")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # passed by timm.create_model
        kwargs.pop(key, None)
    aliases = {"in_chans": "in_channels", "drop_rate": "dropout"}  # timm's names
    for timm_name, ours in aliases.items():
        if timm_name in kwargs:
            if ours in kwargs:
                raise TypeError(f"{name}: got both {timm_name!r} and {ours!r}; pass one")
            kwargs[ours] = kwargs.pop(timm_name)
    return UNet(**{**defaults, **kwargs})


@register_model
def unet(pretrained: bool = False, **kwargs) -> UNet:
    """The paper's U-Net: valid 3x3 convs, no norm, base 64, depth 5 (572 -> 388). Any UNet argument
    may be overridden (timm's in_chans / drop_rate are accepted as in_channels / dropout)."""
    return _create_unet("unet", pretrained, {}, kwargs)


@register_model
def unet_same(pretrained: bool = False, **kwargs) -> UNet:
    """The common modern variant: same-padded (zeros) convs with batch norm; output size = input size."""
    return _create_unet("unet_same", pretrained, dict(padding="same", norm="batch"), kwargs)


# ---------------------------------------------------------------------------------------------------
# Overlap-tile inference
#
# Written against what a model exposes, not against UNet, so a LightningModule wrapping a UNet (with
# its own input scaling in forward) can be passed in. The model must have:
#   input_context  c: px of context per side; model(x) maps (N, C, h, w) -> (N, K, h - 2c, w - 2c)
#   stride         S = 2**(depth-1): tiles start on multiples of S (the pooling grid)
#   padding        "valid" or "same" (optional; "valid" unless c == 0)
# and, for padding="same", optionally receptive_radius (default: the U-Net's 7*S - 5).
# For valid padding the legal sizes follow from c and S alone: an input h is legal iff h > 2c and
# (h - c) % S == 0, i.e. legal outputs are the positive sizes congruent to -c mod S (the U-Net at any
# depth has c = 6S - 4, and its legal inputs S*m + 4(S-1) are exactly these).

def _reflect_index(n: int, before: int, after: int, device) -> Tensor:
    """Indices into a length-n axis for positions -before .. n+after-1, mirrored about the edge
    pixels (torch's "reflect"), repeating the mirroring as often as needed (period 2(n-1))."""
    i = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def mirror_pad(images: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """(N, C, H, W) -> (N, C, H + top + bottom, W + left + right), mirror-extrapolated as
    F.pad(mode="reflect") does, but for any pad size: pads >= the image size keep mirroring (the
    paper's extrapolation for images smaller than the context). A 1-px axis is repeated."""
    h, w = images.shape[-2:]
    rows = _reflect_index(h, top, bottom, images.device)
    cols = _reflect_index(w, left, right, images.device)
    return images.index_select(-2, rows).index_select(-1, cols)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _arch(model: nn.Module) -> tuple[int, int, str]:
    try:
        c, s = int(model.input_context), int(model.stride)
    except AttributeError as e:
        raise TypeError(f"{type(model).__name__} must expose `input_context` (px of context per side) and "
                        "`stride` (2**(depth-1)) for overlap-tile inference, as zoo.models.unet.UNet does") from e
    padding = getattr(model, "padding", "valid" if c else "same")
    if padding not in PADDINGS or (padding == "same" and c != 0) or s < 1 or c < 0:
        raise ValueError(f"{type(model).__name__}: unsupported input_context={c}, stride={s}, padding={padding!r}")
    return c, s, padding


def _legal_output_at_most(t: int, c: int, s: int) -> int:
    """Largest legal valid-padding output size <= t, but at least the smallest legal size >= s (so
    that tiles can advance by a positive multiple of s)."""
    r = (-c) % s  # legal outputs: r, r + s, r + 2s, ... (without 0)
    smallest_ok = r + s if r else s
    return max(t - (t - r) % s, smallest_ok)


def _legal_output_at_least(n: int, c: int, s: int) -> int:
    """Smallest legal valid-padding output size >= n."""
    r = (-c) % s
    t = _round_up(n - r, s) + r
    return t if t >= 1 else t + s


def default_tile(model: nn.Module) -> int:
    """Default output tile side: the largest legal output size <= 388 (the paper's tile; 388 for the
    paper net) for valid padding, the largest multiple of `stride` <= 388 for same padding (at least
    one stride). tiled_predict uses one tile when the image is smaller."""
    c, s, padding = _arch(model)
    if padding == "same":
        return max(DEFAULT_TILE // s, 1) * s
    return _legal_output_at_most(DEFAULT_TILE, c, s)


def _tile_sizes(tile, model) -> tuple[int, int]:
    c, s, padding = _arch(model)
    th, tw = _pair(default_tile(model) if tile is None else tile, "tile")
    if th < 1 or tw < 1:
        raise ValueError(f"tile must be positive, got {tile!r}")
    if padding == "same":
        return max(th // s, 1) * s, max(tw // s, 1) * s
    return _legal_output_at_most(th, c, s), _legal_output_at_most(tw, c, s)


def _starts(n: int, tile: int, step: int, s: int) -> list[int]:
    """Tile starts (multiples of s) covering [0, n) with tiles of size tile: every step px, the last
    one moved back as far as the grid allows. Tile k owns [starts[k], starts[k+1])."""
    if tile >= n:
        return [0]
    last = _round_up(n - tile, s)
    return list(range(0, last, step)) + [last]


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else fallback


@torch.no_grad()
def tiled_predict(model: nn.Module, images: Tensor, tile: Optional[Size] = None, *, batch_size: int = 4,
                  halo: Optional[int] = None) -> Tensor:
    """Overlap-tile segmentation of images of any size: (N, C, H, W) -> (N, K, H, W) softmax
    probabilities (float32, on the images' device; the model runs on its parameters' device).

    Args:
        model: a UNet, or any module with the attributes listed above this function (e.g. a
            LightningModule whose forward scales its input and calls a UNet). Its train/eval mode is
            left as it is: call model.eval() first (in train mode batch norm uses, and updates, tile
            statistics and dropout is active).
        images: (N, C, H, W), any H, W >= 1.
        tile: output tile side, int or (h, w). None -> `default_tile(model)` (388 for the paper net).
            Rounded down to a legal output size (valid padding) or a multiple of `stride` (same), but
            not below the smallest one >= stride. An image smaller than a tile is done in one tile.
        batch_size: tiles per forward call (tiles of all N images are batched together).
        halo: same padding only: input margin per side around each tile; None -> model's
            `receptive_radius` (default 7*stride - 5) rounded up to a multiple of stride.

    Valid padding (exact): the image is mirror-padded by c = input_context px (more on the
    bottom/right as the tiles need) and the output is cut into equal tiles whose starts are multiples
    of stride, overlapping only as far as the legal tile sizes force; each output pixel is taken
    from exactly one tile. For a model whose output at a pixel depends only on its receptive field
    (eval mode; norm none, batch (eval), layer, rms) this equals `whole_image_predict` up to float
    rounding. Norms with statistics over space (instance, group, batch in train mode) normalise each
    tile by its own statistics, so tiles differ from the whole image (see `seam_error`).

    Same padding (approximate): tiles of `tile` outputs with a `halo` px margin of real (or at the
    border, mirrored) image per side; each tile's center is kept. Pixels at least `halo` px inside the
    image match `whole_image_predict` (the net's own conv padding at the image border is replaced by
    the mirrored image, so near the border they differ).
    """
    if images.dim() != 4 or min(images.shape[-2:]) < 1:
        raise ValueError(f"tiled_predict expects images of shape (N, C, H, W) with H, W >= 1, got shape "
                         f"{tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    c, s, padding = _arch(model)
    if len(images) == 0:  # no tiles to learn the class count from: the empty result of one whole pass
        return whole_image_predict(model, images)
    n, _, height, width = images.shape
    th, tw = _tile_sizes(tile, model)
    if padding == "same":
        margin = _round_up(int(getattr(model, "receptive_radius", 7 * s - 5)) if halo is None else halo, s)
        crop = margin  # the model returns the whole tile input; keep its center
        th, tw = min(th, _round_up(height, s)), min(tw, _round_up(width, s))
        step_h, step_w = th, tw
    else:
        margin, crop = c, 0
        th, tw = min(th, _legal_output_at_least(height, c, s)), min(tw, _legal_output_at_least(width, c, s))
        step_h, step_w = th // s * s, tw // s * s
    ys, xs = _starts(height, th, step_h, s), _starts(width, tw, step_w, s)
    padded = mirror_pad(images, margin, ys[-1] + th + margin - height, margin, xs[-1] + tw + margin - width)
    if not padded.is_floating_point():
        padded = padded.float()
    device = _device_of(model, images.device)
    jobs = [(i, y, x) for i in range(n) for y in ys for x in xs]
    out: Optional[Tensor] = None
    ends_y, ends_x = dict(zip(ys, ys[1:] + [height])), dict(zip(xs, xs[1:] + [width]))
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b:b + batch_size]
        tiles = torch.stack([padded[i, :, y:y + th + 2 * margin, x:x + tw + 2 * margin] for i, y, x in chunk])
        logits = model(tiles.to(device))
        expected = (th + 2 * margin - 2 * c, tw + 2 * margin - 2 * c)
        if logits.dim() != 4 or tuple(logits.shape[-2:]) != expected:
            raise ValueError(f"tiled_predict: model returned shape {tuple(logits.shape)} for input tiles of shape "
                             f"{tuple(tiles.shape)}; expected (B, K, {expected[0]}, {expected[1]}) from "
                             f"input_context={c}, padding={padding!r}")
        probs = logits.float().softmax(1)[..., crop:crop + th, crop:crop + tw].to(images.device)
        if out is None:
            out = images.new_empty((n, probs.shape[1], height, width), dtype=torch.float32)
        for p, (i, y, x) in zip(probs, chunk):
            h, w = ends_y[y] - y, ends_x[x] - x
            out[i, :, y:y + h, x:x + w] = p[:, :h, :w]
    return out


@torch.no_grad()
def whole_image_predict(model: nn.Module, images: Tensor) -> Tensor:
    """One forward pass over each whole image: (N, C, H, W) -> (N, K, H, W) softmax probabilities.

    Valid padding: the image is mirror-padded by input_context px on the top/left and on the
    bottom/right by input_context px plus what makes the size legal, and the output is cropped to
    H x W: the reference that tiled_predict reproduces. Same padding: mirror-padded on the
    bottom/right to a legal size (a multiple of stride, >= 2*stride) and cropped. Uses the same
    conventions as tiled_predict (model mode untouched, model's device, float32 output).
    """
    if images.dim() != 4:
        raise ValueError(f"whole_image_predict expects images of shape (N, C, H, W), got shape {tuple(images.shape)}")
    c, s, padding = _arch(model)
    height, width = images.shape[-2:]
    if padding == "same":
        hp, wp = max(_round_up(height, s), 2 * s), max(_round_up(width, s), 2 * s)
    else:
        hp, wp = _legal_output_at_least(height, c, s), _legal_output_at_least(width, c, s)
    padded = mirror_pad(images, c, hp - height + c, c, wp - width + c)
    if not padded.is_floating_point():
        padded = padded.float()
    logits = model(padded.to(_device_of(model, images.device)))
    return logits.float().softmax(1)[..., :height, :width].to(images.device)


def seam_error(model: nn.Module, images: Tensor, tile: Optional[Size] = None, *, batch_size: int = 4) -> float:
    """max |tiled_predict - whole_image_predict| over all pixels and classes (0 up to float rounding for
    a valid-padding model whose norms do not pool over space, in eval mode)."""
    tiled = tiled_predict(model, images, tile, batch_size=batch_size)
    whole = whole_image_predict(model, images)
    return (tiled - whole).abs().max().item()
