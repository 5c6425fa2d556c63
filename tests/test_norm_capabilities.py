"""Norm declarations (zoo.norm.NormSpec): the built-ins' flags against what they compute, a user norm
registered with declarations and trained in every model that accepts it, and the one-line refusals."""
import numpy as np
import pytest
import torch
from torch import nn

from zoo.models import sketch_rnn
from zoo.models.mambavision import MambaVision
from zoo.models.sketch_rnn import BatchNormScan, FusedScan, LSTMLayer, SketchRNN, kl_divergence, reconstruction_loss
from zoo.models.transformer import Transformer, TransformerLM
from zoo.models.unet import UNet
from zoo.norm import (LAYOUTS, NORM_KINDS, LayerNorm, NormSpec, accepted_kinds, build_norm, check_norm, norm_spec,
                      register_norm, unregister_norm)

BUILT_IN = ("batch", "layer", "instance", "group", "rms", "none")
C = 8


class ScaleOnly(nn.Module):
    """A per-row norm: x / std(x over C) * weight, not centered. C is dim 1 for nchw, last otherwise."""

    def __init__(self, num_features: int, layout: str, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.channels_first, self.eps = layout == "nchw", eps

    def forward(self, x):
        dim = 1 if self.channels_first else -1
        w = self.weight.view(-1, *[1] * (x.dim() - 2)) if self.channels_first else self.weight
        return x * torch.rsqrt(x.var(dim, keepdim=True, correction=0) + self.eps) * w


SHAPES = {"nchw": (4, C, 3, 3), "nlc": (4, 5, C), "nc": (4, C)}


def observed_pooling(kind: str, **kw) -> tuple[bool, bool]:
    """What `kind` computes in training, over every layout it declares: (does changing the last
    position (token / pixel) change the earlier positions' outputs, does changing the last sample
    change the other samples' outputs)."""
    positions = batch = False
    for layout in norm_spec(kind).layouts:
        torch.manual_seed(0)
        m = build_norm(kind, C, layout, **kw).double().train()
        x = torch.randn(SHAPES[layout], dtype=torch.float64)
        y = m(x)
        other = x.clone()
        other[-1] = torch.randn_like(x[-1])
        batch |= not torch.allclose(m(other)[:-1], y[:-1])
        if layout != "nc":
            last = (slice(None), slice(None), -1, -1) if layout == "nchw" else (slice(None), -1)
            other = x.clone()
            other[last] = torch.randn_like(x[last])
            rows = (lambda t: t.flatten(2).transpose(1, 2)) if layout == "nchw" else (lambda t: t)  # (N, P, C)
            positions |= not torch.allclose(rows(m(other))[:, :-1], rows(y)[:, :-1])
    return positions, batch


@pytest.fixture(autouse=True)
def restore_registry():
    """Every test may register norms: remove them afterwards, so other tests see the built-ins only."""
    yield
    for kind in set(NORM_KINDS) - set(BUILT_IN):
        unregister_norm(kind)
    assert tuple(NORM_KINDS) == BUILT_IN


def register_scale_only():
    register_norm("scale_only", ScaleOnly, pools_positions=False, pools_batch=False, recurrent=True)


# ---------------------------------------------------------------------------------------------------
# declarations against behaviour

@pytest.mark.parametrize("kind", BUILT_IN)
def test_builtin_declarations_match_what_they_compute(kind):
    spec = norm_spec(kind)
    kw = {"num_groups": 4} if kind == "group" else {}  # groups of 2 channels, so nc has 2 values each
    assert observed_pooling(kind, **kw) == (spec.pools_positions, spec.pools_batch)
    for layout in LAYOUTS:  # exactly the declared layouts build
        if layout in spec.layouts:
            build_norm(kind, C, layout, **kw)
        else:
            with pytest.raises(ValueError, match=f"undefined for layout '{layout}'"):
                build_norm(kind, C, layout, **kw)
    assert spec.recurrent == (kind in ("batch", "layer", "rms", "none"))


def test_user_norm_declarations_are_its_behaviour():
    register_scale_only()
    assert norm_spec("scale_only") == NormSpec(LAYOUTS, pools_positions=False, pools_batch=False, recurrent=True)
    assert observed_pooling("scale_only") == (False, False)


def test_recurrent_declaration_decides_the_sketch_rnn_cells():
    for kind in BUILT_IN:
        if norm_spec(kind).recurrent:
            LSTMLayer(3, 4, kind)(torch.randn(2, 3, 3))
        else:
            with pytest.raises(ValueError, match=f"norm='{kind}' cannot be used in LSTMLayer"):
                LSTMLayer(3, 4, kind)


# ---------------------------------------------------------------------------------------------------
# a registered norm in every model

def train(model: nn.Module, loss_fn, steps: int = 3) -> list[float]:
    """A few Adam steps; returns the losses."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def user_norms_trained(model: nn.Module) -> int:
    """Number of ScaleOnly modules in `model`; asserts each one's weight moved."""
    found = [m for m in model.modules() if isinstance(m, ScaleOnly)]
    assert all(not torch.equal(m.weight, torch.ones_like(m.weight)) for m in found)
    return len(found)


def unet_loss(model):
    x, y = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(2 * 256) % 2
    return nn.functional.cross_entropy(model(x), y.view(2, 16, 16))


def lm_loss(model):
    ids = torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(0))
    return nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def sketch_loss(model):
    strokes = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(0))
    strokes[..., 2:] = nn.functional.one_hot(torch.tensor([0, 1, 0, 1, 0, 2]), 3).float()
    out = model(strokes, torch.tensor([5, 5, 5]))
    l_s, l_p = reconstruction_loss(model.params(out["out"]), strokes[:, 1:])
    return l_s + l_p + kl_divergence(out["mu"], out["presig"])


def mamba_loss(model):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))


MODELS = {
    "UNet": (lambda: UNet(base_channels=4, depth=2, padding="same", norm="scale_only"), unet_loss),
    "TransformerLM": (lambda: TransformerLM(11, d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.0,
                                            norm="scale_only", max_len=16), lm_loss),
    "SketchRNN": (lambda: SketchRNN(enc_rnn_size=6, dec_rnn_size=8, z_size=3, num_mixture=2, norm="scale_only",
                                    max_seq_len=8), sketch_loss),
    "MambaVision": (lambda: MambaVision(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4),
                                        window_size=(8, 8, 4, 2), drop_path_rate=0.0, num_classes=4,
                                        conv_norm="scale_only", token_norm="scale_only"), mamba_loss),
}


@pytest.mark.parametrize("name", MODELS)
def test_registered_per_row_norm_trains_in_every_model(name, monkeypatch):
    register_scale_only()
    if name == "SketchRNN":  # the plain-PyTorch cell: no fused scan (C++ op or its PyTorch form) may run
        fail = lambda *a, **k: pytest.fail("a fused scan ran for a registered norm")  # noqa: E731
        for scan in (FusedScan, BatchNormScan):
            monkeypatch.setattr(scan, "apply", fail)
        monkeypatch.setattr(sketch_rnn, "_lstm_scan", fail)
        monkeypatch.setattr(LSTMLayer, "_batch_scan", fail)
    make, loss_fn = MODELS[name]
    torch.manual_seed(0)
    model = make().train()
    losses = train(model, loss_fn)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert user_norms_trained(model) > 0
    if name == "SketchRNN":
        assert not any(isinstance(m, nn.LSTM) for m in model.modules())
        assert isinstance(model.decoder.cell_norm, ScaleOnly) and len(model.decoder.gate_norms) == 4


def test_plain_pytorch_cell_equals_the_fused_layer_norm_cell():
    """The same layer-norm LSTM through a registered kind (plain-PyTorch cell) and through the
    built-in `layer` (fused scan, C++ on CPU): same outputs and gradients."""
    register_norm("layer_1e3", lambda num_features, layout: build_norm("layer", num_features, layout, eps=1e-3),
               pools_positions=False, pools_batch=False, recurrent=True)
    torch.manual_seed(0)
    fused = LSTMLayer(5, 8, "layer", recurrent_dropout=0.2).double().train()
    plain = LSTMLayer(5, 8, "layer_1e3", recurrent_dropout=0.2).double().train()
    with torch.no_grad():
        for p in (fused.gate_weight, fused.gate_bias, fused.cell_weight, fused.cell_bias):
            p.normal_()
        plain.weight_ih.copy_(fused.weight_ih)
        plain.weight_hh.copy_(fused.weight_hh)
        plain.gate_bias.copy_(fused.gate_bias)  # the norms' own shifts stay 0
        for k, m in enumerate(plain.gate_norms):
            m.weight.copy_(fused.gate_weight[k * 8:(k + 1) * 8])
        plain.cell_norm.weight.copy_(fused.cell_weight)
        plain.cell_norm.bias.copy_(fused.cell_bias)
    keep = (torch.rand(4, 3, 8) > 0.2).double() / 0.8
    results = []
    for layer in (fused, plain):
        layer._keep = lambda T, B, like: keep
        x = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out, (h, c) = layer(x)
        results.append([out, c, *torch.autograd.grad((out * out).sum() + c.sum(), [x, layer.weight_hh])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------
# refusals

def test_position_pooling_user_norm_is_refused_by_the_transformers():
    register_norm("seq_pool", lambda num_features, layout: build_norm("instance", num_features, layout),
               layouts=("nchw", "nlc"), pools_positions=True, pools_batch=False)
    with pytest.raises(ValueError) as e:
        TransformerLM(11, d_model=16, n_heads=2, n_layers=1, d_ff=32, norm="seq_pool")
    assert str(e.value) == ("norm='seq_pool' cannot be used in TransformerLM: its statistics pool over positions, "
                            "a leak of the future (and of padding) into earlier tokens; accepted: batch, layer, "
                            "rms, none")
    with pytest.raises(ValueError, match="norm='seq_pool' cannot be used in Transformer: its statistics pool"):
        Transformer(9, 9, d_model=16, n_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=32,
                    norm="seq_pool")
    UNet(base_channels=4, depth=2, norm="seq_pool")  # a map norm: fine where nothing is causal


def test_undeclared_user_norm_is_refused_where_a_guarantee_is_needed():
    """Declarations default to the safe side: pools positions and batch, not recurrent."""
    register_norm("unknown", ScaleOnly)
    assert norm_spec("unknown") == NormSpec()
    with pytest.raises(ValueError, match="norm='unknown' cannot be used in TransformerLM: its statistics pool "
                                         "over positions"):
        TransformerLM(11, d_model=16, n_heads=2, n_layers=1, d_ff=32, norm="unknown")
    with pytest.raises(ValueError) as e:
        SketchRNN(enc_rnn_size=6, dec_rnn_size=8, z_size=3, num_mixture=2, norm="unknown")
    assert str(e.value) == ("norm='unknown' cannot be used in SketchRNN: it is not declared to run inside a "
                            "recurrent cell (register_norm(..., recurrent=True)); accepted: batch, layer, rms, none")
    UNet(base_channels=4, depth=2, norm="unknown")
    MambaVision(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=(8, 8, 4, 2),
                conv_norm="unknown", token_norm="unknown")


def test_batch_pooling_user_norm_is_refused_by_the_cells():
    register_norm("rows_over_batch", lambda num_features, layout: nn.Identity(), pools_positions=False, recurrent=True)
    with pytest.raises(ValueError, match="norm='rows_over_batch' cannot be used in SketchRNN: its statistics pool "
                                         "over the batch, so padded steps"):
        SketchRNN(enc_rnn_size=6, dec_rnn_size=8, z_size=3, num_mixture=2, norm="rows_over_batch")
    with pytest.raises(ValueError, match="cannot be used in TransformerLM: its statistics pool over the batch"):
        TransformerLM(11, d_model=16, n_heads=2, n_layers=1, d_ff=32, norm="rows_over_batch")


def test_layouts_are_checked_by_the_models_and_build_norm():
    register_norm("maps_only", ScaleOnly, layouts="nchw", pools_positions=False, pools_batch=False)
    assert norm_spec("maps_only").layouts == ("nchw",)
    with pytest.raises(ValueError) as e:
        MambaVision(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=(8, 8, 4, 2),
                    token_norm="maps_only")
    assert str(e.value) == ("token_norm='maps_only' cannot be used in MambaVision: it cannot be built for 'nlc' "
                            "(N, L, C) (it declares layouts nchw); accepted: batch, layer, instance, group, rms, none")
    MambaVision(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=(8, 8, 4, 2),
                conv_norm="maps_only")
    with pytest.raises(ValueError, match="norm='maps_only' cannot be used in TransformerLM: it cannot be built"):
        TransformerLM(11, d_model=16, n_heads=2, n_layers=1, d_ff=32, norm="maps_only")
    with pytest.raises(ValueError, match="'maps_only' declares layouts nchw, not 'nlc'"):
        build_norm("maps_only", C, "nlc")
    assert accepted_kinds(layouts=("nlc",)) == ("batch", "layer", "instance", "group", "rms", "none")
    assert "maps_only" in accepted_kinds(layouts=("nchw",))
    assert accepted_kinds(layouts="nc") == accepted_kinds(layouts=("nc",))  # a str is one layout, as in NormSpec
    for bad in (lambda: check_norm("group", "X", layouts=("nhwc",)), lambda: accepted_kinds(layouts=("nhwc",)),
                lambda: build_norm("batch", C, "nhwc")):
        with pytest.raises(ValueError, match=r"^unknown layout 'nhwc'; valid layouts: 'nchw' \(N, C, H, W\)"):
            bad()


# ---------------------------------------------------------------------------------------------------
# registry mechanics

def test_register_and_unregister():
    before = tuple(NORM_KINDS)
    register_norm("tmp", ScaleOnly, pools_positions=False)
    assert NORM_KINDS[-1] == "tmp" and norm_spec("tmp").pools_batch
    register_norm("tmp", ScaleOnly, pools_positions=False, pools_batch=False, overwrite=True)
    assert not norm_spec("tmp").pools_batch
    unregister_norm("tmp")
    assert tuple(NORM_KINDS) == before
    with pytest.raises(ValueError, match="unknown norm kind 'tmp'"):
        norm_spec("tmp")
    for bad in (lambda: register_norm("layer", ScaleOnly, overwrite=True), lambda: unregister_norm("layer")):
        with pytest.raises(ValueError, match="'layer'.*built.in"):
            bad()
    assert isinstance(build_norm("layer", C), LayerNorm)


def test_factories_and_sizes_are_checked_when_given():
    with pytest.raises(TypeError, match=r"must take \(num_features, layout, \*\*kwargs\), got one with signature \(n\)"):
        register_norm("one_arg", lambda n: nn.Identity())
    assert "one_arg" not in NORM_KINDS
    layer = build_norm("batch", np.int64(8))  # numpy's ints, as torch's own norm layers take them
    assert layer.num_features == 8 and type(layer.num_features) is int
    with pytest.raises(ValueError, match="num_groups=1 and num_features=1 .* use 'rms' or 'batch' for 1 channel$"):
        build_norm("group", 1, "nc")
    for kind in ("rms", "batch"):  # what the message offers works
        build_norm(kind, 1, "nc")(torch.randn(4, 1))


@pytest.mark.parametrize("kw,match", [
    (dict(layouts=()), "non-empty subset"),
    (dict(layouts=("nhwc",)), "non-empty subset"),
    (dict(layouts=("nchw", "nlc"), recurrent=True), "recurrent=True needs layout 'nc'"),
])
def test_bad_declarations(kw, match):
    with pytest.raises(ValueError, match=match):
        register_norm("bad", ScaleOnly, **kw)
    assert "bad" not in NORM_KINDS


def test_declaration_flags_must_be_bools():
    with pytest.raises(TypeError, match="pools_positions must be a bool"):
        NormSpec(pools_positions=None)
