import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]


def cli_args(config: str, root_dir, *extra: str) -> list[str]:
    """CLI arguments for a short CPU test run of `configs/<config>.yaml` in `root_dir`: 4 steps,
    validation every 2, everything logged; `extra` shrinks the model and data."""
    return [
        "--config", str(ROOT / "configs" / f"{config}.yaml"),
        f"--trainer.default_root_dir={root_dir}",
        "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
        *extra,
    ]


def tiny_unet_args(root_dir, *extra: str) -> list[str]:
    """A U-Net small enough for a CPU test: depth 3 (context 20 px per side), 4 base channels,
    training crops of 28 px (inputs 68 px) from 48 px synthetic images."""
    return cli_args(
        "unet", root_dir,
        "--model.base_channels=4", "--model.depth=3", "--model.seam_tile=16",
        "--data.crop_size=28", "--data.image_size=48", "--data.num_train=8", "--data.num_val=2",
        "--data.batch_size=2",
        *extra,
    )


@pytest.fixture
def python():
    return sys.executable
