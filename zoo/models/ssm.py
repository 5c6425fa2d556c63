"""Selective scan (the S6 recurrence of Mamba) that runs everywhere, with `mamba_ssm`'s signature.

    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, backend="auto")

For every batch b, channel d and state n (Gu & Dao 2023, Alg. 2, zero-order-hold discretisation):

    delta = softplus(delta + delta_bias)  (each step optional)
    h[t]  = exp(delta[t] * A) * h[t-1] + delta[t] * B[t] * u[t]        h[-1] = 0
    y[t]  = sum_n C[t, n] * h[t, n] + D * u[t];   y *= silu(z) if z is given

Shapes: u, delta, z (batch, dim, L); A (dim, N), real; B, C either (dim, N) (fixed in time),
(batch, N, L) or (batch, G, N, L) with G groups of dim / G channels; D, delta_bias (dim,).
Returns y (batch, dim, L) in u's dtype, and with `return_last_state` also h[L-1] (batch, dim, N).

Backends, one interface:
    "sequential"  `selective_scan_ref`: a Python loop over time; obviously correct, used in tests.
    "chunked"     `selective_scan_chunked`: the fast path. On CPU, for B and C of layout (batch, N, L)
                  (Mamba's and MambaVision's), one C++ kernel does the whole computation, forward and
                  backward (zoo/csrc/selective_scan.cpp, built on first use): a differentiable torch op
                  that torch.compile keeps in its graph (see zoo.cpu_kernels).
                  Otherwise (other layouts, GPUs without mamba_ssm, no compiler) pure PyTorch: one
                  autograd Function with a hand-written backward (the adjoint recurrence in reverse
                  time). On CPU the time axis is cut into blocks of a few steps whose tensors stay in
                  cache; within a block everything but the recurrence is one vectorised op over the
                  block, and the recurrence is one in-place multiply-add per step (`_scan`). Only the
                  state at each block's end is stored; the backward pass recomputes a block's states
                  from the previous block's end. On GPUs the whole sequence is one block and the
                  recurrence a chunked scan: about sqrt(L) chunks, each scanned in place, chunk-end
                  states carried across chunks (~2 sqrt(L) kernel-launching loop steps instead of L).
                  Either way the recurrence only ever multiplies decays exp(delta * A): no division
                  by a cumulative product, so it cannot overflow where the true states do not (the
                  1/cumprod(decay) formulation overflows float32 once sum(delta * A) < -88).
    "cuda"        mamba_ssm's fused kernel; imported lazily, on first use with a CUDA tensor.
    "auto"        "cuda" for CUDA tensors when mamba_ssm imports, else "chunked".

Every backend computes in float32 (float64 inputs stay float64) with autocast disabled inside: under
bf16/fp16 autocast the exponentials and the long sums of the recurrence lose too much precision (the
official MambaVision NaNs under AMP there).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo import cpu_kernels

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_chunked", "linear_scan", "BACKENDS"]

BACKENDS = ("auto", "chunked", "sequential", "cuda")

_mamba_ssm_fn = None  # the CUDA kernel's selective_scan_fn once imported; False when unavailable


def _cuda_kernel():
    """mamba_ssm's selective_scan_fn, or None when it is not installed (imported once, lazily)."""
    global _mamba_ssm_fn
    if _mamba_ssm_fn is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            _mamba_ssm_fn = selective_scan_fn
        except ImportError:
            _mamba_ssm_fn = False
    return _mamba_ssm_fn or None


# ----------------------------------------------------------------------------------------------------
# input handling shared by the backends

def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, N), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported by the PyTorch backends; use a real A")
    n = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        ok = ((m.dim() == 2 and tuple(m.shape) == (dim, n))
              or (m.dim() == 3 and tuple(m.shape) == (batch, n, length))
              or (m.dim() == 4 and m.shape[0] == batch and m.shape[1] >= 1 and dim % m.shape[1] == 0
                  and tuple(m.shape[2:]) == (n, length)))
        if not ok:
            raise ValueError(f"selective_scan: {name} must be (dim, N) = ({dim}, {n}), (batch, N, L) = "
                             f"({batch}, {n}, {length}) or (batch, G, N, L) with G dividing dim; got "
                             f"{tuple(m.shape)}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (dim,):
            raise ValueError(f"selective_scan: {name} must be (dim={dim},), got {tuple(v.shape)}")
    if z is not None and tuple(z.shape) != tuple(u.shape):
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def _per_channel(m: Tensor, batch: int, dim: int, length: int) -> Tensor:
    """B or C in any accepted layout -> (batch, dim, L, N), broadcasting where possible."""
    if m.dim() == 2:  # (dim, N): the same at every step
        return m[None, :, None, :]
    if m.dim() == 3:  # (batch, N, L): shared by all channels
        return m.transpose(1, 2)[:, None]
    groups = m.shape[1]  # (batch, G, N, L): channel d uses group d // (dim / G)
    return m.transpose(2, 3).repeat_interleave(dim // groups, dim=1)


def _prepare(u, delta, A, delta_bias, delta_softplus):
    dtype = _compute_dtype(u)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return dtype, u.to(dtype), delta, A.to(dtype)


def _finish(y, u, D, z, dtype, dtype_in):
    if D is not None:
        y = y + u * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(dtype_in)


# ----------------------------------------------------------------------------------------------------
# sequential reference

def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                       z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                       delta_softplus: bool = False, return_last_state: bool = False):
    """The recurrence of the module docstring, one time step at a time (plain autograd)."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    with torch.autocast(u.device.type, enabled=False):
        dtype, u, delta, A = _prepare(u, delta, A, delta_bias, delta_softplus)
        batch, dim, length = u.shape
        Bt = _per_channel(B.to(dtype), batch, dim, length)  # (batch|1, dim|1, L|1, N)
        Ct = _per_channel(C.to(dtype), batch, dim, length)
        h = u.new_zeros(batch, dim, A.shape[1])
        ys = []
        for t in range(length):
            dt = delta[:, :, t, None]                                       # (batch, dim, 1)
            b_t = Bt[:, :, min(t, Bt.shape[2] - 1)]
            c_t = Ct[:, :, min(t, Ct.shape[2] - 1)]
            h = torch.exp(dt * A) * h + dt * b_t * u[:, :, t, None]
            ys.append((h * c_t).sum(-1))
        y = torch.stack(ys, dim=-1)
        out = _finish(y, u, D, z, dtype, dtype_in)
    return (out, h) if return_last_state else out


# ----------------------------------------------------------------------------------------------------
# chunked scan

def _chunk_size(length: int) -> int:
    return max(1, math.ceil(math.sqrt(length)))


@torch.no_grad()
def _scan(a: Tensor, b: Tensor, reverse: bool = False, chunk: Optional[int] = None) -> Tensor:
    """The linear recurrence along dim 0 of contiguous a, b (L, *rest), computed in place: b is
    overwritten with h and returned.

    forward:  h[t] = a[t] * h[t-1] + b[t], h[-1] = 0
    reverse:  h[t] = a[t+1] * h[t+1] + b[t], h[L] = 0 (the adjoint of the forward recurrence)

    `chunk` = 1 (the default on CPU) runs it step by step: one in-place op per step on a block that
    stays in cache, 2-5x faster on CPU than the chunked form, which reads and writes everything a few
    more times to save loop steps. Otherwise (default sqrt(L), for GPUs) the sequence splits into `n`
    full chunks of `chunk` steps and a tail of `L - n * chunk` steps (at the end going forward, at the
    start in reverse, so chunk boundaries need no padding). The tail runs step by step after the chunks.
    """
    length, rest = a.shape[0], a.shape[1:]
    chunk = chunk or (1 if a.device.type == "cpu" else _chunk_size(length))
    if chunk == 1:  # one in-place op per step, each step's (rest) block stays in cache
        if not reverse:
            for t in range(1, length):
                b[t].addcmul_(a[t], b[t - 1])
        else:
            for t in range(length - 2, -1, -1):
                b[t].addcmul_(a[t + 1], b[t + 1])
        return b
    n = length // chunk
    tail = length - n * chunk
    h = b
    main = slice(tail, length) if reverse else slice(0, n * chunk)
    a_m = a[main].view(n, chunk, *rest)
    h_m = h[main].view(n, chunk, *rest)
    decay = torch.empty_like(a_m)  # products of the decays between each step and the chunk's edge
    if not reverse:
        decay[:, 0] = a_m[:, 0]
        for j in range(1, chunk):
            h_m[:, j].addcmul_(a_m[:, j], h_m[:, j - 1])
            torch.mul(decay[:, j - 1], a_m[:, j], out=decay[:, j])
        ends = h_m[:, -1].clone()  # true state at each chunk end
        for c in range(1, n):
            ends[c].addcmul_(decay[c, -1], ends[c - 1])
        h_m[1:].addcmul_(decay[1:], ends[:-1, None])
        for t in range(max(n * chunk, 1), length):
            h[t].addcmul_(a[t], h[t - 1])
    else:
        decay[:, -1] = 1
        for j in range(chunk - 2, -1, -1):
            h_m[:, j].addcmul_(a_m[:, j + 1], h_m[:, j + 1])
            torch.mul(decay[:, j + 1], a_m[:, j + 1], out=decay[:, j])
        starts = h_m[:, 0].clone()  # true state at each chunk start
        incoming = torch.zeros_like(starts)  # a at the next chunk's start times its true state
        for c in range(n - 2, -1, -1):
            torch.mul(a_m[c + 1, 0], starts[c + 1], out=incoming[c])
            starts[c].addcmul_(decay[c, 0], incoming[c])
        h_m[:-1].addcmul_(decay[:-1], incoming[:-1, None])
        for t in range(min(tail, length - 1) - 1, -1, -1):
            h[t].addcmul_(a[t + 1], h[t + 1])
    return h


class _LinearScan(torch.autograd.Function):
    """h = scan(a, b) with the adjoint recurrence as backward: for loss l and g = dl/dh,
    lam[t] = g[t] + a[t+1] * lam[t+1];  dl/db[t] = lam[t];  dl/da[t] = lam[t] * h[t-1]."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        h = _scan(a, b.clone(memory_format=torch.contiguous_format))
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        a, h = ctx.saved_tensors
        lam = _scan(a, g.clone(memory_format=torch.contiguous_format), reverse=True)
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.empty_like(a)
            grad_a[0] = 0
            torch.mul(lam[1:], h[:-1], out=grad_a[1:])
        return grad_a, lam if ctx.needs_input_grad[1] else None


def linear_scan(a: Tensor, b: Tensor) -> Tensor:
    """h[t] = a[t] * h[t-1] + b[t] along dim 0 (h[-1] = 0); a, b (L, *rest) -> h (L, *rest).
    Differentiable in a and b (see `_scan`)."""
    if a.shape != b.shape:
        raise ValueError(f"linear_scan: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _LinearScan.apply(a.contiguous(), b)


def _shared(m: Tensor, h: Tensor) -> bool:
    """True when m (L|1, batch|1, N, dim|1) varies with time and sample but is shared by all channels."""
    return m.shape[3] == 1 and m.shape[0] == h.shape[0] and m.shape[1] == h.shape[1]


def _contract(h: Tensor, m: Tensor) -> Tensor:
    """sum over N of h (L, batch, N, dim) times m (L|1, batch|1, N, dim|1) -> (L, batch, dim)."""
    if _shared(m, h):
        return (m.transpose(2, 3) @ h)[:, :, 0]  # one batched matmul over (L, batch)
    return (h * m).sum(2)


def _contract_grad(g: Tensor, h: Tensor, m: Tensor) -> Tensor:
    """d loss / d m for `_contract(h, m)`, given g = d loss / d output (L, batch, dim)."""
    if _shared(m, h):
        # (L, batch, N, 1); as (1, dim) @ (dim, N) rather than (N, dim) @ (dim, 1): 4x faster on CPU
        return (g[:, :, None] @ h.transpose(2, 3)).transpose(2, 3)
    return (g[:, :, None] * h).sum_to_size(m.shape)


# (steps, batch, N, dim) elements per time block on CPU, so that a block's few temporaries stay in
# cache (1 MiB each in float32); of 2**16..2**21, the best or within noise of it at the shapes
BLOCK_ELEMENTS = 1 << 18


def _block_steps(h_shape, device) -> int:
    """Time steps per block of states h (L, batch, N, dim): on CPU as many as fit BLOCK_ELEMENTS (at
    least one); elsewhere the whole sequence (a GPU gains nothing from cache blocking and pays for
    every kernel launch)."""
    length, per_step = h_shape[0], math.prod(h_shape[1:])
    return max(1, BLOCK_ELEMENTS // per_step) if device.type == "cpu" else length


def _steps(m: Tensor, s: int, e: int) -> Tensor:
    """Steps s:e of m (L|1, ...); a tensor fixed in time (first dim 1) is returned whole."""
    return m[s:e] if m.shape[0] > 1 else m


def _block_states(delta: Tensor, du: Tensor, A: Tensor, Bt: Tensor, s: int, e: int, prev: Optional[Tensor]):
    """Decays a[t] = exp(delta[t] A) and states h[t] for steps s:e, given prev = h[s-1] (None: s = 0)."""
    decay = torch.mul(delta[s:e, :, None], A).exp_()
    h = torch.mul(du[s:e, :, None], _steps(Bt, s, e))                # b[t] = delta[t] B[t] u[t]
    if prev is not None:
        h[0].addcmul_(decay[0], prev)
    return decay, _scan(decay, h)


class _SelectiveScanFn(torch.autograd.Function):
    """The selective scan proper, time-major with the channels innermost: u, delta (L, batch, dim)
    (delta after bias/softplus), A (N, dim), Bt, Ct (L|1, batch|1, N, dim|1) -> y (L, batch, dim) =
    sum_n C h, and h[L-1] (batch, N, dim). Channels innermost because every elementwise op then runs
    along a contiguous dim-long row; with N = 8 innermost, broadcasting delta over it is several times
    slower, and the C contraction is a batched matmul over dim rather than over 8.

    One function with a hand-written backward, rather than autograd through a dozen broadcast ops.
    Both passes run block by block over time (`_block_steps`): each block computes its decays, inputs,
    recurrence (`_scan`) and contractions while its (steps, batch, N, dim) tensors are still in cache.
    The forward pass keeps only the state at each block's end (1 / steps-per-block of all states), and
    the backward pass recomputes a block's decays and states from the previous block's end: as fast
    as storing them all (measured; the recomputation is in cache, the stored tensors were not)."""

    @staticmethod
    def forward(ctx, u, delta, A, Bt, Ct):
        length, batch, dim = u.shape
        step = _block_steps((length, batch, A.shape[0], dim), u.device)
        du = delta * u
        ys, ends = [], [None]  # ends[i]: h at the last step before block i
        for s in range(0, length, step):
            e = min(s + step, length)
            _, h = _block_states(delta, du, A, Bt, s, e, ends[-1])
            ys.append(_contract(h, _steps(Ct, s, e)))
            ends.append(h[-1].clone())
        ctx.save_for_backward(u, delta, A, Bt, Ct)
        # intermediates (neither inputs nor outputs) go on ctx; lists of tensors rather than buffers
        # written slice by slice keep the function traceable by torch.onnx.export, and so does
        # returning a copy of the last state (returning ends[-1] itself breaks the exported graph)
        ctx.ends = ends
        return torch.cat(ys), ends[-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, g_last):
        u, delta, A, Bt, Ct = ctx.saved_tensors
        gy = gy.contiguous()  # it arrives permuted; see the note on Bt / Ct in selective_scan_chunked
        length = u.shape[0]
        du = delta * u
        g_du, g_delta = torch.empty_like(u), torch.empty_like(u)
        g_A = torch.zeros_like(A)
        # gradients of B, C: per block where they vary in time, summed over blocks where they do not
        g_B = torch.zeros_like(Bt) if Bt.shape[0] == 1 else torch.empty_like(Bt)
        g_C = torch.zeros_like(Ct) if Ct.shape[0] == 1 else torch.empty_like(Ct)
        carry = g_last  # d loss / d h[e-1] through the steps after the block (e = block end)
        step = _block_steps((length, *g_last.shape), u.device)
        for s, prev in reversed(list(zip(range(0, length, step), ctx.ends))):
            e = min(s + step, length)
            decay, h = _block_states(delta, du, A, Bt, s, e, prev)
            Bb, Cb = _steps(Bt, s, e), _steps(Ct, s, e)
            lam = gy[s:e, :, None] * Cb                               # d loss / d h, direct part ...
            if lam.shape != h.shape:
                lam = lam.expand_as(h).contiguous()
            lam[-1] += carry
            lam = _scan(decay, lam, reverse=True)                     # ... plus through later states
            carry = decay[0] * lam[0]
            g_Cb = _contract_grad(gy[s:e], h, Cb)
            g_du[s:e] = _contract(lam, Bb)                            # through b = du B
            g_Bb = _contract_grad(du[s:e], lam, Bb)
            g_dA = lam.mul_(decay)                                    # d loss / d (delta A); lam is spent
            g_dA[1:].mul_(h[:-1])
            if prev is None:
                g_dA[0] = 0
            else:
                g_dA[0].mul_(prev)
            torch.add((g_dA * A).sum(2), g_du[s:e] * u[s:e], out=g_delta[s:e])
            g_A += g_dA.mul_(delta[s:e, :, None]).sum((0, 1))
            for g, gb, m in ((g_B, g_Bb, Bt), (g_C, g_Cb, Ct)):
                if m.shape[0] == 1:
                    g += gb.sum_to_size(m.shape)
                else:
                    g[s:e] = gb
        return g_du.mul_(delta), g_delta, g_A, g_B, g_C


def _selective_scan_cpp(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The whole selective scan (bias, softplus, recurrence, D skip, silu(z) gate) as the C++ CPU op
    `zoo::selective_scan_forward` (zoo/csrc/selective_scan.cpp; differentiable, and kept whole in
    torch.compile's graphs, see zoo.cpu_kernels) for B, C of layout (batch, N, L): mamba_ssm's shapes in
    and out, except the last state, (batch, N, dim)."""
    empty = u.new_empty(0)  # the op's "absent"
    y, last, _, _ = torch.ops.zoo.selective_scan_forward(
        u, delta, A, B, C, *(empty if t is None else t for t in (D, z, delta_bias)), delta_softplus)
    return y, last


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                           z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                           delta_softplus: bool = False, return_last_state: bool = False):
    """The fast selective scan (on CPU the C++ kernel for B, C of layout (batch, N, L), otherwise pure
    PyTorch blocked over time; both with a hand-written backward; module docstring); the same results as
    `selective_scan_ref` up to float rounding, differentiable once."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    dtype_in, dtype = u.dtype, _compute_dtype(u)
    with torch.autocast(u.device.type, enabled=False):
        if B.dim() == 3 and C.dim() == 3 and cpu_kernels.usable(u.to(dtype)):  # Mamba's layout on CPU: C++
            f = lambda t: None if t is None else t.to(dtype)  # noqa: E731
            y, last = _selective_scan_cpp(*map(f, (u, delta, A, B, C, D, z, delta_bias)), delta_softplus)
            return (y.to(dtype_in), last.transpose(1, 2)) if return_last_state else y.to(dtype_in)
        dtype, u, delta, A = _prepare(u, delta, A, delta_bias, delta_softplus)
        batch, dim, length = u.shape
        # time-major (L, batch, N, dim): each step of the scan is then one contiguous block
        # contiguous: batched matmuls over permuted views copy matrix by matrix (20x slower on CPU)
        Bt = _per_channel(B.to(dtype), batch, dim, length).permute(2, 0, 3, 1).contiguous()  # (L|1, batch|1, N, dim|1)
        Ct = _per_channel(C.to(dtype), batch, dim, length).permute(2, 0, 3, 1).contiguous()
        y, last = _SelectiveScanFn.apply(u.permute(2, 0, 1).contiguous(), delta.permute(2, 0, 1).contiguous(),
                                         A.t().contiguous(), Bt, Ct)
        last = last.transpose(1, 2)
        out = _finish(y.permute(1, 2, 0), u, D, z, dtype, dtype_in)
    return (out, last) if return_last_state else out


# ----------------------------------------------------------------------------------------------------
# dispatch

def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, backend: str = "auto"):
    """Selective scan with mamba_ssm's `selective_scan_fn` signature; `backend` picks the
    implementation (module docstring). Returns y (batch, dim, L) [, last state (batch, dim, N)]."""
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan: backend {backend!r} is not one of {BACKENDS}")
    if backend in ("auto", "cuda") and u.is_cuda:
        kernel = _cuda_kernel()
        if kernel is not None:
            with torch.autocast("cuda", enabled=False):
                # the kernel takes fp32/bf16/fp16 u, delta, z and fp32 A, D, delta_bias; we give it fp32
                f = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
                out = kernel(f(u), f(delta), f(A), f(B), f(C), f(D), f(z), f(delta_bias), delta_softplus,
                             return_last_state)
            if return_last_state:
                return out[0].to(u.dtype), out[1]
            return out.to(u.dtype)
        if backend == "cuda":
            raise RuntimeError("selective_scan: backend 'cuda' needs the mamba_ssm package (pip install mamba-ssm)")
    elif backend == "cuda":
        raise ValueError(f"selective_scan: backend 'cuda' needs CUDA tensors, got a tensor on {u.device}")
    fn = selective_scan_ref if backend == "sequential" else selective_scan_chunked
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
