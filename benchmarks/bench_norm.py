"""Forward + backward time of each zoo.norm layer vs the torch / timm built-in it wraps.

    python benchmarks/bench_norm.py    # CPU; shapes (8,64,64,64) nchw, (8,256,384) nlc, (256,1024) nc
    python benchmarks/bench_norm.py --threads 1 --repeats 31    # steadier on a shared 2-core VM
    python benchmarks/bench_norm.py --device cuda --repeats 31

Both modules get the same input, parameters and upstream gradient, run in training mode, and are
timed in alternating blocks (order flipped every repeat, so drift and warm caches hit both alike).
Prints a markdown table of median ms per step and the median paired ratio ours / built-in (goal
<= 1.05). Where a layout needs a transpose for the built-in (e.g. nn.GroupNorm on (N, L, C)), the
baseline includes it.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from timm.layers import LayerNorm2d, RmsNorm2d
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo.norm import build_norm, default_num_groups  # noqa: E402


class Transposed(nn.Module):
    """Runs a channels-at-dim-1 built-in on (N, L, C): the least a user of the built-in would write."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.transpose(1, 2)).transpose(1, 2)


def builtin(kind, layout, c, groups):
    """The torch / timm module our `kind` wraps for `layout`, with the same defaults as ours."""
    if kind == "batch":
        return nn.BatchNorm2d(c) if layout == "nchw" else nn.BatchNorm1d(c)
    if kind == "layer":
        return LayerNorm2d(c, eps=1e-5) if layout == "nchw" else nn.LayerNorm(c)
    if kind == "instance":
        return nn.InstanceNorm2d(c, affine=True) if layout == "nchw" else nn.InstanceNorm1d(c, affine=True)
    if kind == "group":
        return nn.GroupNorm(groups, c)
    if kind == "rms":
        return RmsNorm2d(c, eps=1e-6) if layout == "nchw" else nn.RMSNorm(c, eps=1e-6)
    raise ValueError(kind)


def cases(shapes, kinds):
    for layout, shape in shapes.items():
        c = shape[-1] if layout == "nlc" else shape[1]
        for kind in kinds:
            if kind == "instance" and layout == "nc":
                continue  # refused by design: one value per statistic
            # zoo's default group count, but never groups of one value on nc
            groups = default_num_groups(c, 32 if layout != "nc" else max(1, min(32, c // 2)))
            ours = build_norm(kind, c, layout, **({"num_groups": groups} if kind == "group" else {}))
            ref = builtin(kind, layout, c, groups)
            if layout == "nlc" and kind in ("batch", "instance", "group"):
                ref = Transposed(ref)
            yield kind, layout, shape, ours, ref


def time_pair(ours, ref, x, repeats, device, min_block_s):
    """Seconds per forward+backward step of each module (medians over interleaved blocks) and the
    median of the per-repeat ratios ours / built-in: adjacent blocks see the same machine load, so
    the paired ratio is robust to load from other processes that shifts both timings."""
    g = torch.randn_like(ours(x))  # the upstream gradient, shaped like the output (a norm's: like x)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    mods = [ours, ref]

    def step(i):
        mods[i].zero_grad(set_to_none=True)
        xs[i].grad = None
        mods[i](xs[i]).backward(g)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in (0, 1):  # warm up (allocator, lazy init) and size a block to ~min_block_s
        for _ in range(3):
            step(i)
    sync()
    t0 = time.perf_counter()
    step(0)
    sync()
    number = max(1, int(min_block_s / max(time.perf_counter() - t0, 1e-6)))

    times = ([], [])
    for r in range(repeats):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            sync()
            t0 = time.perf_counter()
            for _ in range(number):
                step(i)
            sync()
            times[i].append((time.perf_counter() - t0) / number)
    ratio = statistics.median(a / b for a, b in zip(*times))
    return statistics.median(times[0]), statistics.median(times[1]), ratio


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=21, help="timed blocks per module (median is reported)")
    p.add_argument("--min-block-s", type=float, default=0.05, help="seconds per timed block")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--kinds", default="batch,layer,instance,group,rms")
    p.add_argument("--layouts", default="nchw,nlc,nc")
    p.add_argument("--nchw", default="8,64,64,64")
    p.add_argument("--nlc", default="8,256,384")
    p.add_argument("--nc", default="256,1024")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = {k: tuple(int(s) for s in getattr(args, k).split(",")) for k in args.layouts.split(",")}

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads={torch.get_num_threads()}"
    print(f"torch {torch.__version__}, timm {timm.__version__}, device {device} ({where})"
          + f", {args.dtype}, forward+backward in train mode, {args.repeats} interleaved blocks each\n"
          "ms: median per step; ratio: median over repeats of ours / built-in in adjacent blocks\n")
    print("| kind | layout | shape | built-in | ours (ms) | built-in (ms) | ratio |")
    print("|---|---|---|---|---:|---:|---:|")
    ratios = []
    for kind, layout, shape, ours, ref in cases(shapes, args.kinds.split(",")):
        ours, ref = ours.to(device, dtype), ref.to(device, dtype)
        # same parameters, and a check that both compute the same thing
        state = {k.split(".")[-1]: v for k, v in ours.state_dict().items()}
        ref.load_state_dict({k: state[k.split(".")[-1]] for k in ref.state_dict()})
        x = torch.randn(shape, device=device, dtype=dtype)
        tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
        torch.testing.assert_close(ours(x), ref(x), atol=tol, rtol=tol)
        t_ours, t_ref, ratio = time_pair(ours, ref, x, args.repeats, device, args.min_block_s)
        name = type(ref.inner if isinstance(ref, Transposed) else ref).__name__
        name = f"{name} + transposes" if isinstance(ref, Transposed) else name
        ratios.append(ratio)
        print(f"| {kind} | {layout} | {tuple(shape)} | {name} | {t_ours * 1e3:.3f} | {t_ref * 1e3:.3f} | "
              f"{ratio:.3f} |", flush=True)
    print(f"\nmax ratio {max(ratios):.3f}, median ratio {statistics.median(ratios):.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
