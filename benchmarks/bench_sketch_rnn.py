"""Sketch-RNN speed: training sequences/s per cell norm vs the fused nn.LSTM path, sampling speed,
and loading a QuickDraw-sized .npz. Every number is printed with a reference measured in the same run.

    python benchmarks/bench_sketch_rnn.py                       # all, CPU, config and official sizes
    python benchmarks/bench_sketch_rnn.py --only train --size official --device cuda

Training: one optimizer step (forward, L_R + KL loss, backward, Adam) of the full SketchRNN on a random
stroke-5 batch, for norm none with recurrent dropout off (pure torch.nn.LSTM: the reference), none with
the official recurrent dropout (fused scan), layer, rms and batch (with and without dropout). Variants
are timed round-robin (median of --reps) so machine load affects them alike; the CPU time of the
process is printed too (with --threads 1 it is the measure least disturbed by other jobs on a shared machine).
Layer: one decoder-sized LSTMLayer per norm, forward + backward (CPU time vs nn.LSTM).
Sampling: 100 sketches x 250 decoder steps (the end-of-sketch pen state is masked so no sketch stops
early), reference: one teacher-forced decoder pass over the same 100 x 250 steps.
Loading: a sketch-rnn .npz with 70000 / 2500 / 2500 sketches of QuickDraw-like lengths written by this
script; `SketchDataModule.setup` (read, validate, drop, scale factor) vs a bare `np.load` of the arrays.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo.data.sketches import SketchDataModule, write_npz  # noqa: E402
from zoo.models.sketch_rnn import LSTMLayer, SketchRNN, kl_divergence, reconstruction_loss  # noqa: E402

SIZES = {  # enc, dec, z, M, batch, steps
    "config": dict(enc_rnn_size=64, dec_rnn_size=128, z_size=32, num_mixture=10, batch=50, steps=63),
    "official": dict(enc_rnn_size=256, dec_rnn_size=512, z_size=128, num_mixture=20, batch=100, steps=250),
}
VARIANTS = {  # key: (printed name, norm, recurrent dropout); the first is the reference
    "none": ("none (nn.LSTM, no dropout)", "none", 0.0), "none+drop": ("none + dropout (fused scan)", "none", 0.1),
    "layer": ("layer", "layer", 0.0), "layer+drop": ("layer + dropout", "layer", 0.1), "rms": ("rms", "rms", 0.0),
    "batch": ("batch", "batch", 0.0), "batch+drop": ("batch + dropout", "batch", 0.1)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_batch(B, N, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(N // 3, N, (B,), generator=g)
    lengths[0] = N - 1
    strokes = torch.zeros(B, N + 1, 5)
    strokes[:, 0, 2] = 1
    for b, n in enumerate(lengths.tolist()):
        strokes[b, 1:n + 1, :2] = torch.randn(n, 2, generator=g)
        lift = (torch.rand(n, generator=g) < 0.1).float()
        lift[-1] = 1
        strokes[b, 1:n + 1, 3] = lift
        strokes[b, 1:n + 1, 2] = 1 - lift
        strokes[b, n + 1:, 4] = 1
    return strokes.to(device), lengths.to(device)


def bench_train(size, device, reps, dtype, keys):
    variants = [VARIANTS["none"]] + [VARIANTS[k] for k in keys if k != "none"]
    s = dict(SIZES[size])
    B, N = s.pop("batch"), s.pop("steps")
    strokes, lengths = random_batch(B, N, device)
    strokes = strokes.to(dtype)
    nets, opts = {}, {}
    for name, norm, p in variants:
        torch.manual_seed(0)
        nets[name] = SketchRNN(**s, norm=norm, recurrent_dropout=p, max_seq_len=N).to(device, dtype).train()
        opts[name] = torch.optim.Adam(nets[name].parameters(), lr=1e-4)

    def step(name):
        net, opt = nets[name], opts[name]
        out = net(strokes, lengths)
        l_s, l_p = reconstruction_loss(net.params(out["out"]), strokes[:, 1:])
        loss = l_s + l_p + 0.5 * kl_divergence(out["mu"], out["presig"]).clamp_min(0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    wall = {name: [] for name, _, _ in variants}
    cpu = {name: [] for name, _, _ in variants}
    for name in wall:  # warm-up
        step(name)
    for _ in range(reps):
        for name in wall:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step(name)
            sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    ref_w, ref_c = (statistics.median(d[variants[0][0]]) for d in (wall, cpu))
    print(f"\n## training, size={size} (batch {B}, {N} steps, enc {s['enc_rnn_size']}, dec {s['dec_rnn_size']}, "
          f"z {s['z_size']}, M {s['num_mixture']}), {device}, {dtype}, median of {reps}")
    print("| variant | sequences/s (wall) | wall time vs none (nn.LSTM) | CPU time vs none (nn.LSTM) |\n"
          "|---|---|---|---|")
    for name in wall:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"| {name} | {B / w:.1f} | {w / ref_w:.2f}x | {c / ref_c:.2f}x |")


def bench_layer(size, device, reps, dtype):
    """One decoder-sized LSTMLayer, forward + backward over a padded batch, per norm vs nn.LSTM."""
    s = SIZES[size]
    B, T, D, H = s["batch"], s["steps"], 5 + s["z_size"], s["dec_rnn_size"]
    x = torch.randn(B, T, D, device=device, dtype=dtype)
    _, lengths = random_batch(B, T, device)
    layers = {}
    for key in ("none", "layer", "rms", "batch", "none+drop"):
        name, norm, p = VARIANTS[key]
        torch.manual_seed(0)
        layers[name] = LSTMLayer(D, H, norm, p).to(device, dtype).train()

    def step(layer):
        xx = x.clone().requires_grad_()
        out, (_, c) = layer(xx, lengths=lengths)
        (out.square().sum() + c.sum()).backward()

    cpu = {name: [] for name in layers}
    for layer in layers.values():
        step(layer)
    for _ in range(reps):
        for name, layer in layers.items():
            sync(device)
            c0 = time.process_time()
            step(layer)
            sync(device)
            cpu[name].append(time.process_time() - c0)
    ref = statistics.median(cpu[VARIANTS["none"][0]])
    print(f"\n## one LSTM layer fwd + bwd, size={size} (B {B}, T {T}, D {D}, H {H}), {device}, median of {reps}")
    print("| cell | CPU time vs nn.LSTM |\n|---|---|")
    for name, ts in cpu.items():
        print(f"| {name} | {statistics.median(ts) / ref:.2f}x |")


def bench_sample(device, reps, norms=("none", "layer", "rms", "batch")):
    s = dict(SIZES["official"])
    s.pop("batch"), s.pop("steps")
    print(f"\n## sampling 100 sketches x 250 steps, official size, {device}, median of {reps}")
    print("| norm | sampling (s) | teacher-forced decoder pass (s) | ratio |\n|---|---|---|---|")
    inputs = torch.zeros(100, 250, 5, device=device)
    for norm in norms:
        torch.manual_seed(0)
        net = SketchRNN(**s, norm=norm, max_seq_len=250).to(device).eval()
        with torch.no_grad():
            net.head.bias[2] = -1e4  # never sample the end-of-sketch state: always 250 steps
        z = torch.randn(100, net.z_size, device=device)
        ts, tf = [], []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            strokes, lengths = net.sample(z=z, max_len=250, temperature=0.5)
            sync(device)
            ts.append(time.perf_counter() - t0)
            assert strokes.shape[1] == 250
            t0 = time.perf_counter()
            with torch.no_grad():
                net.decode(inputs, z)
            sync(device)
            tf.append(time.perf_counter() - t0)
        a, b = statistics.median(ts), statistics.median(tf)
        print(f"| {norm} | {a:.2f} | {b:.2f} | {a / b:.1f}x |")


def bench_load(reps):
    rng = np.random.default_rng(0)

    def sketch():
        n = int(np.clip(rng.gamma(4, 15), 5, 300))  # QuickDraw-like lengths, some above 250
        s = np.zeros((n, 3), dtype=np.int16)
        s[:, :2] = rng.integers(-60, 60, (n, 2))
        s[:, 2] = rng.random(n) < 0.1
        s[-1, 2] = 1
        return s

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "quickdraw_like.npz"
        t0 = time.perf_counter()
        write_npz(path, {"train": [sketch() for _ in range(70000)], "valid": [sketch() for _ in range(2500)],
                         "test": [sketch() for _ in range(2500)]})
        write_s = time.perf_counter() - t0
        tl, tr = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            with np.load(path, encoding="latin1", allow_pickle=True) as f:
                _ = [f[k] for k in ("train", "valid", "test")]
            tr.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dm = SketchDataModule(path=str(path), batch_size=100)
            dm.setup("fit")
            tl.append(time.perf_counter() - t0)
        a, b = statistics.median(tl), statistics.median(tr)
        print(f"\n## loading 70000 + 2500 + 2500 sketches (file {path.stat().st_size / 2**20:.1f} MiB, written in "
              f"{write_s:.1f} s), median of {reps}")
        print("| step | seconds | vs bare np.load |\n|---|---|---|")
        print(f"| bare np.load of the three arrays | {b:.2f} | 1.00x |")
        print(f"| SketchDataModule.setup (read, validate, drop {dm.report['train']['dropped']} long train "
              f"sketches, scale factor) | {a:.2f} | {a / b:.1f}x |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["train", "layer", "sample", "load"], action="append")
    p.add_argument("--size", choices=list(SIZES), action="append")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"training variants, comma-separated, from {', '.join(VARIANTS)} (none is always run)")
    args = p.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown --variants {', '.join(sorted(unknown))}; accepted: {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} CPU threads")
    only = args.only or ["train", "layer", "sample", "load"]
    if "train" in only:
        for size in args.size or ["config", "official"]:
            bench_train(size, device, args.reps if size == "config" else max(2, args.reps // 2),
                        getattr(torch, args.dtype), args.variants.split(","))
    if "layer" in only:
        for size in args.size or ["config", "official"]:
            bench_layer(size, device, args.reps, getattr(torch, args.dtype))
    if "sample" in only:
        bench_sample(device, max(1, args.reps // 2))
    if "load" in only:
        bench_load(max(1, args.reps // 2))


if __name__ == "__main__":
    main()
