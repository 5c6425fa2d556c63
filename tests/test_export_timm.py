"""`train.py export` of an image classifier is also timm's layout: `timm.create_model("hf-hub:ORG/NAME"
or "local-dir:DIR", pretrained=True)` builds the network of the checkpoint with its weights, bit for bit
like `zoo.load`'s (a plain timm ResNet, and MambaVision with its own non-default norm arguments);
its config.json carries timm's keys, the fitted input scaler as timm's mean / std and the class
names; a network whose norms zoo replaced after creation is exported zoo-only, and timm refuses it."""
import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import zoo
from tests import test_export
from tests.conftest import assert_same_weights, cli_args
from tests.test_classification_timm import TINY_RESNET, TINY_RESNET_ARGS
from tests.test_mambavision_task import tiny_args as tiny_mambavision_args
from zoo import export
from zoo.checkpoint import CheckpointError
from zoo.tasks.classification import ImageClassification

hub, folder_files = test_export.hub, test_export.folder_files  # the local Hugging Face Hub stand-in fixture
# tiny runs of 2 steps: timm's ResNet with its own BatchNorm, MambaVision with its own norm arguments
# set to non-default kinds, and the ResNet with its norms replaced by zoo's group norm (zoo-only)
RUNS = {
    "resnet": lambda root: cli_args("resnet", root, *TINY_RESNET_ARGS, "--model.norm=null"),
    "mambavision": lambda root: tiny_mambavision_args(root, "--model.conv_norm=group", "--model.token_norm=rms"),
    "surgery": lambda root: cli_args("resnet", root, *TINY_RESNET_ARGS, "--model.norm=group"),
}


trained = test_export.trained_runs(RUNS)


def logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(x)


@pytest.mark.parametrize("name", ["resnet", "mambavision"])
def test_timm_loads_the_network_bit_for_bit(name, trained, hub, tmp_path):
    ckpt = trained(name)
    out = export.export(ckpt, tmp_path / "out")
    original, loaded = zoo.load(ckpt), zoo.load(out)
    assert_same_weights(original, loaded)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "task.safetensors"]
    # one copy of each tensor: the network's under its own names (timm's), the task's others beside them
    assert load_file(out / "model.safetensors").keys() == original.net.state_dict().keys()
    assert load_file(out / "task.safetensors").keys() == {"input_scaler.shift", "input_scaler.scale"}

    config = json.loads((out / "config.json").read_text())
    h = original.hparams
    assert config["timm_compatible"] is True and config["weights_prefix"] == "net."
    assert config["architecture"] == h.model_name and config["num_classes"] == h.num_classes
    assert config["label_names"] == original.class_names != [str(k) for k in range(h.num_classes)]
    own = {"conv_norm": "group", "token_norm": "rms"} if name == "mambavision" else {}  # MambaVision's own args
    assert config["model_args"] == {"num_classes": h.num_classes, "in_chans": 3, **h.model_kwargs, **own}
    if name == "mambavision":
        assert config["norm"] == {"norm": None, "norm_skip": None, "conv_norm": "group", "token_norm": "rms"}
    scaler = original.input_scaler
    size = config["data"]["init_args"]["image_size"]
    assert config["pretrained_cfg"]["input_size"] == [3, size, size]
    assert config["pretrained_cfg"]["mean"] == [v / 255 for v in scaler.shift.tolist()]
    assert config["pretrained_cfg"]["std"] == [v / 255 for v in scaler.scale.tolist()]
    card = (out / "README.md").read_text()
    assert "library_name: timm" in card and 'timm.create_model("hf-hub:ORG/NAME", pretrained=True)' in card
    # a norm left at null is the network's own, not the registry's `none`
    title = "conv_norm=group, token_norm=rms" if name == "mambavision" else "its own norms"
    assert f"# ImageClassification ({title})\n" in card and "- norm: norm=null (the network's own)" in card
    assert ("token_norm" in card) == (name == "mambavision")  # (null MambaVision-only arguments are not settings)

    hub.publish("org/classifier", folder_files(out))
    from_hub = timm.create_model("hf-hub:org/classifier", pretrained=True)
    from_dir = timm.create_model(f"local-dir:{out}", pretrained=True)
    x = original.input_scaler(torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255)
    want = logits(original.net, x)
    assert torch.equal(logits(loaded.net, x), want)
    for net in (from_hub, from_dir):
        assert type(net) is type(original.net)
        assert_same_weights(original.net, net)
        assert torch.equal(logits(net, x), want), name
        assert net.pretrained_cfg["label_names"] == original.class_names
    assert_same_weights(zoo.load("hf-hub:org/classifier"), original)  # zoo reads the hub copy whole too

    # timm's evaluation transform of an image (no resize or crop for the synthetic data's size; [0, 1],
    # then its mean / std) is zoo's scaling of the [0, 255] image, up to float rounding
    cfg = timm.data.resolve_data_config({}, model=from_hub)
    assert cfg["input_size"] == (3, size, size) and cfg["crop_pct"] == 1.0
    image = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    timm_input = timm.data.create_transform(**cfg)(Image.fromarray(image.numpy()))
    torch.testing.assert_close(timm_input, scaler(image.permute(2, 0, 1).float()[None])[0], rtol=1e-5, atol=1e-5)


def test_replaced_norms_are_exported_zoo_only(trained, hub, tmp_path):
    ckpt = trained("surgery")
    out = export.export(ckpt, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["timm_compatible"] is False and config["weights_prefix"] == ""
    assert config["timm_reason"].startswith("norm='group' replaced the network's norm layers after timm built it")
    assert not {"architecture", "model_args", "pretrained_cfg", "label_names"} & config.keys()
    assert f"Not loadable with timm: {config['timm_reason']}." in (out / "README.md").read_text()
    assert_same_weights(zoo.load(out), zoo.load(ckpt))
    assert "net.conv1.0.weight" in load_file(out / "model.safetensors")  # the task's names, as before

    hub.publish("org/zoo-only", folder_files(out))
    for spec in ("hf-hub:org/zoo-only", f"local-dir:{out}"):
        with pytest.raises(KeyError, match="architecture"):  # timm refuses it rather than building another net
            timm.create_model(spec, pretrained=True)


def test_a_network_timm_builds_otherwise_is_zoo_only():
    """The rebuild check: a network changed after creation by anything but `norm` is not timm's either."""
    model = ImageClassification(num_classes=4, **TINY_RESNET)
    model.net.act1 = nn.GELU()
    tensors, _, _ = export._split_state(model.state_dict())
    config = export._timm_config(model, tensors, {})
    assert config == {"timm_compatible": False, "timm_reason": (
        "timm.create_model('resnet10t', **model_args) builds another network (module 'act1': "
        "torch.nn.modules.activation.GELU here, torch.nn.modules.activation.ReLU there); only zoo.load rebuilds it")}


@pytest.mark.parametrize("how, message", [
    ("no task weights", r"task.safetensors' is missing$"),
    ("missing network tensor", r"config.json describes: model.safetensors lacks conv1.0.weight$"),
    ("prefixed network tensor", (r"model.safetensors lacks conv1.0.weight; model.safetensors has unexpected "
                                 r"net.conv1.0.weight$")),
    ("missing scaler tensor", r"config.json describes: task.safetensors lacks input_scaler.shift$"),
])
def test_bad_timm_layout_folders_name_the_file(trained, tmp_path, how, message):
    out = export.export(trained("resnet"), tmp_path / "out")
    net_file, task_file = out / "model.safetensors", out / "task.safetensors"
    net, task = load_file(net_file), load_file(task_file)
    if how == "no task weights":
        task_file.unlink()
    elif how == "missing scaler tensor":
        save_file({k: v for k, v in task.items() if k != "input_scaler.shift"}, task_file)
    else:
        tensor = net.pop("conv1.0.weight")
        if how == "prefixed network tensor":  # the task's name where timm's is expected
            net["net.conv1.0.weight"] = tensor
        save_file(net, net_file)
    with pytest.raises(CheckpointError, match=message):
        zoo.load(out)


def test_folders_written_before_weights_prefix_still_load(trained, tmp_path):
    ckpt = trained("surgery")
    out = export.export(ckpt, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    del config["weights_prefix"], config["timm_compatible"], config["timm_reason"]
    (out / "config.json").write_text(json.dumps(config))
    assert_same_weights(zoo.load(out), zoo.load(ckpt))
