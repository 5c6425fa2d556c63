"""Sketch-RNN (Ha & Eck, "A Neural Representation of Sketch Drawings", ICLR 2018): a sequence VAE over
pen strokes, with the normalization inside the recurrent cells.

Shapes (B batch, N decoder steps, M mixture components, Nz latent size):
    strokes   (B, N + 1, 5) stroke-5 rows [dx, dy, p1, p2, p3]; row 0 is S0 = (0, 0, 1, 0, 0), rows
              1..length are the sketch's points, later rows are end-of-sketch padding (p3 = 1)
    lengths   (B,) int64 number of points of each sketch (>= 1)
    encoder   rows 1.. of the batch -> bidirectional LSTM over each sketch's real points only ->
              [h_fwd; h_bwd] (B, 2 enc) -> mu, presig (B, Nz); sigma = exp(presig / 2)
    decoder   input [S_{t-1}; z] (B, N, 5 + Nz), initial state tanh(W z + b) -> h (B, N, dec) ->
              params (B, N, 3 + 6M) = [pen logits 3 | pi | mu_x | mu_y | log sigma_x | log sigma_y | rho]

Cells (`norm`, a `zoo.norm` kind declared recurrent, see `zoo.norm.norm_spec`; every cell has the
official forget-gate bias 1.0, orthogonal recurrent weights per gate, Glorot-uniform input weights, and
recurrent dropout on the candidate tanh(g) only, as magenta's cells; gates are in torch's order
i, f, g, o, a relabelling of the official i, j, f, o):
    none   plain LSTM. Runs as `torch.nn.LSTM` (fused) whenever recurrent dropout is inactive (eval, or
           `recurrent_dropout=0`). The fused kernel cannot drop the candidate alone, so in training with
           recurrent dropout the same nn.LSTM weights run through this file's fused scan instead.
    layer  layer-normalized LSTM (Ba et al. 2016) as magenta's LayerNormLSTMCell: each of the four gate
           pre-activations (x W_x + h W_h, no bias) is normalized over its H units with its own gain and
           shift; the new cell state is normalized before the output tanh; eps 1e-3.
    rms    the layer cell with RMS statistics (no centering); shifts kept so gates still have a bias.
    batch  recurrent batch norm (Cooijmans et al. 2016): BN(x W_x; gamma_x) + BN(h W_h; gamma_h) + b,
           h = o * tanh(BN(c; gamma_c, beta_c)), gains initialised to 0.1. Statistics are per time step
           and computed over the samples whose step t is real (`lengths`), so padding changes nothing;
           steps past the longest sequence of a batch reuse the last real step's statistics, as the paper
           does past T_max. Inference uses per-step running statistics (`max_steps` of them; later steps
           use the last).
    any other registered kind declared per row and recurrent (`register_norm(..., pools_positions=False,
           pools_batch=False, recurrent=True)`): the layer cell's equations with the kind's own modules,
           `build_norm(kind, H, "nc")` for each gate and for the cell, plus a gate bias (forget 1.0), run
           as a plain step loop in PyTorch with autograd (slower than the fused cells).

Speed: the normalized cells (and `none` with recurrent dropout in training) run a whole sequence as one
autograd node (`FusedScan`, `BatchNormScan` for `batch`): the input projection of all steps is one
matmul, the forward steps run without recording a graph, back-propagation through time is hand-written
(including through the masked per-step statistics of `batch`), and weight gradients are one matmul over
all steps. On CPU both run as C++ kernels (zoo/csrc/lstm_scan.cpp, built on first use; differentiable
torch ops that torch.compile keeps in its graphs, see zoo.cpu_kernels): a step is the recurrent matmul
plus one fused pass per row (or column, for batch statistics). Elsewhere, or without a compiler, the
same math runs as torch ops (torch's fused norm kernels for layer/rms). See benchmarks/README.md for the
measured speeds.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import cpu_kernels
from zoo.models.config import network_config
from zoo.models.inference import inference
from zoo.norm import NormSpec, build_norm, check_norm

__all__ = ["LSTMLayer", "SketchRNN", "SketchRNNConfig", "MixtureParams", "split_params", "gmm_log_prob",
           "reconstruction_loss", "kl_divergence", "kl_weight_schedule", "interpolate_latents",
           "sample_mixture"]

SCAN_KINDS = {"none": 0, "layer": 1, "rms": 2}  # FusedScan's kinds: their numbers in zoo/csrc/lstm_scan.cpp
RHO_MAX = 1.0 - 1e-5  # |rho| < 1 keeps log(1 - rho^2) finite where tanh saturates in float32
LOG_2PI = math.log(2 * math.pi)


def _orthogonal_per_gate(weight: Tensor, hidden: int) -> None:
    """magenta's lstm_ortho_initializer: each gate's (H, H) recurrent block orthogonal."""
    with torch.no_grad():
        for k in range(4):
            nn.init.orthogonal_(weight[k * hidden:(k + 1) * hidden])


# --------------------------------------------------------------------------------------------- #
# Fused scan: forward without a graph, hand-written back-propagation through time
# --------------------------------------------------------------------------------------------- #

def _gate_norm_fwd(kind: str, a: Tensor, gamma: Tensor, beta: Tensor, eps: float):
    """Normalize each of the 4 gate groups of a (B, 4H) over its H units. Returns (out, stats...)."""
    B, H4 = a.shape
    if kind == "layer":  # layer norm over (B, 4, H): torch's group-norm backward is ~10x slower on CPU
        y, mean, rstd = torch.ops.aten.native_layer_norm(a.view(B, 4, H4 // 4), [H4 // 4], None, None, eps)
        return torch.addcmul(beta, y.view(B, H4), gamma), mean, rstd
    y, rstd = torch.ops.aten._fused_rms_norm(a.view(B, 4, H4 // 4), [H4 // 4], None, eps)
    return torch.addcmul(beta, y.view(B, H4), gamma), y.view(B, H4), rstd


def _gate_norm_bwd(kind: str, g: Tensor, a: Tensor, gamma: Tensor, s1: Tensor, s2: Tensor, eps: float) -> Tensor:
    """d loss / d a for `_gate_norm_fwd` (gain/shift gradients are summed over steps by the caller)."""
    B, H4 = a.shape
    if kind == "layer":
        da, _, _ = torch.ops.aten.native_layer_norm_backward((g * gamma).view(B, 4, H4 // 4), a.view(B, 4, H4 // 4),
                                                             [H4 // 4], s1, s2, None, None, [True, False, False])
        return da.view(B, H4)
    return _rms_bwd((g * gamma).view(B, 4, H4 // 4), s1.view(B, 4, H4 // 4), s2).view(B, H4)


def _cell_norm_fwd(kind: str, c: Tensor, gamma: Tensor, beta: Tensor, eps: float):
    H = c.shape[1]
    if kind == "layer":
        return torch.ops.aten.native_layer_norm(c, [H], gamma, beta, eps)
    y, rstd = torch.ops.aten._fused_rms_norm(c, [H], None, eps)
    return torch.addcmul(beta, y, gamma), y, rstd


def _rms_bwd(dy: Tensor, y: Tensor, rstd: Tensor) -> Tensor:
    """Gradient of y = x * rstd, rstd = (mean(x^2) + eps)^-1/2 over the last dim (torch has no CPU
    kernel for _fused_rms_norm_backward): dx = rstd * (dy - y * mean(dy * y))."""
    return rstd * (dy - y * (dy * y).mean(-1, keepdim=True))


def _cell_norm_bwd(kind: str, g: Tensor, c: Tensor, gamma: Tensor, s1: Tensor, s2: Tensor) -> Tensor:
    """s1, s2: layer: mean and rstd; rms: normalized cell before the gain, and rstd."""
    if kind == "layer":
        dc, _, _ = torch.ops.aten.native_layer_norm_backward(g, c, [c.shape[1]], s1, s2, gamma, None,
                                                             [True, False, False])
        return dc
    return _rms_bwd(g * gamma, s1, s2)


def _gates_to_cell(gates: Tensor, act: Tensor, c_prev: Tensor, c_out: Tensor, keep: Tensor | None):
    """One LSTM cell update from (B, 4H) pre-activations in (i, f, g, o) order, written into the
    preallocated `act` (B, 4H) and `c_out` (B, H): returns the output gate o and c = f*c_prev + i*g
    (g times the recurrent-dropout mask `keep` when given)."""
    H = c_prev.shape[1]
    torch.sigmoid(gates, out=act)
    torch.tanh(gates[:, 2 * H:3 * H], out=act[:, 2 * H:3 * H])
    i, f, g, o = act.chunk(4, 1)
    if keep is not None:
        g = g * keep
    return o, torch.mul(f, c_prev, out=c_out).addcmul_(i, g)


def _lstm_scan(kind, eps, xw, h0, c0, w_hh, g_gamma, g_beta, c_gamma, c_beta, keep):
    """One LSTM direction of kind none / layer / rms (`FusedScan`'s inputs and results): where the CPU
    kernels are usable the C++ op `zoo::lstm_scan_forward` (differentiable, and kept whole in
    torch.compile's graphs, see zoo.cpu_kernels), else `FusedScan`."""
    if cpu_kernels.usable(xw):
        hs, c, *_ = torch.ops.zoo.lstm_scan_forward(SCAN_KINDS[kind], eps, xw, h0, c0, w_hh, g_gamma, g_beta,
                                                     c_gamma, c_beta, keep)
        return hs, c
    return FusedScan.apply(kind, eps, xw, h0, c0, w_hh, g_gamma, g_beta, c_gamma, c_beta, keep)


class FusedScan(torch.autograd.Function):
    """One LSTM direction over a whole sequence as one autograd node (kinds none / layer / rms).

    Inputs: xw (T, B, 4H) input projections (bias included for `none`), h0, c0 (B, H), w_hh (4H, H),
    gate gain/shift (4H,), cell gain/shift (H,) (ignored for `none`), keep (T, B, H) recurrent-dropout
    multipliers or an empty tensor. Returns the hidden states (T, B, H) and the last cell state (B, H).
    The pure-PyTorch form of the C++ op `zoo::lstm_scan_forward` (the same math, see `_lstm_scan`).

    Per-step work is kept to a few large ops: the forward writes into preallocated buffers; the
    backward first computes, vectorized over all steps, every factor that does not depend on the
    incoming gradient (activation derivatives times their partners in the product rule), so each step
    is one matmul, a handful of multiplies and the two norm backward kernels.
    """

    @staticmethod
    def forward(ctx, kind, eps, xw, h0, c0, w_hh, g_gamma, g_beta, c_gamma, c_beta, keep):
        T, B, H4 = xw.shape
        H = H4 // 4
        drop = keep.numel() > 0
        ctx.kind, ctx.eps, ctx.drop = kind, eps, drop
        hs = xw.new_empty(T + 1, B, H)
        cs = xw.new_empty(T + 1, B, H)
        acts = xw.new_empty(T, B, H4)       # sigmoid(i, f, o) and tanh(g) (before dropout)
        tcs = xw.new_empty(T, B, H)          # tanh of the (normalized) cell
        # gate pre-activations before the norm (kept for its backward), or one scratch buffer
        pre = xw.new_empty(T, B, H4) if kind != "none" else xw.new_empty(1, B, H4)
        gs1, gs2, cs1, cs2 = [], [], [], []
        hs[0], cs[0] = h0, c0
        w_t = w_hh.t()
        for t in range(T):
            a = torch.addmm(xw[t], hs[t], w_t, out=pre[t if kind != "none" else 0])
            if kind != "none":
                a, s1, s2 = _gate_norm_fwd(kind, a, g_gamma, g_beta, eps)
                gs1.append(s1)
                gs2.append(s2)
            o, c = _gates_to_cell(a, acts[t], cs[t], cs[t + 1], keep[t] if drop else None)
            if kind != "none":
                c, s1, s2 = _cell_norm_fwd(kind, c, c_gamma, c_beta, eps)
                cs1.append(s1)
                cs2.append(s2)
            torch.mul(o, torch.tanh(c, out=tcs[t]), out=hs[t + 1])
        stats = [torch.stack(s) if s else xw.new_empty(0) for s in (gs1, gs2, cs1, cs2)]
        ctx.save_for_backward(w_hh, g_gamma, c_gamma, keep, hs, cs, acts, tcs,
                              pre if kind != "none" else xw.new_empty(0), *stats)
        return hs[1:].clone(), cs[T].clone()

    @staticmethod
    def backward(ctx, d_out, d_cT):
        (w_hh, g_gamma, c_gamma, keep, hs, cs, acts, tcs, pre, gs1, gs2, cs1, cs2) = ctx.saved_tensors
        kind, eps, drop = ctx.kind, ctx.eps, ctx.drop
        T, B, H = d_out.shape
        norm = kind != "none"
        # Step-independent factors, all steps at once. With dc, dh the gradients of the step's cell
        # state (before its norm) and hidden state: d(i, f, g, o pre-activations) =
        # (dc * g' * sig'(i), dc * c_prev * sig'(f), dc * i' * tanh'(g), dh * tanh(c) * sig'(o)),
        # primes marking dropout; d(normalized cell) = dh * o * tanh'(c).
        i, f, g, o = acts.chunk(4, 2)
        gk, ik = (g * keep, i * keep) if drop else (g, i)
        mult = torch.stack([gk * i * (1 - i), cs[:-1] * f * (1 - f), ik * (1 - g * g), tcs * o * (1 - o)], 2)
        d_tc = o * (1 - tcs * tcs)
        d_a = d_out.new_empty(T, B, 4 * H)      # d loss / d gate pre-activation before the norm
        d_an = d_out.new_empty(T, B, 4 * H) if norm else d_a   # ... after the norm
        d_cn = d_out.new_empty(T, B, H) if norm else None      # d loss / d normalized cell
        dh = d_out[T - 1]
        dc = d_cT if d_cT is not None else None
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                dh = torch.addmm(d_out[t], d_a[t + 1], w_hh)
            dtc = torch.mul(dh, d_tc[t], out=d_cn[t]) if norm else dh * d_tc[t]
            if norm:
                dtc = _cell_norm_bwd(kind, dtc, cs[t + 1], c_gamma, cs1[t], cs2[t])
            # cell gradient: this step's, plus the next step's carried through its forget gate
            dc = dtc if dc is None else (dtc + dc if t == T - 1 else torch.addcmul(dtc, dc, f[t + 1]))
            da = d_an[t].view(B, 4, H)
            torch.mul(mult[t, :, :3], dc[:, None], out=da[:, :3])
            torch.mul(mult[t, :, 3], dh, out=da[:, 3])
            if norm:
                d_a[t] = _gate_norm_bwd(kind, d_an[t], pre[t], g_gamma, gs1[t], gs2[t], eps)
        d_h0 = d_a[0] @ w_hh
        d_c0 = dc * f[0]
        d_w_hh = d_a.flatten(0, 1).t() @ hs[:-1].flatten(0, 1)
        d_gg = d_gb = d_cg = d_cb = None
        if norm:
            # gains and shifts: one reduction over all steps
            if kind == "layer":
                H4 = 4 * H
                gn = ((pre.view(T, B, 4, H) - gs1.view(T, B, 4, 1)) * gs2.view(T, B, 4, 1)).view(T, B, H4)
                cn = (cs[1:] - cs1.view(T, B, 1)) * cs2.view(T, B, 1)
            else:
                gn, cn = gs1, cs1  # rms keeps the normalized values before the gain as its stats
            d_gg = (d_an * gn).sum((0, 1))
            d_gb = d_an.sum((0, 1))
            d_cg = (d_cn * cn).sum((0, 1))
            d_cb = d_cn.sum((0, 1))
        return None, None, d_a, d_h0, d_c0, d_w_hh, d_gg, d_gb, d_cg, d_cb, None


# --------------------------------------------------------------------------------------------- #
# The recurrent layer
# --------------------------------------------------------------------------------------------- #

class BatchNormScan(torch.autograd.Function):
    """The recurrent-batch-norm LSTM direction (Cooijmans et al.) over a sequence as one autograd node.

    gates_t = BN(x_t W_x; gamma_x) + BN(h_{t-1} W_h; gamma_h) + b, c_t = f * c_{t-1} + i * g,
    h_t = o * tanh(BN(c_t; gamma_c, beta_c)).

    Inputs: xw (T, B, 4H) input projections, h0, c0 (B, H), w_hh (4H, H), x_gamma, h_gamma, bias (4H,),
    c_gamma, c_beta (H,), keep (T, B, H) dropout multipliers or an empty tensor, and either `counts`
    (training: a list of T ints, the rows of step t whose step is real are rows 0..counts[t]-1, i.e. the
    batch is sorted by decreasing length; steps with no real row reuse the last real step's statistics)
    or `stats` (eval: per-step mean and variance of the input projection (T, 4H), of the recurrent
    projection (T, 4H) and of the cell (T, H)). Returns the hidden states (T, B, H), the last cell state
    (B, H) and, in training, the per-step batch statistics (mean_x, var_x, mean_h, var_h, mean_c, var_c).

    The backward adds the gradient through the statistics: for y = (a - mean) * rstd over the real rows
    R of step s, read by the steps t that use step s's statistics, with G_t = dL/dy_t * gamma,
    dL/da_s = rstd * G_s - [b in R] * rstd / |R| * (sum_t sum_b G_t + xhat_s * sum_t sum_b G_t * xhat_t).
    The pure-PyTorch form of the C++ op `zoo::bn_lstm_scan_forward` (the same math, see
    `LSTMLayer._batch_scan`).
    """

    @staticmethod
    def forward(ctx, eps, xw, h0, c0, w_hh, x_gamma, h_gamma, bias, c_gamma, c_beta, keep, counts, stats):
        T, B, H4 = xw.shape
        H = H4 // 4
        drop = keep.numel() > 0
        ctx.eps, ctx.drop, ctx.counts = eps, drop, counts
        hs, cs = xw.new_empty(T + 1, B, H), xw.new_empty(T + 1, B, H)
        acts, tcs, pre = xw.new_empty(T, B, H4), xw.new_empty(T, B, H), xw.new_empty(T, B, H4)
        # per statistic (x, h, c): lists of per-step means and variances, and the (T, width) rstd
        if counts is not None:
            means, variances = [[], [], []], [[], [], []]
        else:
            means, variances = [list(s.unbind(0)) for s in stats[0::2]], [list(s.unbind(0)) for s in stats[1::2]]
        rstds = [xw.new_empty(T, H4), xw.new_empty(T, H4), xw.new_empty(T, H)]

        def normalize(k, v, t):
            """(v - mean) * rstd with statistic k's step-t statistics (computed in training)."""
            if counts is not None:
                var, mean = (torch.var_mean(v[:counts[t]], 0, correction=0) if counts[t]
                             else (variances[k][-1], means[k][-1]))
                variances[k].append(var)
                means[k].append(mean)
            torch.rsqrt(variances[k][t] + eps, out=rstds[k][t])
            return (v - means[k][t]) * rstds[k][t]

        hs[0], cs[0] = h0, c0
        w_t = w_hh.t()
        for t in range(T):
            a = torch.mm(hs[t], w_t, out=pre[t])
            gates = torch.addcmul(torch.addcmul(bias, normalize(0, xw[t], t), x_gamma), normalize(1, a, t), h_gamma)
            o, c = _gates_to_cell(gates, acts[t], cs[t], cs[t + 1], keep[t] if drop else None)
            cn = torch.addcmul(c_beta, normalize(2, c, t), c_gamma)
            torch.mul(o, torch.tanh(cn, out=tcs[t]), out=hs[t + 1])
        means, variances = [torch.stack(m) for m in means], [torch.stack(v) for v in variances]
        ctx.save_for_backward(w_hh, x_gamma, h_gamma, c_gamma, keep, xw, hs, cs, acts, tcs, pre, *means, *rstds)
        out = (hs[1:].clone(), cs[T].clone())
        if counts is not None:
            stats_out = [s for pair in zip(means, variances) for s in pair]
            ctx.mark_non_differentiable(*stats_out)
            out += tuple(stats_out)
        return out

    @staticmethod
    def backward(ctx, d_out, d_cT, *_):
        (w_hh, x_gamma, h_gamma, c_gamma, keep, xw, hs, cs, acts, tcs, pre,
         mean_x, mean_h, mean_c, rstd_x, rstd_h, rstd_c) = ctx.saved_tensors
        drop, counts = ctx.drop, ctx.counts
        T, B, H = d_out.shape
        i, f, g, o = acts.chunk(4, 2)
        gk, ik = (g * keep, i * keep) if drop else (g, i)
        mult = torch.stack([gk * i * (1 - i), cs[:-1] * f * (1 - f), ik * (1 - g * g), tcs * o * (1 - o)], 2)
        d_tc = o * (1 - tcs * tcs)
        xhat_x = (xw - mean_x[:, None]) * rstd_x[:, None]
        xhat_h = (pre - mean_h[:, None]) * rstd_h[:, None]
        xhat_c = (cs[1:] - mean_c[:, None]) * rstd_c[:, None]
        d_gates = d_out.new_empty(T, B, 4 * H)   # d loss / d gates (= d loss / d bias)
        d_xw = d_out.new_empty(T, B, 4 * H)
        d_a = d_out.new_empty(T, B, 4 * H)       # d loss / d (h W_hh^T)
        d_cn = d_out.new_empty(T, B, H)          # d loss / d normalized cell (after gain and shift)
        acc = {}                                 # statistics' gradient sums of steps reusing a step's

        def norm_bwd(name, G, xhat, rstd, t):
            """dL/d input of one step's batch norm, G = dL/d xhat."""
            d = G * rstd
            if counts is None:
                return d
            s1, s2 = G.sum(0), (G * xhat).sum(0)
            if name in acc:
                s1, s2 = s1 + acc[name][0], s2 + acc[name][1]
            if counts[t] == 0:       # this step used the statistics of the last real step
                acc[name] = (s1, s2)
                return d
            acc.pop(name, None)
            n = counts[t]
            d[:n] -= (torch.addcmul(s1, xhat[:n], s2)) * (rstd / n)
            return d

        dh, dc = d_out[T - 1], d_cT
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                dh = torch.addmm(d_out[t], d_a[t + 1], w_hh)
            dcn = torch.mul(dh, d_tc[t], out=d_cn[t])
            dct = norm_bwd("c", dcn * c_gamma, xhat_c[t], rstd_c[t], t)
            dc = dct + dc if t == T - 1 else torch.addcmul(dct, dc, f[t + 1])
            da = d_gates[t].view(B, 4, H)
            torch.mul(mult[t, :, :3], dc[:, None], out=da[:, :3])
            torch.mul(mult[t, :, 3], dh, out=da[:, 3])
            d_a[t] = norm_bwd("h", d_gates[t] * h_gamma, xhat_h[t], rstd_h[t], t)
            d_xw[t] = norm_bwd("x", d_gates[t] * x_gamma, xhat_x[t], rstd_x[t], t)
        d_h0 = d_a[0] @ w_hh
        d_c0 = dc * f[0]
        d_w_hh = d_a.flatten(0, 1).t() @ hs[:-1].flatten(0, 1)
        d_xg = (d_gates * xhat_x).sum((0, 1))
        d_hg = (d_gates * xhat_h).sum((0, 1))
        d_cg = (d_cn * xhat_c).sum((0, 1))
        return (None, d_xw, d_h0, d_c0, d_w_hh, d_xg, d_hg, d_gates.sum((0, 1)), d_cg, d_cn.sum((0, 1)),
                None, None, None)


def _cell_norm_refusal(kind: str, spec: NormSpec) -> Optional[str]:
    """Why norm `kind` cannot run inside the LSTM cells (None: it can); for `zoo.norm.check_norm`."""
    if not spec.recurrent:
        return "it is not declared to run inside a recurrent cell (register_norm(..., recurrent=True))"
    if spec.pools_batch and kind != "batch":  # the built-in one has masked per-step statistics
        return "its statistics pool over the batch, so padded steps of shorter sequences would enter them"
    return None


def _check_cell_norm(kind: str, model: str) -> None:
    """Raise the one-line ValueError of `zoo.norm.check_norm` unless `model` can use norm `kind`."""
    check_norm(kind, model, layouts=("nc",), refuse=_cell_norm_refusal)


class LSTMLayer(nn.Module):
    """One direction of an LSTM layer with `norm` inside the cell (see the module docstring).

    Args:
        input_size, hidden_size: D and H.
        norm: a `zoo.norm` kind declared recurrent (none, layer, rms, batch: fused cells; another per-row
            kind: the plain-PyTorch cell).
        recurrent_dropout: probability of zeroing a unit of the candidate tanh(g) each step in training
            (the official `recurrent_dropout_prob` is the keep probability, 0.9 -> 0.1 here).
        max_steps: per-step running statistics kept by `batch` (later steps use the last).
        eps: of the built-in normalizations (magenta's layer norm: 1e-3); a registered kind keeps its own.
        forget_bias: added to the forget gate; folded into the initial value of its bias (same function
            and gradients as magenta's constant).
        bn_gain: initial gain of `batch` (Cooijmans et al.: 0.1).
        bn_momentum: of the running statistics (torch's convention).

    forward(x (B, T, D), state=(h, c) each (B, H) or None (zeros), lengths (B,) or None (all T real),
    t0=0 (index of the first step, for per-step statistics)) -> (outputs (B, T, H), (h_T, c_T)).
    """

    def __init__(self, input_size: int, hidden_size: int, norm: str = "none", recurrent_dropout: float = 0.1,
                 max_steps: int = 251, eps: float = 1e-3, forget_bias: float = 1.0, bn_gain: float = 0.1,
                 bn_momentum: float = 0.1):
        super().__init__()
        _check_cell_norm(norm, type(self).__name__)
        if not 0.0 <= recurrent_dropout < 1.0:
            raise ValueError(f"recurrent_dropout must be in [0, 1), got {recurrent_dropout!r}")
        self.input_size, self.hidden_size, self.norm = input_size, hidden_size, norm
        self.recurrent_dropout, self.max_steps, self.eps, self.bn_momentum = recurrent_dropout, max_steps, eps, bn_momentum
        H = hidden_size
        if norm == "none":
            self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
            w_ih, w_hh = self.lstm.weight_ih_l0, self.lstm.weight_hh_l0
            with torch.no_grad():
                self.lstm.bias_ih_l0.zero_()
                self.lstm.bias_hh_l0.zero_()
                self.lstm.bias_ih_l0[H:2 * H] = forget_bias
        else:
            w_ih = self.weight_ih = nn.Parameter(torch.empty(4 * H, input_size))
            w_hh = self.weight_hh = nn.Parameter(torch.empty(4 * H, H))
            gate_bias = torch.zeros(4 * H)
            gate_bias[H:2 * H] = forget_bias
            if norm in SCAN_KINDS:
                self.gate_weight = nn.Parameter(torch.ones(4 * H))
                self.gate_bias = nn.Parameter(gate_bias)
                self.cell_weight = nn.Parameter(torch.ones(H))
                self.cell_bias = nn.Parameter(torch.zeros(H))
            elif norm == "batch":
                self.x_weight = nn.Parameter(torch.full((4 * H,), bn_gain))
                self.h_weight = nn.Parameter(torch.full((4 * H,), bn_gain))
                self.bias = nn.Parameter(gate_bias)
                self.cell_weight = nn.Parameter(torch.full((H,), bn_gain))
                self.cell_bias = nn.Parameter(torch.zeros(H))
                for name, width in (("x", 4 * H), ("h", 4 * H), ("c", H)):
                    self.register_buffer(f"running_mean_{name}", torch.zeros(max_steps, width))
                    self.register_buffer(f"running_var_{name}", torch.ones(max_steps, width))
            else:  # a registered per-row kind: its own modules, the gate bias after them
                self.gate_norms = nn.ModuleList([build_norm(norm, H, "nc") for _ in range(4)])
                self.cell_norm = build_norm(norm, H, "nc")
                self.gate_bias = nn.Parameter(gate_bias)
        nn.init.xavier_uniform_(w_ih)
        _orthogonal_per_gate(w_hh, H)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, norm={self.norm!r}, "
                f"recurrent_dropout={self.recurrent_dropout}")

    def _keep(self, T: int, B: int, like: Tensor) -> Tensor:
        """(T, B, H) dropout multipliers (0 or 1/keep), or an empty tensor when dropout is off."""
        p = self.recurrent_dropout
        if not (self.training and p > 0):
            return like.new_empty(0)
        return torch.empty(T, B, self.hidden_size, dtype=like.dtype, device=like.device).bernoulli_(1 - p) / (1 - p)

    def forward(self, x: Tensor, state: Optional[tuple[Tensor, Tensor]] = None, lengths: Optional[Tensor] = None,
                t0: int = 0) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, T, _ = x.shape
        if state is None:
            zeros = x.new_zeros(B, self.hidden_size)
            state = (zeros, zeros)
        h0, c0 = state
        keep = self._keep(T, B, x)
        if self.norm == "none":
            lstm = self.lstm
            if keep.numel() == 0:  # fused nn.LSTM
                out, (h, c) = lstm(x, (h0[None].contiguous(), c0[None].contiguous()))
                return out, (h[0], c[0])
            xw = F.linear(x.transpose(0, 1), lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)
            empty = x.new_empty(0)
            hs, c = _lstm_scan("none", self.eps, xw, h0, c0, lstm.weight_hh_l0, empty, empty, empty, empty, keep)
        elif self.norm in SCAN_KINDS:
            xw = F.linear(x.transpose(0, 1), self.weight_ih)
            hs, c = _lstm_scan(self.norm, self.eps, xw, h0, c0, self.weight_hh, self.gate_weight, self.gate_bias,
                               self.cell_weight, self.cell_bias, keep)
        elif self.norm == "batch":
            hs, c = self._batch_scan(x, h0, c0, lengths, t0, keep)
        else:
            hs, c = self._norm_scan(x, h0, c0, keep)
        return hs.transpose(0, 1), (hs[-1], c)

    def _norm_scan(self, x, h0, c0, keep):
        """The cell of a registered per-row kind over (B, T, D), step by step with autograd: gates =
        norm_k(x W_x + h W_h) per gate k + bias, h = o * tanh(norm_c(c)). Per-row statistics never
        see other rows, so padding changes nothing. Returns hidden states (T, B, H) and c_T (B, H)."""
        H = self.hidden_size
        xw = F.linear(x.transpose(0, 1), self.weight_ih)  # (T, B, 4H)
        h, c, hs = h0, c0, []
        for t in range(x.shape[1]):
            a = torch.addmm(xw[t], h, self.weight_hh.t()).split(H, 1)
            gates = torch.cat([norm(v) for norm, v in zip(self.gate_norms, a)], 1) + self.gate_bias
            i, f, g, o = gates.chunk(4, 1)
            g = torch.tanh(g) * keep[t] if keep.numel() else torch.tanh(g)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * g
            h = torch.sigmoid(o) * torch.tanh(self.cell_norm(c))
            hs.append(h)
        return torch.stack(hs), c

    def _batch_scan(self, x, h0, c0, lengths, t0, keep):
        """Recurrent batch norm over (B, T, D) with per-step statistics over real steps: the C++ op
        `zoo::bn_lstm_scan_forward` where the CPU kernels are usable (differentiable, and kept whole in
        torch.compile's graphs, see zoo.cpu_kernels), else `BatchNormScan`. In training the batch is
        sorted by decreasing length, so each step's real rows are a prefix; `counts` (T,) stays a tensor
        (no graph break) except for BatchNormScan, which slices with its values."""
        B, T, _ = x.shape
        xw = F.linear(x.transpose(0, 1), self.weight_ih).contiguous()  # (T, B, 4H)
        order, counts, stats = None, None, None
        if self.training:
            counts = torch.full((T,), B, device=x.device)
            if lengths is not None:
                # a data-dependent check, which would split a compiled graph; there the kernel's own raises
                if not torch.compiler.is_compiling() and int(lengths.max()) < 1:
                    raise ValueError("recurrent batch norm needs at least one sequence with length >= 1")
                order = torch.argsort(lengths, descending=True, stable=True)
                counts = (lengths[None, :] > torch.arange(T, device=x.device)[:, None]).sum(1)
                xw, h0, c0 = xw[:, order], h0[order], c0[order]
                keep = keep[:, order] if keep.numel() else keep
        else:
            idx = (torch.arange(T, device=x.device) + t0).clamp(max=self.max_steps - 1)
            stats = tuple(getattr(self, f"running_{s}_{k}")[idx] for k in "xhc" for s in ("mean", "var"))
        args = (self.eps, xw, h0.contiguous(), c0.contiguous(), self.weight_hh, self.x_weight, self.h_weight,
                self.bias, self.cell_weight, self.cell_bias, keep)
        if cpu_kernels.usable(xw):
            hs, c, *batch_stats = torch.ops.zoo.bn_lstm_scan_forward(
                *args, xw.new_empty(0, dtype=torch.long) if counts is None else counts, list(stats or ()))
            batch_stats = batch_stats[:6]  # then what its backward pass reads
        else:
            hs, c, *batch_stats = BatchNormScan.apply(*args, None if counts is None else counts.tolist(), stats)
        if counts is not None:
            n = counts.to(x.dtype)[:, None]
            for k, mean, var in zip("xhc", batch_stats[0::2], batch_stats[1::2]):
                self._update_running(k, t0, mean, var, n)
        if order is not None:
            inverse = torch.argsort(order)
            hs, c = hs[:, inverse], c[inverse]
        return hs, c

    @torch.no_grad()
    def _update_running(self, name: str, start: int, mean: Tensor, var: Tensor, n: Tensor) -> None:
        """Momentum update of the running statistics of steps start.. that have real rows (n (T, 1) of
        them; unbiased variance, as torch). Steps without are masked out rather than sliced off, which
        would need their number in Python (a graph break under torch.compile)."""
        stop = min(start + len(mean), self.max_steps)
        if stop <= start:
            return
        k = stop - start
        n = n[:k]
        unbiased = var[:k] * (n / (n - 1).clamp_min(1))
        for stat, value in (("mean", mean[:k]), ("var", unbiased)):
            running = getattr(self, f"running_{stat}_{name}")[start:stop]
            running.copy_(torch.where(n > 0, running.lerp(value.detach(), self.bn_momentum), running))


# --------------------------------------------------------------------------------------------- #
# Mixture density output, losses, schedules
# --------------------------------------------------------------------------------------------- #

class MixtureParams(NamedTuple):
    """The decoder's output distribution at each step; every field (..., M) except pen (..., 3)."""
    pen_logits: Tensor
    pi_logits: Tensor
    mu_x: Tensor
    mu_y: Tensor
    log_sigma_x: Tensor
    log_sigma_y: Tensor
    rho: Tensor


def split_params(out: Tensor, num_mixture: int) -> MixtureParams:
    """(..., 3 + 6M) head output -> MixtureParams (rho = tanh, clamped to +-RHO_MAX)."""
    if out.shape[-1] != 3 + 6 * num_mixture:
        raise ValueError(f"expected {3 + 6 * num_mixture} outputs for {num_mixture} mixtures, got {out.shape[-1]}")
    pen, pi, mx, my, sx, sy, r = out.split([3] + [num_mixture] * 6, dim=-1)
    return MixtureParams(pen, pi, mx, my, sx, sy, torch.tanh(r).clamp(-RHO_MAX, RHO_MAX))


def gmm_log_prob(dx: Tensor, dy: Tensor, p: MixtureParams) -> Tensor:
    """log sum_k pi_k N(dx, dy | mu_k, sigma_k, rho_k) for dx, dy (...), computed in log space."""
    zx = (dx[..., None] - p.mu_x) * torch.exp(-p.log_sigma_x)
    zy = (dy[..., None] - p.mu_y) * torch.exp(-p.log_sigma_y)
    one_m_r2 = 1 - p.rho.square()
    quad = (zx.square() + zy.square() - 2 * p.rho * zx * zy) / (2 * one_m_r2)
    log_n = -LOG_2PI - p.log_sigma_x - p.log_sigma_y - 0.5 * torch.log(one_m_r2) - quad
    return torch.logsumexp(F.log_softmax(p.pi_logits, -1) + log_n, -1)


def reconstruction_loss(p: MixtureParams, target: Tensor, mask_pen: bool = False) -> tuple[Tensor, Tensor]:
    """L_s and L_p of the paper for target (B, N, 5), both divided by B * N as the official code.

    L_s = -log(sum_k pi_k N(dx, dy | k) + 1e-6) over the steps with p3 = 0 (the 1e-6 of the official
    code, applied in log space). L_p = pen cross-entropy over all N steps (training, as the paper), or
    over the steps with p3 = 0 when `mask_pen` (the official code's evaluation mode).
    """
    B, N, _ = target.shape
    real = 1 - target[..., 4]
    ll = gmm_log_prob(target[..., 0], target[..., 1], p)
    l_s = -(torch.logaddexp(ll, ll.new_tensor(math.log(1e-6))) * real).sum() / (B * N)
    pen = F.cross_entropy(p.pen_logits.reshape(B * N, 3), target[..., 2:].argmax(-1).reshape(B * N),
                          reduction="none").view(B, N)
    if mask_pen:
        pen = pen * real
    return l_s, pen.sum() / (B * N)


def kl_divergence(mu: Tensor, presig: Tensor) -> Tensor:
    """KL(N(mu, exp(presig)) || N(0, I)) averaged over batch and latent dims (the official L_KL)."""
    return -0.5 * torch.mean(1 + presig - mu.square() - torch.exp(presig))


def kl_weight_schedule(step: int, kl_weight: float = 0.5, kl_weight_start: float = 0.01,
                       kl_decay_rate: float = 0.99995) -> float:
    """eta_step of the paper: kl_weight - (kl_weight - kl_weight_start) * kl_decay_rate ** step."""
    return kl_weight - (kl_weight - kl_weight_start) * kl_decay_rate ** step


def sample_mixture(p: MixtureParams, temperature: float = 1.0, greedy: bool = False,
                   sigma_temperature: str = "paper", generator: Optional[torch.Generator] = None) -> Tensor:
    """Draws one stroke-5 row per item from MixtureParams with fields (B, M) -> (B, 5).

    Temperature tau as the paper: pi and pen probabilities become softmax(logits / tau); the offsets'
    variance is multiplied by tau (sigma * sqrt(tau)), `sigma_temperature="paper"`; magenta's sampler
    multiplies sigma by tau instead (`"official"`). `greedy`: argmax component and pen state, offsets at
    the component's mean.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if sigma_temperature not in ("paper", "official"):
        raise ValueError(f"sigma_temperature must be 'paper' or 'official', got {sigma_temperature!r}")
    B = p.pi_logits.shape[0]
    rows = torch.arange(B, device=p.pi_logits.device)
    if greedy:
        k, pen = p.pi_logits.argmax(-1), p.pen_logits.argmax(-1)
        dx, dy = p.mu_x[rows, k], p.mu_y[rows, k]
    else:
        k = torch.multinomial(torch.softmax(p.pi_logits / temperature, -1), 1, generator=generator)[:, 0]
        pen = torch.multinomial(torch.softmax(p.pen_logits / temperature, -1), 1, generator=generator)[:, 0]
        scale = math.sqrt(temperature) if sigma_temperature == "paper" else temperature
        sx = torch.exp(p.log_sigma_x[rows, k]) * scale
        sy = torch.exp(p.log_sigma_y[rows, k]) * scale
        rho = p.rho[rows, k]
        e = torch.randn(2, B, generator=generator, device=rows.device, dtype=p.mu_x.dtype)
        dx = p.mu_x[rows, k] + sx * e[0]
        dy = p.mu_y[rows, k] + sy * (rho * e[0] + torch.sqrt(1 - rho.square()) * e[1])
    return torch.cat([dx[:, None], dy[:, None], F.one_hot(pen, 3).to(dx.dtype)], 1)


def interpolate_latents(z0: Tensor, z1: Tensor, steps: int, method: str = "slerp") -> Tensor:
    """(Nz,), (Nz,) -> (steps, Nz) from z0 to z1: spherical ("slerp", as the paper's figures) or linear."""
    t = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device)[:, None]
    if method == "linear":
        return torch.lerp(z0, z1, t)
    if method != "slerp":
        raise ValueError(f"interpolation method must be 'slerp' or 'linear', got {method!r}")
    cos = F.cosine_similarity(z0, z1, dim=0).clamp(-1, 1)
    omega = torch.acos(cos)
    if float(omega) < 1e-6:  # parallel vectors: slerp degenerates to lerp
        return torch.lerp(z0, z1, t)
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


# --------------------------------------------------------------------------------------------- #
# The model
# --------------------------------------------------------------------------------------------- #

def _gaussian_linear(i: int, o: int) -> nn.Linear:
    """magenta's super_linear(init_w='gaussian', weight_start=0.001): weights N(0, 0.001), bias 0."""
    layer = nn.Linear(i, o)
    nn.init.normal_(layer.weight, std=0.001)
    nn.init.zeros_(layer.bias)
    return layer


def _reverse_within_length(x: Tensor, lengths: Tensor) -> Tensor:
    """(B, T, F): reverse each sequence's first `length` steps, leave the padding where it is."""
    T = x.shape[1]
    t = torch.arange(T, device=x.device)[None]
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, idx[..., None].expand_as(x))


class SketchRNN(nn.Module):
    """The sketch VAE. Defaults are magenta's `get_default_hparams()`.

    Args:
        enc_rnn_size, dec_rnn_size: encoder (each direction) and decoder LSTM widths (256, 512).
        z_size: latent size Nz (128).
        num_mixture: M bivariate normals in the offset distribution (20).
        norm: the cells' normalization, a `zoo.norm` kind declared recurrent (`LSTMLayer`; magenta's
            default cell: plain LSTM, "none").
        recurrent_dropout: drop probability on the candidate (official keep 0.9 -> 0.1).
        conditional: VAE (True) or decoder-only unconditional model (False: no encoder, no z, zero
            initial decoder state).
        max_seq_len: longest sketch (250); the decoder keeps per-step statistics for max_seq_len + 1
            steps (`batch`) and samples up to that many points by default.
    """

    def __init__(self, enc_rnn_size: int = 256, dec_rnn_size: int = 512, z_size: int = 128,
                 num_mixture: int = 20, norm: str = "none", recurrent_dropout: float = 0.1,
                 conditional: bool = True, max_seq_len: int = 250):
        super().__init__()
        _check_cell_norm(norm, type(self).__name__)
        for name, size in (("enc_rnn_size", enc_rnn_size), ("dec_rnn_size", dec_rnn_size), ("z_size", z_size),
                           ("num_mixture", num_mixture), ("max_seq_len", max_seq_len)):
            if size < 1:
                raise ValueError(f"{name} must be >= 1, got {size!r}")
        self.z_size, self.num_mixture, self.conditional, self.max_seq_len = z_size, num_mixture, conditional, max_seq_len
        self.norm = norm
        if conditional:
            self.encoder_fwd = LSTMLayer(5, enc_rnn_size, norm, recurrent_dropout, max_steps=max_seq_len)
            self.encoder_bwd = LSTMLayer(5, enc_rnn_size, norm, recurrent_dropout, max_steps=max_seq_len)
            self.mu = _gaussian_linear(2 * enc_rnn_size, z_size)
            self.presig = _gaussian_linear(2 * enc_rnn_size, z_size)
            self.initial_state = _gaussian_linear(z_size, 2 * dec_rnn_size)
        self.decoder = LSTMLayer(5 + (z_size if conditional else 0), dec_rnn_size, norm, recurrent_dropout,
                                 max_steps=max_seq_len + 1)
        self.head = nn.Linear(dec_rnn_size, 3 + 6 * num_mixture)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _check_batch(self, strokes: Tensor, lengths: Tensor) -> None:
        """strokes (B, T, 5), T >= 2 (S0 and a point), of the model's dtype; lengths an int64 tensor (B,).
        Shape and dtype only (free); `encode` checks the values of lengths."""
        dtype = self.head.weight.dtype
        if strokes.dim() != 3 or strokes.shape[1] < 2 or strokes.shape[2] != 5 or strokes.dtype != dtype:
            raise ValueError(f"strokes must be stroke-5 rows of shape (B, T, 5) with T >= 2 (S0 and the points) and "
                             f"the model's dtype {dtype}, got shape {tuple(strokes.shape)} and dtype {strokes.dtype}")
        if not isinstance(lengths, Tensor):
            raise TypeError(f"lengths must be a tensor of shape (B,), got {type(lengths).__name__}")
        if lengths.shape != strokes.shape[:1] or lengths.dtype != torch.long:
            raise ValueError(f"lengths must be an int64 tensor of shape (B,) = ({strokes.shape[0]},), got shape "
                             f"{tuple(lengths.shape)} and dtype {lengths.dtype}")

    def encode(self, points: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """points (B, T, 5) stroke-5 rows of the sketches (padding after `lengths`), lengths (B,) int64 in
        [1, T] -> mu, presig (B, Nz).

        The bidirectional encoder reads real points only: the backward direction runs over each sketch
        reversed within its length, and both final states are taken at the last real point."""
        if not self.conditional:
            raise RuntimeError("an unconditional SketchRNN has no encoder")
        # min and max in one read-back: the single device sync that the former min check cost
        lo, hi = torch.stack(torch.aminmax(lengths)).tolist()
        if lo < 1 or hi > points.shape[1]:
            raise ValueError(f"lengths must be in [1, {points.shape[1]}], the point rows after S0, got lengths "
                             f"from {lo} to {hi}")
        last = (lengths - 1)[:, None, None].expand(-1, 1, self.encoder_fwd.hidden_size)
        fwd, _ = self.encoder_fwd(points, lengths=lengths)
        bwd, _ = self.encoder_bwd(_reverse_within_length(points, lengths), lengths=lengths)
        h = torch.cat([fwd.gather(1, last)[:, 0], bwd.gather(1, last)[:, 0]], 1)
        return self.mu(h), self.presig(h)

    @staticmethod
    def reparameterize(mu: Tensor, presig: Tensor) -> Tensor:
        """z = mu + exp(presig / 2) * N(0, I)."""
        return mu + torch.exp(presig / 2) * torch.randn_like(mu)

    def initial_decoder_state(self, z: Optional[Tensor], batch: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(h0, c0) = split(tanh(W z + b)), or zeros for the unconditional model."""
        if not self.conditional:
            zeros = like.new_zeros(batch, self.decoder.hidden_size)
            return zeros, zeros
        h0, c0 = torch.tanh(self.initial_state(z)).chunk(2, 1)
        return h0.contiguous(), c0.contiguous()

    def decode(self, inputs: Tensor, z: Optional[Tensor] = None, state: Optional[tuple[Tensor, Tensor]] = None,
               lengths: Optional[Tensor] = None, t0: int = 0) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """inputs (B, N, 5) = S_0..S_{N-1}, z (B, Nz) -> head outputs (B, N, 3 + 6M), final state.

        `lengths` (B,): the steps whose statistics count for `batch` (real points plus the end token);
        `state` defaults to the initial state from z."""
        B, N, _ = inputs.shape
        if state is None:
            state = self.initial_decoder_state(z, B, inputs)
        if self.conditional:
            inputs = torch.cat([inputs, z[:, None].expand(B, N, z.shape[1])], 2)
        h, state = self.decoder(inputs, state, lengths=lengths, t0=t0)
        return self.head(h), state

    def forward(self, strokes: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        """strokes (B, N + 1, 5) of the model's dtype, lengths (B,) int64 in [1, N] -> {"out": (B, N, 3 + 6M)
        head outputs for targets strokes[:, 1:], "mu", "presig", "z": (B, Nz) (absent for the
        unconditional model)}."""
        self._check_batch(strokes, lengths)
        if strokes.shape[1] - 1 > self.max_seq_len + 1:
            raise ValueError(f"batch of {strokes.shape[1] - 1} decoder steps is longer than max_seq_len + 1 = "
                             f"{self.max_seq_len + 1}; raise the model's max_seq_len")
        result = {}
        z = None
        if self.conditional:
            mu, presig = self.encode(strokes[:, 1:], lengths)
            z = self.reparameterize(mu, presig) if self.training else mu
            result.update(mu=mu, presig=presig, z=z)
        result["out"], _ = self.decode(strokes[:, :-1], z, lengths=lengths + 1)
        return result

    def params(self, out: Tensor) -> MixtureParams:
        return split_params(out, self.num_mixture)

    @inference
    def sample(self, z: Optional[Tensor] = None, num: Optional[int] = None, max_len: Optional[int] = None,
               temperature: float = 1.0, greedy: bool = False, sigma_temperature: str = "paper",
               generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """Generate sketches in eval mode, one decoder step at a time, all in parallel.

        z (B, Nz) conditions the decoder (conditional model; drawn from N(0, I) when None, with `num`
        sketches); the unconditional model takes `num`. Stops when every sketch has drawn its end token
        or after `max_len` >= 1 (default max_seq_len) steps; longer is allowed (`batch` then reuses its
        last step's running statistics).
        Returns strokes (B, L, 5) stroke-5 offsets in the model's (normalized) units and lengths (B,)
        (points before the end token; rows from there on are end-of-sketch padding).
        """
        param = self.head.weight
        if self.conditional and z is None:
            if num is None:
                raise ValueError("sample needs z or num")
            z = torch.randn(num, self.z_size, generator=generator, device=param.device, dtype=param.dtype)
        if z is not None and (z.dim() != 2 or z.shape[1] != self.z_size):
            raise ValueError(f"z must have shape (B, z_size={self.z_size}), got {tuple(z.shape)}")
        B = z.shape[0] if z is not None else num
        if B is None:
            raise ValueError("sample needs num for an unconditional model")
        max_len = self.max_seq_len if max_len is None else max_len
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1 (or None for max_seq_len={self.max_seq_len}), got {max_len}")
        state = self.initial_decoder_state(z, B, param)
        x = param.new_zeros(B, 1, 5)
        x[:, 0, 2] = 1  # S0
        rows = []
        done = torch.zeros(B, dtype=torch.bool, device=param.device)
        lengths = torch.full((B,), max_len, dtype=torch.long, device=param.device)
        for t in range(max_len):
            out, state = self.decode(x, z, state=state, t0=t)
            x = sample_mixture(self.params(out[:, 0]), temperature, greedy, sigma_temperature, generator)
            end = x[:, 4] > 0
            lengths = torch.where(end & ~done, torch.full_like(lengths, t), lengths)
            done = done | end
            x = torch.where(done[:, None], x.new_tensor([0, 0, 0, 0, 1]), x)
            rows.append(x)
            x = x[:, None]
            if bool(done.all()):
                break
        return torch.stack(rows, 1), lengths

    @inference
    def reconstruct(self, strokes: Tensor, lengths: Tensor, temperature: float = 1.0, greedy: bool = False,
                    use_mean: bool = True, generator: Optional[torch.Generator] = None,
                    **kw) -> tuple[Tensor, Tensor]:
        """Conditional reconstruction: encode strokes (B, N + 1, 5) and decode from z (mu, or a draw
        from q(z|x) when use_mean=False) -> sample()'s (strokes, lengths)."""
        self._check_batch(strokes, lengths)
        mu, presig = self.encode(strokes[:, 1:], lengths)
        if not use_mean:
            mu = mu + torch.exp(presig / 2) * torch.randn(mu.shape, generator=generator, dtype=mu.dtype,
                                                          device=mu.device)
        return self.sample(mu, temperature=temperature, greedy=greedy, generator=generator, **kw)

    @inference
    def interpolate(self, strokes: Tensor, lengths: Tensor, steps: int = 8, method: str = "slerp",
                    **kw) -> tuple[Tensor, Tensor]:
        """Decode `steps` latents between the encodings (mu) of the first two sketches of the batch
        (strokes (B, N + 1, 5), lengths (B,), B >= 2)."""
        self._check_batch(strokes, lengths)
        if strokes.shape[0] < 2:
            raise ValueError(f"interpolate needs a batch of at least 2 sketches, got {strokes.shape[0]}")
        mu, _ = self.encode(strokes[:2, 1:], lengths[:2])
        return self.sample(interpolate_latents(mu[0], mu[1], steps, method), **kw)


SketchRNNConfig = network_config(SketchRNN, given=("max_seq_len",))
