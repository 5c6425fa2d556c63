"""Selective scan speed: zoo's fast path (`selective_scan_chunked`, the "chunked" backend: on CPU the C++
kernel of zoo/csrc/selective_scan.cpp) and its pure-PyTorch form (the same backend with the C++ kernels
off, as on GPUs or without a compiler) vs the sequential reference vs mambapy's parallel scan (Blelloch,
`pip install mambapy`), forward and forward + backward, at MambaVision's shapes, same run.

    python benchmarks/bench_ssm.py --threads 1           # CPU, default shapes (on a shared machine
                                                         # also set OMP_NUM_THREADS=1)
    python benchmarks/bench_ssm.py --shapes 128x160x196 64x640x49 --repeats 5
    python benchmarks/bench_ssm.py --device cuda        # + mamba_ssm's kernel if installed

Shapes are batch x dim x L (d_state N = 8): at 224 px MambaVision-T's stage 3 mixers scan L = 196
tokens (one 14x14 window per image) over dim = 160 channels (half of C = 320), stage 4 L = 49 over 320;
B/L/S/L2 use larger dims. mambapy is given the same inputs and the same computation around its scan
(the selective_scan of mambapy.mamba: exp(delta A), delta B u, pscan, C contraction, D skip), so only
the scan differs. Every method is checked against the reference before timing. Each timing is the
median of `--repeats` runs after `--warmup` warm-ups, the methods interleaved so load changes hit all
alike. Both wall and process CPU time are reported: on a shared machine run with `--threads 1`
(CPU time then measures the work; with more threads than free cores OpenMP's spinning inflates both).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import cpu_kernels  # noqa: E402
from zoo.models.ssm import selective_scan, selective_scan_chunked, selective_scan_ref  # noqa: E402


def mambapy_scan(u, delta, A, B, C, D, delta_bias):
    """The selective scan as mambapy computes it (its pscan), on our (batch, dim, L) layout."""
    from mambapy.pscan import pscan

    delta = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)             # (b, L, d)
    x = u.transpose(1, 2)
    deltaA = torch.exp(delta.unsqueeze(-1) * A)                                  # (b, L, d, N)
    BX = delta.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan(deltaA, BX)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3)
    return (y + D * x).transpose(1, 2)


def inputs(batch, dim, length, n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = dict(u=r(batch, dim, length), delta=0.5 * r(batch, dim, length) - 1, A=-torch.rand(dim, n, generator=g) * 4,
             B=r(batch, n, length), C=r(batch, n, length), D=r(dim), delta_bias=0.1 * r(dim))
    return {k: v.to(device) for k, v in x.items()}


def pure_torch(x):
    """The chunked backend with the C++ kernels off (autograd keeps the path chosen in the forward)."""
    enabled, cpu_kernels.ENABLED = cpu_kernels.ENABLED, False
    try:
        return selective_scan_chunked(**x, delta_softplus=True)
    finally:
        cpu_kernels.ENABLED = enabled


def methods(device):
    ours = dict(chunked=lambda x: selective_scan_chunked(**x, delta_softplus=True))
    if device.type == "cpu" and cpu_kernels.available():
        ours["pure_torch"] = pure_torch
    ours["sequential"] = lambda x: selective_scan_ref(**x, delta_softplus=True)
    try:
        import mambapy.pscan  # noqa: F401
        ours["mambapy"] = lambda x: mambapy_scan(**x)
    except ImportError:
        print("mambapy not installed: pip install mambapy (skipped)")
    if device.type == "cuda":
        from zoo.models import ssm
        if ssm._cuda_kernel() is not None:
            ours["mamba_ssm"] = lambda x: selective_scan(**x, delta_softplus=True, backend="cuda")
    return ours


def time_step(fn, x, device, backward: bool) -> tuple[float, float]:
    """(wall, process CPU) seconds of one forward (+ backward of the sum)."""
    leaves = {k: v.clone().requires_grad_(backward) for k, v in x.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    if backward:
        fn(leaves).sum().backward()
    else:
        with torch.no_grad():
            fn(leaves)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["32x160x196", "32x320x49", "64x160x196"],
                   help="batch x dim x L")
    p.add_argument("--d-state", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fns = methods(device)
    others = [m for m in fns if m != "chunked"]
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; median of "
          f"{args.repeats} (after {args.warmup} warm-up); ms = wall / process CPU; ratios = time(method) / "
          "time(chunked), wall and CPU")
    print(f"| shape (B x d x L, N={args.d_state}) | pass | " + " | ".join(f"{m} ms (wall / CPU)" for m in fns)
          + " | " + " | ".join(f"{m} / chunked (wall / CPU)" for m in others) + " |")
    print("|---|---|" + "---|" * (len(fns) + len(others)))
    for spec in args.shapes:
        b, d, length = (int(v) for v in spec.lower().split("x"))
        x = inputs(b, d, length, args.d_state, device)
        with torch.no_grad():
            ref = fns["sequential"](x)
            for name, fn in fns.items():
                err = (fn(x) - ref).abs().max().item()
                assert err < 2e-3 + 6e-4 * ref.abs().max().item(), f"{name} differs from the reference by {err}"
        for backward in (False, True):
            times = {name: [] for name in fns}
            for r in range(args.warmup + args.repeats):
                for name, fn in fns.items():
                    t = time_step(fn, x, device, backward)
                    if r >= args.warmup:
                        times[name].append(t)
            wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
            cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
            print(f"| {spec} | {'fwd+bwd' if backward else 'fwd'} | "
                  + " | ".join(f"{1e3 * wall[m]:.0f} / {1e3 * cpu[m]:.0f}" for m in fns) + " | "
                  + " | ".join(f"{wall[m] / wall['chunked']:.2f} / {cpu[m] / cpu['chunked']:.2f}" for m in others)
                  + " |", flush=True)


if __name__ == "__main__":
    main()
