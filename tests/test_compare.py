"""`train.py compare`: one run per sweep point and seed, failures reported, statistics, parallel and Ray
launchers with the same metrics, resume after a kill, retries, and one-line errors for bad input."""
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT, default_sigint, tiny_unet_args
from zoo.cli import main as cli_main
from zoo.compare import (execute, normalize_overrides, parse_baseline, parse_seeds, parse_sweeps, plan_runs,
                          prepare_out, read_curves, same_overrides)

TINY = [a for a in tiny_unet_args("IGNORED") if not a.startswith("--trainer.default_root_dir")]


# One thread per run whatever --jobs: torch's CPU kernels sum in an order that depends on threads.
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
SWEEP = ["--sweep", "model.net.norm=none,batch", "--seeds", "0,3"]  # conftest's sweep_reference


def compare(out, *extra, check=True, **popen) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "compare", *TINY, *extra, "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900, env=ENV, **popen)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def val_metrics(out) -> dict:
    runs = json.loads((out / "results.json").read_text())["runs"]
    return {name: {k: v for k, v in r["metrics"].items() if k.startswith("val/")} for name, r in runs.items()}


def test_sweeps_are_crossed_and_norms_is_shorthand(tmp_path):
    sweeps = parse_sweeps("batch,group", ["data.batch_size=1,8"])
    assert sweeps == {"model.net.norm": ["batch", "group"], "data.batch_size": ["1", "8"]}
    names = [r.name for r in plan_runs(sweeps, tmp_path)]
    assert names == ["norm=batch,batch_size=1", "norm=batch,batch_size=8",
                     "norm=group,batch_size=1", "norm=group,batch_size=8"]
    with pytest.raises(ValueError, match="swept twice"):
        parse_sweeps("batch", ["model.net.norm=group"])
    with pytest.raises(ValueError, match="KEY=v1,v2"):
        parse_sweeps(None, ["model.net.norm"])
    # a repeated value would train its point twice
    with pytest.raises(ValueError, match=r"^model.net.norm=batch,group,batch repeats 'batch'; give each value once$"):
        parse_sweeps("batch,group,batch", [])
    with pytest.raises(ValueError, match=r"^data.batch_size=1, 8,1 repeats '1'"):
        parse_sweeps("batch", ["data.batch_size=1, 8,1"])


def test_seeds_baseline_and_plan():
    assert parse_seeds(None) is None and parse_seeds("3") == [0, 1, 2] and parse_seeds("4,0,7") == [4, 0, 7]
    for bad in ("x", "-1", "1.5", "0", "1,1", "2,"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)
    sweeps = {"model.net.norm": ["layer", "rms"], "data.batch_size": ["2", "8"]}
    assert parse_baseline(None, sweeps) == {"model.net.norm": "layer"}
    assert parse_baseline("model.net.norm=rms", sweeps) == {"model.net.norm": "rms"}
    with pytest.raises(ValueError, match="swept key"):
        parse_baseline("model.net.norm=batch", sweeps)
    runs = plan_runs({"model.net.norm": ["layer", "rms"]}, ROOT, [0, 1])
    assert [(r.name, r.point, r.seed) for r in runs] == [
        ("norm=layer,seed=0", "norm=layer", 0), ("norm=layer,seed=1", "norm=layer", 1),
        ("norm=rms,seed=0", "norm=rms", 0), ("norm=rms,seed=1", "norm=rms", 1)]


def run_main(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["compare", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    return line


def test_bad_input_gets_one_line_before_any_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("zoo.compare._cuda_devices", lambda: [])  # a machine without GPUs
    out = tmp_path / "out"
    base = [*TINY, "--out", str(out)]
    cases = {
        ("--sweep", "model.nrom=a,b"): "error: --sweep model.nrom: no such argument; closest: model.net.norm",
        ("--sweep", "model.norm=a,b"): "error: --sweep model.norm: no such argument; closest: model.net.norm",
        ("--norms", "batch,bogus"): "error: unknown norm(s) ['bogus']; valid kinds: batch",
        ("--norms", "batch,batch"): "error: model.net.norm=batch,batch repeats 'batch'; give each value once",
        ("--norms", "batch", "--seeds", "two"): "error: --seeds 'two' is not a count",
        ("--norms", "batch", "--jobs", "0"): "error: --jobs 0: must be at least 1",
        ("--norms", "batch", "--launcher", "foo"): "error: train.py compare: argument --launcher: invalid choice: "
                                                   "'foo' (choose from ",  # argparse, not its usage block
        ("--norms", "batch", "--trainer.max_stepz=3"): "error: unrecognized arguments: --trainer.max_stepz=3",
        # no abbreviations, and compare's own options are suggested
        ("--norm", "batch"): "error: unrecognised argument --norm; did you mean --norms?",
        ("--norms", "batch", "--seed", "3"): "error: unrecognised argument --seed; did you mean --seeds?",
        ("--norms", "batch", "--trainer.max_step=3"): "error: unrecognized arguments: --trainer.max_step=3; did you "
                                                      "mean --trainer.max_steps?",
        ("--norms", "batch", "--baseline", "model.net.norm=group"): "error: --baseline 'model.net.norm=group' must be",
        ("--norms", "batch", "--metric", "val/iou_fg"): "error: --metric 'val/iou_fg': expected NAME:min or NAME:max",
        # tested once (the monitored one always is): two rows of one metric could say better and worse
        ("--norms", "batch", "--metric", "val/loss:max"): "error: --metric val/loss:max: val/loss is the task's "
                                                          "monitored metric, always tested (min)",
        ("--norms", "batch", "--metric", "val/dice_fg:max", "--metric", "val/dice_fg:min"):
            "error: --metric val/dice_fg:min: val/dice_fg is given twice",
        # a value its runs would refuse, before the others train (and are kept by a corrected re-run)
        ("--norms", "batch", "--sweep", "data.batch_size=2,two"): "error: --sweep data.batch_size: value 'two' is "
                                                                  "refused: --data: ",
        ("--norms", "batch", "--alpha", "5"): "error: --alpha 5.0: must be between 0 and 1",
        ("--compare.sweep=[]",): "error: nothing to compare; give --norms a,b,... or --sweep KEY=v1,v2, or set "
                                 "compare.sweep in the config",
        # an option the chosen launcher does not read would be silently ignored
        ("--norms", "batch", "--slurm", "timeout_min=5"): "error: --slurm is for --launcher slurm, not local",
        ("--norms", "batch", "--cpus-per-run", "4"): "error: --cpus-per-run is for --launcher ray or slurm, not local",
        ("--norms", "batch", "--ray-address", "h:1"): "error: --ray-address is for --launcher ray, not local",
        ("--norms", "batch", "--launcher", "ray", "--jobs", "2"): "error: --jobs is for --launcher local, not ray",
        ("--norms", "batch", "--launcher", "slurm", "--devices-per-run", "1"): "error: --devices-per-run is for "
                                                                               "--launcher local or ray, not slurm",
        ("--norms", "batch", "--devices-per-run", "-1"): "error: --devices-per-run -1: must be at least 0",
        ("--norms", "batch", "--devices-per-run", "1"): "error: --devices-per-run 1: this machine has no GPU",
        ("--norms", "batch", "--launcher", "slurm", "--cpus-per-run", "2", "--slurm", "cpus_per_task=4"):
            "error: --cpus-per-run 2 and --slurm cpus_per_task=4 both set a job's CPUs; give one",
        ("--norms", "batch", "--launcher", "slurm", "--slurm", "partition"): "error: --slurm 'partition': expected "
                                                                           "KEY=VALUE",
        ("--norms", "batch", "--launcher", "slurm", "--slurm", "bogus=1"): "error: --slurm: Parameter 'bogus' need "
                                                                         "to be prefixed by an executor name",
    }
    for extra, message in cases.items():
        assert run_main(capsys, *base, *extra).startswith(message)
    (tmp_path / "file").write_text("")
    assert run_main(capsys, *TINY, "--norms", "batch", "--out", str(tmp_path / "file")).startswith(
        f"error: --out {str(tmp_path / 'file')!r} is a file")
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert run_main(capsys, *base, "--norms", "batch", "--launcher", "ray") == (
        "error: --launcher ray needs Ray: pip install 'zoo[ray]' (or pip install ray)")
    monkeypatch.delitem(sys.modules, "ray")
    monkeypatch.setitem(sys.modules, "submitit", None)
    assert run_main(capsys, *base, "--norms", "batch", "--launcher", "slurm") == (
        "error: --launcher slurm needs submitit: pip install 'zoo[slurm]' (or pip install submitit)")
    monkeypatch.delitem(sys.modules, "submitit")
    line = run_main(capsys, *base, "--norms", "batch", "--launcher", "ray", "--ray-address", "127.0.0.1:1")
    assert line.startswith("error: --ray-address 127.0.0.1:1: cannot reach it")
    assert not (out / "runs").exists()
    # refused before compare.json is written: the corrected command is a first run, not a re-run with
    # other settings
    other = tmp_path / "other"
    assert run_main(capsys, *TINY, "--norms", "batch", "--devices-per-run", "1", "--out", str(other)).startswith(
        "error: --devices-per-run 1: this machine has no GPU") and not other.exists()


def test_an_entry_of_a_dict_argument_can_be_swept():
    """`--model.model_kwargs.stem_width 8` works for fit, so it is a sweep key too."""
    from zoo.compare import check_arguments

    resnet = [str(ROOT / "configs" / "resnet.yaml")]
    sweeps, metric, mode, seed = check_arguments(resnet, [], None, ["model.model_kwargs.stem_width=8,16"])
    assert sweeps == {"model.model_kwargs.stem_width": ["8", "16"]} and (metric, mode) == ("val/top1", "max")
    assert seed == 0 and check_arguments(resnet, ["--seed_everything=7"], "batch", [])[3] == 7
    with pytest.raises(ValueError, match="--sweep model.model_kwrgs.stem_width: no such argument"):
        check_arguments(resnet, [], None, ["model.model_kwrgs.stem_width=8,16"])


def test_an_unknown_timm_model_name_is_refused_before_any_run(tmp_path, capsys):
    """The config's or a swept model_name that timm does not know fails before any run starts, as fit
    would refuse it in each run."""
    from zoo.compare import check_arguments

    resnet = [str(ROOT / "configs" / "resnet.yaml")]
    with pytest.raises(ValueError, match="model_name 'resnet10x' is not a registered timm model; closest names: "):
        check_arguments(resnet, [], None, ["model.model_name=resnet10t,resnet10x"])
    with pytest.raises(ValueError, match="model_name 'resnt18' is not a registered timm model"):
        check_arguments(resnet, ["--model.model_name=resnt18"], "batch", [])
    assert check_arguments(resnet, [], None, ["model.model_name=resnet10t,resnet18"])[0] == {
        "model.model_name": ["resnet10t", "resnet18"]}
    out = tmp_path / "out"
    assert run_main(capsys, "--config", resnet[0], "--sweep", "model.model_name=resnet10x", "--out",
                    str(out)).startswith("error: model_name 'resnet10x' is not a registered timm model")
    assert not out.exists()


def test_other_settings_in_the_same_out_are_refused_and_fresh_starts_over(tmp_path):
    config = str(ROOT / "configs" / "unet.yaml")
    prepare_out(tmp_path, [config], ["--trainer.max_steps=4"], fresh=False)
    (tmp_path / "runs" / "kept").mkdir(parents=True)
    prepare_out(tmp_path, [config], ["--trainer.max_steps=4"], fresh=False)  # the same settings: fine
    with pytest.raises(ValueError, match=r"overrides: before \['--trainer.max_steps=4'\], now \['--trainer.max_steps=5'\]"):
        prepare_out(tmp_path, [config], ["--trainer.max_steps=5"], fresh=False)
    assert (tmp_path / "runs" / "kept").exists()
    prepare_out(tmp_path, [config], ["--trainer.max_steps=5"], fresh=True)
    assert not (tmp_path / "runs").exists()


def test_a_sweep_leaving_out_runs_of_the_out_is_refused_and_one_adding_runs_is_not(tmp_path):
    config = str(ROOT / "configs" / "unet.yaml")
    first = plan_runs({"model.net.norm": ["batch", "group"]}, tmp_path, [0, 1])
    prepare_out(tmp_path, [config], [], False, first)
    for r in first:
        r.dir.mkdir(parents=True)
    more = plan_runs({"model.net.norm": ["batch", "group", "none"]}, tmp_path, [0, 1, 2])
    prepare_out(tmp_path, [config], [], False, more)  # more values and seeds: the report grows
    fewer = plan_runs({"model.net.norm": ["batch"]}, tmp_path, [0, 1, 2])
    with pytest.raises(ValueError, match=r"holds runs this sweep leaves out \(norm=group,seed=0, norm=group,seed=1\), "
                                         "which would drop out of its report"):
        prepare_out(tmp_path, [config], [], False, fewer)
    assert all(r.dir.exists() for r in first)
    prepare_out(tmp_path, [config], [], True, fewer)  # --fresh
    assert not (tmp_path / "runs").exists()


def test_seeds_added_to_a_comparison_without_seeds_take_its_runs_as_the_configs_seeds(tmp_path):
    config = str(ROOT / "configs" / "unet.yaml")
    first = plan_runs({"model.net.norm": ["batch", "group"]}, tmp_path)
    prepare_out(tmp_path, [config], [], False, first)
    for r in first:
        r.dir.mkdir(parents=True)
    seeded = plan_runs({"model.net.norm": ["batch", "group"]}, tmp_path, [0, 1, 2], config_seed=1)
    prepare_out(tmp_path, [config], [], False, seeded)
    assert {r.name: r.dir.name for r in seeded if r.seed == 1} == {"norm=batch,seed=1": "norm=batch",
                                                                    "norm=group,seed=1": "norm=group"}
    assert all(r.dir.name == r.name for r in seeded if r.seed != 1)
    without = plan_runs({"model.net.norm": ["batch", "group"]}, tmp_path, [0, 2], config_seed=1)
    with pytest.raises(ValueError, match=r"leaves out \(norm=batch, norm=group\)"):
        prepare_out(tmp_path, [config], [], False, without)


def test_an_override_spelled_either_way_is_the_same_override(tmp_path):
    assert normalize_overrides(["--a", "1", "--b=2", "--flag", "--c", "-1", "x"]) == [
        "--a=1", "--b=2", "--flag", "--c", "-1", "x"]
    config = tmp_path / "c.yaml"
    config.write_text("seed_everything: 0\n")
    out = tmp_path / "out"
    group = prepare_out(out, [str(config)], ["--trainer.max_steps=2", "--model.net.norm", "batch"], fresh=False)
    (out / "runs" / "kept").mkdir(parents=True)
    time.sleep(1)  # the group is named by the time the comparison started: a re-run keeps it
    assert prepare_out(out, [str(config)], ["--trainer.max_steps", "2", "--model.net.norm=batch"], fresh=False) == group
    assert json.loads((out / "compare.json").read_text())["overrides"] == ["--trainer.max_steps=2",
                                                                          "--model.net.norm=batch"]
    # a compare.json written before overrides were normalized holds them as given
    state = json.loads((out / "compare.json").read_text())
    (out / "compare.json").write_text(json.dumps({**state, "overrides": ["--trainer.max_steps", "2",
                                                                         "--model.net.norm=batch"]}))
    prepare_out(out, [str(config)], ["--trainer.max_steps=2", "--model.net.norm", "batch"], fresh=False)
    with pytest.raises(ValueError, match=r"before \['--trainer.max_steps=2', '--model.net.norm=batch'\], now "
                                         r"\['--trainer.max_steps=3', '--model.net.norm=batch'\]"):
        prepare_out(out, [str(config)], ["--trainer.max_steps", "3", "--model.net.norm", "batch"], fresh=False)
    assert (out / "runs" / "kept").exists()
    # another order: the same overrides where order cannot matter (each key once, no config, no +=)
    prepare_out(out, [str(config)], ["--model.net.norm=batch", "--trainer.max_steps=2"], fresh=False)
    assert same_overrides(["--a=1", "--b=2"], ["--b=2", "--a=1"])
    assert not same_overrides(["--a=1", "--a=2"], ["--a=2", "--a=1"])  # the last one wins
    assert not same_overrides(["--config=x.yaml", "--a=1"], ["--a=1", "--config=x.yaml"])
    assert not same_overrides(["--c+=[1]", "--c+=[2]"], ["--c+=[2]", "--c+=[1]"])
    assert not same_overrides(["--c", "-1", "--d=2"], ["--d=2", "--c", "-1"])


def test_curve_steps_are_optimizer_steps(tmp_path):
    """Lightning's metrics.csv of 6 steps, validation every 3, interrupted after step 3 and resumed (a
    second version): Lightning writes each row at global_step - 1; the curves are at global_step."""
    csv_dir = tmp_path / "csv"
    (csv_dir / "version_0").mkdir(parents=True)
    (csv_dir / "version_1").mkdir()
    (csv_dir / "version_0" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n0,0,1.9,\n0,1,1.7,\n0,2,1.1,\n0,2,,1.7\n")
    (csv_dir / "version_1" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n0,3,1.4,\n1,4,1.3,\n1,5,1.2,\n1,5,,1.4\n")
    assert read_curves(tmp_path) == {"train/loss": [(1, 1.9), (2, 1.7), (3, 1.1), (4, 1.4), (5, 1.3), (6, 1.2)],
                                     "val/loss": [(3, 1.7), (6, 1.4)]}


def test_a_metric_no_run_logs_is_refused_after_the_report(tmp_path, capsys, monkeypatch):
    """--metric val/nope:min: the runs and the report without it are kept, and the error names the
    metrics the runs do log, instead of a verdict that reads as if every seed failed."""
    import zoo.compare as c

    metrics = {"val/loss": 0.5, "val/dice_fg": 0.8, "train/loss": 0.4}
    monkeypatch.setattr(c, "execute", lambda spec, max_retries: {
        "summary": {"status": "ok", "metrics": metrics}, "retries": 0})  # a finished run, without training
    out = tmp_path / "out"
    line = run_main(capsys, *TINY, "--norms", "none,batch", "--seeds", "0,1", "--metric", "val/nope:min",
                    "--metric", "val/dice_fg:max", "--out", str(out))
    assert line == "error: --metric 'val/nope': no run logged it; the runs log val/dice_fg, val/loss"
    results = json.loads((out / "results.json").read_text())
    assert {p["metric"] for p in results["paired"]} == {"val/loss", "val/dice_fg"}
    assert not any("nope" in v for v in results["verdicts"]) and (out / "report.md").is_file()


def test_a_training_metric_is_tested_with_a_warning(tmp_path, capsys, monkeypatch):
    import zoo.compare as c

    monkeypatch.setattr(c, "execute", lambda spec, max_retries: {
        "summary": {"status": "ok", "metrics": {"val/loss": 0.5, "train/loss": 0.4}}, "retries": 0})
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["compare", *TINY, "--norms", "none,batch", "--metric", "train/loss:min", "--out", str(tmp_path)])
    assert exit_info.value.code == 0
    assert ("compare: warning: --metric train/loss: a training metric's final value is measured on the last training "
            "batches, not on held-out data") in capsys.readouterr().err
    assert {p["metric"] for p in json.loads((tmp_path / "results.json").read_text())["paired"]} == {"val/loss",
                                                                                                   "train/loss"}


def test_a_comparison_whose_runs_never_validated_is_an_error(tmp_path, capsys, monkeypatch):
    """Runs that ended before their first validation log no monitored metric: the comparison of
    nothing says why, instead of verdicts that read as if every seed failed."""
    import zoo.compare as c

    monkeypatch.setattr(c, "execute", lambda spec, max_retries: {
        "summary": {"status": "ok", "metrics": {"train/loss": 0.4}, "val_step": None}, "retries": 0})
    line = run_main(capsys, *TINY, "--norms", "none,batch", "--out", str(tmp_path / "out"))
    assert line == ("error: val/loss, the task's monitored metric: no run logged it, so nothing is compared; the runs "
                    "log no val/ metric: they ended before their first validation (--trainer.val_check_interval)")


def test_report_plots_the_mean_over_finished_seeds_on_common_steps(tmp_path, monkeypatch):
    """report.md's curves as the dashboard's: per point one labelled line, the mean of its finished
    seeds on the steps they all logged (a failed seed drawn, not averaged), and a seed line each."""
    import matplotlib.figure

    from zoo.compare import plot_curves

    runs = plan_runs({"model.net.norm": ["none", "batch"]}, tmp_path, [0, 1, 2])
    logged = {0: "0,2,,1.0\n0,5,,0.6\n0,7,,0.5\n", 1: "0,2,,2.0\n0,5,,1.0\n", 2: "0,2,,9.0\n"}
    for r in runs:
        (r.dir / "csv" / "version_0").mkdir(parents=True)
        (r.dir / "csv" / "version_0" / "metrics.csv").write_text("epoch,step,train/loss,val/loss\n" + logged[r.seed])
        r.status = "failed" if r.seed == 2 else "ok"
        r.summary = {"status": r.status}
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    plot_curves(runs, tmp_path)
    (ax,) = figures[0].axes
    means = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines
             if not line.get_label().startswith("_")}
    # seeds 0 and 1 share steps 3 and 6 (CSV steps + 1): means 1.5, 0.8; seed 2 failed
    expected = ([3, 6], [pytest.approx(1.5), pytest.approx(0.8)])
    assert means == {"norm=none (n=2)": expected, "norm=batch (n=2)": expected}
    assert len(ax.lines) == 2 * (3 + 1) and len(ax.collections) == 2  # a line per seed and per mean; a band each


@pytest.mark.slow
def test_compare_writes_report_and_reports_failures(tmp_path):
    out = tmp_path / "report"
    # 'bogus' passes --sweep unchecked, so that run fails inside its own process.
    proc = compare(out, "--sweep", "model.net.norm=none,batch,bogus", "--jobs", "2", check=False)
    assert "report:" in proc.stdout
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == (  # the others finished and are reported
        "error: 1 of 3 runs failed (norm=bogus: unknown norm kind 'bogus'; valid kinds: batch, layer, instance, "
        "group, rms, none (yours: register it with zoo.norm.register_norm, in a module that train.py imports with "
        "--import MODULE)); the report lists each, and the same command re-runs them")
    assert "warning: model.net.norm value(s) ['bogus'] are not registered norms" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert runs["norm=none"]["status"] == "ok" and runs["norm=batch"]["status"] == "ok"
    # the failed run's reason is its own error line, not the CLI's internals
    assert runs["norm=bogus"]["status"] == "failed"
    assert runs["norm=bogus"]["error"].startswith("unknown norm kind 'bogus'; valid kinds: batch, layer, instance, "
                                                  "group, rms, none (yours: register it")
    report = (out / "report.md").read_text()
    rows = [line for line in report.split("## Runs")[1].splitlines() if line.startswith("| norm=")]
    assert len(rows) == 3 and "failed" in rows[2]
    header = next(line for line in report.splitlines() if line.startswith("| run |"))
    for col in ("val/iou_fg", "val/seam_error", "train samples/s", "peak memory (MB)", "params", "wall time (s)"):
        assert col in header
    # one seed: a paired comparison is reported, and says it cannot test
    assert "n = 1" in " ".join(results["verdicts"])
    assert (out / "plots" / "train_loss.png").is_file() and (out / "plots" / "val_loss.png").is_file()
    assert len(list((out / "samples").glob("norm=none__*.png"))) == 1
    assert (out / "report.html").is_file() and (out / "runs" / "norm=none" / "tb").is_dir()
    # steps are optimizer steps (global_step), as in the checkpoints' names and summary.json
    for name in ("norm=none", "norm=batch"):
        (best,) = (out / "runs" / name / "checkpoints").glob("best-*.ckpt")
        agg = next(a for a in results["aggregate"] if a["point"] == name and a["metric"] == "val/loss")
        assert agg["best_step"]["mean"] == int(best.stem.rsplit("step=", 1)[1])
        curves = read_curves(out / "runs" / name)  # 4 steps, validation every 2
        assert [s for s, _ in curves["train/loss"]] == [1, 2, 3, 4] and runs[name]["global_step"] == 4
        assert [s for s, _ in curves["val/loss"]] == [2, 4]
    # Same seed, same data: the two runs differ only by the norm.
    for name in ("norm=none", "norm=batch"):
        cmd = (out / "runs" / name / "command.txt").read_text()
        assert "--seed_everything" not in cmd and "--model.net.norm " + name.split("=")[1] in cmd
        assert f'--wandb.tags=["compare", "{name}"]' in shlex.split(cmd)  # quoted for a shell
        # the run's config (and wandb's) records the sweep it was part of, not the config's default
        config = yaml.safe_load((out / "runs" / name / "csv" / "version_0" / "config.yaml").read_text())
        assert config["compare"]["sweep"] == ["model.net.norm=none,batch,bogus"]
    # seeds added (`--seeds 1`: seed 0): the runs made without --seeds are the config's seed's (0), kept
    proc = compare(out, "--sweep", "model.net.norm=none,batch,bogus", "--seeds", "1", check=False)
    assert "3 runs; 2 finished before, kept as they are" in proc.stdout and proc.returncode == 1
    again = json.loads((out / "results.json").read_text())
    for name in ("norm=none", "norm=batch"):
        assert again["runs"][f"{name},seed=0"]["metrics"] == runs[name]["metrics"]
        assert again["runs"][f"{name},seed=0"]["seed"] == 0 and not (out / "runs" / f"{name},seed=0").exists()


@pytest.mark.slow
def test_launchers_and_jobs_give_the_same_metrics_and_retries_resume(tmp_path, sweep_reference, one_ray_at_a_time):
    # the other launchers on half the sweep (two runs at once is what they have to get right)
    half = ["--sweep", "model.net.norm=batch", "--seeds", "0,3"]
    ray = compare(tmp_path / "ray", *half, "--launcher", "ray", "--max-retries", "0")
    nodes = {r["node"] for r in json.loads((tmp_path / "ray" / "results.json").read_text())["runs"].values()}
    assert len(nodes) == 1 and nodes.pop().startswith("127.0.0.1/")  # the local instance stays on loopback
    # --jobs 2, with every run's process SIGKILLed once (at step 2): retried from its last.ckpt, and the
    # metrics still those of one run after another, uninterrupted
    kill = json.dumps({"class_path": "tests.conftest.KillAt", "init_args": {"step": 2, "fresh_only": True}})
    compare(tmp_path / "two", *half, f"--trainer.callbacks+={kill}", "--max-retries", "1", "--jobs", "2")
    results = json.loads((tmp_path / "two" / "results.json").read_text())["runs"]
    assert len(results) == 2 and all(r["retries"] == 1 and r["status"] == "ok" for r in results.values())

    reference_dir = sweep_reference()
    reference = val_metrics(reference_dir)
    assert len(reference) == 4 and all(reference.values())
    assert reference["norm=none,seed=0"] != reference["norm=none,seed=3"]  # the seed changes the run
    subset = {k: v for k, v in reference.items() if k.startswith("norm=batch,")}
    assert val_metrics(tmp_path / "ray") == subset, "the Ray launcher differs from the local one" + ray.stderr[-500:]
    assert val_metrics(tmp_path / "two") == subset, "--jobs 2 with retries differs from --jobs 1"
    cmd = (reference_dir / "runs" / "norm=none,seed=3" / "command.txt").read_text()
    assert "--seed_everything=3" in cmd
    stats = json.loads((reference_dir / "results.json").read_text())
    assert [p["n"] for p in stats["paired"]] == [2]
    assert {(a["point"], a["n"]) for a in stats["aggregate"] if a["metric"] == "val/loss"} == {
        ("norm=none", 2), ("norm=batch", 2)}


@pytest.mark.slow
def test_slurm_launcher_runs_jobs_and_a_rerun_resumes_a_lost_one(tmp_path, sweep_reference):
    """--launcher slurm through submitit (here, without SLURM, its local processes): same metrics as the
    local launcher; a job whose process is killed (a node lost, a job cancelled) leaves its run failed,
    and the same command run again resumes that run from its last.ckpt and keeps the finished one."""
    kill = json.dumps({"class_path": "tests.conftest.KillAt",  # the job process of the first run at step 2
                       "init_args": {"step": 2, "parent": True, "once": str(tmp_path / "killed")}})
    args = ["--sweep", "model.net.norm=none", "--seeds", "0,3", "--launcher", "slurm", "--slurm", "timeout_min=10",
            f"--trainer.callbacks+={kill}"]
    first = compare(tmp_path / "out", *args, check=False)
    assert "submitit runs the jobs on local" in first.stdout
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    (lost,) = [name for name, r in runs.items() if r["status"] == "failed"]
    assert "without finishing the run; log: " in runs[lost]["error"]
    (kept,) = set(runs) - {lost}
    before = (tmp_path / "out" / "runs" / kept / "summary.json").read_bytes()
    compare(tmp_path / "out", *args)
    assert "--ckpt_path=last" in (tmp_path / "out" / "runs" / lost / "run.log").read_text().split("=== attempt")[-1]
    assert (tmp_path / "out" / "runs" / kept / "summary.json").read_bytes() == before
    subset = {k: v for k, v in val_metrics(sweep_reference()).items() if k.startswith("norm=none,")}
    assert val_metrics(tmp_path / "out") == subset


def run_lock_freed(run_dir, within: float) -> bool:
    """Whether the lock a run's training process holds (compare.RUN_LOCK) is free within `within` s."""
    deadline = time.time() + within
    with open(run_dir / ".lock") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.time() > deadline:
                    return False
                time.sleep(0.1)


@pytest.mark.slow
def test_killed_compare_reruns_to_the_same_report_and_keeps_finished_runs(tmp_path, sweep_reference):
    out = tmp_path / "killed"
    # the third run is held after its first checkpoint (step 2), so the kill lands there however loaded
    # the machine is (a poll for last.ckpt could see it late, with the run finished)
    pause = json.dumps({"class_path": "tests.conftest.PauseAt", "init_args": {"step": 2, "run": "norm=batch,seed=0"}})
    sweep = [*SWEEP, f"--trainer.callbacks+={pause}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "compare", *TINY, *sweep, "--out", str(out)],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished = [out / "runs" / "norm=none,seed=0", out / "runs" / "norm=none,seed=3"]
    deadline = time.time() + 600
    while not (out / "runs" / "norm=batch,seed=0" / "paused").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run_lock_freed(out / "runs" / "norm=batch,seed=0", within=30)  # its process died with the compare
    assert all((f / "summary.json").exists() for f in finished) and not (out / "runs" / "norm=batch,seed=3").exists()
    assert "2 of 4 runs done" in (out / "report.html").read_text()  # rewritten after every finished run
    kept = {p: p.read_bytes() for f in finished for p in f.rglob("*") if p.is_file()}
    mtimes = {p: p.stat().st_mtime_ns for p in kept}
    rerun = compare(out, *sweep)
    assert "2 finished before, kept as they are" in rerun.stdout
    assert {p: p.read_bytes() for p in kept} == kept and {p: p.stat().st_mtime_ns for p in kept} == mtimes
    assert val_metrics(out) == val_metrics(sweep_reference())
    refused = compare(out, *SWEEP, "--trainer.max_steps=7", check=False)
    assert refused.returncode == 2 and "holds a comparison with other settings" in refused.stderr


def test_report_carries_text_samples_and_latest_epoch_only(tmp_path):
    from zoo.compare import Run, write_report

    run = Run("norm=layer", {"model.net.norm": "layer"}, tmp_path / "runs" / "norm=layer",
              {"status": "ok", "metrics": {"val/loss": 1.5}, "params": 10}, point="norm=layer", status="ok")
    (run.dir / "samples").mkdir(parents=True)
    (run.dir / "samples" / "val_text_epoch000.txt").write_text("prompt: ab\noutput: old\n")
    (run.dir / "samples" / "val_text_epoch001.txt").write_text("prompt: ab\noutput: new <&>\n")
    write_report([run], tmp_path, ["c.yaml"], [], {"model.net.norm": ["layer"]}, final=False)  # mid-sweep
    assert (tmp_path / "samples" / "norm=layer__val_text.txt").read_text() == "prompt: ab\noutput: new <&>\n"
    assert "samples/norm=layer__val_text.txt" in (tmp_path / "report.html").read_text()  # linked
    report = write_report([run], tmp_path, ["c.yaml"], [], {"model.net.norm": ["layer"]}).read_text()
    assert "output: new <&>" in report and "output: old" not in report
    assert "| norm=layer | ok | 1.5 |" in report


def test_statistics_mid_sweep_skip_points_whose_baseline_has_not_finished(tmp_path):
    from zoo.compare import statistics

    runs = plan_runs({"model.net.norm": ["none", "batch"]}, tmp_path, [0, 1])
    for r in runs[2:3]:  # only norm=batch,seed=0 has finished; the baseline norm=none has not
        r.status, r.summary = "ok", {"status": "ok", "metrics": {"val/loss": 0.5}}
    st = statistics(runs, "val/loss", "min", {"model.net.norm": "none"}, 0.05)
    assert st["paired"] == [] and [a["point"] for a in st["aggregate"]] == ["norm=batch"]


def test_paired_tests_on_further_metrics_with_their_direction(tmp_path):
    from scipy import stats as scipy_stats

    from zoo.compare import statistics

    runs = plan_runs({"model.net.norm": ["none", "layer"]}, tmp_path, [0, 1, 2])
    table = {"none": ([1.0, 1.1, 0.9], [0.50, 0.60, 0.55]), "layer": ([0.9, 1.0, 0.85], [0.70, 0.72, 0.69])}
    for r in runs:
        loss, acc = table[r.values["model.net.norm"]]
        r.status, r.summary = "ok", {"status": "ok", "metrics": {"val/loss": loss[r.seed], "val/acc": acc[r.seed]}}
    st = statistics(runs, "val/loss", "min", {"model.net.norm": "none"}, 0.05, also=(("val/acc", "max"),))
    by_metric = {p["metric"]: p for p in st["paired"]}
    assert set(by_metric) == {"val/loss", "val/acc"}
    acc = by_metric["val/acc"]
    assert acc["p_value"] == pytest.approx(scipy_stats.ttest_rel(table["layer"][1], table["none"][1]).pvalue)
    assert acc["mean_diff"] == pytest.approx((0.20 + 0.12 + 0.14) / 3)
    assert acc["better"] == "better"  # higher accuracy, significant at 0.05
    assert len(st["verdicts"]) == 2


def test_interaction_the_difference_of_differences_seed_by_seed(tmp_path):
    """norm x batch_size: does group's difference to batch change with the batch size? At batch size
    8 vs 2, seed by seed: (group8 - batch8) - (group2 - batch2), tested with scipy's paired t-test."""
    from scipy import stats as scipy_stats

    from zoo.compare import statistics

    runs = plan_runs({"model.net.norm": ["batch", "group"], "data.batch_size": ["2", "8"]}, tmp_path, [0, 1, 2])
    loss = {("batch", "2"): [0.90, 0.80, 0.85], ("group", "2"): [0.60, 0.55, 0.62],
            ("batch", "8"): [0.50, 0.45, 0.52], ("group", "8"): [0.49, 0.47, 0.50]}
    for r in runs:
        r.status = "ok"
        r.summary = {"status": "ok", "metrics": {"val/loss": loss[tuple(r.values.values())][r.seed]}}
    st = statistics(runs, "val/loss", "min", {"model.net.norm": "batch"}, 0.05)
    (row,) = [p for p in st["paired"] if " − " in p["point"]]
    assert row["point"] == "norm=group,batch_size=8 − norm=batch,batch_size=8"
    assert row["baseline"] == "norm=group,batch_size=2 − norm=batch,batch_size=2"
    gap8 = [g - b for g, b in zip(loss["group", "8"], loss["batch", "8"])]
    gap2 = [g - b for g, b in zip(loss["group", "2"], loss["batch", "2"])]
    assert row["mean_diff"] == pytest.approx(sum(a - b for a, b in zip(gap8, gap2)) / 3)  # +0.27: smaller gain at 8
    assert row["p_value"] == pytest.approx(scipy_stats.ttest_rel(gap8, gap2).pvalue)
    assert row["significant"] and row["better"] == "worse"  # group's lead over batch shrinks at batch size 8
    assert len(st["paired"]) == 3  # group vs batch at 2 and at 8, and the interaction
    one_key = plan_runs({"model.net.norm": ["batch", "group"]}, tmp_path / "one", [0, 1])
    for r in one_key:
        r.status, r.summary = "ok", {"status": "ok", "metrics": {"val/loss": 0.5 + r.seed}}
    assert not any(" − " in p["point"] for p in statistics(one_key, "val/loss", "min", {"model.net.norm": "batch"},
                                                           0.05)["paired"])


def test_each_local_job_gets_its_own_gpus(monkeypatch, tmp_path):
    """--jobs 2 --devices-per-run 2 on a (pretend) 4-GPU machine: runs at the same time never share a
    device, and a plan needing more GPUs than there are is refused."""
    import threading

    import zoo.compare as c

    monkeypatch.setattr(c, "_cuda_devices", lambda: ["0", "1", "2", "3"])
    lock, busy, seen, shared = threading.Lock(), set(), [], []

    def fake_execute(spec, max_retries):
        devices = set(spec["env"]["CUDA_VISIBLE_DEVICES"].split(","))
        with lock:
            shared.append(devices & busy)
            busy.update(devices)
        time.sleep(0.05)  # long enough for the other job to start meanwhile
        with lock:
            busy.difference_update(devices)
            seen.append(devices)
        return {"summary": {"status": "ok"}, "retries": 0}

    monkeypatch.setattr(c, "execute", fake_execute)
    runs = plan_runs({"model.net.norm": ["a", "b", "c", "d", "e"]}, tmp_path)
    specs = [{"env": {"OMP_NUM_THREADS": "1"}, "dir": str(r.dir)} for r in runs]
    done = []
    c.launch_local(runs, specs, 2, 2, 0, lambda run, result: done.append(run.name))
    assert sorted(done) == sorted(r.name for r in runs) and len(seen) == 5
    assert all(len(d) == 2 for d in seen) and not any(shared)
    assert {frozenset(d) for d in seen} == {frozenset({"0", "1"}), frozenset({"2", "3"})}
    with pytest.raises(ValueError, match="needs 6 GPUs; this machine has 4"):
        c.launch_local(runs, specs, 3, 2, 0, lambda run, result: None)


def test_the_dashboard_links_the_newest_config_of_a_run(tmp_path):
    """A run resumed ten times: its config link is version_10's, not version_9's (sorted as text)."""
    import zoo.compare as c

    (run,) = plan_runs({"model.net.norm": ["batch"]}, tmp_path)
    for n in (2, 9, 10):
        (run.dir / "csv" / f"version_{n}").mkdir(parents=True)
        (run.dir / "csv" / f"version_{n}" / "config.yaml").write_text(f"# {n}\n")
    data = c.dashboard_data([run], tmp_path, "t", "d", "val/loss", "min", {"aggregate": [], "paired": [], "verdicts": []})
    assert data["runs"][0]["links"]["config"] == "runs/norm=batch/csv/version_10/config.yaml"


def test_a_ray_run_asks_for_what_a_node_has():
    """Each run's Ray task: 1 GPU by default where a node has GPUs (decided from the cluster, not from
    the machine compare runs on), else none; a run no node can hold is refused, not left waiting."""
    cpu_node, gpu_node = {"CPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}
    import zoo.compare as c

    assert c.ray_resources_per_run([cpu_node], 1, None) == (1, 0)
    assert c.ray_resources_per_run([cpu_node, gpu_node], 1, None) == (1, 1)
    assert c.ray_resources_per_run([cpu_node, gpu_node], 4, 0) == (4, 0)  # --devices-per-run 0: CPUs only
    assert c.ray_resources_per_run([cpu_node, gpu_node], 8, 2) == (8, 2)
    for cpus, gpus in ((4, 0), (1, 1)):
        with pytest.raises(ValueError, match=f"--cpus-per-run {cpus} --devices-per-run {gpus}: no node of the Ray "
                                             r"cluster has that many \(its nodes: 2 CPUs \+ 0 GPUs\)"):
            c.ray_resources_per_run([cpu_node], cpus, gpus)
    with pytest.raises(ValueError, match="no node"):
        c.ray_resources_per_run([cpu_node, gpu_node], 4, 3)  # more than one node holds


def test_an_attempt_waits_for_a_process_of_the_run_still_running(tmp_path):
    """A launcher that died while its run's training process lives on (a Ray node declared lost that
    still runs it; a platform where a child does not die with its parent): the retry waits for that
    process to end rather than writing the same run beside it. The process holds the run's lock itself."""
    run = tmp_path / "run"
    first = ("import sys, time\nopen(sys.argv[1] + '-started', 'w').close()\ntime.sleep(1.5)\n"
             "open(sys.argv[1] + '-ended', 'w').close()\n")
    launcher = ("import json, sys\nimport zoo.compare as c\n"
                "c._die_with_parent = lambda: None  # as where a child outlives its parent\n"
                "c.execute(json.loads(sys.argv[1]), max_retries=0)\n")
    spec = {"cmd": [sys.executable, "-c", first, str(tmp_path / "first")], "dir": str(run), "env": {},
            "cwd": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", launcher, json.dumps(spec)], cwd=ROOT, env=ENV)
    deadline = time.time() + 60
    while not (tmp_path / "first-started").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.kill()
    proc.wait()  # the launcher is gone; its attempt still runs
    second = ("import json, os, sys\n"  # records whether the first attempt had ended when this one started
              "json.dump({'status': 'ok', 'first_ended': os.path.exists(sys.argv[1])}, open('summary.json', 'w'))\n")
    spec = {**spec, "cmd": [sys.executable, "-c", second, str(tmp_path / "first-ended")], "cwd": str(run)}
    result = execute(spec, max_retries=0)
    assert result["summary"] == {"status": "ok", "first_ended": True}
    assert "waiting for another process of this run to end" in (run / "run.log").read_text()


def test_a_run_killed_after_its_ok_summary_is_done_and_a_run_finished_meanwhile_is_kept(tmp_path):
    # killed at teardown (wandb.finish, the OOM killer) once its summary and checkpoints are written
    run = tmp_path / "run"
    script = ("import json, os, signal\njson.dump({'status': 'ok', 'metrics': {'val/loss': 1.0}}, open('summary.json', 'w'))\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    spec = {"cmd": [sys.executable, "-c", script], "dir": str(run), "env": {}, "cwd": str(run)}
    result = execute(spec, max_retries=1)
    assert result["summary"]["status"] == "ok" and result["retries"] == 0 and result["returncode"] == -signal.SIGKILL
    # another compare into the same --out finished the run while this one waited for it: nothing is re-run
    failing = {**spec, "cmd": [sys.executable, "-c", "raise SystemExit(3)"]}
    assert execute(failing, max_retries=0) == {"summary": result["summary"], "retries": 0, "returncode": 0}
    assert "finished by another process meanwhile: kept" in (run / "run.log").read_text()


def test_ctrl_c_stops_a_compare_at_once_and_leaves_its_runs_resumable(tmp_path):
    out = tmp_path / "interrupted"
    # a terminal's Ctrl-C: SIGINT to the whole process group (compare and its runs)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "compare", *TINY, "--trainer.max_steps=40",
                             *SWEEP, "--out", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=default_sigint)
    first = out / "runs" / "norm=none,seed=0"
    deadline = time.time() + 300
    while not (first / "checkpoints" / "last.ckpt").exists():  # training, two validations in
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == ("error: interrupted with 0 of 4 runs done; the same command resumes "
                                               "the others (finished runs are kept)")
    statuses = {name: r["status"] for name, r in json.loads((out / "results.json").read_text())["runs"].items()}
    assert set(statuses.values()) == {"pending"}  # nothing reported failed, nothing else started
    assert not (out / "runs" / "norm=batch,seed=0").exists()
    log = (first / "run.log").read_text()
    assert log.count("=== attempt") == 1 and "Traceback" not in log  # stopped once, gracefully, not retried


INTERRUPTED = """
import sys
from pathlib import Path
from zoo import compare

launcher, root = sys.argv[1], Path(sys.argv[2])
# stand-ins for training processes: each says it started, then sleeps until stopped
stand_in = ("import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); (d / 'started').touch()\\n"
            "try:\\n    time.sleep(600)\\nexcept KeyboardInterrupt:\\n    (d / 'stopped').touch()")
runs = [compare.Run(f"run{i}", {}, root / f"run{i}") for i in range(2)]
specs = [{"cmd": [sys.executable, "-c", stand_in, str(r.dir)], "dir": str(r.dir), "env": {}, "cwd": str(root)}
         for r in runs]
on_done = lambda run, result: print("done", run.name, result, flush=True)
try:
    if launcher == "ray":
        compare.launch_ray(runs, specs, None, 1, 0, 0, on_done)
    else:
        compare.launch_slurm(runs, specs, root / "slurm", 1, {"timeout_min": 10}, 0, on_done)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["slurm", "ray"])
def test_ctrl_c_stops_the_runs_a_cluster_launcher_submitted(launcher, tmp_path, request):
    """Ctrl-C reaches the compare process only (its runs are jobs or tasks on the cluster): the
    launcher cancels them, and each run's process is told to stop (SIGINT, as Lightning expects)."""
    if launcher == "ray":
        pytest.importorskip("ray")
        request.getfixturevalue("one_ray_at_a_time")
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED, launcher, str(tmp_path)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 120
    while not all((tmp_path / f"run{i}" / "started").exists() for i in range(2)):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # to the compare process alone
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0 and "interrupted" in output and "done" not in output, output[-3000:]
    for i in range(2):
        assert (tmp_path / f"run{i}" / "stopped").exists(), output[-3000:]
