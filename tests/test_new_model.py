"""A new model touches no shared file: a network, task, datamodule and config written outside `zoo/`
train with `train.py fit`, load with `zoo.load`, and compare with `train.py compare` on the config's
own default sweep."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import zoo
from tests.conftest import ROOT
from zoo.checkpoint import CheckpointError

MODULE = '''
"""A user's model family, outside zoo: regression of y = x @ w + noise with a two-layer MLP."""
import lightning as L
import torch
from torch import nn

from zoo.models.config import network_config
from zoo.norm import build_norm
from zoo.tasks.base import ZooModule


class TinyMLP(nn.Module):
    def __init__(self, width: int = 8, norm: str = "none"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, width), build_norm(norm, width, "nc"), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x):  # (N, 4) -> (N,)
        return self.net(x).squeeze(-1)


TinyMLPConfig = network_config(TinyMLP)


class TinyRegression(ZooModule):
    def __init__(self, net: TinyMLPConfig = TinyMLPConfig(), lr: float = 0.05):
        super().__init__()
        net = TinyMLPConfig.of(net)
        self.save_hyperparameters()
        self.net = net.build()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class TinyData(L.LightningDataModule):
    def __init__(self, n: int = 64, batch_size: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, generator=g)
        self.data = torch.utils.data.TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))
        self.batch_size = batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, self.batch_size, shuffle=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.data, self.batch_size)
'''

NORM_MODULE = '''
"""A user's norm, outside zoo: each row divided by its root mean square, times a learned scale."""
import torch
from torch import nn

from zoo.norm import register_norm


class RowScale(nn.Module):
    def __init__(self, num_features):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))

    def forward(self, x):
        return x * x.pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt() * self.weight


register_norm("rowscale", lambda num_features, layout: RowScale(num_features), layouts=("nc",),
              pools_positions=False, pools_batch=False)
'''

CONFIG = '''
seed_everything: 0
compare:
  sweep: ["model.net.norm=batch,layer"]
trainer:
  max_steps: 6
  val_check_interval: 3
  accelerator: cpu
  enable_progress_bar: false
  log_every_n_steps: 1
model:
  class_path: tiny_ext.TinyRegression
  init_args:
    net:
      width: 8
data:
  class_path: tiny_ext.TinyData
'''


@pytest.mark.slow
def test_a_model_defined_outside_zoo_fits_loads_and_compares(tmp_path, monkeypatch):
    (tmp_path / "tiny_ext.py").write_text(MODULE)
    (tmp_path / "tiny.yaml").write_text(CONFIG)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}

    def train(*args):
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc

    train("fit", "--config", "tiny.yaml", "--model.net.norm=layer", f"--trainer.default_root_dir={tmp_path / 'fit'}")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CheckpointError, match="registered once the module defining it is imported"):
        zoo.load(tmp_path / "fit" / "checkpoints" / "last.ckpt")  # a name in a file imports nothing
    importlib.import_module("tiny_ext")
    model = zoo.load(tmp_path / "fit" / "checkpoints" / "last.ckpt")
    assert type(model).__name__ == "TinyRegression" and model.hparams.net == {"width": 8, "norm": "layer"}
    assert isinstance(model.net.net[1], torch.nn.LayerNorm)
    assert model(torch.zeros(3, 4)).shape == (3,)
    # export names the module to import, as a config does for fit; without it, the checkpoint is refused
    ckpt, exported = str(tmp_path / "fit" / "checkpoints" / "last.ckpt"), tmp_path / "export"
    refused = subprocess.run([sys.executable, str(ROOT / "train.py"), "export", "--ckpt_path", ckpt, "--out",
                              str(exported)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert refused.returncode == 2 and "(train.py export: --import MODULE)" in refused.stderr.splitlines()[-1]
    train("export", "--ckpt_path", ckpt, "--out", str(exported), "--import", "tiny_ext")
    assert "import tiny_ext  # defines TinyRegression" in (exported / "README.md").read_text()
    x = torch.randn(3, 4)
    torch.testing.assert_close(zoo.load(exported)(x), model(x), rtol=0, atol=0)

    # no --sweep: the config's compare.sweep
    out = tmp_path / "cmp"
    printed = train("compare", "--config", "tiny.yaml", "--out", str(out)).stdout
    assert "2 runs" in printed
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["values"]["model.net.norm"]: r["status"] for r in runs.values()} == {"batch": "ok", "layer": "ok"}
    assert all(r["global_step"] == 6 and "val/loss" in r["metrics"] for r in runs.values())
    assert "norm=layer vs norm=batch" in (out / "report.md").read_text()

    # a norm of the user's: a module named with --import registers it, for fit and for compare's runs
    (tmp_path / "my_norm.py").write_text(NORM_MODULE)
    refused = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", "tiny.yaml",
                              "--model.net.norm=rowscale", f"--trainer.default_root_dir={tmp_path / 'mine'}"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1].startswith(
        "error: unknown norm kind 'rowscale'; valid kinds: ") and "--import MODULE" in refused.stderr
    train("fit", "--import", "my_norm", "--config", "tiny.yaml", "--model.net.norm=rowscale",
          f"--trainer.default_root_dir={tmp_path / 'mine'}")
    with pytest.raises(CheckpointError, match=r"last.ckpt': its model cannot be built here: unknown norm kind "
                                              r"'rowscale'"):
        zoo.load(tmp_path / "mine" / "checkpoints" / "last.ckpt")  # not imported in this process
    printed = train("compare", "--config", "tiny.yaml", "--norms", "rowscale", "--import=my_norm", "--out",
                    str(tmp_path / "cmp_mine")).stdout
    (run,) = json.loads((tmp_path / "cmp_mine" / "results.json").read_text())["runs"].values()
    assert "1 runs" in printed and run["status"] == "ok" and run["global_step"] == 6
    command = (tmp_path / "cmp_mine" / "runs" / "norm=rowscale" / "command.txt").read_text()
    assert " fit --import=my_norm " in command  # so that the run's command works on its own


def test_make_train_uses_the_configs_own_sweep():
    makefile = (ROOT / "Makefile").read_text()
    assert "SWEEP_" not in makefile  # no per-config lines: every config carries its sweep
    dry = subprocess.run(["make", "-n", "train", "CONFIG=configs/sketch_rnn.yaml"], capture_output=True, text=True,
                         cwd=ROOT)
    line = [x for x in dry.stdout.splitlines() if "compare" in x][0]
    assert "--sweep" not in line and "--config configs/sketch_rnn.yaml" in line
    dry = subprocess.run(["make", "-n", "train", "NORMS=layer,rms"], capture_output=True, text=True, cwd=ROOT)
    assert "--norms layer,rms" in dry.stdout
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        assert yaml.safe_load(config.read_text())["compare"]["sweep"], f"{config.name} has no default sweep"
