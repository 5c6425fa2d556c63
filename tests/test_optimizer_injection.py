"""One `configure_optimizers` for every task (`ZooModule`): the paper preset from the hparams, or an
optimizer / schedule injected LightningCLI-style (`--model.optimizer SGD --model.optimizer.lr 0.1`),
always over zoo's parameter groups."""
import json
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.cli import ReduceLROnPlateau

import zoo
from tests.conftest import ROOT, tiny_unet_args
from zoo.checkpoint import read
from zoo.cli import ZooCLI
from zoo.export import export
from zoo.optim import param_groups
from zoo.tasks.base import PRESET_KEYS, SCHEDULE_KEYS
from zoo.tasks.segmentation import UNetSegmentation


def fit(root, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", *tiny_unet_args(root, *extra)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def group_ids(groups):
    return [[id(p) for p in g["params"]] for g in groups]


def test_preset_is_the_papers_sgd_over_zoos_groups():
    model = UNetSegmentation(net={"base_channels": 4, "depth": 3, "norm": "batch"}, lr=0.02, momentum=0.9, weight_decay=0.01)
    opt = model.configure_optimizers()  # scheduler "none": no trainer needed
    assert type(opt) is torch.optim.SGD
    expected = param_groups(model, 0.01)
    assert group_ids(opt.param_groups) == group_ids(expected)
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in opt.param_groups] == [(0.02, 0.9, 0.01), (0.02, 0.9, 0.0)]


def test_injected_optimizer_gets_zoos_groups_and_its_own_settings():
    model = UNetSegmentation(net={"base_channels": 4, "depth": 3, "norm": "group"},
                             optimizer=lambda params: torch.optim.AdamW(params, lr=0.003, weight_decay=0.2))
    opt = model.configure_optimizers()
    assert type(opt) is torch.optim.AdamW
    assert group_ids(opt.param_groups) == group_ids(param_groups(model, 1.0))
    # decayed weights take the optimizer's own decay; norms and biases none
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.003, 0.2), (0.003, 0.0)]
    assert "optimizer" not in model.hparams  # a callable is not plain data


def test_a_preset_setting_next_to_an_injected_optimizer_is_refused():
    with pytest.raises(ValueError, match=r"model lr set together with an injected optimizer"):
        UNetSegmentation(net={"base_channels": 4, "depth": 3}, lr=0.5, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    step = lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1)  # noqa: E731
    with pytest.raises(ValueError, match=r"model scheduler set together with an injected lr_scheduler"):
        UNetSegmentation(net={"base_channels": 4, "depth": 3}, scheduler="cosine", lr_scheduler=step)
    UNetSegmentation(net={"base_channels": 4, "depth": 3}, lr=0.5, lr_scheduler=step)  # lr feeds the preset optimizer


def test_reduce_on_plateau_watches_its_own_metric_in_the_tasks_direction():
    net = {"base_channels": 4, "depth": 3}
    own = UNetSegmentation(net=net, lr_scheduler=lambda opt: ReduceLROnPlateau(opt, monitor="val/iou_fg", mode="max"))
    assert own.configure_optimizers()["lr_scheduler"]["monitor"] == "val/iou_fg"  # the user's, not the task's
    task = UNetSegmentation(net=net, lr_scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
    assert task.configure_optimizers()["lr_scheduler"]["monitor"] == "val/loss"
    backwards = UNetSegmentation(net=net, lr_scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max"))  # would cut the rate while the loss falls
    with pytest.raises(ValueError, match=r"^lr_scheduler ReduceLROnPlateau mode='max' watches val/loss, which this "
                                         r"task minimizes; set --model.lr_scheduler.mode min$"):
        backwards.configure_optimizers()


def test_cli_injection_trains_and_checkpoint_loads(tmp_path):
    proc = fit(tmp_path, "--model.optimizer=SGD", "--model.optimizer.lr=0.05", "--model.optimizer.momentum=0.5",
               "--model.lr_scheduler=StepLR", "--model.lr_scheduler.step_size=1", "--model.lr_scheduler.gamma=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = read(tmp_path / "checkpoints" / "last.ckpt")
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [(g["momentum"], g["weight_decay"], g["initial_lr"]) for g in groups] == [(0.5, 0.0, 0.05)] * 2
    # StepLR per epoch (LightningCLI's default interval), not per step: 4 steps = one epoch of 8 samples
    assert ckpt["global_step"] == 4 and ckpt["lr_schedulers"][0]["last_epoch"] == 1
    assert groups[0]["lr"] == pytest.approx(0.05 * 0.5)
    # the hparams say what the run trained with: the injected ones as the CLI gave them, no preset settings
    hp = ckpt["hyper_parameters"]
    assert hp["optimizer"]["class_path"] == "torch.optim.SGD" and hp["lr_scheduler"]["init_args"]["gamma"] == 0.5
    assert (hp["optimizer"]["init_args"]["lr"], hp["optimizer"]["init_args"]["momentum"]) == (0.05, 0.5)
    assert not set(PRESET_KEYS + SCHEDULE_KEYS) & set(hp)
    assert isinstance(zoo.load(tmp_path / "checkpoints" / "last.ckpt"), UNetSegmentation)
    export(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "exported")
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "- optimizer: `torch.optim.SGD` (lr=0.05, momentum=0.5, weight_decay=0.0; all its arguments" in card
    assert "- lr_scheduler: `torch.optim.lr_scheduler.StepLR` (step_size=1, gamma=0.5; all its arguments" in card
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["training"] == {k: hp[k] for k in ("optimizer", "lr_scheduler")}
    assert not set(PRESET_KEYS + SCHEDULE_KEYS) & set(config["hyper_parameters"])


def test_cli_refuses_preset_setting_with_injected_optimizer(tmp_path):
    # configs/unet.yaml injects Adam: --model.lr would be silently unused
    proc = fit(tmp_path, "--model.lr=0.1")
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) <= 2 and "Traceback" not in proc.stderr  # at most Lightning's "Seed set to 0" before it
    assert lines[-1:] == ["error: model lr set together with an injected optimizer, which ignores them; give them as "
                     "its init_args (--model.optimizer.*) instead"], proc.stderr[-2000:]


def test_an_injected_optimizer_sets_a_config_files_preset_settings_aside_and_says_so(tmp_path, capsys):
    # configs/unet.yaml injects Adam; a second config file sets the preset's lr and momentum, as the
    # configs of the other tasks do for their presets
    (tmp_path / "preset.yaml").write_text("model:\n  init_args:\n    lr: 0.5\n    momentum: 0.9\n")
    cli = ZooCLI(args=["fit", *tiny_unet_args(tmp_path / "run", "--trainer.max_steps=2"),
                       "--config", str(tmp_path / "preset.yaml")])
    assert ("the injected optimizer does not use the config's lr=0.5, momentum=0.9; left at the defaults"
            in capsys.readouterr().err)
    assert not {"lr", "momentum"} & set(cli.model.hparams)  # what the run did not use is not recorded
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.001  # the injected Adam's own


def test_a_run_shorter_than_its_warm_up_works_and_says_so(tmp_path):
    # configs/transformer_lm.yaml warms up over 100 steps; fast_dev_run is one step
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config",
                           str(ROOT / "configs" / "transformer_lm.yaml"), "--trainer.fast_dev_run=true",
                           f"--trainer.default_root_dir={tmp_path}", "--model.net.n_layers=1", "--data.max_chars=20000"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warmup_steps=100 >= the run's 1 steps: warming up over 0" in proc.stderr
