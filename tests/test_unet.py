"""zoo.models.unet: the paper's numbers, size arithmetic, blocks and norms, init, timm registration,
overlap-tile inference. Tiny nets everywhere except the paper-size checks."""
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from zoo.models.unet import (DoubleConv, InputSizes, UNet, check_input_size, default_tile, input_size_for_output,
                             mirror_pad, output_size, seam_error, tiled_predict, valid_input_sizes,
                             whole_image_predict)

PAPER_PARAMS = 31_030_658


def tiny(**kw):
    torch.manual_seed(0)
    return UNet(**{"base_channels": 4, "depth": 3, **kw}).eval()


# ------------------------------------------------------------------------------------------- paper

def test_paper_parameter_count_and_layers():
    with torch.device("meta"):
        net = UNet()
    assert sum(p.numel() for p in net.parameters()) == PAPER_PARAMS
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 23
    assert net.input_context == 92 and net.stride == 16
    assert [m.out_channels for m in net.modules() if isinstance(m, DoubleConv)] == \
        [64, 128, 256, 512, 1024, 512, 256, 128, 64]


def test_paper_572_gives_388():
    torch.manual_seed(0)
    net = UNet().eval()  # the full paper network: ~4 s on 2 CPU cores
    with torch.no_grad():
        assert net(torch.randn(1, 1, 572, 572)).shape == (1, 2, 388, 388)


def test_paper_sizes():
    sizes = valid_input_sizes()
    assert sizes == InputSizes(first=188, step=16, context=92)
    assert str(sizes) == "188 + 16k (k >= 0); output = input - 184"
    assert sizes.up_to(240) == [188, 204, 220, 236]
    assert output_size(572) == 388 and output_size((572, 188)) == (388, 4)
    assert input_size_for_output(388) == 572 and input_size_for_output(389) == 588
    assert input_size_for_output(1) == 188 and input_size_for_output((1, 388)) == (188, 572)
    assert UNet(base_channels=1).output_size(572) == 388


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_size_rule_matches_the_network(depth):
    """Every size the rule calls legal runs with the predicted output; every other size is refused."""
    net = UNet(base_channels=1, depth=depth).eval()
    sizes = net.valid_input_sizes()
    assert sizes.step == 2 ** (depth - 1) and sizes.context == 6 * sizes.step - 4
    w = sizes.first
    with torch.no_grad():
        for h in range(max(1, sizes.first - sizes.step - 1), sizes.first + 2 * sizes.step + 1):
            x = torch.randn(1, 1, h, w)
            if h in sizes:
                assert net(x).shape[-2:] == (h - 2 * sizes.context, w - 2 * sizes.context)
            else:
                with pytest.raises(ValueError, match=f"input height {h} is not legal"):
                    net(x)
    assert sizes.output(sizes.first) >= 1 and sizes.output(sizes.first - sizes.step) < 1


def test_smallest_legal_input_is_the_smallest_the_layers_take(monkeypatch):
    monkeypatch.setattr(UNet, "check_input", lambda self, x: None)  # let torch's layers decide
    for depth in (2, 3, 4):
        net = UNet(base_channels=1, depth=depth).eval()
        first, step = net.sizes.first, net.sizes.step
        with torch.no_grad():
            assert net(torch.randn(1, 1, first, first)).shape[-1] == first - 2 * net.input_context
            with pytest.raises(RuntimeError):
                net(torch.randn(1, 1, first - step, first - step))


def test_size_errors_name_the_nearest_legal_sizes():
    with pytest.raises(ValueError, match=r"input size 570 .*188 \+ 16k.*556 \(output 372\) or 572 \(output 388\)"):
        check_input_size(570)
    with pytest.raises(ValueError, match=r"100 .*none below; 188 \(output 4\) above"):
        output_size(100)
    with pytest.raises(ValueError, match=r"input width 200 .*188 \(output 4\) or 204 \(output 20\)"):
        output_size((572, 200))
    with pytest.raises(ValueError, match=r"100 .*multiple of 16.*96 \(output 96\) or 112"):
        check_input_size(100, padding="same")
    with pytest.raises(ValueError, match=r"16 .*at least 32"):
        check_input_size(16, padding="same", padding_mode="reflect")
    assert check_input_size(16, padding="same") == 16


def test_forward_refuses_bad_shapes():
    net = tiny()  # depth 3: legal 44 + 4k
    with pytest.raises(ValueError, match=r"input height 46 is not legal.*44 \(output 4\) or 48 \(output 8\)"):
        net(torch.randn(1, 1, 46, 44))
    with pytest.raises(ValueError, match=r"input width 45"):
        net(torch.randn(1, 1, 44, 45))
    with pytest.raises(ValueError, match=r"\(N, in_channels=1, H, W\), got shape \(2, 3, 44, 44\)"):
        net(torch.randn(2, 3, 44, 44))
    with pytest.raises(ValueError, match=r"got shape \(1, 44, 44\)"):
        net(torch.randn(1, 44, 44))
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny(padding="same")(torch.randn(1, 1, 30, 32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(padding="full"), "padding 'full' is not one of 'valid', 'same'"),
    (dict(padding_mode="circular"), "padding_mode 'circular'"),
    (dict(depth=0), "depth must be"),
    (dict(norm="bogus"), "unknown norm kind 'bogus'"),
    (dict(dropout=1.0), "dropout must be"),
    (dict(base_channels=0), "base_channels must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


# ------------------------------------------------------------------------------- blocks, norms, init

@pytest.mark.parametrize("norm", ["none", "batch", "layer", "instance", "group", "rms"])
def test_norm_threading(norm):
    depth = 3
    net = tiny(norm=norm, depth=depth)
    blocks = [m for m in net.modules() if isinstance(m, DoubleConv)]
    assert len(blocks) == 2 * depth - 1  # depth encoder levels + depth-1 decoder levels
    norms = [b.norm1 for b in blocks] + [b.norm2 for b in blocks]
    assert len(norms) == 2 * (2 * depth - 1)
    if norm == "none":
        assert all(isinstance(n, nn.Identity) for n in norms)
    else:
        assert not any(isinstance(n, nn.Identity) for n in norms)
    # a conv followed by a norm with its own shift has no bias; rms (no shift) and none keep it
    keeps_bias = norm in ("none", "rms")
    assert all((b.conv1.bias is not None) == keeps_bias and (b.conv2.bias is not None) == keeps_bias
               for b in blocks)
    x = torch.randn(2, 1, 48, 52)
    net.train()
    out = net(x)
    assert out.shape == (2, 2, 8, 12)
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_he_init():
    torch.manual_seed(0)
    net = UNet(base_channels=64, depth=2)
    conv = net.encoder[1].conv.conv2  # 128 -> 128, 3x3: 147,456 weights, N = 9 * 128
    assert abs(conv.weight.std().item() / math.sqrt(2 / (9 * 128)) - 1) < 0.01
    up = net.decoder[0].up  # ConvTranspose2d 128 -> 64, 2x2 stride 2: N = 128 inputs per output pixel
    assert abs(up.weight.std().item() / math.sqrt(2 / 128) - 1) < 0.02
    assert abs(net.head.weight.std().item() / math.sqrt(2 / 64) - 1) < 0.3  # only 128 weights
    assert UNet.fan_in(up) == 128 and UNet.fan_in(conv) == 9 * 128
    biases = [m.bias for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert all(b is not None and b.abs().sum() == 0 for b in biases)


def test_features_head_split_and_dropout():
    net = tiny()
    x = torch.randn(2, 1, 52, 48)
    feats = net.forward_features(x)
    assert feats.shape == (2, 4, 12, 8) and net.num_features == 4
    assert torch.equal(net.forward_head(feats), net(x))
    assert net.forward_head(feats, pre_logits=True) is feats
    net.reset_classifier(5)
    assert net(x).shape == (2, 5, 12, 8) and net.get_classifier() is net.head
    assert net.dropout.p == 0.0  # default: deterministic
    drop = tiny(dropout=0.5)
    assert drop.dropout.p == 0.5
    assert torch.equal(drop(x), drop(x))  # eval: no dropout
    drop.train()
    assert not torch.equal(drop(x), drop(x))


def test_same_padding_shapes():
    for mode in ("zeros", "reflect"):
        net = tiny(padding="same", padding_mode=mode)
        assert net.input_context == 0 and net.stride == 4
        assert net(torch.randn(1, 1, 8, 12)).shape == (1, 2, 8, 12)
    assert tiny(padding="same")(torch.randn(1, 1, 4, 4)).shape == (1, 2, 4, 4)


def test_timm_registry():
    net = timm.create_model("unet", base_channels=4, depth=3)
    assert isinstance(net, UNet) and net.padding == "valid" and net.norm == "none" and net.depth == 3
    assert timm.create_model("unet", in_chans=3, num_classes=4, base_channels=2).in_channels == 3
    same = timm.create_model("unet_same", base_channels=2, depth=2)
    assert same.padding == "same" and same.norm == "batch"
    assert "unet" in timm.list_models("unet*")
    with pytest.raises(ValueError, match="no pretrained U-Net weights"):
        timm.create_model("unet", pretrained=True)


# ---------------------------------------------------------------------------------- overlap-tile

def test_mirror_pad():
    x = torch.arange(5 * 7, dtype=torch.float32).view(1, 1, 5, 7)
    assert torch.equal(mirror_pad(x, 4, 3, 6, 2), F.pad(x, (6, 2, 4, 3), mode="reflect"))
    big = mirror_pad(x, 11, 17, 13, 20)  # pads >= the size: mirrored again and again
    expected = np.pad(x[0, 0].numpy(), ((11, 17), (13, 20)), mode="reflect")
    assert np.array_equal(big[0, 0].numpy(), expected)
    assert torch.equal(mirror_pad(torch.ones(1, 2, 1, 1), 3, 3, 2, 2), torch.ones(1, 2, 7, 5))


def _with_eval_batch_stats(net):
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net


SIZES = [(37, 53), (200, 131), (20, 9), (3, 2), (1, 1)]  # odd sizes; sizes smaller than the context (20)


@pytest.mark.parametrize("norm", ["none", "batch", "layer", "rms"])
def test_tiled_equals_whole_image_pass(norm):
    net = _with_eval_batch_stats(tiny(norm=norm))
    for h, w in SIZES:
        x = torch.randn(2, 1, h, w)
        tiled = tiled_predict(net, x, tile=16, batch_size=3)
        assert tiled.shape == (2, 2, h, w) and tiled.dtype == torch.float32
        assert torch.allclose(tiled.sum(1), torch.ones(2, h, w))
        # the reference, spelled out: mirror-pad by the context (and up to a legal size), one pass, crop
        hp, wp = net.input_size_for_output((h, w))
        c = net.input_context
        with torch.no_grad():
            ref = net(mirror_pad(x, c, hp - h - c, c, wp - w - c)).softmax(1)[..., :h, :w]
        assert torch.allclose(whole_image_predict(net, x), ref)
        assert torch.allclose(tiled, ref, atol=1e-5), (h, w)
        assert seam_error(net, x, tile=16) < 1e-5
    assert not net.training


@pytest.mark.parametrize("norm, mode", [("instance", "eval"), ("group", "eval"), ("batch", "train")])
def test_spatial_statistics_norms_have_seams(norm, mode):
    net = tiny(norm=norm).train(mode == "train")
    x = torch.randn(1, 1, 60, 50)
    assert seam_error(net, x, tile=16) > 1e-3
    assert net.training == (mode == "train")  # the mode is left as it was
    if mode == "eval":
        assert seam_error(net, x, tile=64) < 1e-5  # one tile is the whole pass


class ScaledUNet(nn.Module):
    """Like the Lightning task: forward scales its input, and it exposes the attributes tiled_predict reads."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.input_context, self.stride, self.padding = net.input_context, net.stride, net.padding

    def forward(self, x):
        return self.net((x - 3.0) / 2.0)


def test_tiled_predict_takes_a_wrapping_module():
    net = tiny(norm="layer")
    wrapped = ScaledUNet(net)
    x = torch.randn(1, 1, 70, 45) * 2 + 3
    assert torch.allclose(tiled_predict(wrapped, x, 16), whole_image_predict(wrapped, x), atol=1e-5)
    assert torch.allclose(tiled_predict(wrapped, x, 16), tiled_predict(net, (x - 3) / 2, 16), atol=1e-6)
    with pytest.raises(TypeError, match="must expose `input_context`"):
        tiled_predict(nn.Conv2d(1, 2, 3), x)


def test_segmentation_task_takes_any_raw_batch():
    """The task itself goes to tiled_predict / seam_error (its forward scales); float64 images (numpy's
    default) give float32's result; an empty batch gives an empty result; an empty image is refused."""
    from zoo.tasks.segmentation import UNetSegmentation

    torch.manual_seed(0)
    task = UNetSegmentation(net={"base_channels": 4, "depth": 3, "norm": "layer"}).eval()
    x = torch.randn(2, 1, 37, 53) * 2 + 3
    task.input_scaler.fit(x)
    assert seam_error(task, x, 16) == seam_error(task.net, task.input_scaler(x), 16) < 1e-5
    torch.testing.assert_close(task.predict_proba(x.double()), task.predict_proba(x))
    assert task.predict_proba(x[:0]).shape == (0, 2, 37, 53)
    with pytest.raises(ValueError, match=r"with H, W >= 1, got shape \(1, 1, 0, 53\)"):
        tiled_predict(task, x[:1, :, :0])


class PaperStub(nn.Module):
    """No compute: the paper net's geometry (context 92, stride 16), counting tiles."""
    input_context, stride, padding = 92, 16, "valid"

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(tuple(x.shape))
        return torch.zeros(x.shape[0], 2, x.shape[2] - 184, x.shape[3] - 184)


def test_tile_layout_paper_geometry():
    assert default_tile(PaperStub()) == 388 and default_tile(UNet(base_channels=1, depth=4)) == 388
    stub = PaperStub()
    out = tiled_predict(stub, torch.zeros(1, 1, 2048, 1000), batch_size=8)
    assert out.shape == (1, 2, 2048, 1000)
    # 2048 rows: starts 0, 384, ..., 1536 and the last at 1664 (>= 2048 - 388, on the 16-px grid): 6 tiles;
    # 1000 columns: 0, 384, 624: 3 tiles
    assert sum(b for b, *_ in stub.inputs) == 18 and {s[2:] for s in stub.inputs} == {(572, 572)}
    stub.inputs.clear()
    tiled_predict(stub, torch.zeros(2, 1, 100, 30))  # smaller than a tile: one tile of the smallest legal size
    assert stub.inputs == [(2, 1, 100 + 184, 36 + 184)]  # 100 is legal, 30 -> 36
    stub.inputs.clear()
    tiled_predict(stub, torch.zeros(1, 1, 300, 300), tile=64)  # 64 is not legal: rounded down to 52
    assert {s[2:] for s in stub.inputs} == {(236, 236)}


def test_same_padding_tiles():
    net = tiny(padding="same", padding_mode="reflect", depth=3)
    x = torch.randn(1, 1, 130, 101)
    tiled = tiled_predict(net, x, tile=24)
    assert tiled.shape == (1, 2, 130, 101)
    whole = whole_image_predict(net, x)
    r = net.receptive_radius + 1  # away from the image border, tiles see exactly what the whole pass sees
    assert torch.allclose(tiled[..., r:-r, r:-r], whole[..., r:-r, r:-r], atol=1e-5)
    assert tiled_predict(net, torch.randn(2, 1, 5, 3)).shape == (2, 2, 5, 3)
