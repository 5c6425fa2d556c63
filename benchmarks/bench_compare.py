"""Wall time of a `train.py compare` sweep: `--jobs 2` against `--jobs 1` on this machine, and the Ray
launcher (local instance) against the local one, the same sweep of single-threaded runs each time.

    OMP_NUM_THREADS=1 python benchmarks/bench_compare.py --steps 60 --out /tmp/bench_compare

Prints each sweep's wall time, the ratio jobs2 / jobs1 (goal <= 0.6 on 2 cores) and the Ray launcher's
overhead per run, (T_ray - T_local) / runs at the same parallelism (goal <= 3 s; Ray's start-up included).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(out: Path, steps: int, *extra: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "train.py"), "compare", "--config", str(ROOT / "configs" / "unet.yaml"),
           "--sweep", "model.net.norm=none,batch", "--seeds", "2", f"--trainer.max_steps={steps}",
           f"--trainer.val_check_interval={steps}", "--trainer.enable_progress_bar=false",
           "--trainer.accelerator=cpu", "--data.num_val=2", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert all(r["status"] == "ok" for r in runs.values()), runs
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="training steps per run (4 runs per sweep)")
    p.add_argument("--out", default="/tmp/bench_compare")
    p.add_argument("--no-ray", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    one = sweep(out / "jobs1", args.steps)
    two = sweep(out / "jobs2", args.steps, "--jobs", "2")
    print(f"4 runs of {args.steps} steps, U-Net (configs/unet.yaml), 1 thread each, {os.cpu_count()} cores")
    print(f"--jobs 1: {one:.1f} s   --jobs 2: {two:.1f} s   ratio jobs2/jobs1: {two / one:.2f} (goal <= 0.6)")
    if not args.no_ray:
        ray = sweep(out / "ray", args.steps, "--launcher", "ray", "--cpus-per-run", "1")
        print(f"--launcher ray (local instance, 2 runs at a time): {ray:.1f} s; "
              f"overhead per run vs --jobs 2: {(ray - two) / 4:+.2f} s (goal <= 3 s)")


if __name__ == "__main__":
    main()
