"""MambaVision network: parameter counts of the official variants, equality with the official NVlabs
model (skipped without the `mambavision` package), timm conventions, norms, loader, ONNX."""
import re
import sys
import types
import warnings

import pytest
import timm
import torch

import zoo.models.mambavision as mv
from zoo.models import ssm
from zoo.models.mambavision import MambaVision, attention_blocks, load_official_checkpoint, window_partition, window_reverse

# Parameter counts of the paper / issue (millions, one decimal as printed).
PAPER_PARAMS = {"mambavision_t": 31.8, "mambavision_t2": 35.1, "mambavision_s": 50.1, "mambavision_b": 97.7,
                "mambavision_l": 227.9, "mambavision_l2": 241.5, "mambavision_l3": 739.6,
                "mambavision_l2_512": 241.5, "mambavision_l3_512": 739.6}  # the 512 px weights' windows
TINY = dict(dim=16, in_dim=8, depths=(1, 2, 3, 2), num_heads=(1, 2, 2, 4), window_size=(8, 8, 4, 2),
            drop_path_rate=0.0)


def tiny(**kw) -> MambaVision:
    torch.manual_seed(0)
    return MambaVision(**{**TINY, "num_classes": 10, **kw}).eval()


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS))
def test_parameter_counts_match_paper(variant):
    with torch.device("meta"):
        model = timm.create_model(variant)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - PAPER_PARAMS[variant]) < 0.1, (variant, count)


def test_attention_block_placement_is_the_official_rule():
    assert list(attention_blocks(8)) == [4, 5, 6, 7]
    assert list(attention_blocks(3)) == [2]       # odd depth: the smaller half attends
    assert list(attention_blocks(5)) == [3, 4]
    assert list(attention_blocks(1)) == []
    model = tiny()
    kinds = [type(b.mixer).__name__ for b in model.levels[2].blocks]
    assert kinds == ["MambaVisionMixer", "MambaVisionMixer", "Attention"]


def test_window_partition_roundtrip_and_raster_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    w = window_partition(x, 2)
    assert w.shape == (2 * 2 * 3, 4, 3)
    torch.testing.assert_close(w[1, :, 0], x[0, 0, 0:2, 2:4].flatten())  # 2nd window: rows 0-1, cols 2-3
    torch.testing.assert_close(window_reverse(w, 2, 4, 6), x)


# ----------------------------------------------------------------------------------------------------
# the official model

@pytest.fixture(scope="module")
def official():
    """The official `mambavision` module with its selective_scan_fn replaced by our sequential
    reference (mamba_ssm is CUDA-only); skipped when the package is not installed."""
    stub = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    stub.selective_scan_fn = ssm.selective_scan_ref
    saved = {k: sys.modules.get(k) for k in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface")}
    sys.modules.update({"mamba_ssm": types.ModuleType("mamba_ssm"), "mamba_ssm.ops": types.ModuleType("mamba_ssm.ops"),
                        "mamba_ssm.ops.selective_scan_interface": stub})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mambavision.models import mamba_vision
    except ImportError as e:
        pytest.skip(f"the official `mambavision` package is not importable ({e}); "
                    "pip install --no-deps mambavision==1.2.0 einops")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    mamba_vision.selective_scan_fn = ssm.selective_scan_ref  # the name the official module calls
    return mamba_vision


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and buffer away from its init (BN statistics, A_log, D, dt bias, layer scales
    of order 1), so that every part of the network shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("A_log"):
                t.copy_(torch.log(0.5 + 4 * torch.rand(t.shape, generator=g)))
            elif name.endswith("dt_proj.bias"):
                t.copy_(-2 + r)
            elif "gamma" in name or (name.endswith("weight") and t.dim() == 1):
                t.copy_(1 + 0.2 * r)
            elif t.dim() <= 1:
                t.copy_(0.1 * r)
            else:
                t.add_(0.05 * r)


@pytest.mark.parametrize("layer_scale", [None, 1e-5])
def test_equals_official_model_tiny(official, layer_scale):
    kw = dict(TINY, layer_scale=layer_scale, num_classes=10)
    torch.manual_seed(0)
    ref = official.MambaVision(mlp_ratio=4, **kw).eval()
    randomize_(ref)
    ours = MambaVision(**kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    for size in (32, 80):  # 80: stage maps 5x5 and 3x3, windows 4 and 2 -> padded
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            expected = ref(x)
            for backend in ("sequential", "chunked"):
                for m in ours.modules():
                    if isinstance(m, mv.MambaVisionMixer):
                        m.scan_backend = backend
                torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant,official_name", [("mambavision_t", "mamba_vision_T")])
def test_state_dict_names_and_shapes_equal_official(official, variant, official_name):
    # (the computation is compared on the tiny configuration above: the same classes at other sizes)
    ref = getattr(official, official_name)()
    with torch.device("meta"):
        ours = timm.create_model(variant)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_quirks_are_the_defaults_and_switchable():
    mixer = tiny().levels[2].blocks[0].mixer
    assert mixer.conv1d_x.bias is None and mixer.conv1d_z.bias is None and mixer.delta_bias_twice
    assert tiny(conv1d_bias=True).levels[2].blocks[0].mixer.conv1d_x.bias is not None
    a, b = tiny(), tiny(delta_bias_twice=False)
    b.load_state_dict(a.state_dict())
    for m in a.modules():
        if isinstance(m, mv.MambaVisionMixer):
            torch.nn.init.constant_(m.dt_proj.bias, 1.0)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(a(x), b(x))


# ----------------------------------------------------------------------------------------------------
# timm conventions

def test_features_only_gives_four_stage_maps_before_downsampling():
    model = timm.create_model("mambavision_t", features_only=True, **TINY).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 32, 64, 128]
    x = torch.randn(1, 3, 96, 128)
    feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(1, 16, 24, 32), (1, 32, 12, 16), (1, 64, 6, 8), (1, 128, 3, 4)]
    # stage 1's map is what stage 2 downsamples: it matches the full network's computation
    full = tiny()
    full.load_state_dict(model.model.state_dict(), strict=False)
    with torch.no_grad():
        ref = full.levels[1](full.levels[0].downsample(full.levels[0](full.patch_embed(x))))
        torch.testing.assert_close(model(x)[1], ref)
    two = timm.create_model("mambavision_t", features_only=True, out_indices=(1, 2), **TINY)
    assert two.feature_info.reduction() == [8, 16] and len(two(x)) == 2


def test_forward_features_head_and_intermediates():
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 128, 2, 2)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, 128)
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert [m.shape[1] for m in maps] == [16, 32, 64, 128]
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_any_input_size_and_pretrained_cfg():
    model = timm.create_model("mambavision_t", num_classes=5, **TINY).eval()
    for size in (32, 40, 100):
        assert model(torch.randn(1, 3, size, size)).shape == (1, 5)
    for bad in ((3, 64, 64), (1, 1, 64, 64)):  # an unbatched image, a gray one: named as the user gave them
        with pytest.raises(ValueError, match=rf"^MambaVision expects images of shape \(B, 3, H, W\), got {re.escape(str(bad))}$"):
            model(torch.randn(bad))
    cfg = model.pretrained_cfg
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["interpolation"] == "bicubic"
    assert timm.create_model("mambavision_s", pretrained=False, **TINY).pretrained_cfg["crop_pct"] == 0.93


def test_drop_path_is_active_in_training_only():
    model = tiny(drop_path_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model = tiny()
        model.train()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("conv_norm,token_norm", [("group", "rms"), ("layer", "batch"), ("batch", "none")])
def test_pluggable_norms(conv_norm, token_norm):
    model = tiny(conv_norm=conv_norm, token_norm=token_norm).train()
    kinds = {type(m).__name__ for m in model.modules()}
    expect = {"group": "GroupNorm", "layer": "LayerNorm", "batch": "BatchNormNCHW"}[conv_norm]
    assert expect in kinds
    block = model.levels[2].blocks[0]
    assert type(block.norm1).__name__ == {"rms": "RmsNorm", "batch": "BatchNormNLC", "none": "Identity"}[token_norm]
    assert type(model.patch_embed.conv_down[1]).__name__ == expect
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="bogus"):
        tiny(token_norm="bogus")


def test_load_official_checkpoint_layout(tmp_path):
    src = tiny()
    randomize_(src)
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    dst = tiny(num_classes=10)
    report = load_official_checkpoint(dst, path)
    assert report == {"missing": [], "unexpected": [], "mismatched": [], "head_reinitialised": False}
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x))
    # another number of classes: the head is re-initialised, everything else loads
    other = tiny(num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing or unexpected besides the head: no warning
        report = load_official_checkpoint(other, path)
    assert report["head_reinitialised"] and other.head.weight.shape == (3, 128)
    assert (other.head.bias == 0).all() and 0 < other.head.weight.std() < 0.03  # the model's head init
    torch.testing.assert_close(other.levels[2].blocks[0].mixer.A_log, src.levels[2].blocks[0].mixer.A_log)
    # a model with other norms: refused (the default, as load_state_dict), or with strict=False loaded
    # where the keys match, the others reported
    with pytest.raises(RuntimeError, match="unexpected"):
        load_official_checkpoint(tiny(token_norm="rms"), path)
    with pytest.warns(UserWarning, match="unexpected keys"):
        report = load_official_checkpoint(tiny(token_norm="rms"), path, strict=False)
    assert report["unexpected"] and any(k.endswith("norm1.bias") for k in report["unexpected"])
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")  # a file of another layout
    with pytest.raises(RuntimeError, match=r"other.pth\): 130 missing keys \['patch_embed.*, 1 unexpected keys \['x'\]$"):
        load_official_checkpoint(tiny(), tmp_path / "other.pth")


def test_onnx_export(tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx is not installed")
    model = tiny()
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "mambavision.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["image"], output_names=["logits"])
    onnx.checker.check_model(onnx.load(str(path)))
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (export checked only)")
    out = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-4)


def test_import_zoo_registers_every_variant_with_timm():
    # a fresh interpreter: `import zoo` alone must make timm.create_model("mambavision_t") work
    import subprocess
    code = ("import zoo, timm; print(sorted(m for m in timm.list_models('mambavision_*'))); "
            "print(type(timm.create_model('mambavision_t', pretrained=False, num_classes=3, dim=8, in_dim=8, "
            "depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))).__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == str(sorted(PAPER_PARAMS)) and out[1] == "zoo.models.mambavision"


def test_official_t_takes_any_multiple_of_32():
    # mambavision_t's windows are 14 and 7 (made for 224 px): at 160 and 288 px the stage maps are
    # 10x10/5x5 and 18x18/9x9, padded to whole windows and cropped back
    model = timm.create_model("mambavision_t", features_only=True).eval()
    for size in (160, 288):
        with torch.no_grad():
            feats = model(torch.randn(1, 3, size, size))
        assert [tuple(f.shape) for f in feats] == [(1, 80 * 2**i, size // 4 // 2**i, size // 4 // 2**i)
                                                   for i in range(4)]
        assert all(torch.isfinite(f).all() for f in feats)
    assert timm.create_model("mambavision_t").eval()(torch.randn(1, 3, 160, 160)).shape == (1, 1000)


def test_model_under_bf16_autocast_scans_in_float32(monkeypatch, scan_path):
    model = tiny()
    randomize_(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    dtypes = []
    if scan_path == "cpp":  # the whole scan is one C++ call: its tensor inputs
        cpp = ssm._selective_scan_cpp
        monkeypatch.setattr(ssm, "_selective_scan_cpp", lambda *a: dtypes.append(
            {t.dtype for t in a if isinstance(t, torch.Tensor)}) or cpp(*a))
    else:  # the recurrence of the pure-PyTorch path
        scan = ssm._scan
        monkeypatch.setattr(ssm, "_scan", lambda a, b, **kw: dtypes.append({a.dtype, b.dtype}) or scan(a, b, **kw))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert dtypes and all(d == {torch.float32} for d in dtypes)  # every mixer's scan ran in float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1 * ref.abs().max().item())


class _NotAllowed:  # a pickled object that weights-only loading refuses
    pass


def test_load_official_checkpoint_reads_timm_training_files_and_refuses_other_pickles(tmp_path):
    import argparse
    src = tiny()
    randomize_(src)
    # timm's train.py (the official training script) saves its argparse Namespace as "args"
    path = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": src.state_dict(), "args": argparse.Namespace(model="mamba_vision_T", lr=5e-3),
                "epoch": 299, "metric": 82.3}, path)
    dst = tiny()
    assert load_official_checkpoint(dst, path)["missing"] == []
    torch.testing.assert_close(dst.head.weight, src.head.weight)
    evil = tmp_path / "other.pth.tar"
    torch.save({"state_dict": src.state_dict(), "extra": _NotAllowed()}, evil)
    with pytest.raises(ValueError, match="trusted=True"):
        load_official_checkpoint(tiny(), evil)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_official_checkpoint(tiny(), tmp_path / "nope.pth.tar")


def test_conv_norm_layer_is_timm_layernorm2d_at_every_conv_position():
    """conv_norm='layer' (the run that stays at chance on the shapes data) is exactly timm's LayerNorm2d
    (over C at each pixel, weight 1, bias 0) in the stem, the conv blocks and the final norm: swapping
    every one for LayerNorm2d with the same eps gives the same logits and gradients, so that failure is
    not a layout / init bug (timm's own ResNet with LayerNorm2d fails alike; benchmarks/README.md)."""
    from timm.layers import LayerNorm2d
    model = tiny(conv_norm="layer").train()
    ref = tiny(conv_norm="layer").train()
    swapped = 0
    for mod in ref.modules():
        for name, child in list(mod.named_children()):
            if getattr(child, "layout", None) == "nchw":
                assert torch.equal(child.weight, torch.ones_like(child.weight)) and not child.bias.any()
                setattr(mod, name, LayerNorm2d(child.normalized_shape[0], eps=child.eps))
                swapped += 1
    assert swapped == 2 + 2 * sum(TINY["depths"][:2]) + 1  # stem, conv blocks, final norm
    x = torch.randn(2, 3, 32, 32)
    out, out_ref = model(x), ref(x)
    torch.testing.assert_close(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    torch.testing.assert_close(model.patch_embed.conv_down[0].weight.grad, ref.patch_embed.conv_down[0].weight.grad)


def test_mixer_grows_cubically_with_its_input_attention_and_mlp_linearly():
    """Why token_norm='none' diverges: the mixer's dt, B and C are all linear in its input, so for large
    inputs (softplus(dt) ~ dt) its output scales like |x|**3, while attention and the MLP scale like |x|.
    Without a norm in front, a residual stream that grows in training feeds back cubically."""
    block_mixer, block_attn = tiny().levels[3].blocks
    x = torch.randn(4, 4, block_mixer.mlp.fc1.in_features)
    with torch.no_grad():
        def slope(f):  # log2 growth of |f(s x)| per doubling of s, between s = 64 and 256
            return torch.log2(f(256 * x).norm() / f(64 * x).norm()).item() / 2
        assert 2.7 < slope(block_mixer.mixer) < 3.3
        assert 0.9 < slope(block_attn.mixer) < 1.1
        assert 0.9 < slope(block_mixer.mlp) < 1.1
