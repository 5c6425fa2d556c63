"""Loading zoo checkpoints for inference, safely (`torch.load(..., weights_only=True)`).

A zoo checkpoint is a Lightning checkpoint whose `hyper_parameters` are plain data and which carries
`checkpoint["zoo"] = {"task": "<module>.<Class>", "format": 1}` (written by `ZooModule`). Everything
inference needs (weights, fitted input scaler, vocabularies) lives in the state dict or in plain data.

`load` also reads the inference-only folders `train.py export` writes (safetensors + JSON, locally
or `hf-hub:ORG/NAME`; `zoo.export`).

The task name is looked up among registered task classes only (every `ZooModule` subclass registers
itself when defined; zoo's own task modules are imported here), so a file cannot make zoo import a
module or call anything else with its hyper-parameters.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import pickle
import pkgutil
import re
import zipfile
from pathlib import Path

import torch

FORMAT = 1
HUB_PREFIX = "hf-hub:"  # `load("hf-hub:ORG/NAME")`: an export folder on the Hugging Face Hub

# "<module>.<qualname>" -> class, of every ZooModule subclass defined so far (`register_task`).
_TASKS: dict[str, type] = {}


class CheckpointError(ValueError):
    """A file that is not a loadable zoo checkpoint."""


def read(path: str | Path, map_location="cpu") -> dict:
    """Reads a checkpoint as plain data. Raises CheckpointError for missing, truncated, corrupt,
    pickled-code or foreign files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{str(path)!r} is the weights file of an export; zoo.load takes the folder that "
                              f"holds it: zoo.load({str(path.parent)!r})")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (or, in its legacy format, a pickle: protocol opcode first); an
    # image or text file is neither, and must not be reported as refused code by the unpickler below
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a torch checkpoint, or is truncated or corrupt "
                              f"(it is neither a zip archive nor a pickle; it starts with {head!r})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps the unpickler's reason in advice to retry without weights_only, which zoo never
        # does: only the reason is kept
        text = str(e).split("Check the documentation")[0]
        if "WeightsUnpickler error:" in text:
            text = text.rsplit("WeightsUnpickler error:", 1)[1]
        else:  # the advice, then the reason in a paragraph of its own
            paragraphs = re.split(r"\n\s*\n", text.strip())
            text = paragraphs[-1] if len(paragraphs) > 1 else ""
        reason = " ".join(text.split()).split(" Please use")[0][:300] or "no detail"
        raise CheckpointError(f"checkpoint {str(path)!r} is refused: it is not plain data (tensors, numbers, strings, "
                              f"lists, dicts) that loads without running code ({reason})") from None
    except Exception as e:  # noqa: BLE001  (torch's loaders raise KeyError, IndexError, ... on other files)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
        raise CheckpointError(f"checkpoint {str(path)!r} is not a torch checkpoint, or is truncated or corrupt "
                              f"({type(e).__name__}: {detail})") from None
    missing = [k for k in ("zoo", "state_dict") if not isinstance(ckpt, dict) or not isinstance(ckpt.get(k), dict)]
    if missing:
        found = type(ckpt).__name__ if not isinstance(ckpt, dict) else ", ".join(map(repr, sorted(ckpt)))
        # a Lightning checkpoint without the tag: a task whose on_save_checkpoint did not call ZooModule's
        why = (" (a task that overrides on_save_checkpoint must call super().on_save_checkpoint(checkpoint), "
               "which writes 'zoo')" if missing == ["zoo"] and "pytorch-lightning_version" in ckpt else "")
        raise CheckpointError(f"checkpoint {str(path)!r} is not a zoo checkpoint: it lacks the "
                              f"{' and '.join(map(repr, missing))} entr{'ies' if len(missing) > 1 else 'y'} that "
                              f"zoo's trainer writes{why} (found {found})")
    return ckpt


def register_task(cls: type) -> None:
    """Makes `cls` nameable by checkpoints, under the name `ZooModule.on_save_checkpoint` writes.
    Called by `ZooModule.__init_subclass__` for every task class."""
    _TASKS[f"{cls.__module__}.{cls.__qualname__}"] = cls


def _import_zoo_tasks() -> None:
    """Imports every module of `zoo.tasks` (a fixed list, never a name from a file), registering zoo's
    own task classes."""
    import zoo.tasks

    for info in pkgutil.iter_modules(zoo.tasks.__path__, "zoo.tasks."):
        importlib.import_module(info.name)


def task_class(ckpt: dict, path: str | Path = "<checkpoint>") -> type:
    """The task class (ZooModule subclass) a zoo checkpoint was written by. Only registered task
    classes are found: zoo's own, and a user's own once the module defining it has been imported."""
    name = ckpt["zoo"].get("task", "")
    if isinstance(name, str) and name not in _TASKS:
        _import_zoo_tasks()
    if not isinstance(name, str) or name not in _TASKS:
        raise CheckpointError(
            f"checkpoint {str(path)!r} names task {name!r}, which is not a zoo task class; refused. "
            f"Registered task classes: {', '.join(sorted(_TASKS))}. A task class defined outside zoo "
            f"(a ZooModule subclass) is registered once the module defining it is imported (train.py export: "
            f"--import MODULE)."
        )
    return _TASKS[name]


# A task's injected optimizer and schedule (`zoo.tasks.base`): in the hparams as their config, for
# people; a class path read from a file is never imported, so nothing rebuilds them from it.
INJECTED = ("optimizer", "lr_scheduler")


def inference_hparams(ckpt: dict) -> dict:
    """The task's constructor arguments from a checkpoint. An injected optimizer / scheduler is saved as
    its config (class path and init_args): inference needs neither, and a class path read from a file
    is never imported."""
    return {k: v for k, v in ckpt.get("hyper_parameters", {}).items()
            if not k.startswith("_") and k not in INJECTED}


def upgrade_hparams(cls: type, hparams: dict) -> dict:
    """A checkpoint's hyper-parameters in the form task `cls` takes now. Until 2026-12-01 tasks held
    their network's arguments at the top level; a task that takes them as one config, `net`
    (`zoo.models.config`), gets them nested, so that older checkpoints and exports still load."""
    net = inspect.signature(cls).parameters.get("net")
    if net is None or "net" in hparams or not dataclasses.is_dataclass(net.default):
        return hparams
    fields = {f.name for f in dataclasses.fields(net.default)}
    return {**{k: v for k, v in hparams.items() if k not in fields},
            "net": {k: v for k, v in hparams.items() if k in fields}}


def check_expected(cls: type, expected: type | None, path: str | Path) -> None:
    """Refuses a model of another kind than `expected` (None: any task)."""
    if expected is not None and not issubclass(cls, expected):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {cls.__module__}.{cls.__qualname__} model, "
            f"not a {expected.__module__}.{expected.__qualname__}"
        )


def load(path: str | Path, expected: type | None = None, map_location="cpu", strict: bool = True):
    """Loads a zoo model for inference: returns its LightningModule in eval mode, with its
    hyper-parameters, fitted input scaler and weights.

    Args:
        path: a `.ckpt` written by `train.py fit` (e.g. `runs/unet/checkpoints/last.ckpt`), a folder
            written by `train.py export`, or `hf-hub:ORG/NAME[@REVISION]`, such a folder on the
            Hugging Face Hub (`zoo.export`).
        expected: a task class; a model of another kind is refused with CheckpointError.
        map_location: where a `.ckpt`'s tensors are read to (folders are read to the CPU); the model
            is built on the CPU either way.
    """
    if str(path).startswith(HUB_PREFIX) or Path(path).is_dir():
        from zoo import export  # imported here: it imports this module

        return export.load(path, expected=expected, strict=strict)
    return build(read(path, map_location), path, expected, strict)


def build(ckpt: dict, path: str | Path, expected: type | None = None, strict: bool = True):
    """The eval-mode model of a checkpoint that `read` returned (`path`: for messages)."""
    cls = task_class(ckpt, path)
    check_expected(cls, expected, path)
    try:
        model = cls(**upgrade_hparams(cls, inference_hparams(ckpt)))
    except ValueError as e:  # e.g. a norm kind that a module not imported here registered
        raise CheckpointError(f"checkpoint {str(path)!r}: its model cannot be built here: {e}") from e
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"], strict=strict)
    return model.eval()
