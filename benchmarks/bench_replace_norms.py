"""Forward + backward time of a timm model after `replace_norms(model, kind)` vs the same model built
with that norm natively (timm's `norm_layer=` argument), where timm can build it.

    python benchmarks/bench_replace_norms.py                 # CPU, 1 thread, 64 px, batch 8
    python benchmarks/bench_replace_norms.py --repeats 21 --min-block-s 0.5    # steadier
    python benchmarks/bench_replace_norms.py --device cuda --batch 64 --size 128

Both models get the same parameters and buffers (copied in registration order, which replace_norms
keeps), the same input and upstream gradient, and are checked to compute the same outputs; then they
are timed in training mode in alternating blocks (order flipped every repeat, so drift and load from
other processes hit both alike). Prints a markdown table of median ms per step and the median paired
ratio replaced / native (goal <= 1.05). What the ratio measures is the registry modules and the
wrappers replace_norms adds (ChannelsLastNorm for nn.LayerNorm-style norms, NormAct for timm's
norm+act layers) against timm's and torch's own layers. A control row per model times two copies of
the native model against each other (kind "-"): its distance from 1 is the noise of the machine.
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool

import timm  # noqa: E402
import torch  # noqa: E402
from timm.layers import LayerNorm2d, RmsNorm, RmsNorm2d  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo.norm import default_num_groups, replace_norms  # noqa: E402
from bench_norm import time_pair  # noqa: E402  (the same interleaved timing as the norm-layer benchmark)


def group_norm(eps):
    return lambda c, **kw: nn.GroupNorm(default_num_groups(c), c, eps=eps, **kw)  # zoo's default group count


# (model, timm kwargs, kind, native norm_layer(C, **device and dtype) or None for the model's own default,
# what the native is).
# eps: replace_norms carries the old norm's eps (resnet's BatchNorm2d 1e-5, convnext's LayerNorm2d
# 1e-6), so the native layers are given the same.
def cases(size):
    vit = dict(img_size=size, patch_size=8)
    return [
        ("resnet18", {}, "batch", None, "BatchNorm2d"),
        ("resnet18", {}, "group", group_norm(1e-5), "GroupNorm"),
        ("resnet18", {}, "layer", lambda c, **kw: LayerNorm2d(c, eps=1e-5, **kw), "LayerNorm2d"),
        ("resnet18", {}, "instance", lambda c, **kw: nn.InstanceNorm2d(c, affine=True, **kw), "InstanceNorm2d"),
        ("resnet18", {}, "rms", lambda c, **kw: RmsNorm2d(c, eps=1e-5, **kw), "RmsNorm2d"),
        ("convnext_atto", {}, "layer", None, "LayerNorm2d"),
        ("convnext_atto", {}, "batch", lambda c, **kw: nn.BatchNorm2d(c, eps=1e-6, **kw), "BatchNorm2d"),
        ("convnext_atto", {}, "group", group_norm(1e-6), "GroupNorm"),
        ("convnext_atto", {}, "rms", lambda c, **kw: RmsNorm2d(c, eps=1e-6, **kw), "RmsNorm2d"),
        ("vit_tiny_patch16_224", vit, "layer", None, "LayerNorm"),
        ("vit_tiny_patch16_224", vit, "rms", lambda c, **kw: RmsNorm(c, eps=1e-6, **kw), "RmsNorm"),
        ("efficientnet_b0", {}, "batch", None, "BatchNormAct2d"),
    ]


def copy_state(src, dst):
    """Copies src's parameters and buffers into dst by registration order; False if they differ."""
    a = [*src.parameters(), *src.buffers()]
    b = [*dst.parameters(), *dst.buffers()]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return False
    with torch.no_grad():
        for x, y in zip(a, b):
            y.copy_(x)
    return True


def run(name, kw, kind, native_layer, native_name, args, device):
    """Times one row; kind None: the control, two copies of the native model."""
    torch.manual_seed(0)
    common = dict(pretrained=False, num_classes=10, drop_rate=0.0, **kw)
    replaced = timm.create_model(name, **common)
    if kind is not None:
        replace_norms(replaced, kind)
    native = timm.create_model(name, **common, **({"norm_layer": native_layer} if native_layer else {}))
    if not copy_state(replaced, native):
        raise SystemExit(f"{name} {kind}: parameters of the replaced and native models do not line up")
    replaced, native = replaced.to(device).train(), native.to(device).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    with torch.no_grad():  # the same function (batch statistics: train mode)
        torch.testing.assert_close(replaced(x), native(x), atol=1e-3, rtol=1e-3)
    t_rep, t_nat, ratio = time_pair(replaced, native, x, args.repeats, device, args.min_block_s)
    print(f"| {name} | {kind or '-'} | {native_name} | {t_rep * 1e3:.2f} | {t_nat * 1e3:.2f} | {ratio:.3f} |",
          flush=True)
    return ratio


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="input height and width")
    p.add_argument("--repeats", type=int, default=11, help="timed blocks per model (median is reported)")
    p.add_argument("--min-block-s", type=float, default=0.2, help="seconds per timed block")
    p.add_argument("--models", default="", help="comma-separated subset of the models")
    p.add_argument("--kinds", default="", help="comma-separated subset of the kinds")
    p.add_argument("--no-control", action="store_true", help="skip the native-vs-native control rows")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads={torch.get_num_threads()}"
    print(f"torch {torch.__version__}, timm {timm.__version__}, device {device} ({where}), float32, batch "
          f"{args.batch} at {args.size} px, forward+backward in train mode, {args.repeats} interleaved blocks each\n"
          "ms: median per step; ratio: median over repeats of replaced / native in adjacent blocks\n")
    print("| model | kind | native norm_layer | replaced (ms) | native (ms) | ratio |")
    print("|---|---|---|---:|---:|---:|")
    ratios, controlled = [], set()
    for name, kw, kind, native_layer, native_name in cases(args.size):
        if args.models and name not in args.models.split(","):
            continue
        if not args.no_control and name not in controlled:  # before the model's first kind
            controlled.add(name)
            run(name, kw, None, None, "(native copy)", args, device)
        if args.kinds and kind not in args.kinds.split(","):
            continue
        ratios.append(run(name, kw, kind, native_layer, native_name, args, device))
    print(f"\nmax ratio {max(ratios):.3f}, median ratio {statistics.median(ratios):.3f} (goal <= 1.05; "
          "control rows excluded)")


if __name__ == "__main__":
    main()
