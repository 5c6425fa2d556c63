"""Selective scan: the chunked fast path (its C++ CPU kernel and its pure-PyTorch form, `scan_path`)
against the sequential reference (values and gradients), layouts, dtypes, long sequences, autocast,
dispatch; the reference against a hand-computed case."""
import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zoo import cpu_kernels
from zoo.models import ssm
from zoo.models.ssm import linear_scan, selective_scan, selective_scan_chunked, selective_scan_ref

RTOL, ATOL = 6e-4, 2e-3  # mamba_ssm's own tolerances for its kernel vs its reference (fp32)


def make_inputs(batch, dim, length, n, layout="bnl", dtype=torch.float32, seed=0, delta_scale=0.5, groups=2):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    shapes = {"bnl": (batch, n, length), "bgnl": (batch, groups, n, length), "dn": (dim, n)}
    return dict(
        u=r(batch, dim, length), delta=delta_scale * r(batch, dim, length),
        A=-torch.rand(dim, n, generator=g, dtype=dtype) * 4 - 0.1,
        B=r(*shapes[layout]), C=r(*shapes[layout]), D=r(dim), z=r(batch, dim, length), delta_bias=r(dim))


def run(fn, inputs, **kw):
    """Outputs and gradients of every input for a fixed random cotangent."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, last = fn(**leaves, delta_softplus=True, return_last_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g).to(y.dtype)).sum() + (last * last.detach()).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, last, dict(zip(leaves, grads))


def assert_fast_equals_reference(inputs):
    """The fast path's output, last state and every input gradient equal the sequential reference's
    within mamba_ssm's fp32 tolerances."""
    y_ref, last_ref, g_ref = run(selective_scan_ref, inputs)
    y, last, g = run(selective_scan_chunked, inputs)
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(last, last_ref, rtol=RTOL, atol=ATOL)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("layout", ["bnl", "bgnl", "dn"])
@pytest.mark.parametrize("shape", [(2, 4, 1, 3), (2, 6, 5, 4), (3, 8, 49, 8), (2, 8, 196, 8), (1, 4, 230, 2)])
def test_fast_equals_reference_values_and_grads(shape, layout, scan_path):
    assert_fast_equals_reference(make_inputs(*shape, layout=layout))


def test_fast_equals_reference_float64_tightly(scan_path):
    inputs = make_inputs(2, 6, 37, 4, dtype=torch.float64)
    y_ref, last_ref, g_ref = run(selective_scan_ref, inputs)
    y, last, g = run(selective_scan_chunked, inputs)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-9, atol=1e-9)


def test_optional_arguments_match_reference(scan_path):
    x = make_inputs(2, 4, 20, 3)
    for kw in (dict(D=None, z=None, delta_bias=None), dict(z=None), dict(D=None)):
        args = {**x, **kw}
        for softplus in (False, True):
            ref = selective_scan_ref(**args, delta_softplus=softplus)
            torch.testing.assert_close(selective_scan_chunked(**args, delta_softplus=softplus), ref,
                                       rtol=RTOL, atol=ATOL)


def test_reference_hand_computed():
    # one channel, one state, L = 3: h = a h + delta B u with a = exp(delta A)
    u = torch.tensor([[[1.0, 2.0, -1.0]]])
    delta = torch.tensor([[[0.5, 1.0, 2.0]]])
    A = torch.tensor([[-1.0]])
    B = torch.tensor([[[1.0, 0.5, 2.0]]])
    C = torch.tensor([[[2.0, 1.0, -1.0]]])
    D = torch.tensor([0.5])
    h, ys = 0.0, []
    for t in range(3):
        d = delta[0, 0, t].item()
        h = math.exp(-d) * h + d * B[0, 0, t].item() * u[0, 0, t].item()
        ys.append(C[0, 0, t].item() * h + 0.5 * u[0, 0, t].item())
    for fn in (selective_scan_ref, selective_scan_chunked):
        torch.testing.assert_close(fn(u, delta, A, B, C, D), torch.tensor([[ys]]))


def test_long_sequence_where_cumulative_product_formulation_fails(scan_path):
    # sum(delta * A) reaches about -1000: its exp underflows to 0 in float32 and the inverse
    # overflows, so h[t] = P[t] * cumsum(b / P) (P = cumprod of the decays) gives inf / nan.
    inputs = make_inputs(1, 4, 512, 4, delta_scale=0.3, seed=3)
    x = {k: v.double() for k, v in inputs.items()}
    ref = selective_scan_ref(**x, delta_softplus=True)
    delta = F.softplus(x["delta"] + x["delta_bias"][:, None]).float()
    decay = torch.exp(delta[..., None] * inputs["A"][:, None])               # (1, dim, L, N)
    P = torch.cumprod(decay, dim=2)
    b = delta[..., None] * inputs["B"].transpose(1, 2)[:, None] * inputs["u"][..., None]
    naive_h = P * torch.cumsum(b / P, dim=2)
    assert not torch.isfinite(naive_h).all()  # the trap is real at this length
    y = selective_scan_chunked(**inputs, delta_softplus=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, rtol=RTOL, atol=ATOL)
    # and the gradients stay finite and right
    _, _, g = run(selective_scan_chunked, inputs)
    _, _, g_ref = run(selective_scan_ref, {k: v.double() for k, v in inputs.items()})
    for k in g:
        assert torch.isfinite(g[k]).all(), k
        torch.testing.assert_close(g[k].double(), g_ref[k], rtol=1e-3, atol=5e-3)


@pytest.mark.parametrize("length", [1, 2, 7, 16, 17, 50])
@pytest.mark.parametrize("chunk", [None, 1, 3, 4])
def test_linear_scan_against_loop_both_directions(length, chunk):
    g = torch.Generator().manual_seed(length)
    a, b = torch.rand(length, 3, 2, generator=g, dtype=torch.float64), torch.randn(length, 3, 2, generator=g,
                                                                                     dtype=torch.float64)
    fwd, rev, h = [], [None] * length, torch.zeros(3, 2, dtype=torch.float64)
    for t in range(length):
        h = a[t] * h + b[t]
        fwd.append(h)
    h = torch.zeros(3, 2, dtype=torch.float64)
    for t in range(length - 1, -1, -1):
        h = (a[t + 1] * h if t + 1 < length else 0) + b[t]
        rev[t] = h
    torch.testing.assert_close(ssm._scan(a, b.clone(), chunk=chunk), torch.stack(fwd))
    torch.testing.assert_close(ssm._scan(a, b.clone(), reverse=True, chunk=chunk), torch.stack(rev))


def test_linear_scan_gradcheck():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_scan, (a, b))


def test_runs_in_float32_under_autocast(scan_path):
    inputs = make_inputs(2, 8, 49, 8)
    ref = selective_scan_ref(**inputs, delta_softplus=True)
    bf16 = {k: v.bfloat16() if k in ("u", "delta", "z") else v for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan(**bf16, delta_softplus=True)
    assert y.dtype == torch.bfloat16  # returned in the input dtype ...
    ref_from_bf16 = selective_scan_ref(**{k: v.float() for k, v in bf16.items()}, delta_softplus=True)
    # ... but computed in float32: equal to the float32 computation on the same (rounded) inputs
    torch.testing.assert_close(y.float(), ref_from_bf16.bfloat16().float(), rtol=0, atol=0.05)
    assert (y.float() - ref).abs().max() < 0.2  # and close to the exact result


def test_dispatch_and_errors():
    x = make_inputs(1, 2, 5, 3)
    torch.testing.assert_close(selective_scan(**x, backend="sequential"), selective_scan_ref(**x))
    torch.testing.assert_close(selective_scan(**x), selective_scan_chunked(**x))
    with pytest.raises(ValueError, match="backend 'bogus'"):
        selective_scan(**x, backend="bogus")
    with pytest.raises(ValueError, match="CUDA tensors"):
        selective_scan(**x, backend="cuda")
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**{**x, "B": x["B"][:, :, :4]})
    with pytest.raises(ValueError, match="complex"):
        selective_scan(**{**x, "A": x["A"].to(torch.complex64)})


def test_mamba_ssm_is_imported_lazily(monkeypatch):
    # no module-level import of mamba_ssm in the model files ...
    import zoo.models.mambavision as mv
    for module in (ssm, mv):
        tree = ast.parse(Path(module.__file__).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not any(name.startswith("mamba_ssm") for name in names), module.__name__
    # ... and a CPU call never tries to import it
    monkeypatch.setattr(ssm, "_mamba_ssm_fn", None)
    selective_scan(**make_inputs(1, 2, 4, 2))
    assert ssm._mamba_ssm_fn is None


@pytest.mark.parametrize("layout", ["bnl", "bgnl", "dn"])
@pytest.mark.parametrize("block_elements", [1, 3 * 2 * 4 * 8, 5 * 2 * 4 * 8])
def test_fast_path_time_blocks_equal_reference(block_elements, layout, monkeypatch):
    # per step (batch, N, dim) = 2 * 4 * 8 elements: blocks of 1, 3 and 5 steps, the last one short
    monkeypatch.setattr(ssm, "BLOCK_ELEMENTS", block_elements)
    assert_fast_equals_reference(make_inputs(2, 8, 23, 4, layout=layout))


@pytest.mark.parametrize("layout", ["bnl", "dn"])
def test_fast_path_gradcheck_float64_across_blocks(layout, monkeypatch):
    monkeypatch.setattr(ssm, "BLOCK_ELEMENTS", 2 * 3 * 2)  # 2 steps per block of (batch 1, N 3, dim 2)
    x = make_inputs(1, 2, 5, 3, layout=layout, dtype=torch.float64)
    names = list(x)
    leaves = [x[k].clone().requires_grad_() for k in names]

    def f(*args):
        y, last = selective_scan_chunked(**dict(zip(names, args)), delta_softplus=True, return_last_state=True)
        return y, last

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("length", [15, 16, 17, 33])
def test_cpu_kernel_gradcheck_float64_across_blocks(length):
    # the C++ kernel keeps the state before each 16-step block and recomputes the rest backward
    assert cpu_kernels.available()
    x = make_inputs(2, 3, length, 2, dtype=torch.float64)
    names = list(x)
    leaves = [x[k].clone().requires_grad_() for k in names]

    def f(*args):
        return selective_scan_chunked(**dict(zip(names, args)), delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(f, leaves)


def test_cpu_kernel_with_threads_equals_reference():
    # batch rows split over 2 threads, each with its own sums of the A, D and delta_bias gradients
    assert cpu_kernels.available()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_fast_equals_reference(make_inputs(6, 16, 40, 4))
    finally:
        torch.set_num_threads(threads)
