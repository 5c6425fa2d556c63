"""`train.py export` folders (model.safetensors + config.json + README.md) load back with `zoo.load`,
from disk or from a Hugging Face Hub (a local stand-in server), into models that predict bit for bit
like their checkpoints; bad folders, checkpoints, hub ids and output folders are refused clearly."""
import base64
import fcntl
import hashlib
import json
import os
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import load_file, save_file

import zoo
from tests.conftest import assert_same_weights, cli_args, tiny_unet_args
from tests.test_classification_timm import TINY_RESNET_ARGS
from tests.test_errors import error_lines, run_main
from tests.test_sketch_rnn_cli import tiny_sketch_args
from tests.test_transformer_tasks import lm_args
from zoo import export
from zoo.checkpoint import CheckpointError
from zoo.cli import ZooCLI, error_line
from zoo.tasks.language import LanguageModel
from zoo.tasks.segmentation import UNetSegmentation

# Tiny runs of 2 steps (one validation, so summary.json has metrics), each with a norm that has weights.
RUNS = {
    "unet": lambda root: tiny_unet_args(root, "--model.net.norm=group", "--data.input_norm=zscore"),
    "lm": lambda root: lm_args(root, "--model.net.norm=rms"),
    "sketch": lambda root: tiny_sketch_args(root, "--model.net.norm=layer"),
    "classification": lambda root: cli_args("resnet", root, *TINY_RESNET_ARGS, "--model.norm=group"),
}
RUNS_NORM = {"unet": "group", "lm": "rms", "sketch": "layer", "classification": "group"}


def trained_runs(runs: dict):
    """A module fixture: name -> the last.ckpt of its tiny run in `runs` (trained on first use)."""

    @pytest.fixture(scope="module")
    def trained(tmp_path_factory):
        done = {}

        def get(name):
            if name not in done:
                root = tmp_path_factory.mktemp(name)
                ZooCLI(args=["fit", *runs[name](root), "--trainer.max_steps=2"])
                done[name] = root / "checkpoints" / "last.ckpt"
            return done[name]

        return get

    return trained


trained = trained_runs(RUNS)


def predictions(name: str, model) -> list:
    """What each task predicts from fixed raw inputs (sampling seeded)."""
    torch.manual_seed(0)
    with torch.no_grad():
        if name == "unet":
            return [model.predict_proba(torch.rand(2, 1, 48, 48) * 255)]
        if name == "lm":
            return [model(torch.randint(0, len(model.tokenizer), (2, 16)))]
        if name == "sketch":
            return model.generate(3, generator=torch.Generator().manual_seed(0))
        return [model(torch.rand(2, 3, 64, 64) * 255)]


def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("an export folder was unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("name", list(RUNS))
def test_export_predicts_like_the_checkpoint(name, trained, tmp_path, capsys, monkeypatch):
    ckpt = trained(name)
    code, err = run_main(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    original = zoo.load(ckpt)
    with monkeypatch.context() as m:
        no_unpickling(m)
        loaded = zoo.load(tmp_path / "out")
    assert type(loaded) is type(original) and not loaded.training
    assert_same_weights(original, loaded)
    for a, b in zip(predictions(name, original), predictions(name, loaded), strict=True):
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else np.array_equal(a, b)), name

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    card = (tmp_path / "out" / "README.md").read_text()
    summary = json.loads((ckpt.parent.parent / "summary.json").read_text())
    assert config["task"] == f"{type(original).__module__}.{type(original).__qualname__}"
    # the norm as the run set it: a top-level hyper-parameter (classifier) or one of the network config's
    key = "norm" if name == "classification" else "net.norm"
    norm = RUNS_NORM[name]
    assert config["norm"][key] == norm and f"{key}={norm}" in card
    assert config["source"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # all tensors under the task's names; the classifier (its norms replaced) is zoo-only (test_export_timm)
    assert config["weights_prefix"] == "" and config.get("timm_compatible", None) is (
        False if name == "classification" else None)
    assert summary["metrics"] and all(f"| {k} |" in card for k in summary["metrics"])
    if name == "unet":  # the fitted scaler: buffers in the safetensors, kind in config.json
        assert loaded.input_scaler.kind == "zscore" and loaded.input_scaler.fitted
        assert config["extra_state"] == {"input_scaler._extra_state": {"kind": "zscore", "fitted": True}}
        assert "input scaling: zscore (fitted on the training split" in card
    if name == "lm":
        assert "- input scaling: none\n" in card
    if name == "lm":  # the tokenizer travels as JSON; the tied embedding is stored once and stays tied
        assert loaded.tokenizers == original.tokenizers and config["task_state"]["tokenizers"]["text"]["tokens"]
        assert config["aliases"] == {"net.head.weight": "net.embed.tok.weight"}
        assert "net.head.weight" not in load_file(tmp_path / "out" / "model.safetensors")
        assert loaded.net.head.weight is loaded.net.embed.tok.weight
    if name == "sketch":
        assert loaded.scale_factor.item() == original.scale_factor.item() != 1.0
    if name == "classification":
        assert loaded.class_names == original.class_names == config["task_state"]["class_names"]
        assert loaded.class_names != [str(k) for k in range(len(loaded.class_names))]


def test_load_folder_as_a_task(trained, tmp_path):
    out = export.export(trained("unet"), tmp_path / "out")
    assert type(UNetSegmentation.load(out)) is UNetSegmentation
    with pytest.raises(CheckpointError, match="UNetSegmentation model, not a zoo.tasks.language.LanguageModel"):
        LanguageModel.load(out)


# ------------------------------------------------------------------------------------------------
# the output folder

def test_out_folder_is_never_overwritten_by_something_else(trained, tmp_path, capsys):
    ckpt, other = trained("unet"), trained("sketch")
    out = tmp_path / "out"
    export.export(ckpt, out)
    first = (out / "config.json").stat().st_mtime_ns
    export.export(ckpt, out)  # the same checkpoint again: replaced
    assert (out / "config.json").stat().st_mtime_ns != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    code, err = run_main(capsys, "export", "--ckpt_path", str(other), "--out", str(out))
    assert code == 2 and error_lines(err) == [
        f"error: --out {str(out)!r} holds the export of another checkpoint (last.ckpt at step 2: another run's, or "
        "last.ckpt trained on since); give a new or empty folder"]
    assert json.loads((out / "config.json").read_text())["task"].endswith("UNetSegmentation")

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    code, err = run_main(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "notes"))
    assert code == 2 and "is not empty and is not an export" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    export.export(ckpt, tmp_path / "empty")  # an empty folder is fine
    (tmp_path / "file").write_text("x")
    code, err = run_main(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "file"))
    assert code == 2 and error_lines(err) == [f"error: --out {str(tmp_path / 'file')!r} exists and is not a folder"]
    # unwritable: a folder inside a file (we may be root, for whom permissions are no obstacle)
    code, err = run_main(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "file" / "out"))
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: cannot write the export folder {str(tmp_path / 'file' / 'out')!r}: ")
    assert "Not a directory" in err


def test_a_failed_export_leaves_no_half_folder(trained, tmp_path, monkeypatch):
    ckpt = trained("unet")
    out = tmp_path / "out"
    (tmp_path / f".out{export.TEMP_MARK}12345").mkdir()  # left by an export that was killed
    real_open = export.atomic_open

    def failing_open(path, *a, **k):  # the disk fills up at the second file
        if path.name == "config.json":
            raise OSError(28, "No space left on device")
        return real_open(path, *a, **k)

    monkeypatch.setattr(export, "atomic_open", failing_open)
    with pytest.raises(OSError, match="cannot write the export folder .*No space left"):
        export.export(ckpt, out)
    assert list(tmp_path.iterdir()) == []  # neither a half folder nor temporary ones

    monkeypatch.setattr(export, "atomic_open", real_open)
    export.export(ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(export, "atomic_open", failing_open)
    with pytest.raises(OSError):
        export.export(ckpt, out)  # a failed re-export keeps the earlier one whole
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_re_export_swaps_the_folders_in_one_step(trained, tmp_path, monkeypatch):
    ckpt, out = trained("unet"), tmp_path / "out"
    export.export(ckpt, out)
    earlier = (out / "model.safetensors").stat().st_ino  # to tell the two apart
    monkeypatch.setattr(export.os, "rename", None)  # two renames would leave no `out` between them
    export.export(ckpt, out)
    assert (out / "model.safetensors").stat().st_ino != earlier and isinstance(zoo.load(out), UNetSegmentation)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the earlier export removed


def test_a_re_export_keeps_what_it_did_not_write(trained, tmp_path, capsys):
    """A Hub repository cloned, its card edited, then exported into again (`hf download`, `git clone`):
    the clone's .git, the user's files and the edited card stay; the export's own files are new."""
    ckpt, out = trained("unet"), tmp_path / "out"
    export.export(ckpt, out)
    card = (out / "README.md").read_text()
    export.export(ckpt, out)  # nothing of the user's: nothing kept, nothing said
    assert "kept" not in capsys.readouterr().err and (out / "README.md").read_text() == card
    (out / ".git" / "objects").mkdir(parents=True)
    (out / ".git" / "objects" / "ab").write_bytes(b"object")
    (out / ".git" / "HEAD").symlink_to("objects/ab")
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text(card + "\nMy notes on this model.\n")
    (out / "model.safetensors").write_bytes(b"stale")  # the export's own: rewritten
    mine = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "model.safetensors"
            and p.name != "config.json"}
    code, err = run_main(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(out))
    assert code == 0 and "kept from the earlier export: .git, README.md, notes.txt (README.md: edited since the " \
        "earlier export; delete it for a new card)" in err
    assert {p: (out / p).read_bytes() for p in mine} == mine and os.readlink(out / ".git" / "HEAD") == "objects/ab"
    assert_same_weights(zoo.load(out), zoo.load(ckpt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (out / "README.md").unlink()  # deleted: a new card
    export.export(ckpt, out)
    assert (out / "README.md").read_text() == card and (out / "notes.txt").read_text() == "mine"


def test_exports_into_one_folder_take_turns(trained, tmp_path):
    """A second export into the same place waits for the first instead of deleting its temporary folder
    as a stray (which left a folder without its weights while both reported success)."""
    ckpt, out = trained("unet"), tmp_path / "out"
    held = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as an export in progress in another process
    live = tmp_path / f".out{export.TEMP_MARK}99999"
    live.mkdir()  # its temporary folder
    second = threading.Thread(target=export.export, args=(ckpt, out))
    second.start()
    second.join(timeout=2.0)
    assert second.is_alive() and live.is_dir() and not out.exists()  # waiting, nothing touched
    live.rmdir()  # the first export renames its folder and ends
    os.close(held)
    second.join(timeout=120)
    assert not second.is_alive() and isinstance(zoo.load(out), UNetSegmentation)


# ------------------------------------------------------------------------------------------------
# bad input

def test_bad_checkpoints_are_one_line(trained, tmp_path, capsys):
    ckpt = trained("unet")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    for path, message in ((truncated, "is truncated or corrupt"), (tmp_path / "foreign.pt", "is not a zoo checkpoint"),
                          (tmp_path / "nope.ckpt", "does not exist")):
        code, err = run_main(capsys, "export", "--ckpt_path", str(path), "--out", str(tmp_path / "out"))
        assert code == 2 and len(error_lines(err)) == 1 and message in err and str(path) in err, err
    assert not (tmp_path / "out").exists()


def corrupt(folder, how):
    """Breaks an export folder in one way; returns the name of a tensor it holds (or held)."""
    config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    config = json.loads(config_file.read_text())
    tensors = load_file(weights_file)
    name = next(iter(tensors))
    if how == "no config":
        config_file.unlink()
    elif how == "no weights":
        weights_file.unlink()
    elif how == "not json":
        config_file.write_text('{"format": 1,')
    elif how == "truncated weights":
        weights_file.write_bytes(weights_file.read_bytes()[:100])
    elif how == "missing entry":
        del config["hyper_parameters"]
    elif how == "newer format":
        config["format"] = 2
    elif how == "foreign task":
        config["task"] = "os.system"
    elif how == "bad alias":
        config["aliases"] = {"net.extra": "net.nothing"}
    elif how == "missing extra state":
        config["extra_state"] = {}
    elif how in ("missing tensor", "unexpected tensor", "wrong shape"):
        if how == "missing tensor":
            del tensors[name]
        elif how == "unexpected tensor":
            tensors["net.surplus"] = torch.zeros(3)
        else:
            tensors[name] = torch.zeros(7, 7)
        save_file(tensors, weights_file)
    if how not in ("no config", "not json"):
        config_file.write_text(json.dumps(config))
    return name


@pytest.mark.parametrize("how, message", [
    ("no config", r"config.json' is missing: .* is not a folder written by `train.py export`"),
    ("no weights", r"model.safetensors' is missing"),
    ("not json", r"config.json' is not valid JSON"),
    ("truncated weights", r"model.safetensors' is truncated or not a safetensors file"),
    ("missing entry", r"config.json' is not an export's config.json: bad entries hyper_parameters \(missing\)"),
    ("newer format", r"config.json' is export format 2; this zoo reads format 1"),
    ("foreign task", r"config.json' names task 'os.system', which is not a zoo task class"),
    ("bad alias", r"config.json': alias 'net.extra' names 'net.nothing', which is not in model.safetensors"),
    ("missing extra state", r"config.json describes: config.json extra_state lacks input_scaler._extra_state$"),
    ("missing tensor", r"does not fit the model its config.json describes: model.safetensors lacks {name}$"),
    ("unexpected tensor", r"model.safetensors has unexpected net.surplus$"),
    ("wrong shape", r"model.safetensors has {name} as float32\[7, 7\], the model float32\["),
])
def test_bad_folders_are_refused_naming_the_file(trained, tmp_path, how, message):
    out = export.export(trained("unet"), tmp_path / "out")
    name = corrupt(out, how)
    with pytest.raises(CheckpointError, match=message.replace("{name}", name)) as info:
        zoo.load(out)
    assert len(error_line(info.value).splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# the Hugging Face Hub: a local stand-in for the endpoints snapshot_download and upload_folder use

class FakeHub(ThreadingHTTPServer):
    """Model repos in memory, served like huggingface.co: repo info by revision, the file tree, file
    downloads (`resolve`, with X-Repo-Commit and ETag) and, for uploads, repo creation, preupload
    (every file "regular": no LFS / Xet storage) and NDJSON commits. Unknown repos and revisions get
    404 with the Hub's X-Error-Code."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos = {}  # repo id -> {"refs": {branch or tag: commit}, "commits": {commit: {path: bytes}}}
        self.tokens = []  # the Authorization header of each upload request
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self):
        """Goes offline: connections are refused from now on."""
        self.shutdown()
        self.server_close()

    def publish(self, repo_id, files, tag=None) -> str:
        """Commits `files` ({path: bytes}) to `repo_id`'s main (and `tag`); returns the commit hash."""
        commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        repo["commits"][commit] = dict(files)
        repo["refs"].update({"main": commit, **({tag: commit} if tag else {})})
        return commit


class HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body=b"{}", headers=(), length=None):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        # /api/models/ORG/NAME/{revision,tree}/REV and /ORG/NAME/resolve/REV/FILE
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        api = parts[:2] == ["api", "models"]
        repo_id, (kind, rev, *name) = ("/".join(parts[2:4]), parts[4:]) if api else ("/".join(parts[:2]), parts[2:])
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self.reply(404, headers=[("X-Error-Code", "RepoNotFound")])
        commit = repo["refs"].get(rev, rev if rev in repo["commits"] else None)
        if commit is None:
            return self.reply(404, headers=[("X-Error-Code", "RevisionNotFound")])
        files = repo["commits"][commit]
        if kind == "revision":
            return self.reply(200, json.dumps({"id": repo_id, "sha": commit,
                                               "siblings": [{"rfilename": f} for f in files]}).encode())
        if kind == "tree":
            return self.reply(200, json.dumps([{"type": "file", "path": f, "size": len(data),
                                                "oid": hashlib.sha1(data).hexdigest()}
                                               for f, data in files.items()]).encode())
        data = files.get("/".join(name))
        if data is None:
            return self.reply(404, headers=[("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", commit)])
        headers = [("X-Repo-Commit", commit), ("ETag", f'"{hashlib.sha256(data).hexdigest()}"')]
        self.reply(200, b"" if head else data, headers, length=len(data))

    def do_POST(self):
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.tokens.append(self.headers.get("Authorization"))
        if parts == ["api", "repos", "create"]:
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            self.server.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
            return self.reply(200, json.dumps({"url": f"{self.server.url}/{repo_id}"}).encode())
        if parts == ["api", "validate-yaml"]:  # the model card's metadata
            return self.reply(200)
        repo_id, kind = "/".join(parts[2:4]), parts[4]
        if kind == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]
            return self.reply(200, json.dumps({"files": files}).encode())
        items = [json.loads(line) for line in body.splitlines() if line.strip()]  # kind == "commit"
        commit = self.server.publish(repo_id, {i["value"]["path"]: base64.b64decode(i["value"]["content"])
                                               for i in items if i["key"] == "file"})
        self.reply(200, json.dumps({"commitUrl": f"{self.server.url}/{repo_id}/commit/{commit}",
                                    "commitOid": commit}).encode())


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A FakeHub that huggingface_hub talks to (its endpoint constants are read at import, so they
    are patched), with an empty cache and no login."""
    server = FakeHub()
    monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-token"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    yield server
    server.stop()


def folder_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_load_from_the_hub_pinned_and_cached(trained, hub, tmp_path):
    unet = export.export(trained("unet"), tmp_path / "unet")
    lm = export.export(trained("lm"), tmp_path / "lm")
    first = hub.publish("org/model", folder_files(unet), tag="v1")
    hub.publish("org/model", folder_files(lm))  # main moves on to another model

    assert type(zoo.load("hf-hub:org/model")) is LanguageModel
    for pinned in ("hf-hub:org/model@v1", f"hf-hub:org/model@{first}"):
        model = zoo.load(pinned)
        assert type(model) is UNetSegmentation
        assert_same_weights(model, zoo.load(unet))
    assert (tmp_path / "hf-cache" / "models--org--model" / "snapshots" / first / "config.json").is_file()

    hub.stop()  # offline: the cached snapshots still load
    assert type(zoo.load("hf-hub:org/model@v1")) is UNetSegmentation
    assert type(zoo.load("hf-hub:org/model")) is LanguageModel


def test_unknown_hub_ids_are_one_line(hub, trained, tmp_path):
    hub.publish("org/model", folder_files(export.export(trained("unet"), tmp_path / "out")))
    for spec, message in (("hf-hub:org/nope", f"hf-hub:org/nope: no model repository 'org/nope' on {hub.url}"),
                          ("hf-hub:org/model@v9", "hf-hub:org/model@v9: 'org/model' has no revision 'v9'"),
                          ("hf-hub:bad name", "hf-hub:bad name: Repo id must use alphanumeric chars")):
        with pytest.raises(CheckpointError) as info:
            zoo.load(spec)
        assert error_line(info.value).startswith(f"error: {message}") and len(error_line(info.value).splitlines()) == 1
    hub.stop()  # the Hub unreachable, and nothing cached
    with pytest.raises(CheckpointError, match=f"hf-hub:org/model: cannot download from {hub.url}, and it is not "
                                              "in the cache") as info:
        zoo.load("hf-hub:org/model")
    assert len(error_line(info.value).splitlines()) == 1


def test_push_to_hub(trained, hub, tmp_path, capsys, monkeypatch):
    ckpt, out = trained("unet"), tmp_path / "out"
    code, err = run_main(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(out), "--push-to-hub", "org/pushed")
    assert code == 2 and error_lines(err) == [
        "error: --push-to-hub needs a Hugging Face login: run `hf auth login` or set HF_TOKEN"]
    assert not out.exists() and hub.tokens == []  # refused before any work

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    code, err = run_main(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(out), "--push-to-hub", "org/pushed")
    assert code == 0, err
    assert set(hub.tokens) == {"Bearer hf_test"}
    assert 'zoo.load("hf-hub:org/pushed")' in (out / "README.md").read_text()
    commit = hub.repos["org/pushed"]["refs"]["main"]
    assert hub.repos["org/pushed"]["commits"][commit] == folder_files(out)
    assert_same_weights(zoo.load("hf-hub:org/pushed"), zoo.load(ckpt))
