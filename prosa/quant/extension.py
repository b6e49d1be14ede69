"""Loading the prosa C++ kernels (``prosa/csrc/qlinear.cpp``, ``repack.cpp``) and registering them as torch ops.

The extension is built by the package build as ``prosa._qlinear`` (setup.py), or else compiled at run time on
request (``build_kernels()`` or ``$PROSA_BUILD_KERNELS=1``; ~1 min, then cached under ``~/.cache/prosa/kernels``).
Besides the int8/int4 linear kernels it holds the fused Llama block, paged attention and row sampling, which
``prosa.decode``, the engine and ``prosa.sampling`` find through ``kernels()``.

When the kernels cannot be loaded, every caller falls back to PyTorch; that is said once per process (a
``KernelsUnavailableWarning`` naming the error, what it costs and the fix). ``$PROSA_KERNELS=0`` turns the kernels
off deliberately, and silently.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

_CSRC_DIR = Path(__file__).parents[1] / "csrc"   # prosa/csrc, one level above this package
_SOURCES = [_CSRC_DIR / "qlinear.cpp", _CSRC_DIR / "repack.cpp", _CSRC_DIR / "bf16.cpp"]

_ext = None
_ext_error: str | None = None
_ext_lock = threading.Lock()
_said = False      # the fallback has been announced (once per process)
_missing = False   # a search without building found nothing: later calls without ``build`` answer None at once

# Measured with the bundled SmolLM2-135M (greedy, one sequence, one thread) against PyTorch's kernels: int4 ~45 ->
# ~1100 ms/token, int8 ~55 -> ~1000 (the lm_head and asymmetric int8 dequantize every step), float ~190 -> ~225.
FALLBACK_COST = "int8/int4 decoding about 20x slower (float about 1.2x)"


class KernelsUnavailableWarning(RuntimeWarning):
    """prosa's C++ kernels could not be loaded (or built): PyTorch's slower kernels are used instead."""


def _build_dir() -> Path:
    """Build folder keyed by the source, torch and Python versions (a change rebuilds into a new folder)."""
    code = b"".join(p.read_bytes() for p in _SOURCES)
    key = hashlib.sha256(code + torch.__version__.encode() + sys.version.encode()).hexdigest()[:16]
    root = Path(os.environ.get("PROSA_KERNEL_DIR") or Path.home() / ".cache" / "prosa" / "kernels")
    return root / key


def kernels(build: bool | None = None):
    """The compiled prosa kernel module, or None when unavailable.

    Looks for, in order: the extension built with the package (``prosa._qlinear``), a build cached by an earlier
    run-time compile, and (when ``build``) compiles one now. The first time none of them works, a
    ``KernelsUnavailableWarning`` says why and what the PyTorch fallback costs.

    Args:
        build: compile the extension if neither exists (needs a C++ compiler; ~1 min). None follows
            ``$PROSA_BUILD_KERNELS`` ("1" to build; default: no compiling). ``$PROSA_KERNELS=0`` disables the
            kernels altogether (PyTorch fallbacks only, without a warning).
    Returns:
        The extension module, or None.
    """
    global _ext, _ext_error, _said, _missing
    if os.environ.get("PROSA_KERNELS") == "0":
        return None
    if _ext is not None:
        return _ext
    if build is None:
        build = os.environ.get("PROSA_BUILD_KERNELS") == "1"
    if _missing and not build:   # every layer asks on every call: do not hash the sources and search again
        return None
    with _ext_lock:
        if _ext is not None:
            return _ext
        if _missing and not build:
            return None
        try:
            from .. import _qlinear  # built by setup.py against the installed torch
            _ext = _qlinear
        except ImportError as e:  # not built, or built against another torch (undefined symbols)
            _ext_error = f"prosa._qlinear: {type(e).__name__}: {e}"
        if _ext is None:
            folder = _build_dir()
            so = folder / "prosa_qlinear.so"
            try:
                if so.is_file():
                    spec = importlib.util.spec_from_file_location("prosa_qlinear", so)
                    mod = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(mod)
                    _ext = mod
                elif build:
                    from torch.utils.cpp_extension import load

                    folder.mkdir(parents=True, exist_ok=True)
                    # No -march: the AVX-512 code is compiled per function (target attributes), chosen at run time.
                    _ext = load(name="prosa_qlinear", sources=[str(p) for p in _SOURCES], build_directory=str(folder),
                                extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # noqa: BLE001 - no compiler, bad toolchain ...: fall back to other backends
                _ext_error = f"{type(e).__name__}: {e}"
        if _ext is not None:
            _register_ops(_ext)
            return _ext
        _missing = not build
        say, _said = not _said, True
    if say:  # outside the lock: ``-W error`` turns this into an exception
        _say_unavailable(build)
    return None


def _say_unavailable(build: bool) -> None:
    """The once-per-process notice that the kernels are missing: what failed, what it costs, how to fix it."""
    error = (_ext_error or "unknown error").strip().splitlines()
    reason = error[0][:300] if error else "unknown error"
    if build:
        fix = (f"compiling them failed; install a C++ compiler with OpenMP (g++) and retry, or delete "
               f"{_build_dir()} if it holds a broken build")
    else:
        fix = "`make setup` builds them (or PROSA_BUILD_KERNELS=1 compiles them at run time, ~1 min, needs g++)"
    warnings.warn(
        f"prosa: the C++ kernels are unavailable ({reason}): int8/int4 layers, decode steps and sampling use "
        f"PyTorch's kernels instead, {FALLBACK_COST}; {fix}; PROSA_KERNELS=0 chooses PyTorch's kernels silently",
        KernelsUnavailableWarning, stacklevel=3)   # points at the caller of kernels()


def _register_ops(ext) -> None:
    """``torch.ops.prosa.linear_int4/int8``: the kernels as custom ops with shape functions, so that
    ``torch.compile`` can trace through a QuantizedLinear (eager mode calls the extension directly: cheaper)."""
    if hasattr(torch.ops.prosa, "linear_int4"):  # registered by an earlier import of this module
        return

    @torch.library.custom_op("prosa::linear_int4", mutates_args=())
    def linear_int4(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, mn: torch.Tensor | None, bias: torch.Tensor | None,
                    n: int, g: int) -> torch.Tensor:
        return ext.linear_int4(x, w, d, mn, bias, n, g)

    @torch.library.custom_op("prosa::linear_int8", mutates_args=())
    def linear_int8(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None, n: int,
                    g: int) -> torch.Tensor:
        return ext.linear_int8(x, w, d, bias, n, g)

    @linear_int4.register_fake
    def _(x, w, d, mn, bias, n, g):
        return x.new_empty(*x.shape[:-1], n)

    @linear_int8.register_fake
    def _(x, w, d, bias, n, g):
        return x.new_empty(*x.shape[:-1], n)


def build_kernels():
    """Compile (or load the cached build of) the prosa kernels; raises when that fails.

    Returns:
        The extension module.
    """
    if os.environ.get("PROSA_KERNELS") == "0":
        raise RuntimeError("PROSA_KERNELS=0 disables the prosa kernels; unset it to build or load them")
    mod = kernels(build=True)
    if mod is None:
        raise RuntimeError(f"prosa quantization kernels could not be built: {_ext_error}")
    return mod
