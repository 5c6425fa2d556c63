"""Inference-only model folders: `train.py export --ckpt_path CKPT --out DIR [--push-to-hub ORG/NAME]`
writes one, and `zoo.load(DIR)` or `zoo.load("hf-hub:ORG/NAME[@REVISION]")` reads one back into the
eval-mode model the checkpoint holds, predicting exactly as it does.

A folder (format 1) holds three files:

- `model.safetensors`: every tensor of the task's state_dict as the LightningModule has it (weights,
  buffers: the fitted input scaler, Sketch-RNN's scale_factor, ...). safetensors refuses tensors that
  share memory, so a tensor that is another one (tied embeddings) is stored under its first name only
  and listed in config.json's `aliases`.
- `config.json`: plain JSON. `format`; `task`, a registered task class (`zoo.checkpoint.task_class`:
  nothing named in a file is imported); `hyper_parameters`; `task_state`, what the task's
  `on_save_checkpoint` adds and its `on_load_checkpoint` reads (tokenizers, class names);
  `extra_state`, the state_dict's non-tensor entries (the scaler's kind); `aliases` {name: stored
  name}; and, for people, `norm` (the norm hyper-parameters), `data` (the datamodule's
  hyper-parameters) and `source` (checkpoint file name, sha256, epoch, step).
- `README.md`: a model card (model, norm, data, final metrics of the run's summary.json).

Nothing is unpickled: reading takes JSON and safetensors only. Hub downloads go through
`huggingface_hub.snapshot_download` (its cache, HF_HOME, HF_ENDPOINT and revision pinning).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch

from zoo import checkpoint
from zoo.callbacks import SUMMARY_FILE
from zoo.checkpoint import HUB_PREFIX, CheckpointError
from zoo.files import TEMP_MARK, atomic_open, sha256_of

FORMAT = 1
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
# config.json's entries and their JSON types; all are required.
CONFIG_TYPES = {"format": int, "task": str, "hyper_parameters": dict, "task_state": dict, "extra_state": dict,
                "aliases": dict, "norm": dict, "data": dict, "source": dict}


# ------------------------------------------------------------------------------------------------
# writing

def export(ckpt_path: str | Path, out: str | Path, repo_id: str | None = None) -> Path:
    """Writes the export folder of a zoo checkpoint to `out` and returns it. `out` must not exist, be
    empty, or be an earlier export of the same checkpoint (same sha256), which is replaced. The
    folder is written beside `out` under a temporary name and renamed, so a kill leaves no half folder.
    `repo_id`: the Hub repository it is meant for, shown in the model card."""
    ckpt_path, out = Path(ckpt_path), Path(out)
    ckpt = checkpoint.read(ckpt_path)  # refuses missing, truncated, pickled-code and foreign files
    model = checkpoint.build(ckpt, ckpt_path)
    digest = sha256_of(ckpt_path)
    replace = _check_out(out, digest)

    tensors, aliases, extra_state = _split_state(model.state_dict())
    task_state: dict = {}
    model.on_save_checkpoint(task_state)  # the task's own entries, as on_load_checkpoint reads them
    task_state.pop("zoo", None)  # its task name and format are config.json's own
    hparams = checkpoint.inference_hparams(ckpt)
    config = {
        "format": FORMAT,
        "task": f"{type(model).__module__}.{type(model).__qualname__}",
        "hyper_parameters": hparams,
        "task_state": task_state,
        "extra_state": extra_state,
        "aliases": aliases,
        "norm": {k: v for k, v in hparams.items() if "norm" in k},
        "data": _data_config(ckpt.get("datamodule_hyper_parameters", {})),
        "source": {"checkpoint": ckpt_path.name, "sha256": digest, "epoch": ckpt.get("epoch"),
                   "global_step": ckpt.get("global_step")},
    }
    ckpt_dir = ckpt_path.resolve().parent  # in a run: <run dir>/checkpoints, beside <run dir>/summary.json
    summary_file = ckpt_dir.parent / SUMMARY_FILE
    in_run = ckpt_dir.name == "checkpoints" and summary_file.is_file()
    summary = json.loads(summary_file.read_text()) if in_run else None
    # metadata format "pt": what the ecosystem's safetensors loaders (transformers) look for
    files = {WEIGHTS: safetensors.torch.save(tensors, metadata={"format": "pt"}),
             CONFIG: _to_json(config, ckpt_path).encode(),
             CARD: model_card(config, summary, repo_id).encode()}
    try:
        _write_folder(out, files, replace)
    except OSError as e:
        raise type(e)(f"cannot write the export folder {str(out)!r}: {e}") from None
    return out


def _data_config(hparams: dict) -> dict:
    """The datamodule as LightningCLI's config gives it: {"class_path": ..., "init_args": {...}}."""
    if not hparams:
        return {}
    return {"class_path": hparams.get("_class_path"),
            "init_args": {k: v for k, v in hparams.items() if not k.startswith("_")}}


def _check_out(out: Path, digest: str) -> bool:
    """Whether `out` holds an earlier export of the checkpoint with this sha256 (to be replaced).
    Refuses a file, and a non-empty folder that is anything else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    if not any(out.iterdir()):
        return False
    try:
        earlier = json.loads((out / CONFIG).read_text())["source"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):  # no config.json, or not an export's
        earlier = None
    if earlier != digest:
        raise ValueError(f"--out {str(out)!r} is not empty and is not an export of this checkpoint; "
                         "give a new or empty folder")
    return True


def _split_state(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """A state_dict as (tensors to store, {alias: stored name}, non-tensor entries). A tensor that is
    another one (same memory, offset, shape, strides, dtype: a tied weight) is stored once; the stored
    ones are copies, since safetensors refuses tensors sharing memory with anything."""
    tensors, aliases, extra, seen = {}, {}, {}, {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            extra[name] = value
            continue
        view = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
                value.dtype)
        if view in seen:
            aliases[name] = seen[view]
        else:
            seen[view] = name
            tensors[name] = value.detach().cpu().contiguous().clone()
    return tensors, aliases, extra


def _to_json(config: dict, ckpt_path: Path) -> str:
    """config.json's text; an entry that is not plain JSON (a tensor, inf, an object) is refused by name."""
    for key, value in config.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {str(ckpt_path)!r}: its {key} cannot be written as JSON ({e})") from None
    return json.dumps(config, indent=2) + "\n"


def _write_folder(out: Path, files: dict[str, bytes], replace: bool) -> None:
    """Writes `files` into a temporary folder beside `out`, then renames it to `out`. Replacing an
    earlier export moves it aside first (POSIX renames a folder only over an empty one)."""
    for stray in out.parent.glob(f".{glob.escape(out.name)}{TEMP_MARK}*"):  # left by an export that was killed
        shutil.rmtree(stray, ignore_errors=True)
    tmp = out.with_name(f".{out.name}{TEMP_MARK}{os.getpid()}")
    old = out.with_name(f".{out.name}{TEMP_MARK}old-{os.getpid()}")
    try:
        for name, data in files.items():
            with atomic_open(tmp / name) as f:  # flushed to disk before the folder is renamed
                f.write(data)
        if replace:
            os.rename(out, old)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def model_card(config: dict, summary: dict | None, repo_id: str | None = None) -> str:
    """A short README.md: what the model is, its norm and data, how to load it, its final metrics."""
    task = config["task"].rsplit(".", 1)[-1]
    norms = ", ".join(f"{k}={v}" for k, v in config["norm"].items()) or "not a hyper-parameter"
    data = config["data"]
    data_class = str(data.get("class_path", "unknown datamodule")).rsplit(".", 1)[-1]
    scaling = ", ".join(str(v.get("kind")) for k, v in config["extra_state"].items()
                        if k.endswith("input_scaler._extra_state") and isinstance(v, dict))
    source = config["source"]
    lines = [
        "---",
        f"tags: [zoo, {task}]",
        "---",
        f"# {task} ({norms})",
        "",
        (f"Exported by zoo's `train.py export` from `{source['checkpoint']}` "
         f"(epoch {source['epoch']}, step {source['global_step']}, sha256 `{source['sha256'][:16]}...`)."),
        "",
        f"- model: `{config['task']}`",
        f"- norm: {norms}",
        f"- input scaling: {scaling or 'none'} (fitted on the training split; give the model raw inputs)",
        f"- data: `{data_class}` ({', '.join(f'{k}={v}' for k, v in data.get('init_args', {}).items())})",
        "",
        "```python",
        "import zoo",
        f'model = zoo.load("{HUB_PREFIX}{repo_id or "ORG/NAME"}")  # or this folder\'s path; nothing is unpickled',
        "```",
    ]
    if summary:
        lines += ["", f"## Final metrics (step {summary.get('global_step')})", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in summary.get("metrics", {}).items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# reading

def load(source: str | Path, expected: type | None = None, strict: bool = True):
    """`zoo.load` of an export folder, or of `hf-hub:ORG/NAME[@REVISION]` (downloaded first)."""
    if str(source).startswith(HUB_PREFIX):
        source = download(str(source))
    return load_folder(source, expected, strict)


def load_folder(folder: str | Path, expected: type | None = None, strict: bool = True):
    """The eval-mode model of an export folder. A missing file, an invalid config.json, or tensors
    missing, unexpected or of another shape or dtype than the model config.json describes are
    refused with CheckpointError, naming the file and what is wrong."""
    folder = Path(folder)
    config = _read_config(folder / CONFIG)
    cls = checkpoint.task_class({"zoo": {"task": config["task"]}}, folder / CONFIG)
    checkpoint.check_expected(cls, expected, folder)
    model = cls(**config["hyper_parameters"])
    model.on_load_checkpoint(config["task_state"])  # e.g. builds the network from the tokenizers
    state = {**_read_tensors(folder / WEIGHTS), **config["extra_state"]}
    for alias, name in config["aliases"].items():
        if name not in state:
            raise CheckpointError(f"{str(folder / CONFIG)!r}: alias {alias!r} names {name!r}, which is not in "
                                  f"{WEIGHTS}")
        state[alias] = state[name]
    _check_state(model.state_dict(), state, folder, strict)
    model.load_state_dict(state, strict=strict)
    return model.eval()


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing: {str(path.parent)!r} is not a folder written by "
                              "`train.py export`")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(config).__name__}, not a JSON object")
    wrong = [f"{k} (not a {t.__name__})" if k in config else f"{k} (missing)"
             for k, t in CONFIG_TYPES.items() if not isinstance(config.get(k), t)]
    if wrong:
        raise CheckpointError(f"{str(path)!r} is not an export's config.json: bad entries {', '.join(wrong)}")
    if config["format"] != FORMAT:
        raise CheckpointError(f"{str(path)!r} is export format {config['format']}; this zoo reads format {FORMAT}")
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing")
    try:
        return safetensors.torch.load_file(path)
    except safetensors.SafetensorError as e:
        raise CheckpointError(f"{str(path)!r} is truncated or not a safetensors file ({e})") from None


def _check_state(want: dict, state: dict, folder: Path, strict: bool) -> None:
    """Compares the folder's state with the model's own state_dict before loading it, so that a
    mismatch names the file instead of surfacing as torch's multi-line error."""
    def where(value) -> str:  # the file an entry comes from
        return WEIGHTS if isinstance(value, torch.Tensor) else f"{CONFIG} extra_state"

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

    problems = []
    if strict:
        missing = [k for k in want if k not in state]
        unexpected = [k for k in state if k not in want]
        for file in (WEIGHTS, f"{CONFIG} extra_state"):
            if lacking := [k for k in missing if where(want[k]) == file]:
                problems.append(f"{file} lacks {names(lacking)}")
            if extra := [k for k in unexpected if where(state[k]) == file]:
                problems.append(f"{file} has unexpected {names(extra)}")
    for k, w in want.items():
        got = state.get(k, w)
        if where(got) != where(w):
            problems.append(f"{where(got)} has {k}, which the model keeps in {where(w)}")
        elif isinstance(w, torch.Tensor) and (got.shape != w.shape or got.dtype != w.dtype):
            problems.append(f"{WEIGHTS} has {k} as {str(got.dtype)[6:]}{list(got.shape)}, "
                            f"the model {str(w.dtype)[6:]}{list(w.shape)}")
    if problems:
        raise CheckpointError(f"{str(folder)!r} does not fit the model its {CONFIG} describes: {'; '.join(problems)}")


def download(spec: str) -> Path:
    """`hf-hub:ORG/NAME[@REVISION]` -> the local folder of that snapshot, downloaded once into the
    Hugging Face cache (a commit hash as REVISION pins it; a branch or tag follows the Hub)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo_id, _, revision = spec[len(HUB_PREFIX):].partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=[CONFIG, WEIGHTS]))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{spec}: no model repository {repo_id!r} on {constants.ENDPOINT} (or it is private "
                              "or gated and you are not logged in with access)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{spec}: {repo_id!r} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{spec}: cannot download from {constants.ENDPOINT}, and it is not in the cache "
                              f"({first})") from None


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Uploads an export folder to the Hub repository `repo_id` (created if missing) as one commit,
    with the token of `hf auth login` or HF_TOKEN; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="zoo: train.py export").commit_url


def check_login() -> None:
    from huggingface_hub import get_token

    if get_token() is None:
        raise PermissionError("--push-to-hub needs a Hugging Face login: run `hf auth login` or set HF_TOKEN")


# ------------------------------------------------------------------------------------------------
# command line

def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="train.py export",
        description="Write an inference-only folder (model.safetensors, config.json, README.md) from a "
        "checkpoint; `zoo.load(DIR)` reads it back. Optionally upload it to the Hugging Face Hub.",
    )
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by `train.py fit`")
    p.add_argument("--out", required=True,
                   help="the folder to write: new, empty, or an earlier export of this checkpoint (replaced)")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload it to this Hub repository (needs a login)")
    args = p.parse_args(argv)
    if args.push_to_hub:
        check_login()  # before any work
    out = export(args.ckpt_path, args.out, args.push_to_hub)
    print(f"exported {args.ckpt_path} to {out}")
    if args.push_to_hub:
        print(f"uploaded: {push_to_hub(out, args.push_to_hub)}")
    return 0
