"""Trustworthy runs: nothing in a sketch .npz or a checkpoint runs code or calls functions. Crafted
files are refused (naming the file and what they name) and their payloads never run; genuine files,
in every pickle dialect the published sketch files come in, still read as numpy reads them."""
import io
import os
import pickle
import re
import shlex
import sys
import zipfile

import numpy as np
import pytest
import torch

import zoo
from zoo.checkpoint import CheckpointError
from zoo.data.sketches import read_npz, write_npz
from zoo.tasks.base import ZooModule
from zoo.tasks.segmentation import UNetSegmentation
from tests.test_sketch_rnn_data import obj


class Touch:
    """Pickles as `os.system("touch <marker>")`: unpickling it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


SYSTEM = f"{os.system.__module__}.system"  # how pickle names os.system ('posix.system')


def sketches(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = np.zeros((int(rng.integers(1, 9)), 3), dtype=np.int16)
        s[:, :2] = rng.integers(-300, 300, (len(s), 2))
        s[-1, 2] = 1
        out.append(s)
    return out




# --------------------------------------------------------------------------------------------- #
# Sketch .npz files
# --------------------------------------------------------------------------------------------- #

class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), as the published Python 2 pickles hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + n.to_bytes(4, "little")
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_dumps(a):
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(a)
    return buf.getvalue()


def numpy1(data: bytes) -> bytes:
    """numpy 1.x names its array reconstructor numpy.core.multiarray (GLOBAL opcode: protocols 2, 3)."""
    return data.replace(b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct")


DIALECTS = {  # object array -> pickle bytes, as .npy members of the sketch files have been written
    "protocol 2 (Python 3)": lambda a: pickle.dumps(a, protocol=2),
    "Python 2 (numpy 1.x)": lambda a: numpy1(py2_dumps(a)),
    "numpy 1.x np.save (protocol 3)": lambda a: numpy1(pickle.dumps(a, protocol=3)),
    "default protocol": lambda a: pickle.dumps(a),
}


def write_pickled_npz(path, dumps, **arrays):
    """An .npz whose object-array members are pickled by `dumps` (np.savez cannot choose)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": a.shape})
            zf.writestr(f"{name}.npy", buf.getvalue() + dumps(a))
    return path


def assert_reads_as_numpy(path):
    """read_npz gives what numpy's pickle-enabled loader (the reference) gives, as float32."""
    ours = read_npz(path)
    with np.load(path, encoding="latin1", allow_pickle=True) as ref:
        for split in ("train", "valid", "test"):
            assert len(ours[split]) == len(ref[split]) > 0
            for a, b in zip(ours[split], ref[split]):
                assert a.dtype == np.float32 and b.dtype == np.int16
                np.testing.assert_array_equal(a, b)


def test_npz_pickling_a_callable_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"
    good = sketches(2, 0)
    path = tmp_path / "evil.npz"
    np.savez(path, train=obj(good[0], Touch(marker)), valid=obj(good[1]), test=obj(good[1]))
    message = f"sketch file {str(path)!r} member 'train' pickles {SYSTEM!r}, which is not a numpy array; refused"
    with pytest.raises(ValueError, match=re.escape(message)):
        read_npz(path)
    assert not marker.exists()


@pytest.mark.parametrize("dialect", DIALECTS)
def test_npz_dialects_read_as_numpy_does_and_callables_in_them_are_refused(tmp_path, dialect):
    dumps = DIALECTS[dialect]
    data = {"train": sketches(6, 1), "valid": sketches(3, 2), "test": sketches(3, 3)}
    data["train"][1] = data["train"][0].copy()  # equal lengths: still an object array
    path = write_pickled_npz(tmp_path / "cls.npz", dumps, **{k: obj(*v) for k, v in data.items()})
    assert_reads_as_numpy(path)

    marker = tmp_path / "marker"
    evil = write_pickled_npz(tmp_path / "evil.npz", dumps, train=obj(*data["train"]), valid=obj(*data["valid"]),
                             test=obj(data["test"][0], Touch(marker)))
    with pytest.raises(ValueError, match=re.escape(f"{str(evil)!r} member 'test' pickles {SYSTEM!r}")):
        read_npz(evil)
    assert not marker.exists()


def test_write_npz_files_read_as_numpy_does_and_callables_in_them_are_refused(tmp_path):
    data = {"train": sketches(5, 4), "valid": sketches(2, 5), "test": sketches(2, 6)}
    assert_reads_as_numpy(write_npz(tmp_path / "cls.npz", data))
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.npz"
    np.savez_compressed(evil, train=obj(*data["train"]), valid=obj(Touch(marker)), test=obj(*data["test"]))
    with pytest.raises(ValueError, match=re.escape(f"{str(evil)!r} member 'valid' pickles {SYSTEM!r}")):
        read_npz(evil)
    assert not marker.exists()


def test_npz_objects_that_are_not_arrays_of_numbers_are_refused(tmp_path):
    good = sketches(1, 7)[0]
    for name, train in {"text": obj(good, "text"), "nested": obj(good, obj(good)), "dict": {"a": good}}.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, train=train, valid=obj(good), test=obj(good))
        with pytest.raises(ValueError, match=f"{name}\\.npz' member 'train' element .* not an array of numbers"):
            read_npz(path)


# --------------------------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------------------------- #

class TinyTask(ZooModule):
    """A user's own task, defined outside zoo: registered by being defined."""

    def __init__(self, width: int = 3):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(width, 1)


def write_ckpt(path, model, task=None, hyper_parameters=None):
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "zoo": {}}
    model.on_save_checkpoint(ckpt)
    if task is not None:
        ckpt["zoo"]["task"] = task
    if hyper_parameters is not None:
        ckpt["hyper_parameters"] = hyper_parameters
    torch.save(ckpt, path)
    return path


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return UNetSegmentation(net={"base_channels": 4, "depth": 3, "norm": "batch"})


def test_checkpoint_naming_a_zoo_function_is_refused_and_nothing_runs(tmp_path, unet):
    marker = tmp_path / "marker.npz"
    # with the old loader, this called write_npz(path=marker, splits=...) and wrote the marker
    path = write_ckpt(tmp_path / "m.ckpt", unet, task="zoo.data.sketches.write_npz",
                      hyper_parameters={"path": str(marker), "splits": {"train": [[[1, 2, 1]]]}})
    message = f"checkpoint {str(path)!r} names task 'zoo.data.sketches.write_npz', which is not a zoo task class"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        zoo.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("task", ["zoo.models.unet.UNet", "zoo.tasks.base.ZooModule", "os.system",
                                  "builtins.eval", "zoo.tasks.segmentation", ["not", "a", "name"]])
def test_checkpoint_naming_anything_but_a_task_class_is_refused(tmp_path, unet, task):
    path = write_ckpt(tmp_path / "m.ckpt", unet, task=task)
    with pytest.raises(CheckpointError) as e:
        zoo.load(path)
    message = str(e.value)
    assert f"checkpoint {str(path)!r} names task {task!r}, which is not a zoo task class; refused" in message
    # the refusal lists what may be named: zoo's tasks (all imported), and the user's own
    for name in ("zoo.tasks.segmentation.UNetSegmentation", "zoo.tasks.sketch.SketchRNNTask",
                 "zoo.tasks.seq2seq.Seq2Seq", f"{__name__}.TinyTask"):
        assert name in message


def test_checkpoint_never_imports_the_module_it_names(tmp_path, unet, monkeypatch):
    monkeypatch.delitem(sys.modules, "zoo.compare", raising=False)  # a zoo module no task imports
    path = write_ckpt(tmp_path / "m.ckpt", unet, task="zoo.compare.main")
    with pytest.raises(CheckpointError, match="not a zoo task class"):
        zoo.load(path)
    assert "zoo.compare" not in sys.modules


def test_genuine_checkpoints_still_load(tmp_path, unet):
    loaded = zoo.load(write_ckpt(tmp_path / "unet.ckpt", unet))
    assert type(loaded) is UNetSegmentation and loaded.hparams.net["depth"] == 3
    for a, b in zip(loaded.parameters(), unet.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(0)
    tiny = TinyTask(width=5)
    path = write_ckpt(tmp_path / "tiny.ckpt", tiny)
    assert torch.load(path, weights_only=True)["zoo"]["task"] == f"{__name__}.TinyTask"
    loaded = TinyTask.load(path)
    assert type(loaded) is TinyTask and loaded.hparams.width == 5
    torch.testing.assert_close(loaded.layer.weight, tiny.layer.weight, rtol=0, atol=0)
