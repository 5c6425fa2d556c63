"""`zoo.load`: plain-data checkpoints load with weights_only=True; everything else is refused clearly."""
import collections
import dataclasses
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.checkpoint import CheckpointError
from zoo.models.unet import UNetConfig
from zoo.tasks.base import ZooModule
from zoo.tasks.segmentation import UNetSegmentation


class NotAUNet(ZooModule):
    pass


class Payload:  # any class: pickling it makes a checkpoint that carries code
    def __reduce__(self):
        return (print, ("this would have run",))


def write_ckpt(path, model, **extra):
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "zoo": {}, **extra}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = UNetSegmentation(net={"base_channels": 4, "depth": 3, "norm": "batch"})
    m.input_scaler.shift.fill_(3.0)  # as if fitted
    m.input_scaler.scale.fill_(2.0)
    return m


def test_round_trip(tmp_path, model):
    loaded = zoo.load(write_ckpt(tmp_path / "m.ckpt", model))
    assert type(loaded) is UNetSegmentation and not loaded.training
    assert loaded.hparams.net == {**dataclasses.asdict(UNetConfig()), "base_channels": 4, "depth": 3, "norm": "batch"}
    state = loaded.state_dict()
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(state[k], v, rtol=0, atol=0)
        else:  # plain-data extra state, e.g. the scaler's kind
            assert state[k] == v, k
    assert loaded.input_scaler.shift.tolist() == [3.0]


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        zoo.load(tmp_path / "nope.ckpt")


def test_truncated_file(tmp_path, model):
    path = write_ckpt(tmp_path / "m.ckpt", model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        zoo.load(path)


def test_pickled_code_is_refused(tmp_path, model):
    path = write_ckpt(tmp_path / "m.ckpt", model, extra=Payload())
    with pytest.raises(CheckpointError, match="is not plain data") as caught:
        zoo.load(path)
    assert "GLOBAL print" in str(caught.value) and "weights_only" not in str(caught.value)  # no unsafe advice


def test_a_bare_pickle_of_code_is_refused_as_code(tmp_path):
    path = tmp_path / "legacy.ckpt"  # torch's legacy (non-zip) format is a pickle: it still reaches the unpickler
    path.write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(CheckpointError, match="is not plain data.*GLOBAL print"):
        zoo.load(path)


def test_files_that_are_not_checkpoints(tmp_path):
    text, notes, array = tmp_path / "text.ckpt", tmp_path / "notes.ckpt", tmp_path / "array.npy"
    text.write_text("hello\n")  # torch's fallback loader: KeyError
    notes.write_text("some notes\nmore\n")  # IndexError
    np.save(array, np.arange(3))  # not a pickle either (it once read as refused code)
    image = tmp_path / "a.png"
    Image.new("L", (4, 4)).save(image)
    weights = tmp_path / "export" / "model.safetensors"  # inside a `train.py export` folder
    weights.parent.mkdir()
    weights.write_bytes(b"")
    for path, message in ((text, "is not a torch checkpoint"), (notes, "is not a torch checkpoint"),
                          (array, "is not a torch checkpoint"), (image, r"is not a torch checkpoint.*b'\\x89PNG'"),
                          (weights, "zoo.load takes the folder that holds it")):
        with pytest.raises(CheckpointError, match=message) as caught:
            zoo.load(path)
        assert str(path) in str(caught.value) and "weights_only" not in str(caught.value)


def test_foreign_checkpoints(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "plain.pt")  # a bare state dict
    with pytest.raises(CheckpointError, match="not a zoo checkpoint"):
        zoo.load(tmp_path / "plain.pt")
    torch.save(collections.OrderedDict(a=torch.ones(1)), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a zoo checkpoint"):
        zoo.load(tmp_path / "other.pt")
    path = write_ckpt(tmp_path / "m.ckpt", model)
    ckpt = torch.load(path, weights_only=True)
    ckpt["zoo"]["task"] = "os.system"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="not a zoo task"):
        zoo.load(path)


def test_other_model_kind_is_refused(tmp_path, model):
    path = write_ckpt(tmp_path / "m.ckpt", model)
    with pytest.raises(CheckpointError, match="UNetSegmentation model, not a .*NotAUNet"):
        NotAUNet.load(path)
    assert isinstance(UNetSegmentation.load(path), UNetSegmentation)
