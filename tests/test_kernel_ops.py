"""zoo's C++ CPU kernels as torch ops (zoo.cpu_kernels): `torch.library.opcheck` of every op (schema,
fake implementation, autograd registration, AOT dispatch); torch.compile keeps the scans in its graphs
(no graph break names them) and computes what eager pure PyTorch, the reference, computes (outputs
and gradients); concurrent first uses build once."""
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch._inductor.config

import zoo.models.mambavision  # noqa: F401  (registers the models with timm)
from zoo import cpu_kernels
from zoo.models import ssm
from zoo.models.sketch_rnn import SketchRNN

OPS = torch.ops.zoo


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    assert cpu_kernels.available(), "the C++ CPU kernels did not build (see the warning)"


def randn(*shape, grad=False):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_(grad)


def opcheck(op, args):
    assert set(torch.library.opcheck(op, args).values()) == {"SUCCESS"}


def backward_args(forward, args, n_results):
    """The forward op's results on args, without autograd: random gradients of its first n_results (its
    differentiable results), then what its backward op reads."""
    with torch.no_grad():
        out = forward(*args)
    return [torch.randn_like(t) for t in out[:n_results]], out[n_results:]


@pytest.mark.parametrize("optional", [True, False])
def test_selective_scan_ops_pass_opcheck(optional):
    torch.manual_seed(0)
    b, d, length, n = 2, 3, 19, 2  # 19 steps: two of the kernel's 16-step blocks
    empty = torch.empty(0, dtype=torch.float64)
    extra = [randn(d, grad=True), randn(b, d, length, grad=True), randn(d, grad=True)] if optional else [empty] * 3
    args = [randn(b, d, length, grad=True), randn(b, d, length, grad=True),
            (-torch.rand(d, n, dtype=torch.float64)).requires_grad_(), randn(b, n, length, grad=True),
            randn(b, n, length, grad=True), *extra, optional]
    opcheck(OPS.selective_scan_forward, args)
    grads, (starts, delta) = backward_args(OPS.selective_scan_forward, args, 2)
    opcheck(OPS.selective_scan_backward, [*grads, *(a.detach() for a in args[:8]), optional, starts, delta])


@pytest.mark.parametrize("dropout", [True, False])
@pytest.mark.parametrize("kind", [0, 1, 2])  # none, layer, rms
def test_lstm_scan_ops_pass_opcheck(kind, dropout):
    torch.manual_seed(1)
    T, B, H = 5, 3, 4
    empty = torch.empty(0, dtype=torch.float64)
    norm = [randn(4 * H, grad=True), randn(4 * H, grad=True), randn(H, grad=True), randn(H, grad=True)]
    keep = (torch.rand(T, B, H) > 0.3).double() / 0.7 if dropout else empty
    args = [kind, 1e-3, randn(T, B, 4 * H, grad=True), randn(B, H, grad=True), randn(B, H, grad=True),
            randn(4 * H, H, grad=True), *(norm if kind else [empty] * 4), keep]
    opcheck(OPS.lstm_scan_forward, args)
    grads, saved = backward_args(OPS.lstm_scan_forward, args, 2)
    w_hh, g_gamma, c_gamma = (args[i].detach() for i in (5, 6, 8))
    opcheck(OPS.lstm_scan_backward, [kind, *grads, w_hh, g_gamma, c_gamma, keep, *saved])


@pytest.mark.parametrize("training", [True, False])
def test_bn_lstm_scan_ops_pass_opcheck(training):
    torch.manual_seed(2)
    T, B, H = 5, 3, 4
    keep = (torch.rand(T, B, H) > 0.3).double() / 0.7
    # training: the batch statistics of each step's real rows (none in the last two: they reuse step 2's)
    counts = torch.tensor([3, 3, 2, 0, 0]) if training else torch.empty(0, dtype=torch.long)
    stats = [] if training else [torch.rand(T, w, dtype=torch.float64) for w in [4 * H] * 4 + [H] * 2]
    args = [1e-3, randn(T, B, 4 * H, grad=True), randn(B, H, grad=True), randn(B, H, grad=True),
            randn(4 * H, H, grad=True), *(randn(4 * H, grad=True) for _ in range(3)), randn(H, grad=True),
            randn(H, grad=True), keep, counts, stats]
    opcheck(OPS.bn_lstm_scan_forward, args)
    grads, rest = backward_args(OPS.bn_lstm_scan_forward, args, 2)
    mean_x, _, mean_h, _, mean_c, _, hs, cs, acts, tcs, pre, rstd_x, rstd_h, rstd_c = rest
    w_hh, x_gamma, h_gamma, c_gamma, xw = (args[i].detach() for i in (4, 5, 6, 8, 1))
    opcheck(OPS.bn_lstm_scan_backward, [*grads, w_hh, x_gamma, h_gamma, c_gamma, keep, counts, xw, hs, cs, acts,
                                        tcs, pre, mean_x, rstd_x, mean_h, rstd_h, mean_c, rstd_c])


# ----------------------------------------------------------------------------------------------------
# torch.compile

SCAN_CODE = {"selective_scan", "selective_scan_chunked", "_selective_scan_cpp", "_lstm_scan", "FusedScan",
             "_batch_scan", "BatchNormScan", "available", "usable"}  # functions of the scans' paths


def assert_scans_in_graphs(fn, inputs, ops):
    """torch._dynamo.explain of fn(*inputs): every op of `ops` is in a captured graph, and no graph break
    happens in the scans' code or names a zoo op or an autograd Function. Returns the graph breaks."""
    explained = torch._dynamo.explain(fn)(*inputs)
    targets = {n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    for op in ops:
        assert {op, op.default} & targets, f"{op} is not in the compiled graphs"
    for b in explained.break_reasons:
        frames = {f.name for f in b.user_stack}
        assert not frames & SCAN_CODE, f"graph break in the scans: {b.reason} at {b.user_stack}"
        assert not any(s in b.reason for s in ("zoo::", "zoo.", "autograd.Function")), b.reason
    return explained.break_reasons


def step(model, inputs, training):
    """The model's output on inputs and, in training, the gradients of all parameters for a fixed
    weighting of the output (dropout and the latent draw seeded)."""
    torch.manual_seed(1)
    model.train(training)
    out = model(*inputs)
    out = out["out"] if isinstance(out, dict) else out
    if not training:
        return [out.detach()]
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    return [out.detach(), *torch.autograd.grad(loss, list(model.parameters()))]


def assert_compiled_equals_eager_reference(model, inputs, backend, monkeypatch):
    """Training and inference step of torch.compile(model) with the kernels vs eager pure PyTorch (the
    kernels off), float64."""
    compiled = torch.compile(model, backend=backend)
    for training in (True, False):
        with torch._inductor.config.patch(fallback_random=True):  # eager's random streams
            got = step(compiled, inputs, training)
        monkeypatch.setattr(cpu_kernels, "ENABLED", False)
        want = step(model, inputs, training)
        monkeypatch.setattr(cpu_kernels, "ENABLED", True)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def small_mambavision():
    torch.manual_seed(0)
    return timm.create_model("mambavision_t", num_classes=8, dim=32, in_dim=16, depths=[1, 1, 2, 2],
                             num_heads=[1, 2, 2, 4], window_size=[8, 8, 4, 2]).double()


@pytest.mark.slow
def test_compiled_mambavision_keeps_the_scan_in_its_graph_and_equals_eager(monkeypatch):
    # aot_eager: inductor takes ~90 s to compile this model on a shared 2-core CPU (the scan op itself
    # runs under inductor in test_compiled_selective_scan_with_inductor; bench_compile.py compiles it all)
    model = small_mambavision()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert not assert_scans_in_graphs(model, (images,), [OPS.selective_scan_forward])  # one graph, no break
    assert_compiled_equals_eager_reference(model, (images,), "aot_eager", monkeypatch)


def test_compiled_selective_scan_with_inductor(monkeypatch):
    torch.manual_seed(3)
    b, d, length, n = 2, 8, 37, 4
    A = -torch.rand(d, n, dtype=torch.float64) - 0.1
    x = [randn(b, d, length), 0.5 * randn(b, d, length), A, randn(b, n, length), randn(b, n, length), randn(d),
         randn(b, d, length), randn(d)]

    def scan(u, delta, A, B, C, D, z, delta_bias):
        y, last = ssm.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, return_last_state=True)
        return y.sum() + (y * y).mean() + last.square().sum()

    def value_and_grads(fn):
        leaves = [t.clone().requires_grad_() for t in x]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves)]

    got = value_and_grads(torch.compile(scan, backend="inductor"))
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)  # the reference: eager pure PyTorch
    for a, b in zip(got, value_and_grads(scan), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def sketch_batch():
    g = torch.Generator().manual_seed(4)
    return torch.randn(4, 13, 5, generator=g, dtype=torch.float64), torch.tensor([12, 5, 9, 3])


@pytest.mark.parametrize("norm", ["none", "layer", "rms", "batch"])
def test_compiled_sketch_rnn_keeps_the_scans_in_its_graphs_and_equals_eager(norm, monkeypatch):
    torch.manual_seed(0)
    model = SketchRNN(16, 32, 8, 3, norm=norm, max_seq_len=20).double().train()
    op = OPS.bn_lstm_scan_forward if norm == "batch" else OPS.lstm_scan_forward
    # dynamo refuses nn.LSTM modules unless allow_rnn: norm none's layers hold theirs (its eval path),
    # so reading their weights for the scan breaks the graph there without it
    with torch._dynamo.config.patch(allow_rnn=True):
        breaks = assert_scans_in_graphs(model, sketch_batch(), [op])
        # what remains: SketchRNN.encode's check of the lengths (a Python int of a tensor)
        assert all(f.name == "encode" for b in breaks for f in b.user_stack[-1:]), breaks
        # none: aot_eager, as inductor spends a minute on the unrolled nn.LSTM of its eval path (no scan)
        backend = "aot_eager" if norm == "none" else "inductor"
        assert_compiled_equals_eager_reference(model, sketch_batch(), backend, monkeypatch)


# ----------------------------------------------------------------------------------------------------
# building

WORKER = """
import torch
from zoo import cpu_kernels
from zoo.models.sketch_rnn import LSTMLayer
from zoo.models.ssm import selective_scan

assert cpu_kernels.available()
torch.manual_seed(0)
u, delta, z = torch.randn(3, 2, 4, 20).unbind(0)
B, C = torch.randn(2, 2, 2, 20).unbind(0)
y = selective_scan(u, delta, -torch.rand(4, 2), B, C, z=z, delta_softplus=True)
h, _ = LSTMLayer(3, 8, "layer").train()(torch.randn(2, 6, 3))
print(repr(y.sum().item()), repr(h.sum().item()))
"""


@pytest.mark.slow
def test_concurrent_first_uses_build_once_and_load_the_same_kernels(tmp_path):
    # three processes started at once against an empty extension directory, as DDP ranks would be
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "ZOO_CPU_KERNELS": "1"}

    def start():
        return subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    runs = [p.communicate(timeout=900) + (p.returncode,) for p in [start() for _ in range(3)]]
    for out, err, code in runs:
        assert code == 0, err
    warnings = [err.count("building zoo's CPU kernels, once") for _, err, _ in runs]
    assert sorted(warnings) == [0, 0, 1], [err for _, err, _ in runs]
    assert "ZOO_CPU_KERNELS=0 skips it, `make kernels` builds ahead of time" in "".join(err for _, err, _ in runs)
    assert len({out for out, _, _ in runs}) == 1  # the same results from the same library
    # a later process finds the build and says nothing
    out, err = start().communicate(timeout=300)
    assert "building" not in err and out == runs[0][0]
