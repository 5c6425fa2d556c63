"""Loading zoo checkpoints for inference, safely (`torch.load(..., weights_only=True)`).

A zoo checkpoint is a Lightning checkpoint whose `hyper_parameters` are plain data and which carries
`checkpoint["zoo"] = {"task": "<module>.<Class>", "format": 1}` (written by `ZooModule`). Everything
inference needs (weights, fitted input scaler, vocabularies) lives in the state dict or in plain data.

The task name is looked up among registered task classes only (every `ZooModule` subclass registers
itself when defined; zoo's own task modules are imported here), so a file cannot make zoo import a
module or call anything else with its hyper-parameters.
"""
from __future__ import annotations

import importlib
import pickle
import pkgutil
import zipfile
from pathlib import Path

import torch

FORMAT = 1

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
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds pickled objects that are not plain data (tensors, numbers, "
            f"strings, lists, dicts) and is refused, since loading it could run code. "
            f"torch said: {first}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'})"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("zoo"), dict) or "state_dict" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a zoo checkpoint: it lacks the 'zoo' and 'state_dict' "
            f"entries that zoo's trainer writes (found {keys})"
        )
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
            f"(a ZooModule subclass) is registered once the module defining it is imported."
        )
    return _TASKS[name]


def load(path: str | Path, expected: type | None = None, map_location="cpu", strict: bool = True):
    """Loads a zoo checkpoint: returns its LightningModule in eval mode, with its hyper-parameters,
    fitted input scaler and weights.

    Args:
        path: a `.ckpt` written by `train.py fit` (e.g. `runs/unet/checkpoints/last.ckpt`).
        expected: a task class; a checkpoint of another model kind is refused with CheckpointError.
    """
    ckpt = read(path, map_location)
    cls = task_class(ckpt, path)
    if expected is not None and not issubclass(cls, expected):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {cls.__module__}.{cls.__qualname__} model, "
            f"not a {expected.__module__}.{expected.__qualname__}"
        )
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
    model = cls(**hparams)
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"], strict=strict)
    return model.eval()
