"""zoo.cpu_kernels: a machine that cannot build the C++ kernels gets a warning naming why, and the
pure-PyTorch paths."""
import pytest
import torch
from torch.utils import cpp_extension

from zoo import cpu_kernels
from zoo.models.sketch_rnn import LSTMLayer
from zoo.models.ssm import selective_scan_chunked, selective_scan_ref


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.warns(RuntimeWarning, match="c\\+\\+: command not found.*pure-PyTorch"):
        assert not cpu_kernels.available()
    assert not cpu_kernels.available()  # not retried
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(2, 4, 9, generator=g) for _ in range(3))
    A, B, C = -torch.rand(4, 3, generator=g), torch.randn(2, 3, 9, generator=g), torch.randn(2, 3, 9, generator=g)
    torch.testing.assert_close(selective_scan_chunked(u, delta, A, B, C, z=z, delta_softplus=True),
                               selective_scan_ref(u, delta, A, B, C, z=z, delta_softplus=True))
    out, _ = LSTMLayer(3, 5, "layer").train()(torch.randn(2, 6, 3, generator=g))
    assert out.shape == (2, 6, 5) and torch.isfinite(out).all()


def test_disabled_kernels_are_not_built(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("built although disabled"))
    assert not cpu_kernels.available() and not cpu_kernels.usable(torch.zeros(1))
