"""Optional C++ CPU kernels (zoo/csrc/*.cpp) registered as `torch.ops.zoo.*`.

They are compiled on first use with torch's own extension builder (a C++ compiler and ninja; ~20-60 s
once, then cached in torch's extension directory). Where they cannot be built the callers keep their
pure-PyTorch paths, and a warning says why. `ZOO_CPU_KERNELS=0` (or `zoo.cpu_kernels.ENABLED = False`)
turns them off.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

__all__ = ["ENABLED", "available", "usable"]

ENABLED = os.environ.get("ZOO_CPU_KERNELS", "1") != "0"
SOURCES = sorted(str(p) for p in (Path(__file__).parent / "csrc").glob("*.cpp"))
_loaded: bool | None = None  # None: not tried yet


def available() -> bool:
    """Whether `torch.ops.zoo`'s CPU kernels can be used (building them on the first call)."""
    global _loaded
    if not ENABLED:
        return False
    if _loaded is None:
        try:
            # its import warns "No CUDA runtime is found" on CPU-only machines: irrelevant to CPU kernels
            quiet = logging.getLogger("torch.utils.cpp_extension")
            level, quiet.level = quiet.level, logging.ERROR
            try:
                from torch.utils import cpp_extension
            finally:
                quiet.setLevel(level)
            logging.getLogger(__name__).info("building zoo's C++ CPU kernels (once): %s", ", ".join(SOURCES))
            name, flags = "zoo_cpu_kernels", ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
            if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
                # the build is cached under its name: machines without AVX2 build and load their own
                name, flags = name + "_avx2", flags + ["-mavx2", "-mfma"]
            cpp_extension.load(name, SOURCES, extra_cflags=flags, is_python_module=False)
            _loaded = all(hasattr(torch.ops.zoo, op) for op in ("lstm_scan_forward", "selective_scan_forward"))
        except Exception as err:  # no compiler / ninja / headers: the pure-PyTorch paths still work
            warnings.warn(f"zoo: could not build the C++ CPU kernels ({type(err).__name__}: {err}); "
                          f"using the slower pure-PyTorch paths (set ZOO_CPU_KERNELS=0 to skip the attempt)",
                          RuntimeWarning, stacklevel=2)
            _loaded = False
    return _loaded


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels can take x: a float32/float64 CPU tensor, outside tracing and torch.compile
    (exporters and compilers see the pure-PyTorch ops), and the kernels built."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and available())
