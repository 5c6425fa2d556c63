"""`train.py compare`: one run per sweep point, failures reported, report with table, plots, samples."""
import json
import subprocess
import sys

import pytest

from zoo.compare import parse_sweeps, plan_runs
from tests.conftest import ROOT, tiny_unet_args


def test_sweeps_are_crossed_and_norms_is_shorthand(tmp_path):
    sweeps = parse_sweeps("batch,group", ["data.batch_size=1,8"])
    assert sweeps == {"model.norm": ["batch", "group"], "data.batch_size": ["1", "8"]}
    names = [r.name for r in plan_runs(sweeps, tmp_path)]
    assert names == ["norm=batch,batch_size=1", "norm=batch,batch_size=8",
                     "norm=group,batch_size=1", "norm=group,batch_size=8"]
    with pytest.raises(SystemExit, match="swept twice"):
        parse_sweeps("batch", ["model.norm=group"])
    with pytest.raises(SystemExit, match="KEY=v1,v2"):
        parse_sweeps(None, ["model.norm"])


def test_unknown_norm_fails_before_any_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "compare", "--config", str(ROOT / "configs/unet.yaml"),
         "--norms", "batch,bogus", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "bogus" in proc.stderr and "group" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_compare_writes_report_and_reports_failures(tmp_path):
    out = tmp_path / "report"
    args = tiny_unet_args("IGNORED")
    args = [a for a in args if not a.startswith("--trainer.default_root_dir")]
    # 'bogus' passes --sweep unchecked, so that run fails inside its own process.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "compare", *args,
         "--sweep", "model.norm=none,batch,bogus", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "report:" in proc.stdout
    assert "warning: model.norm value(s) ['bogus'] are not registered norms" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["norm=none"]["status"] == "ok" and results["norm=batch"]["status"] == "ok"
    # the failed run's reason is its own error line, not the CLI's internals
    assert results["norm=bogus"]["status"] == "failed"
    assert results["norm=bogus"]["error"] == "unknown norm kind 'bogus'; valid kinds: batch, layer, instance, group, rms, none"
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| norm=")]
    assert len(table) == 3 and "failed" in table[2]
    header = next(line for line in report.splitlines() if line.startswith("| run |"))
    for col in ("val/iou_fg", "val/seam_error", "train samples/s", "peak memory (MB)", "params", "wall time (s)"):
        assert col in header
    assert (out / "plots" / "train_loss.png").is_file() and (out / "plots" / "val_loss.png").is_file()
    assert len(list((out / "samples").glob("norm=none__*.png"))) == 1
    assert (out / "report.html").read_text().count("<tr>") == 4
    # Same seed, same data: the two runs differ only by the norm.
    for name in ("norm=none", "norm=batch"):
        cmd = (out / "runs" / name / "command.txt").read_text()
        assert "--seed_everything" not in cmd and "--model.norm " + name.split("=")[1] in cmd


def test_report_carries_text_samples_and_latest_epoch_only(tmp_path):
    from zoo.compare import Run, write_report

    run = Run("norm=layer", {"model.norm": "layer"}, tmp_path / "runs" / "norm=layer",
              {"status": "ok", "metrics": {"val/loss": 1.5}, "params": 10})
    (run.dir / "samples").mkdir(parents=True)
    (run.dir / "samples" / "val_text_epoch000.txt").write_text("prompt: ab\noutput: old\n")
    (run.dir / "samples" / "val_text_epoch001.txt").write_text("prompt: ab\noutput: new <&>\n")
    report = write_report([run], tmp_path, ["c.yaml"], [], {"model.norm": ["layer"]}).read_text()
    assert "output: new <&>" in report and "output: old" not in report
    assert "| norm=layer | ok | 1.5 |" in report
    assert "output: new &lt;&amp;&gt;" in (tmp_path / "report.html").read_text()
