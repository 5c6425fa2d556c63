"""Inference-only model folders: `train.py export --ckpt_path CKPT --out DIR [--push-to-hub ORG/NAME]`
writes one, and `zoo.load(DIR)` or `zoo.load("hf-hub:ORG/NAME[@REVISION]")` reads one back into the
eval-mode model the checkpoint holds, predicting exactly as it does. An image classifier's folder is
also timm's: `timm.create_model("hf-hub:ORG/NAME" or "local-dir:DIR", pretrained=True)` (with zoo
imported, which registers its models) builds its network with its weights.

A folder (format 1) holds:

- `model.safetensors`, and for a timm-loadable classifier `task.safetensors`: the tensors of the
  task's state_dict (weights, buffers: the fitted input scaler, Sketch-RNN's scale_factor, ...).
  config.json's `weights_prefix` splits them: names that start with it are in model.safetensors,
  without it, the others in task.safetensors. It is "" for every export but a timm-loadable
  classifier's (all tensors in model.safetensors under the LightningModule's names) and "net." for
  those: model.safetensors holds the network's tensors under its own names, which timm reads, and
  task.safetensors the task's others (the input scaler), which timm ignores; nothing is stored twice.
  safetensors refuses tensors that share memory, so a tensor that is another one (tied embeddings)
  is stored under its first name only and listed in config.json's `aliases`.
- `config.json`: plain JSON. `format`; `task`, a registered task class (`zoo.checkpoint.task_class`:
  nothing named in a file is imported); `hyper_parameters`; `task_state`, what the task's
  `on_save_checkpoint` adds and its `on_load_checkpoint` reads (tokenizers, class names);
  `extra_state`, the state_dict's non-tensor entries (the scaler's kind); `aliases` {name: stored
  name}; `weights_prefix` (above; missing in folders written before it: ""); and, for people, `norm`
  (the norm hyper-parameters, nested ones as dotted names: `net.norm`), `data` (the datamodule's
  hyper-parameters), `training` (an injected optimizer / schedule, as the CLI gave it: class_path and
  init_args), `source` (checkpoint file name, sha256, epoch, step) and `card_sha256` (the
  card as written, so that a re-export keeps one edited since).
  An image classifier's config.json also says `timm_compatible`. If true, it holds timm's own keys
  (`timm.models.load_model_config_from_hf` reads them): `architecture`, `model_args` (the
  `timm.create_model` arguments that rebuild the network), `num_classes`, `num_features`,
  `label_names` (the class names) and `pretrained_cfg` (input size, interpolation and crop of zoo's
  evaluation transform; `mean` / `std`: the fitted input scaler, a per-channel `(x - shift) / scale`
  of [0, 255] images, on timm's [0, 1] ones: shift / 255, scale / 255). If false (the network is
  not what timm.create_model builds: norms replaced after creation by `norm`, or any difference a
  rebuild finds), `timm_reason` says why, and there are no timm keys: timm refuses the folder.
- `README.md`: a model card (model, norm, data, the metrics of its weights: the run's summary.json for
  its final checkpoint, its validation's from the run's CSV logs for an earlier one such as
  best-*.ckpt; how to load it with timm, or why not).

Nothing is unpickled: reading takes JSON and safetensors only. Hub downloads go through
`huggingface_hub.snapshot_download` (its cache, HF_HOME, HF_ENDPOINT and revision pinning).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import hashlib
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import safetensors.torch
import timm
import torch
from timm.models import get_arch_name

from zoo import checkpoint
from zoo.callbacks import SUMMARY_FILE
from zoo.checkpoint import HUB_PREFIX, INJECTED, CheckpointError
from zoo.data.images import ImagesDataModule
from zoo.files import TEMP_MARK, atomic_open, sha256_of
from zoo.models import norm_arguments
from zoo.models.config import flat
from zoo.tasks.classification import ImageClassification

FORMAT = 1
WEIGHTS, TASK_WEIGHTS, CONFIG, CARD = "model.safetensors", "task.safetensors", "config.json", "README.md"
NET_PREFIX = "net."  # ImageClassification's network: what timm reads from model.safetensors
# config.json's entries and their JSON types; all are required.
CONFIG_TYPES = {"format": int, "task": str, "hyper_parameters": dict, "task_state": dict, "extra_state": dict,
                "aliases": dict, "norm": dict, "data": dict, "source": dict}


# ------------------------------------------------------------------------------------------------
# writing

def export(ckpt_path: str | Path, out: str | Path, repo_id: str | None = None) -> Path:
    """Writes the export folder of a zoo checkpoint to `out` and returns it. `out` must not exist, be
    empty, or be an earlier export of the same checkpoint (same sha256), which is replaced but for
    the entries the export does not write and an edited card (`_kept_entries`). The
    folder is written beside `out` under a temporary name and renamed, so a kill leaves no half folder.
    `repo_id`: the Hub repository it is meant for, shown in the model card."""
    ckpt_path, out = Path(ckpt_path), Path(out)
    ckpt = checkpoint.read(ckpt_path)  # refuses missing, truncated, pickled-code and foreign files
    model = checkpoint.build(ckpt, ckpt_path)
    digest = sha256_of(ckpt_path)
    replace = _check_out(out, digest, ckpt_path.name)

    tensors, aliases, extra_state = _split_state(model.state_dict())
    task_state: dict = {}
    model.on_save_checkpoint(task_state)  # the task's own entries, as on_load_checkpoint reads them
    task_state.pop("zoo", None)  # its task name and format are config.json's own
    hparams = checkpoint.inference_hparams(ckpt)
    data = _data_config(ckpt.get("datamodule_hyper_parameters", {}))
    timm_config = _timm_config(model, tensors, data)
    prefix = NET_PREFIX if timm_config.get("timm_compatible") else ""
    config = {
        "format": FORMAT,
        "task": f"{type(model).__module__}.{type(model).__qualname__}",
        "hyper_parameters": hparams,
        "task_state": task_state,
        "extra_state": extra_state,
        "aliases": aliases,
        "weights_prefix": prefix,
        "norm": {k: v for k, v in flat(hparams).items() if "norm" in k},
        # the injected optimizer / schedule as the CLI gave them (else the task's preset hyper-parameters)
        "training": {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k in INJECTED},
        "data": data,
        "source": {"checkpoint": ckpt_path.name, "sha256": digest, "epoch": ckpt.get("epoch"),
                   "global_step": ckpt.get("global_step")},
        **timm_config,
    }
    stored: dict[str, dict[str, torch.Tensor]] = {WEIGHTS: {}, TASK_WEIGHTS: {}} if prefix else {WEIGHTS: {}}
    for name, tensor in tensors.items():
        file, key = _locate(name, prefix)
        stored[file][key] = tensor
    ckpt_dir = ckpt_path.resolve().parent  # in a run: <run dir>/checkpoints, beside <run dir>/summary.json
    summary_file = ckpt_dir.parent / SUMMARY_FILE
    in_run = ckpt_dir.name == "checkpoints" and summary_file.is_file()
    summary = json.loads(summary_file.read_text()) if in_run else None
    if summary and ckpt.get("global_step") != summary.get("global_step"):  # not the run's end (best-*.ckpt)
        summary = _metrics_at(ckpt_dir.parent, ckpt.get("global_step"), summary.get("global_step"))
    card = model_card(config, summary, repo_id).encode()
    config["card_sha256"] = hashlib.sha256(card).hexdigest()  # a re-export keeps a card edited since
    # metadata format "pt": what the ecosystem's safetensors loaders (transformers) look for
    files = {file: safetensors.torch.save(part, metadata={"format": "pt"}) for file, part in stored.items()}
    files |= {CONFIG: _to_json(config, ckpt_path).encode(), CARD: card}
    keep = _kept_entries(out) if replace else []
    try:
        _write_folder(out, files, replace, keep)
    except OSError as e:
        raise type(e)(f"cannot write the export folder {str(out)!r}: {e}") from None
    if keep:
        edited = " (README.md: edited since the earlier export; delete it for a new card)" if CARD in keep else ""
        print(f"kept from the earlier export: {', '.join(keep)}{edited}", file=sys.stderr)
    return out


def _metrics_at(run_dir: Path, step: int, run_end: int) -> dict | None:
    """The `val/` metrics of the run's validation at `step` (from its CSV logs), as the card reads a
    summary (`run_end`: the run's last step); None when no validation ran at that step."""
    from zoo.compare import read_curves

    metrics = {k: v for k, curve in read_curves(run_dir).items() if k.startswith("val/")
               for s, v in curve if s == step}
    return {"global_step": step, "val_step": step, "metrics": metrics, "run_end": run_end} if metrics else None


def _data_config(hparams: dict) -> dict:
    """The datamodule as LightningCLI's config gives it: {"class_path": ..., "init_args": {...}}."""
    if not hparams:
        return {}
    return {"class_path": hparams.get("_class_path"),
            "init_args": {k: v for k, v in hparams.items() if not k.startswith("_")}}


def _locate(name: str, prefix: str) -> tuple[str, str]:
    """The file that holds state_dict entry `name` in a folder of this `weights_prefix`, and its name there."""
    return (WEIGHTS, name[len(prefix):]) if name.startswith(prefix) else (TASK_WEIGHTS, name)


# ------------------------------------------------------------------------------------------------
# timm's layout (image classifiers)

def _timm_config(model, tensors: dict[str, torch.Tensor], data: dict) -> dict:
    """config.json's entries for timm of an ImageClassification ({} for other tasks): timm's keys,
    or timm_compatible false and why, when timm.create_model does not build its network."""
    if not isinstance(model, ImageClassification):
        return {}
    h, net = model.hparams, model.net
    arch = get_arch_name(h.model_name)  # a tag names published weights; these are others
    # what the task gave timm.create_model (model_kwargs, and MambaVision's conv_norm / token_norm)
    args = {"num_classes": h.num_classes, "in_chans": h.in_chans, **(h.model_kwargs or {}),
            **norm_arguments(h.model_name, h.norm, h.conv_norm, h.token_norm)}
    net_tensors = {k[len(NET_PREFIX):]: v for k, v in tensors.items() if k.startswith(NET_PREFIX)}
    reason = _not_timms(model, arch, args, net_tensors)
    if reason:
        return {"timm_compatible": False, "timm_reason": reason}
    own = net.pretrained_cfg  # the architecture's default cfg: what our run does not decide
    cfg = {k: own[k] for k in ("interpolation", "crop_pct", "crop_mode", "fixed_input_size", "first_conv",
                               "classifier") if k in own}
    init = data.get("init_args", {})
    cfg |= {k: init[k] for k in ("interpolation", "crop_pct") if init.get(k) is not None}  # zoo's eval transform
    if "root" in init:  # ImagesDataModule's (synthetic images: not cropped)
        cfg["crop_pct"] = ImagesDataModule.eval_crop_pct(init)
    size = init.get("image_size")
    cfg["input_size"] = [h.in_chans, size, size] if size else [h.in_chans, *own["input_size"][1:]]
    # zoo feeds [0, 255] images to its scaler (x - shift) / scale; timm's transforms give [0, 1]
    # ones to Normalize(mean, std): the same map when mean = shift / 255 and std = scale / 255
    scaler = model.input_scaler
    cfg["mean"] = [v / 255 for v in scaler.shift.tolist()]
    cfg["std"] = [v / 255 for v in scaler.scale.tolist()]
    cfg["num_classes"] = h.num_classes
    return {"timm_compatible": True, "architecture": arch, "num_classes": h.num_classes,
            "num_features": net.num_features, "label_names": list(model.class_names), "model_args": args,
            "pretrained_cfg": cfg}


def _not_timms(model, arch: str, args: dict, net_tensors: dict[str, torch.Tensor]) -> str | None:
    """Why timm.create_model(arch, **args) with `net_tensors` loaded would not be the task's network
    (None: it would be). The rebuild compares module classes and tensor names, shapes and dtypes, so
    that no folder claims a network timm would build otherwise."""
    norm = model.hparams.norm
    if norm is not None and "conv_norm" not in args:  # not MambaVision's own argument
        return (f"norm={norm!r} replaced the network's norm layers after timm built it (zoo.norm.replace_norms), "
                f"which timm.create_model({arch!r}) cannot do; only zoo.load rebuilds it")
    with torch.random.fork_rng(devices=[]):  # building initialises weights: keep the caller's random stream
        rebuilt = timm.create_model(arch, **args)
    ours = {n: type(m) for n, m in model.net.named_modules()}
    theirs = {n: type(m) for n, m in rebuilt.named_modules()}
    spec = {k: (tuple(v.shape), v.dtype) for k, v in net_tensors.items()}
    timm_spec = {k: (tuple(v.shape), v.dtype) for k, v in rebuilt.state_dict().items()}
    differences = [f"module {n!r}: {_name(ours.get(n))} here, {_name(theirs.get(n))} there"
                   for n in ours | theirs if ours.get(n) is not theirs.get(n)]
    differences += [f"tensor {k!r}: {spec.get(k, 'none')} here, {timm_spec.get(k, 'none')} there"
                    for k in spec | timm_spec if spec.get(k) != timm_spec.get(k)]
    if differences:
        return (f"timm.create_model({arch!r}, **model_args) builds another network ({'; '.join(differences[:3])}"
                f"{f'; ... ({len(differences)} in all)' if len(differences) > 3 else ''}); only zoo.load rebuilds it")
    return None


def _name(cls: type | None) -> str:
    return "none" if cls is None else f"{cls.__module__}.{cls.__qualname__}"


def _check_out(out: Path, digest: str, name: str) -> bool:
    """Whether `out` holds an earlier export of the checkpoint with this sha256 (to be replaced).
    Refuses a file, and a non-empty folder that is anything else (naming the checkpoint of an export:
    another run's, or a checkpoint file called `name` trained on since)."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    if not any(out.iterdir()):
        return False
    try:
        source = json.loads((out / CONFIG).read_text())["source"]
        earlier = source["sha256"]
    except (OSError, ValueError, KeyError, TypeError):  # no config.json, or not an export's
        source, earlier = {}, None
    if earlier == digest:
        return True
    if earlier is not None:  # its weights are not these: replacing it would lose them
        again = f", or {name} trained on since" if source.get("checkpoint") == name else ""
        raise ValueError(f"--out {str(out)!r} holds the export of another checkpoint ({source.get('checkpoint')} at "
                         f"step {source.get('global_step')}: another run's{again}); give a new or empty folder")
    raise ValueError(f"--out {str(out)!r} is not empty and is not an export of this checkpoint; "
                     "give a new or empty folder")


def _kept_entries(out: Path) -> list[str]:
    """What a re-export into the earlier export `out` keeps (sorted): every entry the export does not
    write (a Hub clone's .git, the user's files), and README.md when it is not the card that export
    wrote (edited since; timm's push_to_hf_hub likewise keeps a repository's card)."""
    own = {WEIGHTS, TASK_WEIGHTS, CONFIG, CARD}
    keep = [p.name for p in out.iterdir() if p.name not in own]
    try:
        written = json.loads((out / CONFIG).read_text()).get("card_sha256")
    except (OSError, ValueError, AttributeError):
        written = None
    if (out / CARD).is_file() and sha256_of(out / CARD) != written:  # (written None: before it was recorded)
        keep.append(CARD)
    return sorted(keep)


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


def _write_folder(out: Path, files: dict[str, bytes], replace: bool, keep: list[str] = ()) -> None:
    """Writes `files` into a temporary folder beside `out`, then renames it to `out`. Replacing an
    earlier export moves it aside first (POSIX renames a folder only over an empty one); its entries
    `keep` are linked (or copied) into the new folder first, so a kill at any moment loses none of
    them. Exports into one parent folder take turns (a lock on that folder), so the temporary folders
    found there are strays, not a running export's."""
    if out.parent.exists() and not out.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(out.parent))
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stray in out.parent.glob(f".{glob.escape(out.name)}{TEMP_MARK}*"):  # left by an export that was killed
            shutil.rmtree(stray, ignore_errors=True)
        tmp = out.with_name(f".{out.name}{TEMP_MARK}{os.getpid()}")
        old = out.with_name(f".{out.name}{TEMP_MARK}old-{os.getpid()}")
        try:
            for name, data in files.items():
                with atomic_open(tmp / name) as f:  # flushed to disk before the folder is renamed
                    f.write(data)
            for name in keep:
                _link_tree(out / name, tmp / name)
            if not (replace and out.exists()):  # (another export may have put it there while this one waited)
                os.rename(tmp, out)
            elif not _exchange(tmp, out):  # where the filesystem cannot swap: `out` is missing for a moment
                os.rename(out, old)
                os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(lock)  # (releases the lock)


def _link_tree(src: Path, dst: Path) -> None:
    """`src` (a file, folder or symlink) at `dst`, its files hard-linked where the filesystem allows
    (a .git with large objects is not copied), else copied; replaces a file at `dst`."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if dst.is_file():
        dst.unlink()
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two folders in one step (Linux renameat2 RENAME_EXCHANGE), so a kill leaves either the old
    or the new export in place; False where that is not available."""
    rename2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    return rename2 is not None and rename2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0


def _main_args(injected: dict) -> str:
    """The arguments of an injected optimizer / schedule a reader looks for first."""
    return ", ".join(f"{k}={v}" for k, v in (injected.get("init_args") or {}).items()
                     if k in ("lr", "weight_decay", "momentum", "step_size", "gamma", "T_max", "mode"))


def model_card(config: dict, summary: dict | None, repo_id: str | None = None) -> str:
    """A short README.md: what the model is, its norm and data, how to load it, its final metrics."""
    task = config["task"].rsplit(".", 1)[-1]
    # None: the network's own norms (a timm model's as built; MambaVision's official batch / layer), said
    # once, by `norm` (a ResNet's unused conv_norm=null, token_norm=null would read as settings)
    kinds = {k: v for k, v in config["norm"].items()
             if not k.endswith("norm_skip") and (v is not None or k.rsplit(".", 1)[-1] == "norm")}
    title = ", ".join(f"{k}={v}" for k, v in kinds.items() if v is not None) or "its own norms"
    norms = ", ".join(f"{k}={v}" if v is not None else f"{k}=null (the network's own)" for k, v in kinds.items())
    data = config["data"]
    data_class = str(data.get("class_path", "unknown datamodule")).rsplit(".", 1)[-1]
    scaling = ", ".join(str(v.get("kind")) for k, v in config["extra_state"].items()
                        if k.endswith("input_scaler._extra_state") and isinstance(v, dict))
    source = config["source"]
    timm_ok = config.get("timm_compatible")
    lines = [
        "---",
        f"tags: [zoo, {task}{', timm, image-classification' if timm_ok else ''}]",
        *(["library_name: timm", "pipeline_tag: image-classification"] if timm_ok else []),
        "---",
        f"# {task} ({title})",
        "",
        (f"Exported by zoo's `train.py export` from `{source['checkpoint']}` "
         f"(epoch {source['epoch']}, step {source['global_step']}, sha256 `{source['sha256'][:16]}...`)."),
        "",
        f"- model: `{config['task']}`",
        f"- norm: {norms or 'not a hyper-parameter'}",
        (f"- input scaling: {scaling} (fitted on the training split; give the model raw inputs)"
         if scaling not in ("", "none") else "- input scaling: none"),
        f"- data: `{data_class}` ({', '.join(f'{k}={v}' for k, v in data.get('init_args', {}).items())})",
        *(f"- {k}: `{v.get('class_path')}` ({_main_args(v)}; all its arguments in config.json's training)"
          for k, v in config.get("training", {}).items() if isinstance(v, dict)),
        "",
        "```python",
        "import zoo",
        *([f"import {config['task'].rpartition('.')[0]}  # defines {task}: zoo.load never imports code itself"]
          if not config["task"].startswith("zoo.") else []),
        f'model = zoo.load("{HUB_PREFIX}{repo_id or "ORG/NAME"}")  # or this folder\'s path; nothing is unpickled',
        "```",
    ]
    if timm_ok:
        lines += [
            "", "## timm", "",
            (f"Its network, `{config['architecture']}`, loads with timm as well (its model_args and the fitted "
             "input scaling as pretrained_cfg mean / std on timm's [0, 1] images, equal to zoo's on [0, 255] "
             "images up to float rounding):"), "",
            "```python",
            "import timm",
            "import zoo  # registers zoo's models (mambavision_*) with timm",
            (f'net = timm.create_model("{HUB_PREFIX}{repo_id or "ORG/NAME"}", pretrained=True).eval()  '
             '# or "local-dir:PATH"'),
            "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=net))",
            "```",
        ]
    elif timm_ok is False:
        lines += ["", f"Not loadable with timm: {config['timm_reason']}."]
    if summary:
        step, val_step = summary.get("global_step"), summary.get("val_step")
        if "run_end" in summary:  # an earlier checkpoint's (`_metrics_at`)
            lines += ["", f"## Metrics of this checkpoint (its validation at step {step})", "",
                      f"The run went on to step {summary['run_end']}; its final metrics are in its summary.json.", ""]
        else:
            lines += ["", f"## Final metrics (step {step})", ""]
        if val_step is not None and val_step != step:  # the run ended between validations
            lines += [f"The `val/` metrics are of the run's last validation, at step {val_step}.", ""]
        lines += ["| metric | value |", "|---|---|"]
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
    model = cls(**checkpoint.upgrade_hparams(cls, config["hyper_parameters"]))
    model.on_load_checkpoint(config["task_state"])  # e.g. builds the network from the tokenizers
    prefix = config["weights_prefix"]
    state = {prefix + k: v for k, v in _read_tensors(folder / WEIGHTS).items()}
    if prefix:
        state |= _read_tensors(folder / TASK_WEIGHTS)
    state |= config["extra_state"]
    for alias, name in config["aliases"].items():
        if name not in state:
            file, key = _locate(name, prefix)
            raise CheckpointError(f"{str(folder / CONFIG)!r}: alias {alias!r} names {key!r}, which is not in {file}")
        state[alias] = state[name]
    _check_state(model.state_dict(), state, folder, strict, prefix)
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
    config.setdefault("weights_prefix", "")  # folders written before it: everything in model.safetensors
    if not isinstance(config["weights_prefix"], str):
        wrong.append("weights_prefix (not a str)")
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


def _check_state(want: dict, state: dict, folder: Path, strict: bool, prefix: str) -> None:
    """Compares the folder's state with the model's own state_dict before loading it, so that a
    mismatch names the file and the entry's name there instead of surfacing as torch's multi-line error."""
    def where(name: str, value) -> tuple[str, str]:  # the file an entry comes from, and its name there
        return _locate(name, prefix) if isinstance(value, torch.Tensor) else (f"{CONFIG} extra_state", name)

    def names(entries: list[tuple[str, object]]) -> str:
        keys = [where(k, v)[1] for k, v in entries]
        return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

    problems = []
    if strict:
        missing = [(k, v) for k, v in want.items() if k not in state]
        unexpected = [(k, v) for k, v in state.items() if k not in want]
        for file in (WEIGHTS, TASK_WEIGHTS, f"{CONFIG} extra_state"):
            if lacking := [(k, v) for k, v in missing if where(k, v)[0] == file]:
                problems.append(f"{file} lacks {names(lacking)}")
            if extra := [(k, v) for k, v in unexpected if where(k, v)[0] == file]:
                problems.append(f"{file} has unexpected {names(extra)}")
    for k, w in want.items():
        got = state.get(k, w)
        (file, name), (kept, _) = where(k, got), where(k, w)
        if file != kept:
            problems.append(f"{file} has {name}, which the model keeps in {kept}")
        elif isinstance(w, torch.Tensor) and (got.shape != w.shape or got.dtype != w.dtype):
            problems.append(f"{file} has {name} as {str(got.dtype)[6:]}{list(got.shape)}, "
                            f"the model {str(w.dtype)[6:]}{list(w.shape)}")
    if problems:
        raise CheckpointError(f"{str(folder)!r} does not fit the model its {CONFIG} describes: {'; '.join(problems)}")


def download(spec: str) -> Path:
    """`hf-hub:ORG/NAME[@REVISION]` -> the local folder of that snapshot, downloaded once into the
    Hugging Face cache (a commit hash as REVISION pins it; a branch or tag follows the Hub)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, _, revision = spec[len(HUB_PREFIX):].partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=[CONFIG, WEIGHTS, TASK_WEIGHTS]))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{spec}: no model repository {repo_id!r} on {constants.ENDPOINT} (or it is private "
                              "or gated and you are not logged in with access)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{spec}: {repo_id!r} has no revision {revision!r}") from None
    except HFValidationError as e:  # a name the Hub cannot have
        raise CheckpointError(f"{spec}: {' '.join(str(e).split()).rstrip('.')}; give hf-hub:ORG/NAME[@REVISION]") \
            from None
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

def main(argv: list[str], prog: str = "train.py export") -> int:
    from zoo.cli import IMPORT_HELP, ArgumentParser, import_modules

    p = ArgumentParser(
        prog=prog,
        description="Write an inference-only folder (model.safetensors, config.json, README.md) from a "
        "checkpoint; `zoo.load(DIR)` reads it back, and an image classifier's network also "
        '`timm.create_model("local-dir:DIR", pretrained=True)`. Optionally upload it to the Hugging Face Hub.',
    )
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by `train.py fit`")
    p.add_argument("--out", required=True,
                   help="the folder to write: new, empty, or an earlier export of this checkpoint (replaced)")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload it to this Hub repository (needs a login)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help=IMPORT_HELP)
    args = p.parse_args(argv)
    import_modules(args.imports)
    if args.push_to_hub:
        check_login()  # before any work
    out = export(args.ckpt_path, args.out, args.push_to_hub)
    print(f"exported {args.ckpt_path} to {out}")
    if args.push_to_hub:
        print(f"uploaded: {push_to_hub(out, args.push_to_hub)}")
    return 0
