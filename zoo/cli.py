"""The single entry point: `train.py {fit,validate,test,predict,compare,export}`.

`fit`/`validate`/`test`/`predict` are Lightning's own (LightningCLI); the model and data are chosen by
the config (`model.class_path`, `data.class_path`), and every argument can be overridden from the
command line (`--model.net.norm group`). `compare` lives in `zoo.compare`, `export` in `zoo.export`.

Bad input ends in one line, `error: <what is wrong>`, and exit status 2 (1 for a failure while
running); `ZOO_DEBUG=1` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import netrc
import os
import re
import signal
import site
import sys
import sysconfig
import threading
import warnings
from pathlib import Path
from typing import Literal, Optional

import jsonargparse
import lightning as L
import torch
from jsonargparse._actions import _ActionPrintConfig  # jsonargparse's own --print_config step
from lightning.fabric.utilities.exceptions import MisconfigurationException  # Lightning's bad-settings error
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from zoo import checkpoint
from zoo.callbacks import AtomicCheckpointIO, LastCheckpoint, ResumeSettings, RunSummary, StepSeed, WritePredictions
from zoo.checkpoint import INJECTED
from zoo.data.contract import ZooDataModule
from zoo.files import remove_stray_temp_files
from zoo.models.config import flat
from zoo.tasks.base import PRESET_KEYS, SCHEDULE_KEYS, ZooModule, preset_settings_set

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
    """Tags naming the model (the task, and its timm network's name) and every norm-like hyper-parameter
    (`norm=batch`, `input_norm=zscore`)."""
    tags = [type(model).__name__]
    if isinstance((getattr(model, "hparams", None) or {}).get("model_name"), str):
        tags.append(model.hparams["model_name"])
    for source in (model, data):
        for key, value in flat(getattr(source, "hparams", None) or {}).items():
            if "norm" in key and isinstance(value, str):
                tags.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return tags


class ZooTrainer(L.Trainer):
    """Lightning's Trainer, with its batch limits annotated int first (`--trainer.limit_val_batches 1` is
    one batch) and a validation interval of 0 batches refused. Lightning's `Union[float, int]` (which
    `typing` caches, so `Union[int, float]` is that same object) makes jsonargparse read it as 1.0,
    which Lightning takes as the whole set."""

    def __init__(self, *, limit_train_batches: int | float | None = None, limit_val_batches: int | float | None = None,
                 limit_test_batches: int | float | None = None, limit_predict_batches: int | float | None = None,
                 **kwargs):
        every = kwargs.get("val_check_interval")
        if type(every) is int and every < 1:  # Lightning takes 0 and fails in the first epoch
            raise ValueError(f"trainer.val_check_interval={every}: give a number of training batches (>= 1), a "
                             "fraction of an epoch (a float in [0.0, 1.0]), or null (once per epoch)")
        super().__init__(limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
                         limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches, **kwargs)


class ZooCLI(LightningCLI):
    """LightningCLI with the zoo's defaults: a fixed per-run directory (`trainer.default_root_dir`)
    holding `checkpoints/` (best + `last.ckpt`, so `--ckpt_path last` resumes), `csv/` logs, wandb
    files, sample images and `summary.json`; CSV + wandb loggers; seed 0 unless given."""

    def __init__(self, args=None, run: bool = True, prog: str = "train.py"):
        self._wandb_id = None  # the wandb run a resumed fit continues (from its checkpoint's RunSummary)
        # Lightning's own call of a torch API deprecated in torch 2.14, printed by every run: nothing to act on
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            trainer_class=ZooTrainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            # parse errors raise (main prints them as one line) instead of printing usage and exiting
            parser_kwargs={"description": f"zoo: `{prog} fit|validate|test|predict` are LightningCLI's (below); "
                           f"`{prog} compare` trains a config over several norms and seeds and reports the "
                           f"comparison; `{prog} export` writes an inference-only folder (each: --help). "
                           "Every subcommand takes --import MODULE (repeatable): your module, imported first.",
                           "exit_on_error": False,
                           # `--trainer.max_step 4` must be refused, not read as --trainer.max_steps
                           "allow_abbrev": False},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--wandb.project", type=str, default="zoo", help="wandb project")
        parser.add_argument("--wandb.name", type=Optional[str], default=None, help="wandb run name")
        parser.add_argument("--wandb.group", type=Optional[str], default=None, help="wandb group (compare sets it)")
        parser.add_argument("--wandb.tags", type=list[str], default=[], help="extra wandb tags")
        parser.add_argument("--wandb.job_type", type=str, default="fit", help="wandb job type (compare sets it)")
        parser.add_argument(
            "--wandb.mode", type=Optional[Literal["online", "offline", "disabled"]], default=None,
            help="default: WANDB_MODE, else online if an API key is configured, else offline",
        )
        # The config's own default sweep, so `train.py compare --config X` (and `make train CONFIG=X`)
        # need no per-config list elsewhere; `fit` reads and ignores it.
        parser.add_argument("--compare.sweep", type=list[str], default=[],
                            help="default sweep of `train.py compare` for this config: KEY=V1,V2 items")
        parser.add_argument(
            "--predict_out", type=Optional[str], default=None,
            help="where `predict` writes its outputs (default: <default_root_dir>/predictions)",
        )

    def parse_arguments(self, parser, args) -> None:
        # --print_config is printed after the links, so it shows (and saves) the values the run uses
        with _ActionPrintConfig.skip_print_config():
            try:
                super().parse_arguments(parser, args)
            except Exception as e:
                e.add_note(closest_option(e, parser))  # error_line ends its line with it
                raise
        stage = self.config.get("subcommand")
        args = sys.argv[1:] if args is None else args
        if stage:
            refuse_unread_options(stage, args)
        link_data_to_model(self.config[stage] if stage else self.config)
        drop_unused_presets(self.config[stage] if stage else self.config, args)
        _ActionPrintConfig.print_config_if_requested(parser, self.config)

    def _loggers(self, cfg, root: Path, model, stage: str) -> list:
        # fit's metrics in csv/ (what compare and the dashboard read), an evaluation's in <stage>/
        loggers = [CSVLogger(save_dir=str(root), name="csv" if stage == "fit" else stage)]
        if stage == "fit":
            # One fixed folder, so a resumed run continues its curves; hyper-parameters and final
            # metrics are written once, at the end (RunSummary), for TensorBoard's HParams view.
            loggers.append(TensorBoardLogger(save_dir=str(root), name="tb", version="", default_hp_metric=False))
        mode = wandb_mode(cfg["wandb"]["mode"])
        os.environ["WANDB_MODE"] = mode  # decided once, before any wandb.init
        if mode != "disabled":
            w = cfg["wandb"]
            self._dump_config()  # the full resolved config, as plain data
            loggers.append(WandbLogger(
                project=w["project"], name=w["name"] or root.name, group=w["group"], job_type=w["job_type"],
                id=self._wandb_id if stage == "fit" else None,
                # each once (compare's sweep tags repeat the norms'), and the seed also without --seeds
                tags=list(dict.fromkeys([*run_tags(model, self.datamodule), f"seed={cfg['seed_everything']}",
                                         *w["tags"]])),
                config=self.config_dump, save_dir=os.environ.get("WANDB_DIR") or str(root), offline=mode == "offline",
            ))
        return loggers

    @staticmethod
    def _root(trainer_cfg, task: str) -> Path:
        """The run's fixed directory: `trainer.default_root_dir`, else runs/<task class name>."""
        return Path(trainer_cfg.get("default_root_dir") or Path("runs") / task.rsplit(".", 1)[-1].lower())

    def _parse_ckpt_path(self) -> None:
        """Checks `--ckpt_path` before anything is built from it, with `zoo.load`'s checks (plain data
        only, a zoo checkpoint, of the task the config builds). `last` means
        <run dir>/checkpoints/last.ckpt (fit without one starts a new run and says so), `best` (not
        for fit) the run's best-*.ckpt. Resuming fit
        with model arguments other than the checkpoint's is refused; validate/test/predict need a
        checkpoint and build the model with its arguments (as Lightning does), saying which differ."""
        stage = self.config.get("subcommand")
        if not stage:
            return
        cfg = self.config[stage]
        path = cfg.get("ckpt_path")
        ckpt_dir = self._root(cfg["trainer"], cfg["model"]["class_path"]) / "checkpoints"
        if stage == "fit":
            remove_stray_temp_files(ckpt_dir)  # left by a writer killed mid-write
        if path in (None, "last"):
            last = ckpt_dir / "last.ckpt"
            if stage != "fit" and path is None:
                raise ValueError(f"{stage} needs --ckpt_path: a checkpoint written by `train.py fit` (or `last`: "
                                 f"{last}); without one the model would have untrained weights")
            if path is None:
                if last.is_file():  # a new run here would overwrite that run's checkpoints and summary
                    raise FileExistsError(f"{last.parent.parent} already holds a run ({last}); resume it with "
                                          "--ckpt_path last, or start a new run in another --trainer.default_root_dir")
                return
            if not last.is_file():
                if stage != "fit":
                    raise FileNotFoundError(f"--ckpt_path last: no last.ckpt in {last.parent}")
                print(f"no last.ckpt in {last.parent}: starting a new run", file=sys.stderr)
                cfg.ckpt_path = None
                return
            cfg.ckpt_path = path = str(last)
        if path == "best":  # as Lightning's `best`, from the files: <run dir>/checkpoints/best-*.ckpt
            best = sorted(ckpt_dir.glob("best-*.ckpt"))
            why = "fit resumes a run from last" if stage == "fit" else f"{len(best)} best-*.ckpt in {ckpt_dir}"
            if stage == "fit" or len(best) != 1:
                raise ValueError(f"--ckpt_path best: {why}; give last, best (validate, test, predict) or a "
                                 "checkpoint's path")
            cfg.ckpt_path = path = str(best[0])
        ckpt = checkpoint.read(path)
        task = checkpoint.task_class(ckpt, path)
        task_name = f"{task.__module__}.{task.__qualname__}"
        if task_name != cfg["model"]["class_path"]:
            raise checkpoint.CheckpointError(
                f"checkpoint {path!r} holds a {task_name} model, but the config builds "
                f"{cfg['model']['class_path']}; use the config it was trained with")
        # (an injected optimizer / schedule: compared through ResumeSettings, and a class path read from
        # a file is never imported)
        hparams = checkpoint.upgrade_hparams(task, {k: v for k, v in ckpt.get("hyper_parameters", {}).items()
                                                    if k not in INJECTED})
        given = flat(cfg["model"].get("init_args") or {})
        differ = {k: (v, given[k]) for k, v in flat(hparams).items()
                  if not k.startswith("_") and k in given and v != given[k]}
        data_differ = {}
        if stage == "fit":
            saved = ckpt.get("callbacks", {}).get(ResumeSettings.__qualname__, {}).get("settings")
            now = resume_settings(cfg)
            if saved is not None and not any(k.startswith("data.") for k in saved):  # saved before they were
                now = {k: v for k, v in now.items() if not k.startswith("data.")}
            changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved or {}) | set(now))
                       if saved is not None and saved.get(k) != now.get(k)}
            data_differ = {k: v for k, v in changed.items() if k.startswith("data.")}
            differ.update({k: v for k, v in changed.items() if k not in data_differ})
        if differ:
            what = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" + (f" (data.{k} follows)" if k in LINKED else "")
                             for k, (a, b) in differ.items())
            if stage == "fit":
                raise ValueError(f"cannot resume {path} with other model arguments or settings ({what}); resume "
                                 "with the checkpoint's, or start a new run in another --trainer.default_root_dir")
            print(f"using the checkpoint's model arguments ({what})", file=sys.stderr)
        trained = ckpt.get("datamodule_hyper_parameters", {}).get("input_norm")
        given_norm = ((cfg.get("data") or {}).get("init_args") or {}).get("input_norm")
        if stage != "fit" and None not in (trained, given_norm) and trained != given_norm:
            # the scaler is fitted in fit only: the model carries the checkpoint's
            print(f"the model scales its inputs as trained, input_norm={trained!r} fitted on its training split; "
                  f"--data.input_norm {given_norm!r} is not used (fit reads it)", file=sys.stderr)
        if data_differ:  # allowed, as in Lightning, but the run is then not the one it continues
            what = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in data_differ.items())
            print(f"warning: resuming with other data settings than the checkpoint's ({what}): the resumed run "
                  "trains on other batches than the interrupted one would have", file=sys.stderr)
        if stage == "fit":
            self._wandb_id = ckpt.get("callbacks", {}).get(RunSummary.__qualname__, {}).get("wandb_id")
            steps, done = cfg["trainer"].get("max_steps"), ckpt.get("global_step", 0)
            if steps not in (None, -1) and done >= steps:  # Lightning only says max_steps was reached
                print(f"{path} is at step {done}, max_steps={steps}: nothing left to train (a larger "
                      "--trainer.max_steps trains further)", file=sys.stderr)
        if stage == "fit" and Path(path) == ckpt_dir / "last.ckpt":
            # a best checkpoint the interrupted segment wrote after last.ckpt: the resumed run writes it
            # again, and the checkpoint callback, restored from last.ckpt, would never remove this copy
            known = {Path(state["best_model_path"]).name for key, state in ckpt.get("callbacks", {}).items()
                     if key.startswith("ModelCheckpoint") and state.get("best_model_path")}
            for stale in ckpt_dir.glob("best-*.ckpt"):
                if stale.name not in known:
                    stale.unlink()
        # then as Lightning's own _parse_ckpt_path, from the upgraded hyper-parameters: the model is
        # configured with the checkpoint's arguments
        hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
        # the data follows the checkpoint's values of the keys it shares with the model (LINKED)
        data = {k: hparams[k] for k in LINKED if k in differ and k in ((cfg.get("data") or {}).get("init_args") or {})}
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        if hparams:
            self.config = self.parser.parse_object({stage: {"model": hparams}}, self.config)
        for key, value in data.items():
            self.config[stage]["data"]["init_args"][key] = value

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SystemExit:  # Lightning ends a run stopped by Ctrl-C with exit(1), after its graceful stop
            if self.trainer.interrupted:
                raise KeyboardInterrupt from None
            raise

    def instantiate_trainer(self, **kwargs):
        # run=False (programmatic use, no subcommand) configures a trainer for fit.
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        stage = self.subcommand or "fit"
        trainer_cfg = cfg["trainer"]
        root = self._root(trainer_cfg, type(self.model).__name__)
        kwargs["default_root_dir"] = str(root)
        if not trainer_cfg.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        if stage == "predict":
            # it logs nothing and writes only to its folder: its config.yaml (LightningCLI's, written to
            # the trainer's log_dir, the root without a logger) goes beside its outputs
            out = Path(cfg["predict_out"] or root / "predictions")
            if out.exists() and not out.is_dir():
                raise NotADirectoryError(f"--predict_out {str(out)!r} is a file; give a folder (created if missing)")
            kwargs["default_root_dir"], kwargs["logger"] = str(out), False
        elif trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = self._loggers(cfg, root, self.model, stage)
        callbacks = list(trainer_cfg.get("callbacks") or [])
        own_checkpoint = any(isinstance(c, ModelCheckpoint) for c in callbacks)
        if stage != "fit" and not own_checkpoint:
            # nothing to checkpoint (Lightning's default one would only restore the run's state, and warn)
            kwargs["enable_checkpointing"] = False
        elif not own_checkpoint:
            metric, mode = getattr(self.model, "monitor", (None, "min"))
            callbacks += [
                ModelCheckpoint(dirpath=root / "checkpoints", filename="best-{epoch}-{step}", monitor=metric,
                                mode=mode, save_top_k=1),
                LastCheckpoint(root / "checkpoints"),
            ]
        if stage == "fit":
            # seed_everything ran before the model was built: torch's initial seed is the run's seed
            raw = self.config[self.subcommand] if self.subcommand else self.config  # (cfg holds built objects)
            callbacks += [RunSummary(root), StepSeed(torch.initial_seed()), ResumeSettings(resume_settings(raw))]
        if stage != "fit":  # RunSummary (fit only) keeps state in checkpoints, which evaluation does not need
            warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used to create")
        if stage == "predict":
            callbacks.append(WritePredictions(out))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def resume_settings(cfg) -> dict:
    """What a resumed fit must share with the run it resumes besides the model's hyper-parameters
    (`ResumeSettings`), flat and plain: the seed and the injected optimizer and schedule (refused if
    changed), and the data's class and arguments but those that do not change what fit trains on
    (`ZooDataModule.resume_free`; warned if changed)."""
    init = cfg["model"].get("init_args") or {}
    data = cfg.get("data") or {}
    cls = class_at(data["class_path"]) if data.get("class_path") else None
    free = cls.resume_free if isinstance(cls, type) and issubclass(cls, ZooDataModule) else ()
    settings = flat({"seed_everything": cfg.get("seed_everything"),
                     "model": {"optimizer": init.get("optimizer"), "lr_scheduler": init.get("lr_scheduler")},
                     "data": {"class_path": data.get("class_path"),
                              **{k: v for k, v in (data.get("init_args") or {}).items() if k not in free}}})
    # plain data in the checkpoint (weights_only): a path or other object as its text
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in settings.items()}


# Values a model and its data must agree on: the data's is the one source, and the model's follows
# it, as with LightningCLI's `link_arguments`. We do not use jsonargparse's links: inside subclass
# init_args they silently replace a value set on the model, and a disagreement must be refused.
LINKED = ("num_classes", "block_size", "max_seq_len")


def class_at(path: str) -> type:
    """The class a config's `class_path` names (jsonargparse has imported it while parsing)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def link_data_to_model(cfg) -> None:
    """Sets model.<key> = data.<key> for each LINKED key both classes take; a model value set away from
    its default and different from the data's is refused, naming both."""
    model, data = cfg.get("model"), cfg.get("data")
    if not (model and data and model.get("init_args") and data.get("init_args")):
        return
    params = inspect.signature(class_at(model["class_path"])).parameters
    for key in LINKED:
        if key not in model["init_args"] or key not in data["init_args"]:
            continue
        given, wanted = model["init_args"][key], data["init_args"][key]
        if given != wanted and key in params and given != params[key].default:
            raise ValueError(f"model.{key}={given} and data.{key}={wanted} disagree; set data.{key} only "
                             f"(model.{key} follows it)")
        model["init_args"][key] = wanted


def closest_option(exc: BaseException, parser) -> str:
    """'did you mean --model.net.norm?' for an option jsonargparse refused as unknown (it names none)
    with a known one close to it; '' otherwise. The known options of an option nested in a class
    (--model.net.*, --data.*, --model.optimizer.*) are that class's arguments."""
    messages, keys = [], []
    while exc is not None:
        messages.append(str(exc))
        keys += [k for k in re.findall(r'^Parser key "([^"]+)":', str(exc)) if k not in keys]
        exc = exc.__cause__
    bad = re.search(r"unrecognized arguments: --([^\s=]+)|Option '([^']+)' is not accepted", messages[-1])
    if bad is None:
        return ""
    classes = [c for m in messages for c in re.findall(r"class_path ?=? ?'([\w.]+)'", m)]
    if classes:  # the innermost class named
        parser = jsonargparse.ArgumentParser()
        parser.add_class_arguments(class_at(classes[-1]))
    known = {o.lstrip("-") for p in [parser, *(parser._subcommands_action.choices.values()
                                                if parser._subcommands_action else [])]
             for a in p._actions for o in a.option_strings if o.startswith("--")}
    prefix = ".".join(keys) + "." if classes else ""
    bad = bad[1] or bad[2]
    parent, _, leaf = bad.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    if siblings:  # --trainer.max_stesp: compared with trainer's options only
        prefix += parent + "." if parent else ""
        near = difflib.get_close_matches(leaf, siblings, n=1)
    else:  # --trainr.max_steps
        near = difflib.get_close_matches(bad, [k for k in known if k.count(".") == bad.count(".")], n=1)
    return f"did you mean --{prefix}{near[0]}?" if near else ""


def refuse_unread_options(stage: str, args: list[str]) -> None:
    """An option given on the command line that `stage` does not read would be silently ignored, so it
    is refused. (A config file may hold them all: each subcommand reads its own.)"""
    for arg in args:
        option = arg.split("=", 1)[0]
        if option == "--predict_out" and stage != "predict":
            raise ValueError(f"--predict_out is read by predict, not {stage}")
        if option.startswith("--wandb.") and stage == "predict":
            raise ValueError(f"{option}: predict does not log to wandb (it writes files to --predict_out)")


def drop_unused_presets(cfg, args: list[str]) -> None:
    """An injected optimizer (schedule) does not read the task's preset settings (`PRESET_KEYS`,
    `SCHEDULE_KEYS`): those a config file set are put back to the task's defaults, saying so, so that
    `--model.optimizer SGD` works with any config; one given on the command line is left for the task
    to refuse (the user asked for a value that would not be used)."""
    model = cfg.get("model")
    init = model.get("init_args") if model else None
    if not init or "class_path" not in model:
        return
    task = class_at(model["class_path"])
    if not issubclass(task, ZooModule):
        return
    defaults = inspect.signature(task.__init__).parameters
    given = {a.split("=", 1)[0].replace(".init_args.", ".", 1) for a in args if a.startswith("--model.")}
    for injected, keys in (("optimizer", PRESET_KEYS), ("lr_scheduler", SCHEDULE_KEYS)):
        if init.get(injected) is None:
            continue
        unused = [k for k in preset_settings_set(task, init, keys) if f"--model.{k}" not in given]
        if unused:
            print(f"the injected {injected} does not use the config's {', '.join(f'{k}={init[k]}' for k in unused)}; "
                  "left at the defaults", file=sys.stderr)
        for k in unused:
            init[k] = defaults[k].default


class ArgumentParser(argparse.ArgumentParser):
    """argparse for `compare` and `export`: a bad argument raises ValueError, which `main` prints as one
    `error:` line, instead of argparse's usage block. No abbreviations: `--seed 3` is not `--seeds 3`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise ValueError(f"{self.prog}: {message} (--help lists the arguments)")


# Errors that describe bad input; anything else is a failure while running and names its type.
USER_ERRORS = (ValueError, TypeError, KeyError, LookupError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError, ImportError, MisconfigurationException)


def error_line(exc: BaseException) -> str:
    """One line for an exception: jsonargparse wraps errors raised while building the model or data
    (`Does not validate against any of the Union subtypes ... Given value: Namespace(...)`); the
    message is the error it wraps, after the option it concerns (`--data: ...`)."""
    keys, top = [], exc  # the options it is nested in: --model, then --optimizer inside it
    while exc.__cause__ is not None and _raised_in(exc, "jsonargparse") and "Union subtypes" in str(exc):
        found = re.match(r'Parser key "([^"]+)":', str(exc))
        if found and found[1] not in keys:
            keys.append(found[1])
        exc = exc.__cause__
    message = " ".join(str(exc).split())
    own = re.match(r'Parser key "([^"]+)":', message)
    if own:
        keys += [own[1]] if own[1] not in keys else []
        message = message[own.end():].strip()
    message = "; ".join([message or type(exc).__name__, *(n for n in getattr(top, "__notes__", ()) if n)])
    key = ".".join(keys)
    if key:
        message = f"--{key}: {message}"
    if type(exc) is KeyError and len(exc.args) == 1:  # str(KeyError('x')) is just "'x'"
        message = f"missing key {exc.args[0]!r}"
    if not _raised_in(exc, "jsonargparse") and (not isinstance(exc, USER_ERRORS) or _raised_in_user_code(exc)):
        message = f"{type(exc).__name__}: {message} (ZOO_DEBUG=1 shows the traceback)"
    return f"error: {message}"


def is_bad_input(exc: BaseException) -> bool:
    """Bad input (exit status 2): jsonargparse's errors, and errors of the USER_ERRORS types that zoo,
    a library or Python raised. The same types raised in the user's own code (their task, data or
    network: a KeyError in training_step) are a failure while running, as any other (exit 1)."""
    return _raised_in(exc, "jsonargparse") or (isinstance(exc, USER_ERRORS) and not _raised_in_user_code(exc))


def _last_frame_file(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename if tb is not None else ""


def _raised_in(exc: BaseException, package: str) -> bool:
    return f"{os.sep}{package}{os.sep}" in _last_frame_file(exc)


def _raised_in_user_code(exc: BaseException) -> bool:
    """Raised by a Python file outside zoo, the standard library and the installed packages."""
    file = _last_frame_file(exc)
    ours = [str(Path(__file__).parent), *site.getsitepackages(), site.getusersitepackages(),
            *(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib"))]
    return file.endswith(".py") and not any(file.startswith(p + os.sep) for p in ours)


BUNDLED_CONFIGS = Path(__file__).parent / "configs"


def bundled_config(value: str) -> str:
    """`--config unet` means the config shipped with zoo (zoo/configs/unet.yaml), so zoo works outside a
    clone; a path (anything with a suffix or a directory part) is left as it is."""
    if Path(value).suffix or Path(value).name != value or Path(value).exists():
        return value
    path = BUNDLED_CONFIGS / f"{value}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml")))
        raise ValueError(f"--config {value!r}: no such file, and not a bundled config ({names})")
    return str(path)


def with_bundled_configs(args: list[str]) -> list[str]:
    """`args` with every `--config NAME` / `-c NAME` / `--config=NAME` naming a bundled config resolved."""
    out = list(args)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + bundled_config(a.split("=", 1)[1])
        elif a in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = bundled_config(out[i + 1])
    return out


SUBCOMMANDS = ("fit", "validate", "test", "predict", "compare", "export")
IMPORT_HELP = ("import this module first (repeatable): yours, registering norms or defining models, tasks or data "
               "that the config or arguments name")


def import_modules(names: list[str]) -> None:
    """`--import MODULE`: the user's module, imported first, as a config's class_path is (named on the
    command line, never read from a file)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"--import {name}: cannot import it ({e}); give a module on the Python path") from None


def take_imports(args: list[str]) -> tuple[list[str], list[str]]:
    """`args` without their `--import MODULE` / `--import=MODULE` items (LightningCLI does not know the
    option), and those modules."""
    rest, modules, i = [], [], 0
    while i < len(args):
        if args[i] == "--import" and i + 1 < len(args):
            modules.append(args[i + 1])
            i += 2
            continue
        if args[i].startswith("--import="):
            modules.append(args[i].split("=", 1)[1])
        else:
            rest.append(args[i])
        i += 1
    return rest, modules


def _interrupt_once(signum, frame):
    """SIGINT in `fit`: KeyboardInterrupt once, then ignored. A terminal's Ctrl-C reaches a compare's runs
    and compare forwards one more (it may have been sent to compare alone); a second KeyboardInterrupt
    would break Lightning's graceful stop, which ignores SIGINT only once it has caught the first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _end_progress_bars() -> None:
    """Closes the progress bars a failed run left drawing (Lightning's tqdm bars, on stdout, closed at
    exit otherwise), so that its error line starts a line of its own in a terminal and in a log."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    bars = list(getattr(tqdm, "_instances", None) or ())
    for bar in bars:
        bar.close()
    if any(not bar.leave for bar in bars):
        print(flush=True)  # a bar that clears its line on close leaves the cursor on that line


def main(argv: list[str] | None = None) -> None:
    """`train.py` and the `zoo` console script: `zoo fit --config unet ...`."""
    args = sys.argv[1:] if argv is None else list(argv)
    prog = Path(sys.argv[0]).name if argv is None else "train.py"  # `zoo` when run as the console script
    own_sigint = args[:1] == ["fit"] and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _interrupt_once) if own_sigint else None
    try:
        args = with_bundled_configs(args)
        if args[:1] and args[0] in SUBCOMMANDS[:4]:
            args, modules = take_imports(args)
            import_modules(modules)
        if argv is None:  # LightningCLI reads sys.argv itself (given args, it warns that both are set)
            sys.argv[1:] = args
        if not args or not (args[0].startswith("-") or args[0] in SUBCOMMANDS):
            raise ValueError(f"{'no subcommand' if not args else f'unknown subcommand {args[0]!r}'}; give one of "
                             f"{', '.join(SUBCOMMANDS)} ({prog} --help, {prog} compare --help)")
        if args[0] in SUBCOMMANDS[:4] and not any(a.startswith(("--config", "-c", "--model", "--help", "-h"))
                                                  for a in args[1:]):
            names = ", ".join(sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml")))
            raise ValueError(f"{prog} {args[0]} needs --config: a config file, or a bundled one by name ({names})")
        if args[0] == "compare":
            from zoo.compare import main as compare

            sys.exit(compare(args[1:], f"{prog} compare"))
        if args[0] == "export":
            from zoo.export import main as export

            sys.exit(export(args[1:], f"{prog} export"))
        ZooCLI(args=None if argv is None else args, prog=prog)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        resume = "; the same command with --ckpt_path last resumes it" if args[:1] == ["fit"] else ""
        print(f"error: interrupted{resume}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("ZOO_DEBUG", "") not in ("", "0"):
            raise
        _end_progress_bars()
        print(error_line(e), file=sys.stderr)
        sys.exit(2 if is_bad_input(e) else 1)
    finally:
        if own_sigint:
            signal.signal(signal.SIGINT, previous)
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()


if __name__ == "__main__":
    main()
