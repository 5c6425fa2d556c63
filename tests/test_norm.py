"""zoo.norm against slow, obvious references (plain mean / var over the right dims) in float64."""
import warnings

import pytest
import torch
from torch import nn

from zoo import norm
from zoo.norm import NORM_KINDS, build_norm, default_num_groups, register_norm

C = 6
# test shape per case; "ncdhw" is built with layout "nchw" (which takes any (N, C, *spatial), 2+ spatial dims)
SHAPES = {"nchw": (3, C, 5, 4), "ncdhw": (2, C, 3, 4, 2), "nlc": (3, 7, C), "nc": (5, C)}
BUILD_LAYOUT = {"nchw": "nchw", "ncdhw": "nchw", "nlc": "nlc", "nc": "nc"}


# ---------------------------------------------------------------------------------------------------
# references

def channel_dim(layout):
    return 2 if layout == "nlc" else 1


def per_channel(v, x, layout):
    """(C,) -> broadcastable against x along the layout's channel dim."""
    shape = [1] * x.dim()
    shape[channel_dim(layout)] = -1
    return v.reshape(shape)


def normalize(x, dims, eps, center=True):
    """Biased statistics over dims; returns (y, mean, biased var)."""
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps), mean, var


def affine(y, x, layout, weight, bias):
    if weight is not None:
        y = y * per_channel(weight, x, layout)
    if bias is not None:
        y = y + per_channel(bias, x, layout)
    return y


def ref_layer(x, layout, weight, bias, eps):
    return affine(normalize(x, (channel_dim(layout),), eps)[0], x, layout, weight, bias)


def ref_rms(x, layout, weight, eps):
    rms = torch.sqrt((x ** 2).mean(channel_dim(layout), keepdim=True) + eps)
    return affine(x / rms, x, layout, weight, None)


def ref_instance(x, layout, weight, bias, eps):
    spatial = tuple(d for d in range(1, x.dim()) if d != channel_dim(layout))
    return affine(normalize(x, spatial, eps)[0], x, layout, weight, bias)


def ref_group(x, layout, weight, bias, eps, groups):
    n = x.shape[0]
    if layout == "nlc":  # (N, L, G, C/G): statistics over L and C/G
        xg = x.reshape(n, x.shape[1], groups, -1)
        dims = (1, 3)
    else:  # (N, G, C/G, *spatial): statistics over C/G and spatial
        xg = x.reshape(n, groups, -1, *x.shape[2:])
        dims = tuple(range(2, xg.dim()))
    y = normalize(xg, dims, eps)[0].reshape(x.shape)
    return affine(y, x, layout, weight, bias)


def fresh_state():
    """Running statistics of a new batch norm, for ref_batch."""
    return {"running_mean": torch.zeros(C, dtype=torch.float64), "num_batches": 0,
            "running_var": torch.ones(C, dtype=torch.float64)}


def ref_batch(x, layout, weight, bias, eps, state, training, momentum):
    """state: dict of running_mean, running_var, num_batches (updated in place in training)."""
    dims = tuple(d for d in range(x.dim()) if d != channel_dim(layout))
    if training:
        y, mean, var = normalize(x, dims, eps)
        count = x.numel() // x.shape[channel_dim(layout)]
        state["num_batches"] += 1
        f = 1.0 / state["num_batches"] if momentum is None else momentum
        state["running_mean"] = (1 - f) * state["running_mean"] + f * mean.detach().flatten()
        unbiased = var.detach().flatten() * count / (count - 1)  # torch tracks the unbiased variance
        state["running_var"] = (1 - f) * state["running_var"] + f * unbiased
    else:
        mean = per_channel(state["running_mean"], x, layout)
        var = per_channel(state["running_var"], x, layout)
        y = (x - mean) / torch.sqrt(var + eps)
    return affine(y, x, layout, weight, bias)


def randomize(module):
    """Random affine parameters, so a transform along the wrong dim cannot pass."""
    torch.manual_seed(1)
    for name, p in module.named_parameters():
        with torch.no_grad():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p))
    return module


def rand_input(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # per-position offsets and scales, so statistics over the wrong dims give wrong answers
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    scale = torch.rand(shape[1:], generator=g, dtype=torch.float64) * 3 + 0.5
    return x * scale + torch.randn(shape[1:], generator=g, dtype=torch.float64)


def check_against(module, ref, x):
    """Output and the gradients of input and parameters agree with the reference."""
    module.zero_grad(set_to_none=True)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y = module(x1)
    params = {k.split(".")[-1]: v for k, v in module.named_parameters()}  # "bn.weight" -> "weight"
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    y_ref = ref(x2, ref_params)
    torch.testing.assert_close(y, y_ref)
    assert y.shape == x.shape
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert x1.grad.abs().sum() > 0
    for k in params:
        torch.testing.assert_close(params[k].grad, ref_params[k].grad, msg=k)


# ---------------------------------------------------------------------------------------------------
# semantics

CASES = [(k, s) for k in ("layer", "instance", "group", "rms") for s in SHAPES
         if not (k == "instance" and s == "nc")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind,shape", CASES)
def test_matches_reference(kind, shape, training):
    layout = BUILD_LAYOUT[shape]
    ref_layout = "nlc" if shape == "nlc" else "nchw"
    kw = {"num_groups": 3} if kind == "group" else {}
    m = randomize(build_norm(kind, C, layout, **kw).double()).train(training)
    if kind == "rms":
        ref = lambda x, p: ref_rms(x, ref_layout, p["weight"], 1e-6)
    elif kind == "layer":
        ref = lambda x, p: ref_layer(x, ref_layout, p["weight"], p["bias"], 1e-5)
    elif kind == "instance":
        ref = lambda x, p: ref_instance(x, ref_layout, p["weight"], p["bias"], 1e-5)
    else:
        ref = lambda x, p: ref_group(x, ref_layout, p["weight"], p["bias"], 1e-5, 3)
    check_against(m, ref, rand_input(SHAPES[shape]))


@pytest.mark.parametrize("momentum", [0.3, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("shape", SHAPES)
def test_batch_matches_reference(shape, momentum):
    layout = BUILD_LAYOUT[shape]
    ref_layout = "nlc" if shape == "nlc" else "nchw"
    m = randomize(build_norm("batch", C, layout, momentum=momentum).double())
    bn = m.bn if shape == "nlc" else m
    state = fresh_state()
    for step, training in enumerate([True, True, True, False]):
        m.train(training)
        ref = lambda x, p: ref_batch(x, ref_layout, p["weight"], p["bias"], 1e-5, state, training, momentum)
        check_against(m, ref, rand_input(SHAPES[shape], seed=step))
        torch.testing.assert_close(bn.running_mean, state["running_mean"])
        torch.testing.assert_close(bn.running_var, state["running_var"])
        assert bn.num_batches_tracked.item() == state["num_batches"]
    assert state["num_batches"] == 3


def test_batch_without_running_stats_uses_batch_statistics_in_eval():
    m = randomize(build_norm("batch", C, track_running_stats=False).double()).eval()
    assert m.running_mean is None
    check_against(m, lambda x, p: ref_batch(x, "nchw", p["weight"], p["bias"], 1e-5, fresh_state(), True, 0.1),
                  rand_input(SHAPES["nchw"]))


@pytest.mark.parametrize("shape", ["nchw", "nlc"])
def test_instance_running_stats(shape):
    layout = BUILD_LAYOUT[shape]
    m = randomize(build_norm("instance", C, layout, track_running_stats=True, momentum=0.25).double())
    x = rand_input(SHAPES[shape])
    spatial = (1,) if shape == "nlc" else (2, 3)
    n = x.shape[1] if shape == "nlc" else x.shape[2] * x.shape[3]
    m.train()(x)
    # torch's instance norm: running stats follow the batch average of per-instance (unbiased) stats
    _, mean, var = normalize(x, spatial, 0)
    exp_mean = 0.25 * mean.mean(0).flatten()
    exp_var = 0.75 * 1 + 0.25 * (var * n / (n - 1)).mean(0).flatten()
    torch.testing.assert_close(m.running_mean, exp_mean)
    torch.testing.assert_close(m.running_var, exp_var)
    m.eval()
    x2 = rand_input(SHAPES[shape], seed=3)
    y = (x2 - per_channel(exp_mean, x2, layout)) / torch.sqrt(per_channel(exp_var, x2, layout) + 1e-5)
    torch.testing.assert_close(m(x2), affine(y, x2, layout, m.weight, m.bias))


@pytest.mark.parametrize("kind,kwarg", [("batch", "affine"), ("instance", "affine"), ("group", "affine"),
                                        ("layer", "elementwise_affine"), ("layer", "affine"),
                                        ("rms", "elementwise_affine"), ("rms", "affine")])
def test_affine_off(kind, kwarg):
    m = build_norm(kind, C, **{kwarg: False}).double()
    assert list(m.parameters()) == []
    x = rand_input(SHAPES["nchw"])
    ref = {"batch": lambda: ref_batch(x, "nchw", None, None, 1e-5, fresh_state(), True, 0.1),
           "instance": lambda: ref_instance(x, "nchw", None, None, 1e-5),
           "group": lambda: ref_group(x, "nchw", None, None, 1e-5, default_num_groups(C)),
           "layer": lambda: ref_layer(x, "nchw", None, None, 1e-5),
           "rms": lambda: ref_rms(x, "nchw", None, 1e-6)}[kind]
    torch.testing.assert_close(m(x), ref())


@pytest.mark.parametrize("layout", ["nchw", "nlc", "nc"])
def test_none_is_identity(layout):
    m = build_norm("none", C, layout)
    x = torch.randn(SHAPES[layout])
    assert isinstance(m, nn.Identity) and m(x) is x


def test_defaults():
    inst = build_norm("instance", C)
    assert inst.affine and not inst.track_running_stats and inst.eps == 1e-5
    assert build_norm("rms", C).eps == 1e-6 and build_norm("rms", C, "nlc").eps == 1e-6
    assert build_norm("layer", C).eps == 1e-5
    bn = build_norm("batch", C)
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (1e-5, 0.1, True, True)
    assert build_norm("group", C, dtype=torch.float64).weight.dtype == torch.float64
    assert build_norm("layer", C, "nlc", bias=False).bias is None


@pytest.mark.parametrize("channels,groups", [(64, 32), (48, 24), (7, 7), (96, 32), (40, 20), (33, 11), (1, 1),
                                             (256, 32)])
def test_group_count_capping(channels, groups):
    assert default_num_groups(channels) == groups
    assert build_norm("group", channels).num_groups == groups
    assert build_norm("group", channels, num_groups=1).num_groups == 1


# ---------------------------------------------------------------------------------------------------
# checkpoints, SyncBatchNorm, compile

@pytest.mark.parametrize("layout,torch_cls", [("nchw", nn.BatchNorm2d), ("nc", nn.BatchNorm1d)])
def test_batch_state_dict_is_torchs(layout, torch_cls):
    ours = build_norm("batch", C, layout)
    theirs = randomize(torch_cls(C))
    theirs.running_mean.normal_()
    theirs.running_var.uniform_(0.5, 2)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn((4, C, 3, 3) if layout == "nchw" else (4, C))
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


@pytest.mark.parametrize("layout", ["nchw", "nlc", "nc"])
def test_sync_batchnorm_conversion(layout):
    # L == C for nlc, so a conversion that dropped the transpose would run and silently disagree
    shape = {"nchw": (4, C, 3, 3), "nlc": (4, C, C), "nc": (4, C)}[layout]
    model = nn.Sequential(nn.Identity(), randomize(build_norm("batch", C, layout)))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 1 and all(type(m) is nn.SyncBatchNorm for m in bns)
    original = nn.Sequential(nn.Identity(), randomize(build_norm("batch", C, layout)))
    assert list(converted.state_dict()) == list(original.state_dict())
    x = torch.randn(shape)
    for training in (True, False):  # no process group: SyncBatchNorm falls back to F.batch_norm
        torch.testing.assert_close(converted.train(training)(x), original.train(training)(x))


@pytest.mark.parametrize("kind", ["batch", "layer", "instance", "group", "rms", "none"])
def test_compile_fullgraph_and_script(kind):
    for layout in ("nchw", "nlc"):
        m = build_norm(kind, C, layout, **({"num_groups": 3} if kind == "group" else {}))
        x = torch.randn(SHAPES[layout])
        expected = m(x)
        torch.testing.assert_close(torch.compile(m, backend="eager", fullgraph=True)(x), expected)
        with warnings.catch_warnings():  # torch.jit is deprecated but still used for export
            warnings.simplefilter("ignore", FutureWarning)
            torch.testing.assert_close(torch.jit.script(m)(x), expected)


# ---------------------------------------------------------------------------------------------------
# registry

@pytest.fixture
def registry(monkeypatch):
    """A scratch copy of the registry, restored after the test."""
    monkeypatch.setattr(norm, "_FACTORIES", dict(norm._FACTORIES))
    monkeypatch.setattr(norm, "_SPECS", dict(norm._SPECS))


class Scale(nn.Module):
    def __init__(self, num_features, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_register_norm(registry):
    def scaled(num_features, layout, *, factor=2.0):
        return Scale(num_features, factor)

    kinds_before = norm.norm_kinds()
    assert "scaled" not in NORM_KINDS
    assert register_norm("scaled", scaled) is scaled
    # NORM_KINDS was imported before registering and still sees it
    assert "scaled" in NORM_KINDS and "scaled" in norm.NORM_KINDS
    assert tuple(NORM_KINDS) == norm.norm_kinds() == kinds_before + ("scaled",)
    assert NORM_KINDS == kinds_before + ("scaled",) and len(NORM_KINDS) == len(kinds_before) + 1
    assert NORM_KINDS[-1] == "scaled" and "scaled" in ", ".join(NORM_KINDS)
    m = build_norm("scaled", 4, "nlc", factor=3.0)
    torch.testing.assert_close(m(torch.ones(2, 3, 4)), torch.full((2, 3, 4), 3.0))
    with pytest.raises(TypeError, match=r"'bogus'.*'scaled'.*factor"):
        build_norm("scaled", 4, bogus=1)
    with pytest.raises(ValueError, match=r"'scaled' is already registered.*overwrite=True"):
        register_norm("scaled", scaled)
    with pytest.raises(ValueError, match=r"'batch' is already registered"):
        register_norm("batch", scaled)
    register_norm("scaled", lambda num_features, layout: Scale(num_features, 5.0), overwrite=True)
    assert build_norm("scaled", 4).factor == 5.0


def test_register_norm_decorator_and_var_kwargs(registry):
    seen = {}

    @register_norm("anything")
    def anything(num_features, layout, **kwargs):
        seen.update(kwargs, num_features=num_features, layout=layout)
        return nn.Identity()

    assert callable(anything) and "anything" in NORM_KINDS
    build_norm("anything", 5, "nc", foo=1)
    assert seen == {"foo": 1, "num_features": 5, "layout": "nc"}
    register_norm("broken", lambda num_features, layout: "not a module")
    with pytest.raises(TypeError, match="'broken'.*str"):
        build_norm("broken", 5)


# ---------------------------------------------------------------------------------------------------
# errors: each names the bad value and what is accepted

def test_unknown_kind():
    with pytest.raises(ValueError, match="'batchnorm'") as e:
        build_norm("batchnorm", C)
    assert all(k in str(e.value) for k in ("batch", "layer", "instance", "group", "rms", "none"))


def test_unknown_layout():
    with pytest.raises(ValueError, match="'nhwc'") as e:
        build_norm("batch", C, "nhwc")
    assert all(f"'{k}'" in str(e.value) for k in ("nchw", "nlc", "nc"))


@pytest.mark.parametrize("bad", [5, 0, 7.0, 100])
def test_num_groups_not_dividing(bad):
    with pytest.raises(ValueError, match=rf"num_groups={bad!r} does not divide num_features=48; "
                                         r"valid num_groups: 1, 2, 3, 4, 6, 8, 12, 16, 24, 48$"):
        build_norm("group", 48, num_groups=bad)


def test_group_one_value_per_group():
    with pytest.raises(ValueError, match=r"num_groups=8 .* 1 value.*one of 1, 2, 4, or"):
        build_norm("group", 8, "nc")  # default 8 groups of 8 channels
    build_norm("group", 8, "nc", num_groups=4)
    m = build_norm("group", 4, num_groups=4)
    m(torch.randn(2, 4, 2, 1))
    with pytest.raises(ValueError, match=r"\(2, 4, 1, 1\) gives 1 value per group.*variance.*num_groups"):
        m(torch.randn(2, 4, 1, 1))


RANK_CASES = [("nchw", (2, C, 5), r"\(N, C, H, W\)"), ("nchw", (2, C), r"\(N, C, H, W\)"),
              ("nlc", (2, 3, 4, C), r"\(N, L, C\)"), ("nc", (2, C, 3), r"\(N, C\)")]


@pytest.mark.parametrize("kind,layout,bad_shape,expected", [
    (k, *case) for k in ("batch", "layer", "instance", "group", "rms") for case in RANK_CASES
    if not (k == "instance" and case[0] == "nc")])
def test_wrong_rank(kind, layout, bad_shape, expected):
    m = build_norm(kind, C, layout, **({"num_groups": 3} if kind == "group" else {}))
    shape = ", ".join(map(str, bad_shape))
    with pytest.raises(ValueError, match=rf"{kind} norm \(layout '{layout}'\): expected input of shape "
                                         rf"{expected}.*got {len(bad_shape)}-D input of shape \({shape}\)"):
        m(torch.randn(bad_shape))


@pytest.mark.parametrize("kind,layout,bad_shape,dim", [
    (k, *case) for k in ("batch", "layer", "instance", "group", "rms")
    for case in [("nchw", (2, 4, 5, 5), 1), ("nlc", (2, 5, 4), 2), ("nc", (3, 4), 1)]
    if not (k == "instance" and case[0] == "nc")])
def test_channel_mismatch(kind, layout, bad_shape, dim):
    m = build_norm(kind, C, layout, **({"num_groups": 3} if kind == "group" else {}))
    shape = ", ".join(map(str, bad_shape))
    with pytest.raises(ValueError, match=rf"expected {C} channels at dim {dim}, got 4 in input of shape "
                                         rf"\({shape}\)"):
        m(torch.randn(bad_shape))


@pytest.mark.parametrize("layout,shape", [("nc", (1, C)), ("nchw", (1, C, 1, 1)), ("nlc", (1, 1, C))])
def test_batch_single_value_per_channel(layout, shape):
    m = build_norm("batch", C, layout)
    msg = r"1 value per channel.*variance of one value is undefined.*'group' or 'layer'"
    with pytest.raises(ValueError, match=msg):
        m.train()(torch.randn(shape))
    m.eval()(torch.randn(shape))  # eval uses running statistics: fine
    m = build_norm("batch", C, layout, track_running_stats=False).eval()
    with pytest.raises(ValueError, match=msg):  # no running statistics: batch statistics even in eval
        m(torch.randn(shape))
    m.train()(torch.randn((2,) + shape[1:]))


@pytest.mark.parametrize("layout,shape", [("nchw", (4, C, 1, 1)), ("nlc", (4, 1, C))])
def test_instance_single_value(layout, shape):
    with pytest.raises(ValueError, match=r"1 value per sample and channel.*variance.*'group' or 'layer'"):
        build_norm("instance", C, layout).eval()(torch.randn(shape))


def test_instance_nc_refused():
    with pytest.raises(ValueError, match=r"instance norm is undefined for layout 'nc'.*'layer', 'group', 'rms' or "
                                         r"'batch' normalize vectors$"):
        build_norm("instance", C, "nc")


def test_layer_single_channel_refused():
    with pytest.raises(ValueError, match=r"num_features=1.*'rms'"):
        build_norm("layer", 1)


@pytest.mark.parametrize("kind,kwarg,accepted", [
    ("layer", "momentum", "eps, elementwise_affine, affine, bias"),
    ("group", "momentum", "num_groups, eps, affine"),
    ("batch", "num_groups", "eps, momentum, affine, track_running_stats"),
    ("rms", "bias", "eps, elementwise_affine"),
    ("instance", "num_groups", "eps, momentum, affine, track_running_stats"),
    ("none", "eps", "no keyword arguments")])
def test_unexpected_kwarg(kind, kwarg, accepted):
    with pytest.raises(TypeError, match=rf"unexpected keyword argument '{kwarg}' for norm kind '{kind}'; "
                                        rf"'{kind}' accepts: {accepted}"):
        build_norm(kind, C, **{kwarg: 1})


def test_conflicting_affine_aliases():
    with pytest.raises(TypeError, match="elementwise_affine=True and affine=False"):
        build_norm("rms", C, elementwise_affine=True, affine=False)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_bad_num_features(bad):
    with pytest.raises(ValueError, match=rf"num_features must be a positive int, got {bad!r}"):
        build_norm("group", bad)
