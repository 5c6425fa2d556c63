"""Selective scan: the chunked fast path (its C++ CPU kernel and its pure-PyTorch form, `scan_path`)
and zoo's sequential reference against `loop_reference`, an independent float64 implementation of
mamba_ssm's `selective_scan_ref` semantics written here (zoo's reference shares its input handling
with the fast path, so it cannot catch an error there); the fast path against zoo's reference (values
and gradients) over layouts, dtypes, long sequences, autocast, dispatch; both against a hand-computed
case."""
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


def loop_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm's selective_scan_ref semantics, from the paper (Gu & Dao 2023, Alg. 2) and that
    function, in float64 with a plain loop over time; it shares no code with zoo.models.ssm.

    u, delta, z (batch, dim, L); A (dim, N); B, C each (dim, N) (fixed in time), (batch, N, L) (one for
    all channels) or (batch, G, N, L) (channel d reads group d // (dim / G): mamba_ssm repeats
    "B G N L -> B (G H) N L"); D, delta_bias (dim,).
        delta <- softplus(delta + delta_bias)       (each part optional)
        h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,  h_{-1} = 0,   y_t = <C_t, h_t>
        out = (y + D u) * silu(z)
    Returns out and the last state h_{L-1} (batch, dim, N)."""
    f = lambda t: None if t is None else t.double()  # noqa: E731
    u, delta, A, B, C, D, z, delta_bias = map(f, (u, delta, A, B, C, D, z, delta_bias))
    batch, dim, length = u.shape
    n = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))  # softplus written out

    def at(m, t):  # m's (batch, dim, N) coefficients at step t
        if m.dim() == 2:
            return m.expand(batch, dim, n)
        if m.dim() == 3:
            return m[:, None, :, t].expand(batch, dim, n)
        per_group = dim // m.shape[1]
        return torch.stack([m[:, d // per_group, :, t] for d in range(dim)], dim=1)

    h = torch.zeros(batch, dim, n, dtype=torch.float64)
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * at(B, t) * u[:, :, t, None]
        ys.append((h * at(C, t)).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * (z * torch.sigmoid(z))  # silu written out
    return y, h


def make_inputs(batch, dim, length, n, layout="bnl", dtype=torch.float32, seed=0, delta_scale=0.5, groups=2):
    """`layout` of B and C: "bnl", "bgnl", "dn", or "B:C" for different ones (e.g. "bnl:dn")."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    shapes = {"bnl": (batch, n, length), "bgnl": (batch, groups, n, length), "dn": (dim, n)}
    b_layout, _, c_layout = layout.partition(":")
    return dict(
        u=r(batch, dim, length), delta=delta_scale * r(batch, dim, length),
        A=-torch.rand(dim, n, generator=g, dtype=dtype) * 4 - 0.1,
        B=r(*shapes[b_layout]), C=r(*shapes[c_layout or b_layout]), D=r(dim), z=r(batch, dim, length),
        delta_bias=r(dim))


@pytest.fixture
def path_calls(monkeypatch):
    """Counts the calls of the fast path's two implementations: the C++ kernel and the blocked
    pure-PyTorch scan, so that a test can assert which one it exercised."""
    calls = {"cpp": 0, "torch": 0}
    for key, owner, name in (("cpp", ssm, "_selective_scan_cpp"), ("torch", ssm._SelectiveScanFn, "apply")):
        def counted(*args, _key=key, _fn=getattr(owner, name)):
            calls[_key] += 1
            return _fn(*args)
        monkeypatch.setattr(owner, name, counted)
    return calls


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


OPTIONS = {  # which of the optional arguments are given, and the softplus flag
    "all": dict(softplus=True),
    "none": dict(drop=("D", "z", "delta_bias"), softplus=False),
    "no-z": dict(drop=("z",), softplus=True),
    "bias-only": dict(drop=("D", "z"), softplus=False),
}


def run_against_loops(fn, inputs, softplus):
    """Outputs, last state and input gradients of fn (zoo) and of `loop_reference` on the same inputs,
    for the same random cotangent of the output and of the last state."""
    results = []
    for impl in (fn, None):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        if impl is None:
            y, last = loop_reference(**leaves, delta_softplus=softplus)
        else:
            y, last = impl(**leaves, delta_softplus=softplus, return_last_state=True)
        g = torch.Generator().manual_seed(1)
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
        glast = torch.randn(last.shape, generator=g, dtype=torch.float64)
        loss = (y.double() * gy).sum() + (last.double() * glast).sum()
        results.append((y, last, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))))
    return results


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("layout", ["bnl", "bgnl", "dn", "bnl:dn", "dn:bgnl"])
def test_fast_path_and_zoo_reference_equal_loop_reference(layout, options, scan_path, path_calls):
    # float64 throughout, so any difference beyond rounding is a semantic error (delta bias,
    # softplus, D, z, group layout, gradients) in zoo's code; L = 37 spans several of the C++
    # kernel's 16-step blocks
    spec = OPTIONS[options]
    x = make_inputs(2, 4, 37, 3, layout=layout, dtype=torch.float64, groups=2)
    x = {k: v for k, v in x.items() if k not in spec.get("drop", ())}
    for fn in (selective_scan_chunked, selective_scan_ref):
        (y, last, g), (y_ref, last_ref, g_ref) = run_against_loops(fn, x, spec["softplus"])
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(last, last_ref, rtol=1e-9, atol=1e-10)
        for k in g_ref:
            torch.testing.assert_close(g[k], g_ref[k], rtol=1e-8, atol=1e-9, msg=lambda m: f"grad {k}: {m}")
    # the fast path ran the implementation the fixture names: C++ only for (batch, N, L) B and C
    cpp = scan_path == "cpp" and layout == "bnl"
    assert path_calls == {"cpp": int(cpp), "torch": int(not cpp)}


def test_fast_path_equals_loop_reference_float32(scan_path):
    # float32 inputs: computed and returned in float32, within mamba_ssm's kernel-vs-reference tolerance
    x = make_inputs(2, 8, 49, 4)
    y = selective_scan_chunked(**x, delta_softplus=True)
    y_ref, _ = loop_reference(**x, delta_softplus=True)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=RTOL, atol=ATOL)


def test_loop_reference_hand_computed():
    # the test's own reference is checked too: one channel, N = 1, L = 2; delta = 0 + delta_bias 1
    # (no softplus), A = -ln 2 so that exp(delta A) = 1/2; B = 2, C = 3 fixed in time; D = 0.5
    u = torch.tensor([[[1.0, 4.0]]], dtype=torch.float64)
    delta = torch.zeros(1, 1, 2, dtype=torch.float64)
    A = torch.tensor([[-math.log(2)]], dtype=torch.float64)
    B, C = torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[3.0]], dtype=torch.float64)
    D, bias = torch.tensor([0.5], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    # h0 = 1 * 2 * 1 = 2, y0 = 3 * 2 + 0.5 * 1 = 6.5; h1 = h0 / 2 + 1 * 2 * 4 = 9, y1 = 27 + 2 = 29
    y, h = loop_reference(u, delta, A, B, C, D, delta_bias=bias)
    torch.testing.assert_close(y, torch.tensor([[[6.5, 29.0]]], dtype=torch.float64))
    torch.testing.assert_close(h, torch.tensor([[[9.0]]], dtype=torch.float64))
    # softplus(ln(e - 1)) = ln(1 + e - 1) = 1: the same delta through the softplus
    y, _ = loop_reference(u, delta, A, B, C, D, delta_bias=torch.full_like(bias, math.log(math.e - 1)),
                          delta_softplus=True)
    torch.testing.assert_close(y, torch.tensor([[[6.5, 29.0]]], dtype=torch.float64))
    z = torch.tensor([[[math.log(3), 0.0]]], dtype=torch.float64)  # silu(ln 3) = ln 3 * 3 / 4
    y, _ = loop_reference(u, delta, A, B, C, D, z=z, delta_bias=bias)
    torch.testing.assert_close(y, torch.tensor([[[6.5 * math.log(3) * 0.75, 0.0]]], dtype=torch.float64))
    # groups: dim 4, G = 2, B of group 0 all ones and of group 1 zeros -> channels 0 and 1 (group
    # d // 2 = 0) have states, 2 and 3 none (an interleaved d % G mapping would pick channels 0 and 2)
    Bg = torch.zeros(1, 2, 1, 3, dtype=torch.float64)
    Bg[:, 0] = 1
    _, h = loop_reference(torch.ones(1, 4, 3), torch.ones(1, 4, 3), -torch.ones(4, 1), Bg, Bg)
    assert (h[0, :2] > 0).all() and (h[0, 2:] == 0).all()


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


@pytest.fixture
def block_calls(monkeypatch, path_calls):
    """The blocked pure-PyTorch path forced (the C++ kernel off: it would take the (batch, N, L) layout
    and ignore BLOCK_ELEMENTS), and its time blocks counted (`_block_states` runs once per block in
    the forward pass and once per block in the backward pass)."""
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    blocks = []
    block_states = ssm._block_states

    def counted(delta, du, A, Bt, s, e, prev):
        blocks.append((s, e))
        return block_states(delta, du, A, Bt, s, e, prev)

    monkeypatch.setattr(ssm, "_block_states", counted)
    return blocks, path_calls


@pytest.mark.parametrize("layout", ["bnl", "bgnl", "dn"])
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_fast_path_time_blocks_equal_reference(steps, layout, monkeypatch, block_calls):
    # per step (batch, N, dim) = 2 * 4 * 8 elements: blocks of 1, 3 and 5 steps, the last one short
    monkeypatch.setattr(ssm, "BLOCK_ELEMENTS", steps * 2 * 4 * 8)
    assert_fast_equals_reference(make_inputs(2, 8, 23, 4, layout=layout))
    blocks, calls = block_calls
    assert calls == {"cpp": 0, "torch": 1}
    want = [(s, min(s + steps, 23)) for s in range(0, 23, steps)]
    assert blocks == want + want[::-1]  # forward in time, then the backward pass in reverse


@pytest.mark.parametrize("layout", ["bnl", "dn"])
def test_fast_path_gradcheck_float64_across_blocks(layout, monkeypatch, block_calls):
    monkeypatch.setattr(ssm, "BLOCK_ELEMENTS", 2 * 3 * 2)  # 2 steps per block of (batch 1, N 3, dim 2)
    x = make_inputs(1, 2, 5, 3, layout=layout, dtype=torch.float64)
    names = list(x)
    leaves = [x[k].clone().requires_grad_() for k in names]

    def f(*args):
        y, last = selective_scan_chunked(**dict(zip(names, args)), delta_softplus=True, return_last_state=True)
        return y, last

    assert torch.autograd.gradcheck(f, leaves)
    blocks, calls = block_calls
    assert calls["cpp"] == 0 and calls["torch"] > 0
    assert set(blocks) == {(0, 2), (2, 4), (4, 5)}


@pytest.mark.parametrize("length", [15, 16, 17, 33])
def test_cpu_kernel_gradcheck_float64_across_blocks(length, path_calls):
    # the C++ kernel keeps the state before each 16-step block and recomputes the rest backward
    assert cpu_kernels.available()
    x = make_inputs(2, 3, length, 2, dtype=torch.float64)
    names = list(x)
    leaves = [x[k].clone().requires_grad_() for k in names]

    def f(*args):
        return selective_scan_chunked(**dict(zip(names, args)), delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(f, leaves)
    assert path_calls["cpp"] > 0 and path_calls["torch"] == 0


def test_cpu_kernel_with_threads_equals_reference(path_calls):
    # batch rows split over 2 threads, each with its own sums of the A, D and delta_bias gradients
    assert cpu_kernels.available()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_fast_equals_reference(make_inputs(6, 16, 40, 4))
    finally:
        torch.set_num_threads(threads)
    assert path_calls == {"cpp": 1, "torch": 0}
