"""`zoo` as a console script with the bundled configs usable by name, so zoo works outside a clone."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.cli import BUNDLED_CONFIGS, with_bundled_configs

ZOO = Path(sys.executable).parent / "zoo"  # installed by `pip install -e .` ([project.scripts])
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_console_script_takes_bundled_configs_by_name_from_any_directory(tmp_path):
    assert ZOO.is_file(), "the zoo console script is not installed: pip install -e ."
    proc = subprocess.run([str(ZOO), "fit", "--config", "sketch_rnn", "--data.max_seq_len=120", "--print_config"],
                          cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "class_path: zoo.tasks.sketch.SketchRNNTask" in proc.stdout and "max_seq_len: 120" in proc.stdout
    bad = subprocess.run([str(ZOO), "fit", "--config", "unt"], cwd=tmp_path, capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: --config 'unt': no such file, and not a bundled config (mambavision, resnet, ")
    bad = subprocess.run([str(ZOO), "compare", "--norms", "batch"], cwd=tmp_path, capture_output=True, text=True,
                         env=ENV)  # the messages name the command as it was run
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: zoo compare: the following arguments are required: --config, --out")
    usage = subprocess.run([str(ZOO), "--help"], cwd=tmp_path, capture_output=True, text=True, env=ENV).stdout
    assert "`zoo compare` trains a config" in " ".join(usage.split()) and "train.py" not in usage


def test_names_resolve_and_paths_stay_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert with_bundled_configs(["compare", "--config", "unet", "-c", "resnet", "--config=mambavision"]) == [
        "compare", "--config", str(BUNDLED_CONFIGS / "unet.yaml"), "-c", str(BUNDLED_CONFIGS / "resnet.yaml"),
        "--config=" + str(BUNDLED_CONFIGS / "mambavision.yaml")]
    (tmp_path / "unet").write_text("seed_everything: 1\n")  # a local file of that name wins
    assert with_bundled_configs(["--config", "unet", "--config", "my/own.yaml"]) == ["--config", "unet",
                                                                                    "--config", "my/own.yaml"]
    # the clone's configs/ is the package's folder
    assert (Path(__file__).parents[1] / "configs").resolve() == BUNDLED_CONFIGS.resolve()
