"""`train.py compare`: trains one config once per point of a sweep (by default, per norm) with the same
seed and data, then writes a report a person can read without a server.

    python train.py compare --config configs/unet.yaml --norms batch,group,instance,none --out DIR
    python train.py compare --config configs/unet.yaml --sweep model.norm=batch,group \
        --sweep data.batch_size=1,2,8 --out DIR --trainer.max_steps 200

Each run is its own `train.py fit` process, so one run's failure, memory or wandb state cannot touch
the others; its directory `DIR/runs/<name>/` holds its checkpoints, CSV log, `run.log` and
`summary.json`. The report `DIR/report.md` (+ `report.html`) has a table of final validation metrics,
training throughput, peak memory, parameter count and wall time per run, curves of every logged
metric for all runs on one axis (`DIR/plots/`), and each run's latest sample images.
"""
from __future__ import annotations

import argparse
import csv
import html
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from zoo.callbacks import SUMMARY_FILE


@dataclass
class Run:
    name: str
    values: dict[str, str]
    dir: Path
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.summary.get("status") == "ok"


def parse_sweeps(norms: str | None, sweeps: list[str]) -> dict[str, list[str]]:
    """`--norms a,b` and `--sweep KEY=v1,v2` (repeatable) -> {key: [values]}, in order."""
    out: dict[str, list[str]] = {}
    specs = ([f"model.norm={norms}"] if norms else []) + list(sweeps)
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().removeprefix("--")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise SystemExit(f"compare: bad sweep {spec!r}; expected KEY=v1,v2 (e.g. model.norm=batch,group)")
        if key in out:
            raise SystemExit(f"compare: {key!r} is swept twice (by --norms and --sweep, or two --sweep)")
        out[key] = vals
    if not out:
        raise SystemExit("compare: nothing to compare; give --norms a,b,... or --sweep KEY=v1,v2")
    return out


def check_norms(values: list[str]) -> None:
    from zoo.norm import NORM_KINDS

    unknown = [v for v in values if v not in NORM_KINDS]
    if unknown:
        raise SystemExit(
            f"compare: unknown norm(s) {unknown}; valid kinds: {', '.join(NORM_KINDS)} "
            "(a norm you registered yourself: use --sweep model.norm=... and import it from your config's module)"
        )


def warn_unregistered_norms(key: str, values: list[str]) -> None:
    """A swept `model.*norm` value that is not registered here is probably a typo, but may be a norm
    the config's own module registers in the run's process: say so, and let the run decide."""
    from zoo.norm import NORM_KINDS

    unknown = [v for v in values if v not in NORM_KINDS]
    if key.startswith("model.") and key.endswith("norm") and unknown:
        print(f"compare: warning: {key} value(s) {unknown} are not registered norms ({', '.join(NORM_KINDS)}); "
              "their runs will fail unless your config's module registers them", file=sys.stderr)


def plan_runs(sweeps: dict[str, list[str]], out: Path) -> list[Run]:
    runs = []
    for combo in itertools.product(*sweeps.values()):
        values = dict(zip(sweeps, combo))
        name = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())
        runs.append(Run(name, values, out / "runs" / re.sub(r"[^\w.,=+-]", "_", name)))
    return runs


def run_one(run: Run, configs: list[str], overrides: list[str], group: str, tags: list[str]) -> None:
    cmd = [sys.executable, "-m", "zoo.cli", "fit"]
    for c in configs:
        cmd += ["--config", c]
    cmd += overrides
    for key, value in run.values.items():
        cmd += [f"--{key}", value]
    cmd += [f"--trainer.default_root_dir={run.dir}", f"--wandb.group={group}",
            f"--wandb.name={group}/{run.name}", "--wandb.tags=" + json.dumps(tags)]
    if run.dir.exists():
        shutil.rmtree(run.dir)  # a fresh run; a re-run of compare replaces the old one
    run.dir.mkdir(parents=True)
    (run.dir / "command.txt").write_text(" ".join(cmd) + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(run.dir / "run.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    summary_path = run.dir / SUMMARY_FILE
    run.summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if proc.returncode != 0 and run.summary.get("status") != "failed":
        run.summary = {**run.summary, "status": "failed", "error": failure_reason(run.dir / "run.log", proc.returncode)}


def failure_reason(log: Path, returncode: int) -> str:
    """The run's own `error: ...` line (the CLI ends every failure with one), else its last line."""
    lines = log.read_text(errors="replace").strip().splitlines()
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1]
    return f"exit code {returncode}: {lines[-1] if lines else '(no output)'}"


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from the run's newest CSV log."""
    versions = sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    curves: dict[str, list[tuple[int, float]]] = {}
    if not versions:
        return curves
    with open(versions[-1], newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key in ("epoch", "step") or value in ("", None):
                    continue
                curves.setdefault(key, []).append((int(row["step"]), float(value)))
    return curves


def plot_curves(runs: list[Run], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {run.name: read_curves(run.dir) for run in runs}
    metrics = sorted({m for c in curves.values() for m in c if m.startswith(("train/", "val/"))})
    paths = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, c in curves.items():
            if metric in c:
                steps, values = zip(*c[metric])
                ax.plot(steps, values, label=name, marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "plots" / f"{metric.replace('/', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def latest_samples(run: Run, out: Path) -> list[Path]:
    """Copies the run's newest sample (image or text) per key into the report folder."""
    newest: dict[tuple[str, str], Path] = {}
    for p in sorted([*(run.dir / "samples").glob("*.png"), *(run.dir / "samples").glob("*.txt")]):
        newest[p.stem.rsplit("_epoch", 1)[0], p.suffix] = p  # sorted, so the last epoch wins
    copied = []
    for (key, suffix), p in newest.items():
        dest = out / "samples" / f"{run.dir.name}__{key}{suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
        copied.append(dest)
    return copied


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    metrics = sorted({m for r in runs for m in r.summary.get("metrics", {}) if m.startswith("val/")})
    header = ["run", "status", *metrics, "train samples/s", "peak memory (MB)", "params", "wall time (s)"]
    rows = []
    for r in runs:
        s = r.summary
        status = "ok" if r.ok else f"failed: {s.get('error') or 'no summary written'}"
        rows.append([r.name, status, *(_fmt(s.get("metrics", {}).get(m)) for m in metrics),
                     _fmt(s.get("train_samples_per_s")), _fmt(s.get("peak_memory_mb")),
                     _fmt(s.get("params")), _fmt(s.get("wall_time_s"))])
    return header, rows


def write_report(runs: list[Run], out: Path, configs: list[str], overrides: list[str], sweeps: dict) -> Path:
    plots = plot_curves(runs, out)
    samples = {r.name: latest_samples(r, out) for r in runs}
    header, rows = table(runs)
    device = next((r.summary.get("device") for r in runs if r.summary.get("device")), "unknown")
    sweep_text = "; ".join(f"{k} ∈ {{{', '.join(v)}}}" for k, v in sweeps.items())
    esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731

    md = [f"# Comparison: {', '.join(configs)}", "",
          f"Sweep: {sweep_text}. Overrides for every run: `{' '.join(overrides) or 'none'}`. Device: {device}.",
          "Same config, seed and data for every run; each run's files are under `runs/<name>/`.", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    md += ["", "Throughput counts training batches only (data loading included, first batch of each epoch "
           "excluded). Peak memory: CUDA allocator peak on GPU; on CPU, the training working set (peak "
           "resident memory during fit minus that at fit start).", "", "## Curves", ""]
    md += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots]
    md += ["", "## Samples (latest validation epoch)", ""]
    for name, paths in samples.items():
        md += [f"### {name}", ""]
        for p in paths:
            if p.suffix == ".txt":
                md += [f"`{p.stem}`:", "", "```text", p.read_text().rstrip(), "```", ""]
            else:
                md += [f"![{p.stem}]({p.relative_to(out).as_posix()})", ""]
    (out / "report.md").write_text("\n".join(md) + "\n")

    h = html.escape
    page = ["<!doctype html><meta charset='utf-8'><title>zoo comparison</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}</style>",
            f"<h1>Comparison: {h(', '.join(configs))}</h1>",
            f"<p>Sweep: {h(sweep_text)}. Overrides: <code>{h(' '.join(overrides) or 'none')}</code>. Device: {h(device)}.</p>",
            "<table><tr>" + "".join(f"<th>{h(c)}</th>" for c in header) + "</tr>"]
    page += ["<tr>" + "".join(f"<td>{h(c)}</td>" for c in row) + "</tr>" for row in rows]
    page += ["</table><h2>Curves</h2>"] + [f"<img src='{h(p.relative_to(out).as_posix())}' width=480>" for p in plots]
    page += ["<h2>Samples</h2>"]
    for name, paths in samples.items():
        page += [f"<h3>{h(name)}</h3>"]
        page += [f"<pre>{h(p.read_text())}</pre>" if p.suffix == ".txt" else f"<img src='{h(p.relative_to(out).as_posix())}'>"
                 for p in paths]
    (out / "report.html").write_text("\n".join(page) + "\n")
    (out / "results.json").write_text(json.dumps({r.name: {"values": r.values, **r.summary} for r in runs}, indent=2))
    return out / "report.md"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="train.py compare",
        description="Train one config once per norm (or per point of --sweep), same seed and data, "
        "and write DIR/report.md. Any other --trainer.*/--model.*/--data.* argument applies to every run.",
    )
    p.add_argument("--config", action="append", required=True, help="config file (repeatable, as for fit)")
    p.add_argument("--norms", help="comma-separated norm kinds: shorthand for --sweep model.norm=a,b,c")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep any argument (repeatable; sweeps are crossed), e.g. data.batch_size=1,2,8")
    p.add_argument("--out", required=True, help="report directory")
    args, overrides = p.parse_known_args(argv)
    stray = [o for o in overrides if o.startswith("-") and not o.startswith("--")]
    if stray:
        p.error(f"unrecognised arguments {stray}; overrides look like --trainer.max_steps=100")
    sweeps = parse_sweeps(args.norms, args.sweep)
    if args.norms:
        check_norms(sweeps["model.norm"])
    for key, values in sweeps.items():
        if key != "model.norm" or not args.norms:
            warn_unregistered_norms(key, values)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(sweeps, out)
    group = f"{Path(args.config[-1]).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.name} ...", flush=True)
        tags = ["compare"] + [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in run.values.items()]
        run_one(run, args.config, overrides, group, tags)
        status = "ok" if run.ok else f"FAILED ({run.summary.get('error')}); log: {run.dir / 'run.log'}"
        print(f"[{i}/{len(runs)}] {run.name}: {status}", flush=True)
    report = write_report(runs, out, args.config, overrides, sweeps)
    print(f"checkpoints: {(out / 'runs').resolve()}/<run>/checkpoints/last.ckpt")
    print(f"report: {report.resolve()}\n        {(out / 'report.html').resolve()}")
    return 0 if any(r.ok for r in runs) else 1
