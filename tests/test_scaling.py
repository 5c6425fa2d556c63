"""InputScaler: each kind against independently computed statistics, inverse, state, errors."""
import io
import statistics
import warnings

import numpy as np
import pytest
import torch

from zoo import scaling
from zoo.scaling import SCALER_KINDS, InputScaler

# Two channels with different ranges so a mix-up between channels would show.
CH0 = [3.0, -1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
CH1 = [100.0, 250.0, 120.0, 80.0, 300.0, 90.0, 110.0, 95.0]


def images():
    """(N=2, C=2, H=2, W=2) float32 whose channel c holds exactly the 8 values of CH<c>."""
    x = torch.tensor([CH0, CH1], dtype=torch.float32)  # (C, 8)
    return x.reshape(2, 2, 2, 2).permute(1, 0, 2, 3).contiguous()  # (C, N, H, W) -> (N, C, H, W)


def expected(kind):
    """shift, scale per channel from the statistics module / numpy, not from torch."""
    out = []
    for v in (CH0, CH1):
        if kind == "minmax":
            out.append((min(v), max(v) - min(v)))
        elif kind == "zscore":
            out.append((statistics.fmean(v), statistics.pstdev(v)))
        elif kind == "robust":
            q25, q50, q75 = np.percentile(np.array(v, dtype=np.float64), [25, 50, 75])
            out.append((q50, q75 - q25))
        else:
            out.append((0.0, 1.0))
    shift, scale = zip(*out)
    return torch.tensor(shift, dtype=torch.float32), torch.tensor(scale, dtype=torch.float32)


@pytest.mark.parametrize("kind", SCALER_KINDS)
def test_each_kind_matches_independent_statistics(kind):
    x = images()
    s = InputScaler(2, kind=kind).fit(x)
    shift, scale = expected(kind)
    torch.testing.assert_close(s.shift, shift)
    torch.testing.assert_close(s.scale, scale)
    assert s.fitted and s.shift.dtype == s.scale.dtype == torch.float32
    y = s(x)
    torch.testing.assert_close(y, (x - shift.view(1, 2, 1, 1)) / scale.view(1, 2, 1, 1))
    torch.testing.assert_close(s.inverse(y), x)
    assert f"kind={kind!r}" in repr(s) and "num_channels=2" in repr(s)


def test_robust_hand_values():
    # CH0 sorted: -1 1 2 3 4 5 6 9; linear interpolation at positions 1.75, 3.5, 5.25.
    s = InputScaler(2, kind="robust").fit(images())
    assert s.shift[0].item() == 3.5
    assert s.scale[0].item() == pytest.approx((5 + 0.25 * 1) - (1 + 0.75 * 1))


def test_zscore_standardises_training_data():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 5, 5) * torch.tensor([1.0, 10.0, 0.5]).view(1, 3, 1, 1) + 20  # (N, C, H, W)
    y = InputScaler(3, kind="zscore").fit(x)(x).double()
    # Tolerance: the statistics are stored in float32 (as are x and y).
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_minmax_maps_training_extremes_exactly():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 7, 7) * torch.tensor([255.0, 3.0, 1e-3]).view(1, 3, 1, 1) - 1.7
    y = InputScaler(3, kind="minmax").fit(x)(x)
    assert y.dtype == torch.float32
    assert (y.amin(dim=(0, 2, 3)) == 0).all() and (y.amax(dim=(0, 2, 3)) == 1).all()
    assert ((y >= 0) & (y <= 1)).all()


def test_channels_are_independent():
    torch.manual_seed(0)
    x = torch.randn(10, 3, 4, 4)
    for kind in ("minmax", "zscore", "robust"):
        base = InputScaler(3, kind=kind).fit(x)
        x2 = x.clone()
        x2[:, 1] = x2[:, 1] * 50 + 7  # change channel 1 only
        other = InputScaler(3, kind=kind).fit(x2)
        assert torch.equal(base.shift[[0, 2]], other.shift[[0, 2]])
        assert torch.equal(base.scale[[0, 2]], other.scale[[0, 2]])
        assert not torch.equal(base.shift[1], other.shift[1])


def test_iterable_of_different_sizes_equals_concatenation():
    torch.manual_seed(0)
    ims = [torch.randn(2, 5, 7), torch.randn(2, 3, 3), torch.randn(2, 8, 2)]  # (C, H, W) each
    flat = torch.cat([im.reshape(2, -1) for im in ims], dim=1)  # (C, M)
    for kind in ("minmax", "zscore", "robust"):
        # The same values as one (1, C, M) tensor, as batched chunks, and as unbatched samples.
        ref = InputScaler(2, kind=kind).fit(flat[None].double())
        batched = InputScaler(2, kind=kind).fit(im[None] for im in ims)
        samples = InputScaler(2, kind=kind).fit(ims, unbatched=True)
        for s in (batched, samples):
            torch.testing.assert_close(s.shift, ref.shift)
            torch.testing.assert_close(s.scale, ref.scale)


def test_channel_last_sequences():
    torch.manual_seed(0)
    x = torch.randn(4, 9, 3) * torch.tensor([1.0, 5.0, 0.5]) + torch.tensor([0.0, 10.0, -3.0])  # (N, L, C)
    s = InputScaler(3, kind="zscore", channel_dim=-1).fit(x)
    torch.testing.assert_close(s.shift, x.double().reshape(-1, 3).mean(0).float())
    torch.testing.assert_close(s.scale, x.double().reshape(-1, 3).std(0, unbiased=False).float())
    y = s(x)
    assert y.shape == x.shape
    torch.testing.assert_close(s.inverse(y), x)
    # Unbatched (L, C) samples with a negative channel_dim use the same axis.
    s2 = InputScaler(3, kind="zscore", channel_dim=-1).fit(list(x), unbatched=True)
    torch.testing.assert_close(s2.shift, s.shift)


def test_uint8_images_come_out_float():
    x = torch.tensor([[[[0, 255], [10, 20]]]], dtype=torch.uint8)  # (1, 1, 2, 2)
    s = InputScaler(1, kind="minmax").fit(x)
    y = s(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.flatten(), torch.tensor([0.0, 255.0, 10.0, 20.0]) / 255)


@pytest.mark.parametrize("kind", ["minmax", "zscore", "robust"])
def test_constant_channel_is_finite_and_warns(kind):
    x = torch.randn(4, 3, 5, 5)
    x[:, 1] = 7.0
    with pytest.warns(UserWarning, match=rf"{kind}.*\[1\].*scale 1"):
        s = InputScaler(3, kind=kind).fit(x)
    assert s.scale[1].item() == 1.0 and s.shift[1].item() == 7.0
    y = s(x)
    assert torch.isfinite(y).all() and (y[:, 1] == 0).all()


def test_fitting_clean_data_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kind in SCALER_KINDS:
            InputScaler(2, kind=kind).fit(images())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_fit_data_raises_naming_channel(bad):
    x = torch.randn(2, 3, 4, 4)
    x[1, 2, 0, 0] = bad
    with pytest.raises(ValueError, match=r"channel\(s\) \[2\]"):
        InputScaler(3, kind="zscore").fit(x)
    with pytest.raises(ValueError, match=r"channel\(s\) \[2\] of data item 1"):
        InputScaler(3, kind="robust").fit([x[:1], x[1:]])


def test_state_dict_round_trip_weights_only():
    fitted = InputScaler(2, kind="robust").fit(images())
    buf = io.BytesIO()
    torch.save(fitted.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["_extra_state"] == {"kind": "robust", "fitted": True}
    fresh = InputScaler(2)  # kind "none", unfitted statistics
    fresh.load_state_dict(state)
    assert fresh.kind == "robust" and fresh.fitted
    assert torch.equal(fresh.shift, fitted.shift) and torch.equal(fresh.scale, fitted.scale)
    x = images()
    assert torch.equal(fresh(x), fitted(x))


def test_unfitted_state_stays_unfitted_after_load():
    fresh = InputScaler(2)
    fresh.load_state_dict(InputScaler(2, kind="zscore").state_dict())
    with pytest.raises(RuntimeError, match="fit"):
        fresh(images())


def test_copy_from():
    src = InputScaler(2, kind="minmax").fit(images())
    dst = InputScaler(2, channel_dim=-1)
    assert dst.copy_from(src) is dst
    assert dst.kind == "minmax" and dst.fitted and dst.channel_dim == -1
    assert torch.equal(dst.shift, src.shift) and torch.equal(dst.scale, src.scale)
    src.shift.add_(1)  # a copy, not shared storage
    assert not torch.equal(dst.shift, src.shift)
    with pytest.raises(ValueError, match="3 channels.*2"):
        InputScaler(3).copy_from(src)


def test_robust_large_data_subsamples_with_warning(monkeypatch):
    # With a small cap: the subsample is every 3rd value (10 > 4 -> stride 3 -> 4 values).
    monkeypatch.setattr(scaling, "QUANTILE_MAX_VALUES", 4)
    x = torch.arange(10, dtype=torch.float32).view(1, 1, 10)  # (N, C, L)
    with pytest.warns(UserWarning, match="subsample.*one value in every 3, 4 per channel"):
        s = InputScaler(1, kind="robust").fit(x)
    q25, q50, q75 = np.percentile([0.0, 3.0, 6.0, 9.0], [25, 50, 75])
    assert s.shift.item() == q50 and s.scale.item() == pytest.approx(q75 - q25)


def test_robust_over_real_cap_warns():
    # 2**24 + 2 values in one channel (uint8 keeps it at 16 MB): over the real cap.
    n = scaling.QUANTILE_MAX_VALUES + 2
    x = (torch.arange(n) % 200).to(torch.uint8).view(1, 1, n)
    with pytest.warns(UserWarning, match="exceed the quantile limit"):
        s = InputScaler(1, kind="robust").fit(x)
    assert s.shift.item() == pytest.approx(99.0, abs=1) and s.scale.item() == pytest.approx(100.0, abs=1)


def test_errors():
    with pytest.raises(ValueError, match="unknown scaler kind 'std'.*minmax"):
        InputScaler(2, kind="std")
    with pytest.raises(ValueError, match=r"^the input has 3 channel\(s\) \(shape \(4, 3, 5\), channel_dim=1\), the model takes 2"):
        InputScaler(2, kind="zscore").fit(torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match=r"has 5 channel\(s\) .*channel_dim=-1\), the model takes 2: its input scaler holds statistics of 2 channel\(s\); give 2-channel inputs$"):
        InputScaler(2, channel_dim=-1)(torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match="no such axis"):
        InputScaler(2, channel_dim=3)(torch.randn(4, 2))
    with pytest.raises(RuntimeError, match=r"not fitted: call \.fit"):
        InputScaler(2, kind="minmax")(torch.randn(4, 2, 5))
    with pytest.raises(RuntimeError, match="not fitted"):
        InputScaler(2, kind="robust").inverse(torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match="no values"):
        InputScaler(2, kind="zscore").fit([])
    with pytest.raises(ValueError, match="no values"):
        InputScaler(2, kind="robust").fit(torch.empty(0, 2, 3))
    # numpy arrays are accepted like tensors.
    arr = images().numpy()
    torch.testing.assert_close(InputScaler(2, kind="minmax").fit(arr).shift, expected("minmax")[0])
    # "none" works without fitting and is the identity.
    x = torch.randn(3, 2, 4)
    assert torch.equal(InputScaler(2)(x), x)
