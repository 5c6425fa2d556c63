"""MambaVision throughput (images/s, inference and training) of zoo's model vs the official NVlabs
model, same weights, same run.

    python benchmarks/bench_mambavision.py                         # CPU (1 thread), mambavision_t, 224 px, batch 8
    python benchmarks/bench_mambavision.py --device cuda --batch-size 128 --bf16 --channels-last
    python benchmarks/bench_mambavision.py --device cuda --batch-size 128 --bf16 --channels-last --compile

Rows: zoo with its default scan backend ("auto": chunked on CPU, mamba_ssm's kernel on CUDA when
installed), zoo with the sequential reference scan, and, when the `mambavision` package is importable,
the official model. Without CUDA the official model cannot run its mamba_ssm kernel; its
`selective_scan_fn` is then replaced by zoo's sequential reference (the only way it runs on a CPU).
Training = forward, cross-entropy, backward and an AdamW step. Timings: `--warmup` untimed
iterations, then the median of `--steps` timed ones (CUDA synchronised), per wall second and per
process-CPU second (on a shared CPU use `--threads 1`: CPU time then measures the work); the ratio
columns are images/s relative to the official model (or to zoo-sequential without it).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402

import zoo.models.mambavision as mv  # noqa: E402
from zoo.models import ssm  # noqa: E402

OFFICIAL_NAMES = {"mambavision_t": "mamba_vision_T", "mambavision_t2": "mamba_vision_T2", "mambavision_s": "mamba_vision_S",
                  "mambavision_b": "mamba_vision_B", "mambavision_l": "mamba_vision_L", "mambavision_l2": "mamba_vision_L2"}


def official_module(device: torch.device):
    """The official model module, with zoo's sequential scan standing in for mamba_ssm when it is
    missing or the device is not CUDA. None when the package is not installed."""
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
        have_kernel = device.type == "cuda"
    except ImportError:
        have_kernel = False
    if not have_kernel:
        stub = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
        stub.selective_scan_fn = ssm.selective_scan_ref
        for name, mod in (("mamba_ssm", types.ModuleType("mamba_ssm")), ("mamba_ssm.ops", types.ModuleType("mamba_ssm.ops")),
                          ("mamba_ssm.ops.selective_scan_interface", stub)):
            sys.modules[name] = mod
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mambavision.models import mamba_vision
    except ImportError as e:
        print(f"official model skipped: `mambavision` not importable ({e})")
        return None, False
    if not have_kernel:
        mamba_vision.selective_scan_fn = ssm.selective_scan_ref
    return mamba_vision, have_kernel


def set_backend(model, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, mv.MambaVisionMixer):
            m.scan_backend = backend


def measure(rows: dict, batch: int, size: int, train: bool, args, device) -> dict:
    """{name: (images per wall second, images per process-CPU second)} of every model in `rows`,
    medians over args.steps timed iterations after args.warmup, the models interleaved iteration by
    iteration (so load changes on a shared machine hit them alike)."""
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) if train else None for name, m in rows.items()}
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    times = {name: ([], []) for name in rows}
    for i in range(args.warmup + args.steps):
        for name, model in rows.items():
            model.train(train)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            if train:
                with amp:
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
            else:
                with torch.no_grad(), amp:
                    model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name][0].append(time.perf_counter() - t)
                times[name][1].append(time.process_time() - c)
    return {name: (batch / statistics.median(w), batch / statistics.median(c)) for name, (w, c) in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="mambavision_t", choices=sorted(OFFICIAL_NAMES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-batch-size", type=int, default=None, help="default: --batch-size")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the scan stays float32)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile zoo's model (not the official one)")
    p.add_argument("--no-official", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours = timm.create_model(args.variant)
    rows = {}
    official, kernel = (None, False) if args.no_official else official_module(device)
    if official is not None:
        ref = getattr(official, OFFICIAL_NAMES[args.variant])()
        ours.load_state_dict(ref.state_dict(), strict=True)
        rows[f"official ({'mamba_ssm kernel' if kernel else 'sequential scan'})"] = ref
    rows["zoo (scan: auto)"] = ours
    seq = timm.create_model(args.variant)
    seq.load_state_dict(ours.state_dict())
    set_backend(seq, "sequential")
    rows["zoo (scan: sequential)"] = seq
    for name, model in list(rows.items()):
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        if args.compile and name.startswith("zoo (scan: auto"):
            rows[name + " compiled"] = torch.compile(model)
    reference = next(iter(rows))
    flags = " ".join(f for f, on in (("bf16", args.bf16), ("channels_last", args.channels_last),
                                      ("compile", args.compile)) if on)
    print(f"{args.variant} {args.image_size}px on {device} ({torch.get_num_threads()} threads) {flags}; "
          f"batch {args.batch_size} (train {args.train_batch_size or args.batch_size}); median of {args.steps} "
          f"after {args.warmup} warm-up; torch {torch.__version__}")
    print(f"| model | inference img/s (wall / CPU) | training img/s (wall / CPU) | inference vs {reference} "
          f"(wall / CPU) | training vs {reference} (wall / CPU) |")
    print("|---|---|---|---|---|")
    inference = measure(rows, args.batch_size, args.image_size, False, args, device)
    training = measure(rows, args.train_batch_size or args.batch_size, args.image_size, True, args, device)
    (ri, ric), (rt, rtc) = inference[reference], training[reference]
    for name in rows:
        inf, trn = inference[name], training[name]
        print(f"| {name} | {inf[0]:.2f} / {inf[1]:.2f} | {trn[0]:.2f} / {trn[1]:.2f} | {inf[0] / ri:.2f}x / "
              f"{inf[1] / ric:.2f}x | {trn[0] / rt:.2f}x / {trn[1] / rtc:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
