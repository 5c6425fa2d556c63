"""Optional C++ CPU kernels (zoo/csrc/*.cpp) as torch ops, `torch.ops.zoo.*`.

Ops (schemas in the .cpp files): `selective_scan_forward`, `lstm_scan_forward` and `bn_lstm_scan_forward`
are differentiable; their backward passes are the ops `*_backward`. Like `aten.native_layer_norm`, a
forward op returns its results first, then what its backward pass reads (marked non-differentiable).
The C++ side defines the schemas and CPU kernels; this module registers, once the library is loaded,
a fake implementation of every op (output shapes from input shapes, so that torch.compile and
FakeTensor tracing keep the ops in their graphs instead of breaking them) and the autograd formula of
each forward op (`torch.library.register_fake`, `torch.library.register_autograd`).

The kernels are compiled on first use with torch's extension builder (a C++ compiler and ninja) into
torch's extension directory (`TORCH_EXTENSIONS_DIR`), and cached there. That first use says so in a
warning; `make kernels` (`build_ahead`) builds ahead of time instead. Build and
load hold a file lock (fcntl: Unix) in the build directory, so concurrent first uses (DDP ranks,
parallel runs) build once and never load a half-written library. Where the kernels cannot be built the callers keep
their pure-PyTorch paths, and a warning says why. `ZOO_CPU_KERNELS=0` (or
`zoo.cpu_kernels.ENABLED = False`) turns them off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["ENABLED", "available", "usable"]

ENABLED = os.environ.get("ZOO_CPU_KERNELS", "1") != "0"
SOURCES = sorted(str(p) for p in (Path(__file__).parent / "csrc").glob("*.cpp"))
SCAN_BLOCK = 16  # kBlock of zoo/csrc/selective_scan.cpp: its forward keeps the state before each block
_loaded: bool | None = None  # None: not tried yet
log = logging.getLogger(__name__)


def _build_config():
    """torch's extension builder, and the name, compiler flags and build directory of the kernels."""
    # its import warns "No CUDA runtime is found" on CPU-only machines: irrelevant to CPU kernels
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
    name, flags = "zoo_cpu_kernels", ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        # the build is cached under its name: machines without AVX2 build and load their own
        name, flags = name + "_avx2", flags + ["-mavx2", "-mfma"]
    return cpp_extension, name, flags, Path(cpp_extension._get_build_directory(name, verbose=False))


def _build_and_load() -> None:
    """Builds the kernels where the build directory has no build of these sources and flags, and loads
    them, under an exclusive lock on `zoo.lock` there: a process that finds another one building waits
    for it and then loads its library. The OS releases the lock when its holder dies, so a killed build
    leaves no stale lock; the next process builds again."""
    import fcntl  # Unix only: elsewhere the ImportError makes `available` warn and fall back

    cpp_extension, name, flags, build_dir = _build_config()
    key = hashlib.sha256(b"".join(Path(s).read_bytes() for s in SOURCES)
                         + " ".join([*flags, torch.__version__]).encode()).hexdigest()
    stamp = build_dir / "zoo_sources.sha256"  # written after a successful build of exactly these
    with open(build_dir / "zoo.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        built = (build_dir / f"{name}.so").exists() and stamp.exists() and stamp.read_text() == key
        if not built:
            log.warning("building zoo's CPU kernels, once, ~30 s, in %s; ZOO_CPU_KERNELS=0 skips it, "
                        "`make kernels` builds ahead of time", build_dir)
        cpp_extension.load(name, SOURCES, extra_cflags=flags, build_directory=str(build_dir), is_python_module=False)
        if not built:
            stamp.write_text(key)


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether `torch.ops.zoo`'s CPU kernels can be used (building them on the first call). Under
    torch.compile its result is a constant of the graph: the first call builds eagerly, not traced."""
    global _loaded
    if not ENABLED:
        return False
    if _loaded is None:
        try:
            _build_and_load()
            _register()
            _loaded = True
        except Exception as err:  # no compiler / ninja / headers: the pure-PyTorch paths still work
            warnings.warn(f"zoo: could not build the C++ CPU kernels ({type(err).__name__}: {err}); "
                          f"using the slower pure-PyTorch paths (set ZOO_CPU_KERNELS=0 to skip the attempt)",
                          RuntimeWarning, stacklevel=2)
            _loaded = False
    return _loaded


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels can take x: a float32/float64 CPU tensor, the kernels enabled and built, and
    no exporter tracing (torch.onnx and torch.export see the pure-PyTorch ops; torch.compile sees the
    zoo ops)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and ENABLED
            and not torch.jit.is_tracing() and not torch.compiler.is_exporting() and available())


# ----------------------------------------------------------------------------------------------------
# fake implementations: the outputs' shapes (all contiguous, in the input's dtype), as the .cpp files
# document them

def _selective_scan_forward_fake(u, delta, A, B, C, D, z, delta_bias, softplus):
    batch, dim, length = u.shape
    n = A.shape[1]
    blocks = (length + SCAN_BLOCK - 1) // SCAN_BLOCK
    return [u.new_empty(batch, dim, length), u.new_empty(batch, n, dim), u.new_empty(blocks, batch, n, dim),
            u.new_empty(batch, length, dim)]


def _selective_scan_backward_fake(gy, g_last, u, delta, A, B, C, D, z, delta_bias, softplus, starts, delta_tm):
    return [u.new_empty(t.shape) for t in (u, delta, A, B, C, D, z, delta_bias)]  # absent (empty): empty


def _lstm_scan_forward_fake(kind, eps, xw, h0, c0, w_hh, g_gamma, g_beta, c_gamma, c_beta, keep):
    length, batch, h4 = xw.shape
    h, norm_length = h4 // 4, length if kind else 0  # kind 0 (none) keeps no norm inputs and statistics
    e = xw.new_empty
    return [e(length, batch, h), e(batch, h), e(length + 1, batch, h), e(length + 1, batch, h), e(length, batch, h4),
            e(length, batch, h), e(norm_length, batch, h4), e(norm_length, batch, 4), e(norm_length, batch, 4),
            e(norm_length, batch), e(norm_length, batch)]


def _lstm_scan_backward_fake(kind, d_out, d_cT, w_hh, *saved):
    length, batch, h = d_out.shape
    e = d_out.new_empty
    grads = [e(length, batch, 4 * h), e(batch, h), e(batch, h), e(4 * h, h)]
    return grads + ([e(4 * h), e(4 * h), e(h), e(h)] if kind else [])


def _bn_lstm_scan_forward_fake(eps, xw, h0, c0, w_hh, x_gamma, h_gamma, bias, c_gamma, c_beta, keep, counts,
                               stats):
    length, batch, h4 = xw.shape
    h = h4 // 4
    e = xw.new_empty
    return [e(length, batch, h), e(batch, h), e(length, h4), e(length, h4), e(length, h4), e(length, h4),
            e(length, h), e(length, h), e(length + 1, batch, h), e(length + 1, batch, h), e(length, batch, h4),
            e(length, batch, h), e(length, batch, h4), e(length, h4), e(length, h4), e(length, h)]


def _bn_lstm_scan_backward_fake(d_out, d_cT, *saved):
    length, batch, h = d_out.shape
    e = d_out.new_empty
    return [e(length, batch, 4 * h), e(batch, h), e(batch, h), e(4 * h, h), e(4 * h), e(4 * h), e(4 * h), e(h),
            e(h)]


# ----------------------------------------------------------------------------------------------------
# autograd: each forward op saves what its backward op reads; its extra outputs are not differentiable

def _selective_scan_setup(ctx, inputs, output):
    *tensors, ctx.softplus = inputs
    ctx.save_for_backward(*tensors, *output[2:])  # inputs, then the block starts and delta
    ctx.mark_non_differentiable(*output[2:])


def _selective_scan_backward(ctx, grads):
    *tensors, starts, delta_tm = ctx.saved_tensors
    # gradients of u, delta, A, B, C, D, z, delta_bias (empty for an absent one, which has no gradient)
    return *torch.ops.zoo.selective_scan_backward(*grads[:2], *tensors, ctx.softplus, starts, delta_tm), None


def _lstm_scan_setup(ctx, inputs, output):
    ctx.kind, _, _, _, _, w_hh, g_gamma, _, c_gamma, _, keep = inputs
    ctx.save_for_backward(w_hh, g_gamma, c_gamma, keep, *output[2:])
    ctx.mark_non_differentiable(*output[2:])


def _lstm_scan_backward(ctx, grads):
    d_xw, d_h0, d_c0, d_w_hh, *d_norm = torch.ops.zoo.lstm_scan_backward(ctx.kind, *grads[:2], *ctx.saved_tensors)
    return None, None, d_xw, d_h0, d_c0, d_w_hh, *(d_norm or [None] * 4), None


def _bn_lstm_scan_setup(ctx, inputs, output):
    _, xw, _, _, w_hh, x_gamma, h_gamma, _, c_gamma, _, keep, counts, stats = inputs
    mean_x, _, mean_h, _, mean_c, _, hs, cs, acts, tcs, pre, rstd_x, rstd_h, rstd_c = output[2:]
    ctx.num_stats = len(stats)
    ctx.save_for_backward(w_hh, x_gamma, h_gamma, c_gamma, keep, counts, xw, hs, cs, acts, tcs, pre, mean_x, rstd_x,
                          mean_h, rstd_h, mean_c, rstd_c)
    ctx.mark_non_differentiable(*output[2:])


def _bn_lstm_scan_backward(ctx, grads):
    # gradients of xw, h0, c0, w_hh, x_gamma, h_gamma, bias, c_gamma, c_beta
    grads_in = torch.ops.zoo.bn_lstm_scan_backward(*grads[:2], *ctx.saved_tensors)
    return None, *grads_in, None, None, [None] * ctx.num_stats


def _register() -> None:
    """Registers the fake implementations and autograd formulas of the loaded ops."""
    for name, fake in (("selective_scan_forward", _selective_scan_forward_fake),
                       ("selective_scan_backward", _selective_scan_backward_fake),
                       ("lstm_scan_forward", _lstm_scan_forward_fake),
                       ("lstm_scan_backward", _lstm_scan_backward_fake),
                       ("bn_lstm_scan_forward", _bn_lstm_scan_forward_fake),
                       ("bn_lstm_scan_backward", _bn_lstm_scan_backward_fake)):
        torch.library.register_fake(f"zoo::{name}", fake)
    for name, backward, setup in (("selective_scan_forward", _selective_scan_backward, _selective_scan_setup),
                                  ("lstm_scan_forward", _lstm_scan_backward, _lstm_scan_setup),
                                  ("bn_lstm_scan_forward", _bn_lstm_scan_backward, _bn_lstm_scan_setup)):
        torch.library.register_autograd(f"zoo::{name}", backward, setup_context=setup)


def build_ahead() -> int:
    """`make kernels`: builds the kernels ahead of time, for machines that should not compile at run
    time, and says where. Returns the exit status: 1 when they are disabled or cannot be built."""
    logging.basicConfig(format="%(message)s")
    if not ENABLED:
        print("zoo's CPU kernels are disabled (ZOO_CPU_KERNELS=0): nothing built", file=sys.stderr)
        return 1
    ok = available()
    print(f"zoo's CPU kernels: {'built' if ok else 'NOT built'} in {_build_config()[3]}")
    return 0 if ok else 1
