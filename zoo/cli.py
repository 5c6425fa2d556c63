"""The single entry point: `train.py {fit,validate,test,predict,compare}`.

`fit`/`validate`/`test`/`predict` are Lightning's own (LightningCLI); the model and data are chosen by
the config (`model.class_path`, `data.class_path`), and every argument can be overridden from the
command line (`--model.norm group`). `compare` lives in `zoo.compare`.
"""
from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from typing import Literal, Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from zoo.callbacks import RunSummary, WritePredictions

WANDB_MODES = ("online", "offline", "disabled")


def wandb_mode(requested: str | None = None) -> str:
    """Decides wandb's mode before the first `wandb.init`, so a run never waits on a network it
    does not have: an explicit `--wandb.mode` or `WANDB_MODE` wins; otherwise `online` only when an
    API key is configured (`WANDB_API_KEY` or a `wandb login` entry in ~/.netrc), else `offline`."""
    mode = requested or os.environ.get("WANDB_MODE")
    if mode:
        mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode {mode!r} is not one of {WANDB_MODES}")
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        hosts = {}
    return "online" if any("wandb" in host for host in hosts) else "offline"


def run_tags(model: L.LightningModule, data: L.LightningDataModule | None) -> list[str]:
    """Tags naming the model and every norm-like hyper-parameter (`norm=batch`, `input_norm=zscore`)."""
    tags = [type(model).__name__]
    for source in (model, data):
        for key, value in (getattr(source, "hparams", None) or {}).items():
            if "norm" in key and isinstance(value, str):
                tags.append(f"{key}={value}")
    return tags


class ZooCLI(LightningCLI):
    """LightningCLI with the zoo's defaults: a fixed per-run directory (`trainer.default_root_dir`)
    holding `checkpoints/` (best + `last.ckpt`, so `--ckpt_path last` resumes), `csv/` logs, wandb
    files, sample images and `summary.json`; CSV + wandb loggers; seed 0 unless given."""

    def __init__(self, args=None, run: bool = True):
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"description": "zoo: train.py {fit,validate,test,predict} as LightningCLI; "
                           "`train.py compare --help` runs one config over several norms."},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--wandb.project", type=str, default="zoo", help="wandb project")
        parser.add_argument("--wandb.name", type=Optional[str], default=None, help="wandb run name")
        parser.add_argument("--wandb.group", type=Optional[str], default=None, help="wandb group (compare sets it)")
        parser.add_argument("--wandb.tags", type=list[str], default=[], help="extra wandb tags")
        parser.add_argument(
            "--wandb.mode", type=Optional[Literal["online", "offline", "disabled"]], default=None,
            help="default: WANDB_MODE, else online if an API key is configured, else offline",
        )
        parser.add_argument(
            "--predict_out", type=Optional[str], default=None,
            help="where `predict` writes its outputs (default: <default_root_dir>/predictions)",
        )

    def _loggers(self, cfg, root: Path, model, stage: str) -> list:
        loggers = [CSVLogger(save_dir=str(root), name="csv")]
        mode = wandb_mode(cfg["wandb"]["mode"])
        os.environ["WANDB_MODE"] = mode  # decided once, before any wandb.init
        if mode != "disabled" and stage != "predict":
            from lightning.pytorch.loggers import WandbLogger

            w = cfg["wandb"]
            loggers.append(WandbLogger(
                project=w["project"], name=w["name"] or root.name, group=w["group"],
                tags=run_tags(model, self.datamodule) + list(w["tags"]),
                save_dir=str(root), offline=mode == "offline",
            ))
        return loggers

    def instantiate_trainer(self, **kwargs):
        # run=False (programmatic use, no subcommand) configures a trainer for fit.
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        stage = self.subcommand or "fit"
        trainer_cfg = cfg["trainer"]
        root = Path(trainer_cfg.get("default_root_dir") or Path("runs") / type(self.model).__name__.lower())
        kwargs["default_root_dir"] = str(root)
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = self._loggers(cfg, root, self.model, stage)
        callbacks = list(trainer_cfg.get("callbacks") or [])
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            metric, mode = getattr(self.model, "monitor", (None, "min"))
            callbacks.append(ModelCheckpoint(
                dirpath=root / "checkpoints", filename="best-{epoch}-{step}", monitor=metric, mode=mode,
                save_last=True, save_top_k=1,
            ))
        if stage == "fit":
            callbacks.append(RunSummary(root))
        if stage == "predict":
            callbacks.append(WritePredictions(cfg["predict_out"] or root / "predictions"))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "compare":
        from zoo.compare import main as compare

        sys.exit(compare(argv[1:]))
    try:
        ZooCLI(args=argv)
    finally:
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()


if __name__ == "__main__":
    main()
