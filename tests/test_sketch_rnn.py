"""Sketch-RNN model: cells against independent step loops, the mixture likelihood against
torch.distributions, masked recurrent batch norm, sampling temperature, schedules, degenerate input,
input validation."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D

from zoo import cpu_kernels
from zoo.models.sketch_rnn import (
    LSTMLayer,
    MixtureParams,
    SketchRNN,
    gmm_log_prob,
    interpolate_latents,
    kl_divergence,
    kl_weight_schedule,
    reconstruction_loss,
    sample_mixture,
    split_params,
)
from zoo.optim import lr_schedule

CELL_NORMS = ("none", "layer", "rms", "batch")  # the built-in kinds, each with its own fused cell


def fixed_keep(layer, keep):
    """Makes the layer use the dropout multipliers `keep` (T, B, H) in training."""
    layer._keep = lambda T, B, like: keep
    return layer


def slow_cell(kind, layer, x, h, c, keep=None, eps=1e-3):
    """An obvious per-step loop written from the papers' equations (explicit means and variances),
    reading the layer's parameters; gates in torch's order i, f, g, o."""
    H = layer.hidden_size
    if kind == "none":
        w_ih, w_hh = layer.lstm.weight_ih_l0, layer.lstm.weight_hh_l0
        bias = layer.lstm.bias_ih_l0 + layer.lstm.bias_hh_l0
    else:
        w_ih, w_hh = layer.weight_ih, layer.weight_hh
    outs = []
    for t in range(x.shape[1]):
        a = x[:, t] @ w_ih.T + h @ w_hh.T
        if kind == "none":
            a = a + bias
        else:
            groups = []
            for k in range(4):
                v = a[:, k * H:(k + 1) * H]
                if kind == "layer":
                    v = (v - v.mean(1, keepdim=True)) / torch.sqrt(((v - v.mean(1, keepdim=True)) ** 2).mean(1, keepdim=True) + eps)
                else:
                    v = v / torch.sqrt((v ** 2).mean(1, keepdim=True) + eps)
                groups.append(v)
            a = torch.cat(groups, 1) * layer.gate_weight + layer.gate_bias
        i, f, g, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
        g = torch.tanh(g) if keep is None else torch.tanh(g) * keep[t]
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * g
        if kind == "layer":
            cn = (c - c.mean(1, keepdim=True)) / torch.sqrt(c.var(1, unbiased=False, keepdim=True) + eps)
            cn = cn * layer.cell_weight + layer.cell_bias
        elif kind == "rms":
            cn = c / torch.sqrt((c ** 2).mean(1, keepdim=True) + eps) * layer.cell_weight + layer.cell_bias
        else:
            cn = c
        h = torch.sigmoid(o) * torch.tanh(cn)
        outs.append(h)
    return torch.stack(outs, 1), c


def test_none_cell_is_torch_lstm_and_equals_lstmcell_loop():
    torch.manual_seed(0)
    layer = LSTMLayer(5, 8, "none", recurrent_dropout=0.0).eval()
    cell = torch.nn.LSTMCell(5, 8)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in layer.lstm.state_dict().items()})
    x, h, c = torch.randn(3, 6, 5), torch.randn(3, 8), torch.randn(3, 8)
    out, (hT, cT) = layer(x, (h, c))
    ref = []
    for t in range(6):
        h, c = cell(x[:, t], (h, c))
        ref.append(h)
    torch.testing.assert_close(out, torch.stack(ref, 1))
    torch.testing.assert_close(cT, c)
    # official initialisation: forget bias 1, orthogonal recurrent block per gate
    assert torch.all(layer.lstm.bias_ih_l0[8:16] == 1) and torch.all(layer.lstm.bias_hh_l0 == 0)
    blk = layer.lstm.weight_hh_l0[16:24]
    torch.testing.assert_close(blk @ blk.T, torch.eye(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["none", "layer", "rms"])
def test_fused_scan_equals_slow_loop_with_dropout_outputs_and_gradients(kind, scan_path):
    torch.manual_seed(1)
    layer = LSTMLayer(4, 6, kind, recurrent_dropout=0.3).double().train()
    with torch.no_grad():  # non-trivial gains and shifts
        for name, p in layer.named_parameters():
            if name.endswith(("gate_weight", "gate_bias", "cell_weight", "cell_bias")):
                p.add_(torch.randn_like(p) * 0.3)
    B, T = 3, 7
    keep = (torch.rand(T, B, 6) > 0.3).double() / 0.7
    fixed_keep(layer, keep)
    x = torch.randn(B, T, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, 6, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(B, 6, dtype=torch.float64, requires_grad=True)
    out, (_, cT) = layer(x, (h0, c0))
    ref, ref_c = slow_cell(kind, layer, x, h0, c0, keep)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(cT, ref_c)
    w = torch.randn_like(out)
    inputs = [x, h0, c0, *layer.parameters()]
    g_fast = torch.autograd.grad((out * w).sum() + cT.sum(), inputs)
    g_ref = torch.autograd.grad((ref * w).sum() + ref_c.sum(), inputs)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b)


def slow_batch_norm_cell(layer, x, lengths, keep=None, eps=1e-3):
    """Recurrent batch norm from Cooijmans et al. with statistics over the real samples of each step;
    steps where no sample is real reuse the last real step's statistics (autograd through all of it)."""
    B, T, _ = x.shape
    H = layer.hidden_size
    h = c = torch.zeros(B, H, dtype=x.dtype)
    last = {}

    def bn(name, v, real, gamma, beta):
        if real.any():
            r = v[real]
            mean = r.mean(0)
            last[name] = mean, ((r - mean) ** 2).mean(0)
        mean, var = last[name]
        return (v - mean) / torch.sqrt(var + eps) * gamma + beta

    outs = []
    for t in range(T):
        real = lengths > t
        a = bn("x", x[:, t] @ layer.weight_ih.T, real, layer.x_weight, layer.bias) + \
            bn("h", h @ layer.weight_hh.T, real, layer.h_weight, 0)
        i, f, g, o = a.chunk(4, 1)
        g = torch.tanh(g) if keep is None else torch.tanh(g) * keep[t]
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * g
        h = torch.sigmoid(o) * torch.tanh(bn("c", c, real, layer.cell_weight, layer.cell_bias))
        outs.append(h)
    return torch.stack(outs, 1), c


def test_batch_norm_cell_equals_slow_masked_loop_and_ignores_padding(scan_path):
    torch.manual_seed(2)
    layer = LSTMLayer(4, 5, "batch", recurrent_dropout=0.0).double().train()
    lengths = torch.tensor([6, 3, 5, 6])
    x = torch.randn(4, 6, 4, dtype=torch.float64)
    out, _ = layer(x, lengths=lengths)
    torch.testing.assert_close(out, slow_batch_norm_cell(layer, x, lengths)[0])
    # Changing the padded steps' values, or adding padding, leaves every real step unchanged.
    x2 = torch.cat([x, torch.randn(4, 3, 4, dtype=torch.float64) * 50], 1)
    for b, n in enumerate(lengths.tolist()):
        x2[b, n:] = torch.randn(x2.shape[1] - n, 4, dtype=torch.float64) * 50
    out2, _ = layer(x2, lengths=lengths)
    real = torch.arange(6)[None] < lengths[:, None]
    torch.testing.assert_close(out2[:, :6][real], out[real])
    # Per-step running statistics were updated for the 6 real steps only (first call), in eval they are used.
    assert torch.all(layer.running_mean_x[9:] == 0) and not torch.all(layer.running_mean_x[:6] == 0)
    layer.eval()
    o_eval, _ = layer(x, lengths=lengths)
    assert torch.isfinite(o_eval).all()


def test_batch_norm_scan_gradients_equal_autograd_through_slow_loop(scan_path):
    # Unsorted lengths, steps past the longest sequence (statistics reused), dropout, trained gains.
    torch.manual_seed(5)
    layer = LSTMLayer(3, 4, "batch", recurrent_dropout=0.3).double().train()
    with torch.no_grad():
        for p in (layer.x_weight, layer.h_weight, layer.bias, layer.cell_weight, layer.cell_bias):
            p.add_(torch.randn_like(p) * 0.5)
    B, T = 5, 7
    lengths = torch.tensor([3, 5, 1, 5, 2])
    keep = (torch.rand(T, B, 4) > 0.3).double() / 0.7
    fixed_keep(layer, keep)
    x = torch.randn(B, T, 3, dtype=torch.float64, requires_grad=True)
    out, (_, cT) = layer(x, lengths=lengths)
    ref, ref_c = slow_batch_norm_cell(layer, x, lengths, keep)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(cT, ref_c)
    w = torch.randn_like(out)
    inputs = [x, *layer.parameters()]
    g_fast = torch.autograd.grad((out * w).sum() + (cT * cT).sum(), inputs)
    g_ref = torch.autograd.grad((ref * w).sum() + (ref_c * ref_c).sum(), inputs)
    for name, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], g_fast, g_ref):
        torch.testing.assert_close(a, b, msg=name)
    # eval: running statistics are constants; gradients still match autograd through the same formula
    del layer._keep  # back to the layer's own (no dropout in eval)
    layer.eval()
    out_e, _ = layer(x, lengths=lengths)
    ref_e = []
    h = c = torch.zeros(B, 4, dtype=torch.float64)
    for t in range(T):
        def bn(name, v, gamma, beta):
            m, var = getattr(layer, f"running_mean_{name}")[t], getattr(layer, f"running_var_{name}")[t]
            return (v - m) / torch.sqrt(var + 1e-3) * gamma + beta
        a = (bn("x", x[:, t] @ layer.weight_ih.T, layer.x_weight, layer.bias)
             + bn("h", h @ layer.weight_hh.T, layer.h_weight, 0))
        i, f, g, o = a.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(bn("c", c, layer.cell_weight, layer.cell_bias))
        ref_e.append(h)
    ref_e = torch.stack(ref_e, 1)
    torch.testing.assert_close(out_e, ref_e)
    torch.testing.assert_close(torch.autograd.grad((out_e * w).sum(), inputs),
                               torch.autograd.grad((ref_e * w).sum(), inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernels_equal_torch_scans_with_threads(dtype, monkeypatch):
    """The C++ scans against the pure-PyTorch ones, in float32 and with rows/columns split over 2
    threads (per-thread gain-gradient sums, per-column batch statistics)."""
    assert cpu_kernels.available()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for norm in CELL_NORMS[1:]:
            torch.manual_seed(0)
            layer = LSTMLayer(5, 64, norm, recurrent_dropout=0.2).to(dtype).train()
            x = torch.randn(300, 6, 5, dtype=dtype)
            lengths = torch.randint(1, 7, (300,))
            keep = (torch.rand(6, 300, 64) > 0.2).to(dtype) / 0.8
            fixed_keep(layer, keep)
            results = []
            for enabled in (True, False):
                monkeypatch.setattr(cpu_kernels, "ENABLED", enabled)
                copy = LSTMLayer(5, 64, norm, recurrent_dropout=0.2).to(dtype).train()
                copy.load_state_dict(layer.state_dict())
                fixed_keep(copy, keep)
                out, (_, c) = copy(x, lengths=lengths)
                grads = torch.autograd.grad((out * out).sum() + c.sum(), list(copy.parameters()))
                results.append([out, c, *grads, *copy.buffers()])
            for a, b in zip(*results):  # float32: sums over 1800 rows, error relative to the largest entry
                tol = dict(rtol=0, atol=1e-4 * b.detach().abs().max().item()) if dtype == torch.float32 else {}
                torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{norm}: {m}")
    finally:
        torch.set_num_threads(threads)


def test_encoder_ignores_padding_for_every_norm():
    torch.manual_seed(3)
    for norm in CELL_NORMS:
        net = SketchRNN(enc_rnn_size=6, dec_rnn_size=8, z_size=3, num_mixture=2, norm=norm,
                        recurrent_dropout=0.0).double().train()
        pts = torch.randn(3, 5, 5, dtype=torch.float64)
        lengths = torch.tensor([5, 2, 4])
        padded = torch.cat([pts, torch.zeros(3, 4, 5, dtype=torch.float64)], 1)
        for b, n in enumerate(lengths.tolist()):
            padded[b, n:] = torch.randn(9 - n, 5, dtype=torch.float64) * 10
        mu1, s1 = net.encode(pts, lengths)
        mu2, s2 = net.encode(padded, lengths)
        torch.testing.assert_close(mu1, mu2, msg=norm)
        torch.testing.assert_close(s1, s2, msg=norm)


def random_params(shape, M, scale=1.0):
    g = torch.Generator().manual_seed(4)
    out = torch.randn(*shape, 3 + 6 * M, generator=g, dtype=torch.float64) * scale
    return split_params(out, M)


def test_gmm_log_prob_equals_torch_distributions_mixture():
    M = 4
    p = random_params((6,), M)
    x, y = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    sx, sy = p.log_sigma_x.exp(), p.log_sigma_y.exp()
    cov = torch.stack([torch.stack([sx * sx, p.rho * sx * sy], -1), torch.stack([p.rho * sx * sy, sy * sy], -1)], -2)
    mix = D.MixtureSameFamily(D.Categorical(logits=p.pi_logits),
                              D.MultivariateNormal(torch.stack([p.mu_x, p.mu_y], -1), covariance_matrix=cov))
    torch.testing.assert_close(gmm_log_prob(x, y, p), mix.log_prob(torch.stack([x, y], -1)))


def test_reconstruction_loss_masks_and_divides_as_official():
    M, B, N = 3, 2, 4
    p = random_params((B, N), M)
    target = torch.zeros(B, N, 5, dtype=torch.float64)
    target[..., :2] = torch.randn(B, N, 2, dtype=torch.float64)
    target[0, :, 2] = 1                          # sketch 0: 4 points, pen down
    target[1, :2, 3] = 1                         # sketch 1: 2 points, then end-of-sketch
    target[1, 2:, 4] = 1
    target[1, 2:, :4] = 0
    l_s, l_p = reconstruction_loss(p, target)
    real = [(0, t) for t in range(4)] + [(1, 0), (1, 1)]
    ll = gmm_log_prob(target[..., 0], target[..., 1], p)
    ref_s = sum(-torch.log(ll[b, t].exp() + 1e-6) for b, t in real) / (B * N)
    ce = -F.log_softmax(p.pen_logits, -1).gather(-1, target[..., 2:].argmax(-1, keepdim=True))[..., 0]
    torch.testing.assert_close(l_s, ref_s)
    torch.testing.assert_close(l_p, ce.sum() / (B * N))              # training: all N steps
    _, l_p_eval = reconstruction_loss(p, target, mask_pen=True)
    torch.testing.assert_close(l_p_eval, sum(ce[b, t] for b, t in real) / (B * N))


def test_temperature_scales_pi_pen_and_variance_as_the_paper():
    B, tau = 40000, 0.5
    pen = torch.tensor([1.0, 0.0, -1.0])
    pi = torch.tensor([0.0, 0.7])
    p = MixtureParams(pen.expand(B, 3), pi.expand(B, 2), torch.tensor([0.0, 20.0]).expand(B, 2),
                      torch.zeros(B, 2), torch.full((B, 2), math.log(2.0)), torch.full((B, 2), math.log(2.0)),
                      torch.zeros(B, 2))
    g = torch.Generator().manual_seed(0)
    s = sample_mixture(p, tau, generator=g)
    freq = s[:, 2:].mean(0)
    torch.testing.assert_close(freq, torch.softmax(pen / tau, 0), atol=0.01, rtol=0)
    second = (s[:, 0] > 10).float().mean()  # component 2 has mean 20, component 1 mean 0
    assert abs(float(second) - float(torch.softmax(pi / tau, 0)[1])) < 0.01
    assert abs(float(s[:, 1].std()) - 2 * math.sqrt(tau)) < 0.03   # dy: sigma 2, variance * tau
    s_off = sample_mixture(p, tau, sigma_temperature="official", generator=g)
    assert abs(float(s_off[:, 1].std()) - 2 * tau) < 0.03           # magenta: sigma * tau
    greedy = sample_mixture(p, tau, greedy=True)
    assert torch.all(greedy[:, 0] == 20.0) and torch.all(greedy[:, 2] == 1)
    with pytest.raises(ValueError, match="temperature"):
        sample_mixture(p, 0.0)


def test_kl_annealing_and_lr_schedule_hand_computed():
    assert kl_weight_schedule(0) == pytest.approx(0.01)
    assert kl_weight_schedule(1) == pytest.approx(0.5 - 0.49 * 0.99995)
    # 0.99995 ** 10000 = exp(10000 * ln 0.99995) = 0.6065231 -> 0.5 - 0.49 * 0.6065231
    assert kl_weight_schedule(10000) == pytest.approx(0.2028037, abs=1e-6)
    assert kl_weight_schedule(10**7) == pytest.approx(0.5)
    mu, presig = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    # dim 1: mu^2 = 1 -> 0.5; dim 2: sigma^2 = 4 -> 0.5 (4 - 1 - ln 4); mean over the 2 dims
    assert float(kl_divergence(mu, presig)) == pytest.approx((0.5 + 0.5 * (3 - math.log(4.0))) / 2)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = lr_schedule(opt, "exponential", decay_rate=0.9999, min_lr_ratio=1e-5 / 1e-3)
    for _ in range(1000):
        opt.step()
        sched.step()
    # (1e-3 - 1e-5) * 0.9999 ** 1000 + 1e-5, 0.9999 ** 1000 = 0.9048329
    assert opt.param_groups[0]["lr"] == pytest.approx(0.00099 * 0.9048329 + 1e-5, rel=1e-6)


@pytest.mark.parametrize("norm", CELL_NORMS)
def test_degenerate_strokes_give_finite_loss_and_gradients(norm):
    torch.manual_seed(5)
    net = SketchRNN(enc_rnn_size=6, dec_rnn_size=8, z_size=3, num_mixture=2, norm=norm).train()
    strokes = torch.zeros(3, 5, 5)
    strokes[:, 0, 2] = 1
    strokes[0, 1:, 3] = 1          # 4 points, all zero offsets
    strokes[1, 1, 3] = 1           # a single point
    strokes[1, 2:, 4] = 1
    strokes[2, 1, 3] = 1
    strokes[2, 2:, 4] = 1
    lengths = torch.tensor([4, 1, 1])
    out = net(strokes, lengths)
    l_s, l_p = reconstruction_loss(net.params(out["out"]), strokes[:, 1:])
    loss = l_s + l_p + kl_divergence(out["mu"], out["presig"])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    # saturated rho (tanh = +-1 in float32) stays finite
    p = split_params(torch.full((2, 3 + 6 * 2), 50.0), 2)
    assert torch.isfinite(gmm_log_prob(torch.zeros(2), torch.zeros(2), p)).all()


@pytest.mark.parametrize("norm", CELL_NORMS)
def test_sampling_reconstruction_interpolation_shapes(norm):
    torch.manual_seed(6)
    net = SketchRNN(enc_rnn_size=6, dec_rnn_size=8, z_size=3, num_mixture=2, norm=norm, max_seq_len=12)
    strokes, lengths = net.sample(num=5, temperature=0.5)
    assert strokes.shape[0] == 5 and strokes.shape[1] <= 12 and strokes.shape[2] == 5
    assert torch.all(lengths <= strokes.shape[1]) and net.training
    # rows from `length` on are end-of-sketch rows
    for s, n in zip(strokes, lengths.tolist()):
        assert torch.all(s[n:, 4] == 1) and torch.all(s[:n, 4] == 0)
    batch = torch.zeros(2, 5, 5)
    batch[:, 0, 2] = 1
    batch[:, 1:, 2] = 1
    out, _ = net.reconstruct(batch, torch.tensor([4, 4]), greedy=True)
    assert out.shape[0] == 2
    interp, _ = net.interpolate(batch, torch.tensor([4, 4]), steps=4)
    assert interp.shape[0] == 4
    uncond = SketchRNN(enc_rnn_size=6, dec_rnn_size=8, z_size=3, num_mixture=2, norm=norm, conditional=False,
                       max_seq_len=6)
    assert uncond.sample(num=3)[0].shape[0] == 3 and not hasattr(uncond, "encoder_fwd")


def test_interpolation_endpoints_and_slerp_norm():
    z0, z1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    path = interpolate_latents(z0, z1, 5)
    torch.testing.assert_close(path[0], z0)
    torch.testing.assert_close(path[-1], z1)
    lin = interpolate_latents(z0, z1, 3, "linear")
    torch.testing.assert_close(lin[1], torch.tensor([0.5, 1.0]))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="bogus"):
        LSTMLayer(3, 4, "bogus")
    with pytest.raises(ValueError, match="recurrent_dropout"):
        LSTMLayer(3, 4, "layer", recurrent_dropout=1.0)


def tiny_sketch_rnn(**kw):
    torch.manual_seed(7)
    return SketchRNN(enc_rnn_size=6, dec_rnn_size=8, z_size=3, num_mixture=2, max_seq_len=10, norm="layer", **kw)


def stroke_batch(B=2, T=6):
    strokes = torch.zeros(B, T, 5)
    strokes[:, 0, 2] = 1  # S0
    return strokes


@pytest.mark.parametrize("conditional", [True, False])
def test_forward_refuses_a_malformed_batch(conditional):
    net, strokes, lengths = tiny_sketch_rnn(conditional=conditional), stroke_batch(), torch.tensor([3, 5])
    assert net(strokes, lengths)["out"].shape == (2, 5, 3 + 6 * 2)
    for bad in (strokes[..., :4], strokes[0], strokes[:, :1], strokes.double()):
        want = (f"strokes must be stroke-5 rows of shape (B, T, 5) with T >= 2 (S0 and the points) and the model's "
                f"dtype torch.float32, got shape {tuple(bad.shape)} and dtype {bad.dtype}")
        with pytest.raises(ValueError, match=re.escape(want)):
            net(bad, lengths)
    for bad in (torch.tensor([3]), lengths.float(), lengths[:, None], lengths.int()):
        want = (f"lengths must be an int64 tensor of shape (B,) = (2,), got shape {tuple(bad.shape)} and dtype "
                f"{bad.dtype}")
        with pytest.raises(ValueError, match=re.escape(want)):
            net(strokes, bad)
    with pytest.raises(TypeError, match=re.escape("lengths must be a tensor of shape (B,), got list")):
        net(strokes, [3, 5])


def test_lengths_must_fit_the_points_after_s0():
    net, strokes = tiny_sketch_rnn(), stroke_batch()  # 6 rows: S0 and 5 points
    assert net(strokes, torch.tensor([5, 1]))["out"].shape[1] == 5  # a sketch may fill every row (no end row)
    for bad, lo, hi in (([3, 6], 3, 6), ([0, 5], 0, 5)):
        with pytest.raises(ValueError, match=re.escape(f"lengths must be in [1, 5], the point rows after S0, got "
                                                       f"lengths from {lo} to {hi}")):
            net(strokes, torch.tensor(bad))
    with pytest.raises(ValueError, match=re.escape("lengths must be in [1, 5]")):
        net.reconstruct(strokes, torch.tensor([6, 2]))


def test_sampling_and_interpolation_arguments_are_checked():
    net, strokes, lengths = tiny_sketch_rnn(), stroke_batch(), torch.tensor([3, 5])
    with pytest.raises(ValueError, match=re.escape("z must have shape (B, z_size=3), got (2, 5)")):
        net.sample(torch.randn(2, 5))
    with pytest.raises(ValueError, match=re.escape("z must have shape (B, z_size=3), got (3,)")):
        net.sample(torch.randn(3))
    with pytest.raises(ValueError, match=re.escape("max_len must be >= 1 (or None for max_seq_len=10), got 0")):
        net.sample(num=2, max_len=0)
    g = torch.Generator().manual_seed(0)
    assert net.sample(num=2, max_len=1, generator=g)[0].shape == (2, 1, 5)  # max_len is honoured, not replaced
    with pytest.raises(ValueError, match=re.escape("interpolate needs a batch of at least 2 sketches, got 1")):
        net.interpolate(strokes[:1], lengths[:1])
    with pytest.raises(ValueError, match=re.escape("strokes must be stroke-5 rows of shape (B, T, 5)")):
        net.reconstruct(strokes[..., :4], lengths)
    assert net.interpolate(strokes, lengths, steps=3)[0].shape[0] == 3


@pytest.mark.parametrize("name", ["enc_rnn_size", "dec_rnn_size", "z_size", "num_mixture", "max_seq_len"])
def test_sizes_must_be_positive(name):
    with pytest.raises(ValueError, match=re.escape(f"{name} must be >= 1, got 0")):
        SketchRNN(**{name: 0})
