"""zoo.norm.replace_norms on tiny timm models of several families and on zoo's MambaVision: every
kind keeps shapes and trains, rows match an independent count, same-kind conversion is exact,
timm's norm+act layers keep their activation, and what cannot be converted is refused by name."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, RmsNorm, RmsNorm2d
from torch import nn

from zoo.models.mambavision import MambaVision
from zoo.norm import (BatchNormNLC, ChannelsLastNorm, build_norm, default_num_groups,
                      replace_norms)

KINDS = ("batch", "layer", "instance", "group", "rms", "none")
# every class a norm of these models can be (timm's *Act, LayerNorm2d, zoo's classes subclass these)
NORM_CLASSES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
                nn.GroupNorm, nn.RMSNorm, RmsNorm, RmsNorm2d, BatchNormNLC)


def mambavision():
    return MambaVision(dim=16, in_dim=8, depths=(1, 2, 3, 2), num_heads=(1, 2, 2, 4), window_size=(8, 8, 4, 2),
                       num_classes=5)


# name -> (constructor, input size). timm's test_* variants are the tiny members of each family.
MODELS = {
    "resnet": (lambda: timm.create_model("test_resnet", pretrained=False, num_classes=5), 64),  # BatchNorm2d
    "efficientnet": (lambda: timm.create_model("test_efficientnet", pretrained=False, num_classes=5), 64),
    "efficientnet_gn": (lambda: timm.create_model("test_efficientnet_gn", pretrained=False, num_classes=5), 64),
    # LayerNorm on (N, H, W, C) in the blocks, LayerNorm2d in the stem, downsamples and head
    "convnext": (lambda: timm.create_model("test_convnext", pretrained=False, num_classes=5), 32),
    "vit": (lambda: timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=32, patch_size=8), 32),
    "vit_rms": (lambda: timm.create_model("test_vit4", pretrained=False, num_classes=5, img_size=32), 32),
    "mambavision": (mambavision, 64),  # zoo.norm's BatchNormNCHW and nlc LayerNorm
}
# documented limits, not bugs: these heads normalize pooled features (N, C, 1, 1) / (N, 1, C), one
# value per sample and channel, which instance norm refuses at the first forward
CANNOT = {("convnext", "instance"), ("vit_rms", "instance")}


def build(name):
    torch.manual_seed(0)
    make, size = MODELS[name]
    return make(), torch.randn(2, 3, size, size)


def norms_of(model):
    return [(n, type(m)) for n, m in model.named_modules() if isinstance(m, NORM_CLASSES)]


def registry_types(kind):
    """Classes of the modules (and their children) build_norm makes for `kind` in any layout."""
    types = set()
    for layout in ("nchw", "nlc", "nc"):
        try:
            types |= {type(m) for m in build_norm(kind, 8, layout).modules()}
        except ValueError:  # instance on nc
            pass
    return types


def randomize(model):
    """Non-trivial affine and running stats, so that a conversion that drops them shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORM_CLASSES):
                for name in ("weight", "bias", "running_mean"):
                    t = getattr(m, name, None)
                    if t is not None:
                        t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (name == "weight"))
                if getattr(m, "running_var", None) is not None:
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# ---------------------------------------------------------------------------------------------------
# (a) shapes, (b) rows, (d) training, for every model and kind

@pytest.mark.parametrize("name, kind", [(n, k) for n in MODELS for k in KINDS if (n, k) not in CANNOT])
def test_every_kind_converts_and_trains(name, kind):
    model, x = build(name)
    before = norms_of(model)
    assert before, name

    rows = replace_norms(model, kind)

    assert [r[0] for r in rows] == [n for n, _ in before]  # each norm exactly once, in module order
    assert [r[1] for r in rows] == [t.__name__ for _, t in before]
    assert all(r[2] == type(model.get_submodule(r[0])).__name__ for r in rows)
    left = {type(m) for m in model.modules()} & {t for _, t in before}
    assert not left - registry_types(kind), f"old norm classes remain: {left}"

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.tensor([1, 3])
    model.train()
    for _ in range(3):
        out = model(x)
        assert out.shape == (2, 5)
        loss = F.cross_entropy(out, target)
        assert math.isfinite(loss.item()), (name, kind, loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, params[n])]
    assert changed
    if kind != "none":  # the new norms' own parameters train too
        assert any(n.startswith(tuple(r[0] + "." for r in rows)) for n in changed)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)


@pytest.mark.parametrize("name, kind", sorted(CANNOT))
def test_instance_norm_of_pooled_features_refused(name, kind):
    model, x = build(name)
    replace_norms(model, kind)
    with pytest.raises(ValueError, match="1 value per sample and channel"):
        model(x)


# ---------------------------------------------------------------------------------------------------
# (c) the same kind: identical outputs

@pytest.mark.parametrize("name, kind, skip", [
    ("resnet", "batch", ()), ("efficientnet", "batch", ()), ("efficientnet_gn", "group", ()),
    ("convnext", "layer", ()), ("vit", "layer", ()), ("vit_rms", "rms", ()),
    # MambaVision mixes batch (conv) and layer (token) norms: convert one kind, skip the other
    ("mambavision", "batch", (nn.LayerNorm,)), ("mambavision", "layer", (nn.modules.batchnorm._BatchNorm,)),
])
def test_same_kind_gives_identical_outputs(name, kind, skip):
    model, x = build(name)
    randomize(model)
    model.eval()
    with torch.no_grad():
        ref_eval = model(x)
        ref_train = model.train()(x)  # batch statistics; updates the running stats
    model, _ = build(name)
    randomize(model)
    model.eval()
    assert replace_norms(model, kind, skip=skip)
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_eval, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.train()(x), ref_train, rtol=0, atol=1e-6)


def test_batch_to_batch_is_bitwise_and_copies_buffers():
    model, x = build("resnet")
    randomize(model)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    bn = model.get_submodule("conv1.1")
    replace_norms(model, "batch")
    new = model.get_submodule("conv1.1")
    assert type(new).__name__ == "BatchNormNCHW"
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(new, k), getattr(bn, k), rtol=0, atol=0)
    assert (new.eps, new.momentum) == (bn.eps, bn.momentum)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# (e) norm + act layers; channels-last layer norms

def test_batchnormact_keeps_activation_and_drop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, eps=1e-3, act_layer=nn.SiLU, drop_layer=nn.Dropout),
                          BatchNormAct2d(8, apply_act=False))
    randomize(model)
    act, drop = model[1].act, model[1].drop
    rows = replace_norms(model, "group")
    assert rows == [("1", "BatchNormAct2d", "NormAct"), ("2", "BatchNormAct2d", "GroupNorm")]  # no act: bare
    new = model[1]
    assert new.act is act and new.drop is drop
    assert new.norm.eps == 1e-3 and new.norm.num_groups == default_num_groups(8)
    assert sorted(new.state_dict()) == ["norm.bias", "norm.weight"]
    new.eval()  # dropout off
    x = torch.randn(2, 8, 5, 5)
    expected = F.silu(F.group_norm(x, default_num_groups(8), new.norm.weight, new.norm.bias, 1e-3))
    torch.testing.assert_close(new(x), expected, rtol=0, atol=1e-6)
    assert (new(x) < 0).any()  # SiLU, not ReLU: the kept act is the one that runs


def test_norm_none_keeps_an_inplace_activation_off_the_blocks_input():
    # a pre-activation block: out = conv(act(norm(x))) + x. With norm none the norm returns x itself, and
    # timm's in-place ReLU would overwrite the shortcut
    layer = BatchNormAct2d(8, act_layer=nn.ReLU)
    assert layer.act.inplace
    model = nn.Sequential(layer)
    replace_norms(model, "none")
    x = torch.randn(2, 8, 3, 3)
    before = x.clone()
    y = model(x)
    assert torch.equal(x, before) and torch.equal(y, F.relu(before))
    assert layer.act.inplace  # the replaced layer's own activation is left as it was


def test_channels_last_layer_norm_on_any_rank():
    ln = nn.LayerNorm(6)
    model = nn.Sequential(ln)
    replace_norms(model, "batch")
    new = model[0]
    assert isinstance(new, ChannelsLastNorm) and sorted(new.state_dict())[0].startswith("norm.")
    bn = nn.BatchNorm2d(6)
    x = torch.randn(3, 4, 5, 6)  # (N, H, W, C)
    torch.testing.assert_close(new(x), bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))  # stats over N, H, W
    v = torch.randn(5, 6)  # (N, C): the nc batch norm
    torch.testing.assert_close(new(v), nn.BatchNorm1d(6)(v))
    assert new(torch.randn(2, 7, 6)).shape == (2, 7, 6)
    with pytest.raises(ValueError, match=r"\(N, \*, C\)"):
        new(torch.randn(6))


def test_carries_eps_affine_dtype_mode_and_converts_again():
    model = nn.Sequential(nn.LayerNorm(8, eps=1e-3, elementwise_affine=False), nn.BatchNorm2d(4),
                          nn.InstanceNorm2d(4)).double().eval()
    rows = replace_norms(model, "rms")
    assert [r[2] for r in rows] == ["ChannelsLastNorm", "RmsNorm", "RmsNorm"]
    assert model[0].norm.eps == 1e-3 and model[0].norm.weight is None  # eps and affine=False carried
    assert model[1].eps == 1e-5 and model[1].weight.dtype == torch.float64
    assert model[2].weight is None  # torch's InstanceNorm2d default affine=False is kept
    assert not any(m.training for m in model.modules())
    rows = replace_norms(model, "group", affine=True)  # converts zoo's own modules, wrappers included
    assert [r[0] for r in rows] == ["0.norm", "1", "2"]
    assert model[0].norm.weight is not None and model[0].norm.weight.dtype == torch.float64


def test_copies_weight_across_kinds_and_stats_within():
    model = nn.Sequential(nn.BatchNorm2d(4))
    randomize(model)
    w, b = model[0].weight.clone(), model[0].bias.clone()
    replace_norms(model, "group", num_groups=2)
    torch.testing.assert_close(model[0].weight, w, rtol=0, atol=0)
    torch.testing.assert_close(model[0].bias, b, rtol=0, atol=0)
    model = nn.Sequential(nn.LayerNorm(4))
    randomize(model)
    w = model[0].weight.clone()
    replace_norms(model, "rms")  # rms has no bias: the weight only
    torch.testing.assert_close(model[0].norm.weight, w, rtol=0, atol=0)


def test_identity_skipped_shared_norm_swapped_everywhere():
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(bn, nn.Identity(), nn.Sequential(bn))
    rows = replace_norms(model, "layer")
    assert rows == [("0", "BatchNorm2d", "LayerNorm")]
    assert model[0] is model[2][0] and isinstance(model[1], nn.Identity)


# ---------------------------------------------------------------------------------------------------
# (f) refusals; nothing is changed when one is raised

class PixelNorm(nn.Module):
    def forward(self, x):
        return x / x.pow(2).mean(1, keepdim=True).add(1e-8).sqrt()


class MyLayerNorm(nn.LayerNorm):
    def forward(self, x):  # channels first: not what nn.LayerNorm's class says
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def test_nothing_to_replace():
    with pytest.raises(ValueError, match=r"model has no normalization layers to replace \(replace_norms converts "
                                         r"\d+ torch, timm and zoo classes of the batch, instance, group, layer, rms "
                                         r"and simple families, e.g. BatchNorm2d") as e:
        replace_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Identity()), "group")
    assert len(str(e.value)) < 250  # one readable line, not every class name
    for skipinit in (False, True):  # NormFreeBlock: a container, not a norm (with skipinit, its own gain too)
        nfnet = timm.create_model("test_nfnet", pretrained=False, skipinit=skipinit)
        with pytest.raises(ValueError, match="^model has no normalization layers"):
            replace_norms(nfnet, "group")
    resnet = timm.create_model("resnet10t", pretrained=False)
    for skip in ("BatchNorm2d", nn.BatchNorm2d):
        with pytest.raises(ValueError, match=r"^nothing left to replace: skip leaves out every normalization layer of "
                                             r"the model \(14 modules skipped\)$"):
            replace_norms(resnet, "group", skip=skip)


def test_a_skip_entry_that_matches_no_module_is_refused():
    model = nn.Sequential(nn.BatchNorm2d(4), PixelNorm())
    with pytest.raises(ValueError, match=r"^skip: no module of the model is a 'BatchNorm2D', 'LayerNorm' \(its "
                                         r"normalization layers: BatchNorm2d, PixelNorm\); give classes or class names"):
        replace_norms(model, "group", skip=("PixelNorm", "BatchNorm2D", nn.LayerNorm))
    with pytest.raises(TypeError, match=r"^skip: give classes or class names, got \(3,\)"):
        replace_norms(model, "group", skip=3)
    assert type(model[0]) is nn.BatchNorm2d


@pytest.mark.parametrize("module, message", [
    (PixelNorm(), "PixelNorm at 1: replace_norms does not know"),
    (MyLayerNorm(4), "MyLayerNorm at 1: it subclasses LayerNorm with its own forward"),
    (nn.LayerNorm((4, 4)), r"over its last 2 dims \(normalized_shape=\(4, 4\)\)"),
    (nn.SyncBatchNorm(4), "SyncBatchNorm at 1: it takes any rank"),
    (nn.InstanceNorm1d(4), r"\(N, C, L\)"),
    (nn.LazyBatchNorm2d(), "lazy and not initialized"),
])
def test_refuses_by_name_and_reason_changing_nothing(module, message):
    model = nn.Sequential(nn.BatchNorm2d(4), module)
    with pytest.raises(ValueError, match=message):
        replace_norms(model, "group")
    assert type(model[0]) is nn.BatchNorm2d  # atomic: not half converted


def test_unknown_timm_norm_and_skip():
    model = timm.create_model("test_efficientnet_evos", pretrained=False)
    with pytest.raises(ValueError, match=r"(?s)EvoNorm2dS0 at bn1, blocks\.0\.0\.bn1, .* more\): .*skip="):
        replace_norms(model, "batch")
    model = nn.Sequential(nn.BatchNorm2d(4), PixelNorm())
    assert replace_norms(model, "group", skip=("PixelNorm",)) == [("0", "BatchNorm2d", "GroupNorm")]
    model = nn.Sequential(nn.BatchNorm2d(4), nn.LayerNorm(4))
    assert [r[0] for r in replace_norms(model, "group", skip=nn.LayerNorm)] == ["0"]
    assert type(model[1]) is nn.LayerNorm


def test_batchnorm1d_is_nc_and_says_so_on_other_ranks():
    model = nn.Sequential(nn.BatchNorm1d(4))
    replace_norms(model, "layer")
    assert model[0].layout == "nc" and model(torch.randn(3, 4)).shape == (3, 4)
    with pytest.raises(ValueError, match=r"layer norm \(layout 'nc'\): expected input of shape \(N, C\)"):
        model(torch.randn(3, 4, 5))  # a BatchNorm1d used on (N, C, L): the registry's shape check


def test_bad_kind_kwargs_and_model_itself():
    model = nn.Sequential(nn.BatchNorm2d(6))
    with pytest.raises(ValueError, match="unknown norm kind 'batchnorm'; valid kinds: batch, layer"):
        replace_norms(model, "batchnorm")
    with pytest.raises(TypeError, match="0 \\(BatchNorm2d\\): build_norm: unexpected keyword argument 'groups'"):
        replace_norms(model, "group", groups=2)
    with pytest.raises(ValueError, match="0 \\(BatchNorm2d\\): group norm: num_groups=4 does not divide"):
        replace_norms(model, "group", num_groups=4)
    assert type(model[0]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="the model is itself a normalization layer"):
        replace_norms(nn.BatchNorm2d(4), "group")
