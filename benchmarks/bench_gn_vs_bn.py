"""Wu & He 2018 (Group Normalization), Fig. 1, on a zoo model: does batch norm degrade as the batch
shrinks while group norm stays flat? One `train.py compare` sweep (norm x batch size x seeds), then a
plot of the final validation metric against batch size per norm with 95 % CIs over seeds.

    OMP_NUM_THREADS=1 python benchmarks/bench_gn_vs_bn.py --model unet --out benchmarks/reports/gn_vs_bn --jobs 2
    OMP_NUM_THREADS=1 python benchmarks/bench_gn_vs_bn.py --model resnet --steps 300 \
        --out benchmarks/reports/gn_vs_bn_resnet --jobs 2

Every run takes the same number of optimizer steps at the same learning rate, so a larger batch also
sees more data; what the figure is about is the gap between the norms at each batch size (paired by
seed in the report: group vs batch at the same batch size).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# model -> (config, its norm argument, overrides that size it for this sweep, metric plotted)
MODELS = {
    "unet": ("unet.yaml", "model.net.norm", ["--model.net.base_channels=8", "--model.net.depth=3",
                                             "--data.crop_size=44"], "val/iou_fg"),
    "resnet": ("resnet.yaml", "model.norm", [], "val/top1"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="unet")
    p.add_argument("--out", default="benchmarks/reports/gn_vs_bn")
    p.add_argument("--batch-sizes", default="2,4,8,16,32")
    p.add_argument("--seeds", default="3")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--jobs", default="2")
    args = p.parse_args()
    out = Path(args.out)
    config, norm, sizes, metric = MODELS[args.model]
    cmd = [sys.executable, str(ROOT / "train.py"), "compare", "--config", str(ROOT / "configs" / config),
           "--sweep", f"{norm}=batch,group", "--sweep", f"data.batch_size={args.batch_sizes}",
           "--seeds", args.seeds, "--baseline", f"{norm}=batch", "--jobs", args.jobs, "--out", str(out),
           *sizes, f"--trainer.max_steps={args.steps}",
           f"--trainer.val_check_interval={args.steps // 3}", "--trainer.enable_progress_bar=false"]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"})
    plot(out, metric)


def plot(out: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads((out / "results.json").read_text())
    rows = [a for a in results["aggregate"] if a["metric"] == metric]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    lines = []
    for norm in ("batch", "group"):
        pts = sorted((int(a["point"].split("batch_size=")[1]), a) for a in rows if a["point"].startswith(f"norm={norm},"))
        xs = [b for b, _ in pts]
        means = [a["mean"] for _, a in pts]
        lo = [a["mean"] - a["ci_low"] if a["ci_low"] is not None else 0 for _, a in pts]
        hi = [a["ci_high"] - a["mean"] if a["ci_high"] is not None else 0 for _, a in pts]
        ax.errorbar(xs, means, yerr=[lo, hi], marker="o", capsize=3, label=f"{norm} norm")
        lines += [f"| {norm} | {b} | {a['n']} | {a['mean']:.4f} | [{a['ci_low']:.4f}, {a['ci_high']:.4f}] |"
                  for b, a in pts]
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (images per step)")
    ax.set_ylabel(f"final {metric} (mean, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "metric_vs_batch_size.png", dpi=120)
    print("| norm | batch size | n | mean | 95% CI |\n|---|---|---|---|---|\n" + "\n".join(lines))
    print("\n".join(results["verdicts"]))


if __name__ == "__main__":
    main()
