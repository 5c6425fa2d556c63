"""Quality runs of the Transformer through the entry point, each a `train.py fit` (+ `test`) process.

    python benchmarks/bench_transformer_tasks.py seq2seq --out /tmp/tf-bench    # reverse + addition, pre + post
    python benchmarks/bench_transformer_tasks.py seq2seq --tasks addition --positions pre --trainer.max_steps=4000
    python benchmarks/bench_transformer_tasks.py nanogpt --out /tmp/tf-bench    # nanoGPT's small CPU recipe
    python benchmarks/bench_transformer_tasks.py babygpt --out /tmp/tf-bench --device gpu  # needs a GPU

seq2seq: for each task (reverse, addition) and norm position (pre, post) with layer norm, fits
`configs/transformer_seq2seq.yaml` with the task's overrides, then tests the best checkpoint on the
held-out test split (beam search, beam 4, alpha 0.6). Prints held-out exact match, the first
validation step with exact match >= 0.99, training steps, wall and CPU time (user + sys of the run).
Any further argument (`--trainer.max_steps=3000`) is passed to every run.

nanogpt / babygpt: character LM on tinyshakespeare with nanoGPT's shapes and optimizer settings
(`configs/transformer_lm.yaml` + overrides: learned positions, GELU, no linear biases, AdamW
betas (0.9, 0.99), lr 1e-3 cosine to 1e-4 after 100 warm-up steps, clip 1.0); prints the final
validation loss over the whole validation split (nanoGPT estimates it on random batches).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

SEQ2SEQ = {
    "reverse": ["--data.task=reverse", "--data.max_length=12", "--data.num_symbols=10"],
    "addition": ["--data.task=addition", "--data.max_length=3", "--data.num_train=30000"],
}
NANOGPT = {  # nanoGPT README, "I only have a macbook": 4 layers, 4 heads, 128 wide, block 64, batch 12
    "nanogpt": ["--model.net.n_layers=4", "--model.net.n_heads=4", "--model.net.d_model=128", "--model.block_size=64",
                "--data.block_size=64", "--data.batch_size=12", "--trainer.max_steps=2000", "--model.net.dropout=0.0"],
    # config/train_shakespeare_char.py: 6 layers, 6 heads, 384 wide, block 256, batch 64, dropout 0.2, 5000 iters
    "babygpt": ["--model.net.n_layers=6", "--model.net.n_heads=6", "--model.net.d_model=384", "--model.block_size=256",
                "--data.block_size=256", "--data.batch_size=64", "--trainer.max_steps=5000", "--model.net.dropout=0.2"],
}
LM_COMMON = ["--model.net.pos_encoding=learned", "--model.net.activation=gelu", "--model.net.bias=false", "--model.lr=0.001",
             "--model.betas=[0.9,0.99]", "--model.scheduler=cosine", "--model.warmup_steps=100",
             "--model.min_lr_ratio=0.1", "--model.weight_decay=0.1", "--trainer.gradient_clip_val=1.0",
             "--trainer.limit_val_batches=1.0"]


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Runs a command, output to `log`; returns (wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")})
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n  see {log}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def val_curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of a logged metric from the run's CSV logs (fit and test write separate versions)."""
    out = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            out += [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]
    return out


def seq2seq(out: Path, tasks: list[str], positions: list[str], extra: list[str]) -> None:
    print("| task | norm_position | steps | first val step with EM >= 0.99 | val EM | test EM (beam 4) | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for task in tasks:
        overrides = SEQ2SEQ[task]
        for pos in positions:
            run_dir = out / f"{task}_{pos}"
            if run_dir.exists():
                raise SystemExit(f"{run_dir} exists: remove it or choose another --out (a fresh run per directory)")
            cfg = ["--config", "configs/transformer_seq2seq.yaml", *overrides, f"--model.net.norm_position={pos}",
                   "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run_dir}", *extra]
            wall, cpu = run([sys.executable, "train.py", "fit", *cfg], out / f"{task}_{pos}.fit.log")
            best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
            run([sys.executable, "train.py", "test", *cfg, f"--ckpt_path={best}"], out / f"{task}_{pos}.test.log")
            test = val_curve(run_dir, "test/exact_match")[-1][1]
            curve = val_curve(run_dir, "val/exact_match")
            first = next((s + 1 for s, v in curve if v >= 0.99), None)
            summary = json.loads((run_dir / "summary.json").read_text())
            print(f"| {task} | {pos} | {summary['global_step']} | {first} | {max(v for _, v in curve):.4f} | "
                  f"{test:.4f} | {wall:.0f} | {cpu:.0f} |", flush=True)


def lm(name: str, out: Path, extra: list[str]) -> None:
    run_dir = out / name
    cmd = [sys.executable, "train.py", "fit", "--config", "configs/transformer_lm.yaml", f"--data.path={SHAKESPEARE}",
           *NANOGPT[name], *LM_COMMON, "--trainer.val_check_interval=500", "--trainer.enable_progress_bar=false",
           f"--trainer.default_root_dir={run_dir}", *extra]
    wall, cpu = run(cmd, out / f"{name}.log")
    curve = val_curve(run_dir, "val/loss")
    print(f"{name}: val loss by step {', '.join(f'{s + 1}: {v:.4f}' for s, v in curve)}; "
          f"wall {wall:.0f} s, CPU {cpu:.0f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["seq2seq", "nanogpt", "babygpt"])
    p.add_argument("--out", type=Path, default=Path("/tmp/tf-bench"))
    p.add_argument("--device", default="cpu", help="trainer.accelerator (cpu, gpu)")
    p.add_argument("--tasks", default="reverse,addition", help="seq2seq tasks to run")
    p.add_argument("--positions", default="pre,post", help="norm positions to run (seq2seq)")
    args, extra = p.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [f"--trainer.accelerator={args.device}", *extra]
    if args.what == "seq2seq":
        seq2seq(args.out, args.tasks.split(","), args.positions.split(","), extra)
    else:
        lm(args.what, args.out, extra)


if __name__ == "__main__":
    main()
