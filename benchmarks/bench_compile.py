"""torch.compile vs eager on CPU, with zoo's C++ scans as torch ops inside the compiled graphs; and the
cold first use of those kernels, with and without the ahead-of-time build (`make kernels`).

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py                 # all (~10 min on 2 busy cores)
    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --only steps --reps 10
    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --only steps --cases U-Net Transformer

Steps: a training step (forward, loss, backward, AdamW step) and an inference step (eval, no_grad) of
MambaVision at configs/mambavision.yaml's size (64 px, batch 32) and Sketch-RNN at
configs/sketch_rnn.yaml's size (bench_sketch_rnn.py's "config" batch: 50 sketches, 63 steps), norm none
(the config's: fused scan in training, nn.LSTM in inference) and layer (fused scan in both); U-Net at
configs/unet.yaml's size (base 16, depth 4, valid padding, batch 4 of 188 px inputs -> 100 px crops, the
task's weighted NLL), norm none (the config's) and batch; the Transformer LM at
configs/transformer_lm.yaml's size (4 pre-norm layers, 128 wide, 4 heads, d_ff 512, batch 12 x 64
characters, vocabulary 65) and the seq2seq Transformer at configs/transformer_seq2seq.yaml's size (2 + 2
post-norm layers, 64 wide, d_ff 256, dropout 0.1, batch 64 of the reverse task's 1-12 symbols, padded).
`torch.compile(model)` with its defaults (inductor) vs the same eager model: the first compiled call
(compilation included, into empty inductor caches: a later run that reuses them compiles in seconds) is
reported apart, then eager and compiled steps alternate (median of --reps, so machine load affects both
alike); ratio = eager time / compiled time (> 1: compile wins). Also printed: graph breaks
(torch._dynamo.explain of a training forward) and the largest difference of the two models' inference
outputs on the same weights.

Cold start: seconds from starting a Python process to the end of its first MambaVision training step,
each in a fresh extension directory (TORCH_EXTENSIONS_DIR): kernels off (ZOO_CPU_KERNELS=0), kernels
built on that first use, and kernels built ahead of time (`make kernels`' command, timed too).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402

import zoo.models.mambavision  # noqa: E402,F401  (registers the models with timm)
from bench_sketch_rnn import SIZES, random_batch  # noqa: E402
from zoo.data.text import BOS, EOS, PAD  # noqa: E402
from zoo.models.sketch_rnn import SketchRNN, kl_divergence, reconstruction_loss  # noqa: E402
from zoo.models.transformer import Transformer, TransformerLM  # noqa: E402
from zoo.models.unet import UNet  # noqa: E402

MAMBAVISION = dict(num_classes=8, dim=32, in_dim=16, depths=[1, 1, 2, 2], num_heads=[1, 2, 2, 4],
                   window_size=[8, 8, 4, 2], drop_path_rate=0.05)  # configs/mambavision.yaml
UNET = dict(in_channels=1, num_classes=2, base_channels=16, depth=4, padding="valid")  # configs/unet.yaml
LM = dict(vocab_size=65, d_model=128, n_heads=4, n_layers=4, d_ff=512, dropout=0.0, norm="layer",
          norm_position="pre", max_len=64, pos_encoding="learned", activation="gelu")  # transformer_lm.yaml
SEQ2SEQ = dict(src_vocab_size=14, tgt_vocab_size=14, d_model=64, n_heads=4, num_encoder_layers=2,
               num_decoder_layers=2, d_ff=256, dropout=0.1, norm="layer", norm_position="post", max_len=64,
               share_embeddings=True)  # transformer_seq2seq.yaml; 10 symbols + pad, bos, eos, unk


def case(make_model, inputs, loss):
    """A fresh model (seed 0), its inputs and its training loss (of the model's output on the inputs)."""
    torch.manual_seed(0)
    return make_model(), inputs, lambda model: loss(model(*inputs))


def mambavision_case():
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(32, 3, 64, 64, generator=g), torch.randint(0, 8, (32,), generator=g)
    return case(lambda: timm.create_model("mambavision_t", **MAMBAVISION), (images,),
                lambda out: F.cross_entropy(out, labels, label_smoothing=0.1))


def unet_case(norm):
    """configs/unet.yaml: 100 px target crops with 44 px of context per side, the paper's weighted NLL."""
    g = torch.Generator().manual_seed(1)
    images, masks = torch.randn(4, 1, 188, 188, generator=g), torch.randint(0, 2, (4, 100, 100), generator=g)
    weight = 1 + 9 * torch.rand(4, 100, 100, generator=g)  # w(x) > 0: class balance + border term
    return case(lambda: UNet(**UNET, norm=norm), (images,),
                lambda out: (F.nll_loss(F.log_softmax(out, 1), masks, reduction="none") * weight).mean())


def lm_case():
    ids = torch.randint(0, LM["vocab_size"], (12, 65), generator=torch.Generator().manual_seed(1))
    return case(lambda: TransformerLM(**LM), (ids[:, :-1],),
                lambda out: F.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten()))


def seq2seq_case():
    """A reverse-task batch: sources of 1-12 symbols right-padded, targets bos + reversed source + eos."""
    g, n = torch.Generator().manual_seed(1), torch.arange(64)
    lengths = torch.randint(1, 13, (64,), generator=g)
    src = torch.randint(4, 14, (64, 12), generator=g).masked_fill(torch.arange(12) >= lengths[:, None], PAD)
    tgt = F.pad(torch.stack([torch.cat([s[:k].flip(0), s[k:]]) for s, k in zip(src, lengths)]), (1, 1), value=PAD)
    tgt[n, 0], tgt[n, lengths + 1] = BOS, EOS
    return case(lambda: Transformer(**SEQ2SEQ), (src, tgt[:, :-1]),
                lambda out: F.cross_entropy(out.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD,
                                            label_smoothing=0.1))


def sketch_case(norm):
    s = dict(SIZES["config"])
    B, N = s.pop("batch"), s.pop("steps")
    strokes, lengths = random_batch(B, N, torch.device("cpu"))
    torch.manual_seed(0)
    model = SketchRNN(**s, norm=norm, recurrent_dropout=0.1, max_seq_len=N)

    def loss(model):
        out = model(strokes, lengths)
        l_s, l_p = reconstruction_loss(model.params(out["out"]), strokes[:, 1:])
        return l_s + l_p + 0.5 * kl_divergence(out["mu"], out["presig"]).clamp_min(0.2)

    return model, (strokes, lengths), loss


CASES = {"MambaVision": mambavision_case, "Sketch-RNN none": lambda: sketch_case("none"),
         "Sketch-RNN layer": lambda: sketch_case("layer"), "U-Net none": lambda: unet_case("none"),
         "U-Net batch": lambda: unet_case("batch"), "Transformer LM": lm_case, "Transformer seq2seq": seq2seq_case}


def bench_steps(reps, prefixes=None):
    print(f"\n## torch.compile (inductor) vs eager, CPU, {torch.get_num_threads()} thread(s), median of {reps}")
    print("| model | step | eager ms | compiled ms | eager / compiled | first compiled call s | graph breaks "
          "| max abs diff (inference) |\n|---|---|---|---|---|---|---|---|")
    for name, make in CASES.items():
        if prefixes and not name.startswith(tuple(prefixes)):
            continue
        bench_case(name, make, reps)
        torch._dynamo.reset()


def bench_case(name, make, reps):
    """One model's table rows: training and inference step, eager vs compiled."""
    eager, inputs, loss_fn = make()
    probe = make()[0].train()  # a training forward updates batch-norm statistics: not in the timed ones
    breaks = torch._dynamo.explain(probe)(*inputs).graph_break_count
    torch._dynamo.reset()
    models = {"eager": eager, "compiled": torch.compile(make()[0])}  # the same weights
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

    def train(key):
        models[key].train()
        opts[key].zero_grad(set_to_none=True)
        loss_fn(models[key]).backward()
        opts[key].step()

    @torch.no_grad()
    def infer(key):
        out = models[key].eval()(*inputs)
        return out["out"] if isinstance(out, dict) else out

    def first_call(step):
        """step("compiled") timed: its first call compiles."""
        t0 = time.perf_counter()
        out = step("compiled")
        return time.perf_counter() - t0, out

    compile_s = {}
    compile_s["infer"], out = first_call(infer)
    diff = (out - infer("eager")).abs().max().item()  # before any training step: the same weights
    compile_s["train"], _ = first_call(train)
    train("eager")
    for step in (train, infer):
        times = {key: [] for key in models}
        for _ in range(reps):
            for key in models:
                t0 = time.perf_counter()
                step(key)
                times[key].append(time.perf_counter() - t0)
        e, c = (statistics.median(times[k]) * 1e3 for k in models)
        print(f"| {name} | {step.__name__} | {e:.1f} | {c:.1f} | {e / c:.2f}x | {compile_s[step.__name__]:.0f} | "
              f"{breaks} | {diff:.1e} |", flush=True)


COLD = """
import sys, time
import torch
sys.path.insert(0, sys.argv[2])
from bench_compile import mambavision_case
from zoo import cpu_kernels
t0 = time.time()
cpu_kernels.available()  # what the first step would do first: build or load the kernels
kernels = time.time() - t0
model, _, loss_fn = mambavision_case()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
loss_fn(model.train()).backward()
opt.step()
print(time.time() - float(sys.argv[1]), kernels)
"""


def run(code_args, env, what):
    start = time.time()
    done = subprocess.run([sys.executable, *code_args], env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return time.time() - start, done


def bench_cold():
    print("\n## cold first use: process start to the end of the first MambaVision training step, fresh "
          "extension directory each\n| case | seconds | of which building or loading the kernels |\n|---|---|---|")
    here = str(Path(__file__).resolve().parent)
    for case in ("kernels off (ZOO_CPU_KERNELS=0)", "kernels built on first use", "kernels built ahead of time"):
        with tempfile.TemporaryDirectory() as ext:
            env = {**os.environ, "TORCH_EXTENSIONS_DIR": ext, "ZOO_CPU_KERNELS": "0" if "off" in case else "1"}
            if "ahead" in case:
                build, _ = run(["-c", "import sys, zoo.cpu_kernels as k; sys.exit(k.build_ahead())"], env, "build")
                print(f"| `make kernels` (its command, before) | {build:.1f} | |")
            _, done = run(["-c", COLD, str(time.time()), here], env, case)
            built = "building zoo's CPU kernels" in done.stderr
            total, kernels = map(float, done.stdout.split()[-2:])
            print(f"| {case}{' (warned: building)' if built else ''} | {total:.1f} | {kernels:.1f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["steps", "cold"])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--cases", nargs="+", metavar="PREFIX",
                        help=f"only the step cases whose names start with one of these; cases: {', '.join(CASES)}")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    if args.only in (None, "steps"):
        # compile times as on a first run: inductor's caches (compiled graphs, kernels) in a new directory
        with tempfile.TemporaryDirectory() as cache, temporary_cache_dir(cache):
            bench_steps(args.reps, args.cases)
    if args.only in (None, "cold"):
        bench_cold()


if __name__ == "__main__":
    main()
