"""ImageClassification with any timm model and any norm: ResNet with every norm kind (the classes
built, a few training steps), timm's own norms with norm=null, other timm families, MambaVision's own
norm arguments, a bit-identical checkpoint round trip through `zoo.load`, and one-line errors for bad
model names, norms, models without norms and model_kwargs through `train.py`."""
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

import zoo
from tests.conftest import ROOT, cli_args
from zoo import norm as zn
from zoo.cli import ZooCLI
from zoo.optim import is_norm_module
from zoo.tasks.classification import ImageClassification

# resnet10t at 1/8 width: 64 px inputs leave a 2 x 2 map at the last stage, enough for instance norm
TINY_RESNET = dict(model_name="resnet10t", model_kwargs=dict(stem_width=8, channels=[8, 16, 16, 16]))
TINY_RESNET_ARGS = ("--model.model_kwargs.stem_width=8", "--model.model_kwargs.channels=[8, 16, 16, 16]",
                    "--model.sample_images=4", "--data.num_train=16", "--data.num_val=8", "--data.batch_size=4")
BUILT = {"batch": {zn.BatchNormNCHW}, "group": {zn.GroupNorm}, "layer": {zn.LayerNorm}, "rms": {zn.RmsNorm},
         "instance": {zn.InstanceNorm}, "none": set()}


def norm_classes(model: nn.Module) -> set[type]:
    """Classes of the leaf norm layers (not wrappers such as zoo's NormAct or timm's NormMlpClassifierHead)."""
    return {type(m) for m in model.modules() if is_norm_module(m) and not any(m.children())}


def train_steps(model: ImageClassification, size: int, steps: int = 3) -> list[float]:
    """`steps` AdamW steps of the task's training_step on one random batch (4, 3, size, size); the losses."""
    model.log = lambda *a, **k: None  # no trainer to log to
    opt = model.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(4, 3, size, size, generator=g) * 255, "label": torch.tensor([0, 1, 2, 3])}
    model.train()
    losses = []
    for i in range(steps):
        loss = model.training_step(batch, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", sorted(BUILT))
def test_resnet_with_every_norm_builds_those_norms_and_trains(kind):
    torch.manual_seed(0)
    model = ImageClassification(num_classes=4, norm=kind, scheduler="none", **TINY_RESNET)
    assert norm_classes(model.net) == BUILT[kind]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, 64)
    assert all(math.isfinite(x) for x in losses), losses
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("net.layer1"))
    if kind != "none":  # the new norms' own affine parameters train too
        assert not torch.equal(model.net.bn1.weight, before["net.bn1.weight"])


def test_norm_null_keeps_timms_batch_norm():
    model = ImageClassification(num_classes=4, **TINY_RESNET)
    assert norm_classes(model.net) == {nn.BatchNorm2d}


@pytest.mark.parametrize("model_name, model_kwargs, kind, size, built", [
    # ViT: channels-last LayerNorm -> batch norm over (N, L) per channel (BatchNormNLC's nn.BatchNorm1d)
    ("test_vit", dict(img_size=32, patch_size=8), "batch", 32, {nn.BatchNorm1d}),
    # ConvNeXt: LayerNorm2d (stem, downsamples, head) and channels-last LayerNorm (blocks) -> rms
    ("test_convnext", {}, "rms", 32, {zn.RmsNorm}),
    # MobileNetV3: timm's BatchNormAct2d -> group norm (in a NormAct that keeps the activation)
    ("mobilenetv3_small_050", {}, "group", 64, {zn.GroupNorm}),
])
def test_other_timm_families(model_name, model_kwargs, kind, size, built):
    torch.manual_seed(0)
    model = ImageClassification(model_name, num_classes=4, norm=kind, model_kwargs=model_kwargs, scheduler="none")
    assert norm_classes(model.net) == built
    losses = train_steps(model, size, steps=2)
    assert all(math.isfinite(x) for x in losses), losses


@pytest.mark.slow
def test_mambavision_keeps_its_own_norm_arguments():
    tiny = dict(dim=8, in_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2], window_size=[8, 8, 2, 1])
    model = ImageClassification("mambavision_t", num_classes=4, conv_norm="group", token_norm="rms",
                                model_kwargs=tiny, scheduler="none")
    assert isinstance(model.net.norm, zn.GroupNorm) and isinstance(model.net.patch_embed.conv_down[1], zn.GroupNorm)
    assert isinstance(model.net.levels[2].blocks[0].norm1, zn.RmsNorm)
    assert all(math.isfinite(x) for x in train_steps(model, 32, steps=2))
    with pytest.raises(ValueError, match="conv_norm and token_norm are MambaVision's arguments, not resnet10t's"):
        ImageClassification(num_classes=4, conv_norm="group", **TINY_RESNET)


def test_checkpoint_round_trip_rebuilds_the_replaced_norms_bit_identically(tmp_path):
    run = tmp_path / "run"
    cli = ZooCLI(args=["fit", *cli_args("resnet", run, *TINY_RESNET_ARGS, "--model.norm=group")])
    ckpt = run / "checkpoints" / "last.ckpt"
    hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hp["model_name"] == "resnet10t" and hp["norm"] == "group"
    assert hp["model_kwargs"] == {"stem_width": 8, "channels": [8, 16, 16, 16]}
    model = zoo.load(ckpt)  # weights_only=True
    assert norm_classes(model.net) == {zn.GroupNorm}
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    cli.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), cli.model(x), rtol=0, atol=0)
        torch.testing.assert_close(model.predict_proba(x), model(x).softmax(-1), rtol=0, atol=0)
    # `test` on the data's test set (the validation images): validate's numbers under test/
    common = [*cli_args("resnet", run, *TINY_RESNET_ARGS, "--model.norm=group"), f"--ckpt_path={ckpt}"]
    tested = ZooCLI(args=["test", *common]).trainer.callback_metrics
    validated = ZooCLI(args=["validate", *common]).trainer.callback_metrics
    assert {k: tested[f"test/{k}"] for k in ("loss", "top1", "top5")} == {
        k: validated[f"val/{k}"] for k in ("loss", "top1", "top5")}


def test_a_forward_failure_names_the_layer_and_what_would_change_it():
    tiny_convnext = dict(dims=[8, 8, 8, 8], depths=[1, 1, 1, 1])
    model = ImageClassification("convnext_atto", num_classes=4, norm="instance", model_kwargs=tiny_convnext).train()
    pooled = (r"\(the output would be constant\)\. It normalizes pooled features, one position per sample at any "
              r"image size: norm='(instance|group)' cannot, a norm with statistics per position or over the batch can "
              r"\(batch, layer, rms, none\)$")  # (not the norm's own advice: a larger feature map cannot help)
    with pytest.raises(ValueError, match=r"convnext_atto on 96 x 96 images, at head.norm: instance norm: .*" + pooled):
        model(torch.rand(2, 3, 96, 96))  # timm's ConvNeXt normalizes after the pooling
    rexnet = ImageClassification("rexnet_100", num_classes=4, norm="group", model_kwargs={"width_mult": 0.5}).train()
    with pytest.raises(ValueError, match=r"at features.3.se.bn: group norm: .*" + pooled):
        rexnet(torch.rand(2, 3, 32, 32))  # a squeeze-excitation block's norm, inside the network
    with pytest.raises(ValueError, match=r"expected a batch of raw images \(B, C, H, W\), got shape \(3, 32, 32\)"):
        model(torch.rand(3, 32, 32))
    small = ImageClassification(num_classes=4, norm="group", **TINY_RESNET).train()
    with pytest.raises(ValueError, match=r"resnet10t on 8 x 8 images, at layer2.0.bn1: group norm: .*; "
                                         r"--data.image_size sets the images' size$"):
        small(torch.rand(2, 3, 8, 8))
    short = ImageClassification("resnet10t", num_classes=4, model_kwargs={"channels": [16, 32]})
    with pytest.raises(ValueError, match=r"resnet10t on 32 x 32 images: AttributeError: .*'layer3' "
                                         r"\(model_kwargs \{'channels': \[16, 32\]\}\)"):
        short(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"timm could not build resnet10t\(num_classes=4, in_chans=3, "
                                         r"channels='notalist'\): TypeError: "):
        ImageClassification("resnet10t", num_classes=4, model_kwargs={"channels": "notalist"})


def test_norm_skip_leaves_the_named_classes_as_they_are():
    """ConvNeXt-V2's GlobalResponseNorm is no registry kind: refused, naming norm_skip, and kept with it."""
    v2 = dict(model_name="convnextv2_atto", num_classes=4, model_kwargs=dict(dims=[8, 8, 8, 8], depths=[1, 1, 1, 1]))
    with pytest.raises(ValueError, match="cannot convert GlobalResponseNorm at stages.0.blocks.0.mlp.grn.*; "
                                         r"norm_skip \(class names\) leaves such modules as they are"):
        ImageClassification(norm="layer", **v2)
    model = ImageClassification(norm="rms", norm_skip=["GlobalResponseNorm"], scheduler="none", **v2)
    grn = [m for m in model.net.modules() if type(m).__name__ == "GlobalResponseNorm"]
    assert len(grn) == 4 and norm_classes(model.net) - set(map(type, grn)) == {zn.RmsNorm}
    assert all(math.isfinite(x) for x in train_steps(model, 32, steps=2))
    one = ImageClassification(norm="rms", norm_skip="GlobalResponseNorm", scheduler="none", **v2)  # a str is one name
    assert sum(type(m).__name__ == "GlobalResponseNorm" for m in one.net.modules()) == 4
    # a name that matches nothing, or one with nothing to convert, would leave the user's intent undone unsaid
    with pytest.raises(ValueError, match=r"norm_skip: no module of the model is a 'GlobalResponseNrom' \(its "
                                         r"normalization layers: GlobalResponseNorm, LayerNorm2d\)"):
        ImageClassification(norm="rms", norm_skip=["GlobalResponseNorm", "GlobalResponseNrom"], **v2)
    with pytest.raises(ValueError, match=r"^norm_skip=\['GlobalResponseNorm'\] is read only when norm converts the "
                                         r"network's norms \(replace_norms\), and norm is None$"):
        ImageClassification(norm_skip=["GlobalResponseNorm"], **v2)
    with pytest.raises(ValueError, match=r"^grad_checkpointing=True: inception_v3 does not support it \(gradient "
                                         r"checkpointing not supported\)$"):
        ImageClassification("inception_v3", num_classes=4, grad_checkpointing=True)


ERRORS = {
    "unknown model": (["--model.model_name=resnet10"],
                      "error: model_name 'resnet10' is not a registered timm model; closest names: resnet10t, "),
    "upper case": (["--model.model_name=RESNET10T"], "error: model_name 'RESNET10T' is not a registered timm model; "
                                                     "closest names: resnet10t, "),
    "unknown norm": (["--model.norm=None"], "error: norm='None' is not a norm kind; valid kinds: batch, layer, "
                                            "instance, group, rms, none (or null: the network's own norms)"),
    "nothing to replace": (["--model.model_name=test_nfnet", "--model.model_kwargs=null", "--model.norm=group"],
                           "error: norm='group' for test_nfnet: model has no normalization layers to replace ("),
    "rejected kwargs": (["--model.model_kwargs.foo=1", "--model.model_kwargs.bar=2"],
                        "error: model_kwargs ['foo', 'bar'] are not arguments of resnet10t (timm class ResNet); "
                        "it takes: block, layers, num_classes, "),
    # the config's model_kwargs (a narrow ResNet's) stay with another model_name
    "another model": (["--model.model_name=vit_tiny_patch16_224", "--model.model_kwargs.img_size=32"],
                      "error: model_kwargs ['stem_width', 'channels'] are not arguments of vit_tiny_patch16_224 "
                      "(timm class VisionTransformer); it takes: "),
}


@pytest.mark.slow
def test_bad_input_is_one_error_line(tmp_path):
    # `train.py fit` once per ERRORS case, all at once (each is mostly imports)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen(
        [sys.executable, "train.py", "fit", *cli_args("resnet", tmp_path / f"run{i}", *extra)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i, (name, (extra, _)) in enumerate(ERRORS.items())}
    for name, proc in procs.items():
        output = proc.communicate()[0]
        lines = [line for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and lines[-1] == errors[0], f"{name}: {output}"
        assert errors[0].startswith(ERRORS[name][1]) and "Traceback" not in output, f"{name}: {errors[0]}"
        if name in ("rejected kwargs", "another model"):
            assert errors[0].endswith("; model_kwargs null drops all that the config set"), errors[0]


def test_hub_and_folder_model_names_are_refused_saying_what_to_give():
    # timm would read their config from the Hub or the folder each time the task is rebuilt (zoo.load)
    for name in ("hf-hub:timm/resnet10t.c3_in1k", "local-dir:/tmp/export"):
        with pytest.raises(ValueError, match=f"^model_name '{name}': give a timm architecture name; for published "
                                             r"weights add their tag and pretrained=True \(e.g. model_name"):
            ImageClassification(model_name=name, num_classes=5)


def test_create_model_with_a_norm_is_timms_network_after_the_surgery():
    # zoo.models.create_model, the task's builder and the Python API: the same network as building it
    # with timm and calling replace_norms by hand (same seed, same weights, same outputs)
    from zoo.models import create_model
    kwargs = dict(TINY_RESNET["model_kwargs"], num_classes=3)
    torch.manual_seed(0)
    ours = create_model("resnet10t", norm="group", **kwargs)
    torch.manual_seed(0)
    reference = timm.create_model("resnet10t", **kwargs)
    zn.replace_norms(reference, "group")
    assert norm_classes(ours) == {zn.GroupNorm}
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)
    mamba = create_model("mambavision_t", norm="rms", dim=8, in_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2],
                         window_size=[8, 8, 2, 1])  # MambaVision takes it as its own conv_norm and token_norm
    assert norm_classes(mamba) == {zn.RmsNorm}
    with pytest.raises(ValueError, match="^norm='rms' sets both conv_norm and token_norm, and conv_norm='group' is given"):
        create_model("mambavision_t", norm="rms", conv_norm="group")


def test_images_the_network_cannot_take_are_one_error_naming_the_size_settings():
    # timm's fixed-size models assert the input size; zoo's instance norm refuses a 1 x 1 map
    vit = ImageClassification("test_vit", num_classes=4,
                              model_kwargs=dict(img_size=32, patch_size=8, dynamic_img_size=False))
    with pytest.raises(ValueError, match=r"^test_vit on 16 x 16 images, at patch_embed: Input height \(16\) doesn't match model \(32\); "
                                         r"--data.image_size sets the images' size, --model.model_kwargs.img_size "
                                         r"the model's$"):
        vit(torch.rand(2, 3, 16, 16))
    resnet = ImageClassification(num_classes=4, norm="instance", **TINY_RESNET)
    with pytest.raises(ValueError, match=r"^resnet10t on 16 x 16 images, at layer3.0.bn1: instance norm: input of "
                                         r"shape \(2, 16, 1, 1\) "
                                         r".*; --data.image_size sets the images' size$"):
        resnet(torch.rand(2, 3, 16, 16))
    # replace_norms' hint about `skip` is a note (Python users see it); through the task, norm_skip
    with pytest.raises(ValueError, match="cannot convert EvoNorm2dS0") as e:
        zn.replace_norms(timm.create_model("test_efficientnet_evos"), "group")
    assert e.value.__notes__ == ["pass skip=(class or class name, ...) to leave such modules as they are"]
    with pytest.raises(ValueError, match=r"; norm_skip \(class names\) leaves such modules as they are; norm=null "
                                         "keeps its own norms$") as e:
        ImageClassification("test_efficientnet_evos", num_classes=4, norm="group")
    assert not getattr(e.value, "__notes__", None)
