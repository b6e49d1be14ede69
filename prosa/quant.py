"""Weight-only quantized linear layers: int8 (per-channel or group-wise) and int4 (group-wise, scale + min).

``QuantizedLinear`` is a drop-in for ``nn.Linear`` (same ``forward(x)``, any leading dims, optional bias) whose
weight is stored as integers plus per-group scales:

- int8: ``W = d * q``, q in -127..127 (symmetric), one fp16 ``d`` per ``group_size`` inputs of a row
  (``group_size = in_features`` is per-channel).
- int4: ``W = d * q + m``, q in 0..15 (asymmetric: scale and min per group), fp16 ``d`` and ``m``.

GGUF's Q8_0 (int8, group 32), Q4_0 (int4, group 32, ``m = -8 d``) and Q4_1 (int4, group 32, ``d`` and ``m``) are
these formats exactly, so ``QuantizedLinear.from_gguf`` repacks their blocks without going through float.

Backends (``QuantizedLinear.backend``), each with its own weight layout:

- ``"prosa"``: the C++ kernels in ``prosa/csrc/qlinear.cpp`` (AVX-512 VNNI with a portable scalar path), built
  by the package build as ``prosa._qlinear`` (setup.py), or else compiled at run time on request
  (``build_kernels()`` or ``$PROSA_BUILD_KERNELS=1``; ~1 min, then cached under ``~/.cache/prosa/kernels``), see
  ``kernels()``. Weights row-interleaved 16 rows at a time. Two kinds of kernels (``QuantizedLinear.activations``,
  ``set_activations``): "float" (default) dequantizes the weights in registers and keeps the activations in
  float32, so the result equals the float reference up to summation order; "int8" quantizes the activations to
  int8 per 32 values on the fly (as llama.cpp does) and uses VNNI integer dot products: faster, but results differ
  from the float reference by that rounding (~0.4% relative per layer, ~1.5% on SmolLM2-135M logits).
- ``"aten"``: PyTorch's own CPU kernels: ``aten._weight_int4pack_mm_for_cpu`` (int4; needs
  ``in_features % group_size == 0`` and ``group_size`` in 32/64/128/256) and ``aten._weight_int8pack_mm``
  (int8 per-channel only).
- ``"torch"``: plain layout; forward dequantizes and calls ``F.linear``. Runs anywhere (any device and dtype).

``backend="auto"`` picks, per layer, the fastest one measured on a 2-core Sapphire Rapids (see
``bench/kernels.py``): prosa when its kernels load and the shape suits them, else aten where it applies, else
torch. ``QuantizedLinear.forward_reference(x)`` is the pure-PyTorch path (dequantize, then ``F.linear``) for any
backend.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QuantizedLinear", "quantize_model", "set_activations", "quantize_int8", "quantize_uint8", "quantize_int4",
           "gguf_to_int", "kernels", "build_kernels"]

TILE = 16          # output rows per tile of the prosa layout
_CSRC = Path(__file__).parent / "csrc" / "qlinear.cpp"


# ------------------------------------------------------------------------------------------------- C++ kernels
_ext = None
_ext_error: str | None = None
_ext_lock = threading.Lock()


def _build_dir() -> Path:
    """Build folder keyed by the source, torch and Python versions (a change rebuilds into a new folder)."""
    key = hashlib.sha256(_CSRC.read_bytes() + torch.__version__.encode() + sys.version.encode()).hexdigest()[:16]
    root = Path(os.environ.get("PROSA_KERNEL_DIR") or Path.home() / ".cache" / "prosa" / "kernels")
    return root / key


def kernels(build: bool | None = None):
    """The compiled prosa kernel module, or None when unavailable.

    Looks for, in order: the extension built with the package (``prosa._qlinear``), a build cached by an earlier
    run-time compile, and (when ``build``) compiles one now.

    Args:
        build: compile the extension if neither exists (needs a C++ compiler; ~1 min). None follows
            ``$PROSA_BUILD_KERNELS`` ("1" to build; default: no compiling). ``$PROSA_KERNELS=0`` disables the
            kernels altogether (PyTorch fallbacks only).
    """
    global _ext, _ext_error
    if os.environ.get("PROSA_KERNELS") == "0":
        return None
    if _ext is not None:
        return _ext
    if build is None:
        build = os.environ.get("PROSA_BUILD_KERNELS") == "1"
    with _ext_lock:
        if _ext is not None:
            return _ext
        try:
            from . import _qlinear  # built by setup.py against the installed torch
            _ext = _qlinear
        except ImportError as e:  # not built, or built against another torch (undefined symbols)
            _ext_error = f"prosa._qlinear: {e}"
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
                    _ext = load(name="prosa_qlinear", sources=[str(_CSRC)], build_directory=str(folder),
                                extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # noqa: BLE001 - no compiler, bad toolchain ...: fall back to other backends
                _ext_error = f"{type(e).__name__}: {e}"
        if _ext is not None:
            _register_ops(_ext)
        return _ext


def _register_ops(ext) -> None:
    """``torch.ops.prosa.linear_int4/int8``: the kernels as custom ops with shape functions, so that
    ``torch.compile`` can trace through a QuantizedLinear (eager mode calls the extension directly: cheaper)."""
    if hasattr(torch.ops.prosa, "linear_int4"):  # registered by an earlier import of this module
        return

    @torch.library.custom_op("prosa::linear_int4", mutates_args=())
    def linear_int4(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, mn: torch.Tensor, bias: torch.Tensor | None,
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
    """Compile (or load the cached build of) the prosa kernels; raises when that fails."""
    mod = kernels(build=True)
    if mod is None:
        raise RuntimeError(f"prosa quantization kernels could not be built: {_ext_error}")
    return mod


# ------------------------------------------------------------------------------------------ plain quantization
def _check_groups(k: int, group_size: int) -> None:
    if group_size <= 0 or k % group_size:
        raise ValueError(f"in_features={k} is not a multiple of group_size={group_size}")


_CHUNK = 1 << 20   # weights quantized per step: bounds the float temporaries to a few MB whatever the layer


def _row_chunks(n: int, k: int):
    """Row slices of about ``_CHUNK`` weights each."""
    step = max(1, _CHUNK // max(k, 1))
    return (slice(r, min(n, r + step)) for r in range(0, n, step))


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: ``w ~= d * q`` per group of ``group_size`` inputs (None: per output channel).

    Returns:
        q int8 (N, K) in -127..127, d float16 (N, K // group_size).
    """
    n, k = w.shape
    g = group_size or k
    _check_groups(k, g)
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    d = torch.empty(n, k // g, dtype=torch.float16, device=w.device)
    for rows in _row_chunks(n, k):
        wg = w[rows].detach().float().reshape(-1, k // g, g)
        d[rows] = (wg.abs().amax(-1) / 127).to(torch.float16)
        d32 = d[rows].float()
        inv = torch.where(d32 > 0, 1 / d32, torch.zeros_like(d32))
        q[rows] = torch.round(wg * inv[..., None]).clamp_(-127, 127).to(torch.int8).reshape(-1, k)
    return q, d


def _quantize_asym(w: torch.Tensor, group_size: int, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w ~= d * q + m`` per group, q in 0..levels, ``m`` the group minimum, ``d = (max - min) / levels``."""
    n, k = w.shape
    _check_groups(k, group_size)
    q = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    d = torch.empty(n, k // group_size, dtype=torch.float16, device=w.device)
    m = torch.empty_like(d)
    for rows in _row_chunks(n, k):
        wg = w[rows].detach().float().reshape(-1, k // group_size, group_size)
        lo, hi = wg.amin(-1), wg.amax(-1)
        d[rows] = ((hi - lo) / levels).to(torch.float16)
        m[rows] = lo.to(torch.float16)
        d32 = d[rows].float()
        inv = torch.where(d32 > 0, 1 / d32, torch.zeros_like(d32))
        wg = (wg - m[rows].float()[..., None]).mul_(inv[..., None])   # a new tensor: in place is safe
        q[rows] = torch.round(wg).clamp_(0, levels).to(torch.uint8).reshape(-1, k)
    return q, d, m


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4: ``w ~= d * q + m`` per group, q in 0..15, ``m`` the group minimum.

    Returns:
        q uint8 (N, K) in 0..15, d float16 (N, K // g), m float16 (N, K // g).
    """
    return _quantize_asym(w, group_size, 15)


def quantize_uint8(w: torch.Tensor, group_size: int | None = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int8: ``w ~= d * q + m`` per group, q in 0..255 (None: per output channel).

    Up to twice as fine as symmetric int8 on groups that are not centred on zero, and exact on weights that were
    Q4_0/Q4_1 blocks (their 16 levels land on every 17th code). The default int8 format.

    Returns:
        q uint8 (N, K) in 0..255, d float16 (N, K // g), m float16 (N, K // g).
    """
    return _quantize_asym(w, group_size or w.shape[1], 255)


def dequantize_int(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """``d * q (+ m)`` with d/m broadcast over their groups; computed in float32."""
    n, k = q.shape
    g = k // d.shape[1]
    w = q.float().reshape(n, -1, g) * d.float()[..., None]
    if m is not None:
        w = w + m.float()[..., None]
    return w.reshape(n, k).to(dtype)


# --------------------------------------------------------------------------------------------------- GGUF blocks
def gguf_to_int(raw, ggml_type, shape: tuple[int, int]):
    """GGUF Q8_0 / Q4_0 / Q4_1 blocks -> ``(bits, q, d, m)`` in this module's plain format, exactly; Q4_K blocks
    too, with their per-32 scales and mins (``d * sc`` and ``dmin * m``, exact in float32) rounded to float16.

    Args:
        raw: the tensor's bytes (uint8 numpy array or tensor, any shape; e.g. ``ReaderTensor.data``).
        ggml_type: a ``gguf.GGMLQuantizationType`` (or its int / name).
        shape: (rows, cols) in torch order.
    Returns:
        bits (8 or 4), q (int8 for Q8_0, uint8 0..15 for Q4_x; shape ``shape``), d and m float16 (rows, cols // 32);
        m is None for Q8_0. Q4_0's implicit zero becomes ``m = -8 d`` (exact in fp16).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    t = Q[ggml_type] if isinstance(ggml_type, str) else Q(ggml_type)
    if t not in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K):
        raise ValueError(f"{t.name} blocks have no int8/int4 form here; dequantize and use from_float")
    n, k = shape
    block, nbytes = GGML_QUANT_SIZES[t]
    if k % block:
        raise ValueError(f"rows of {k} are not whole {t.name} blocks")
    arr = np.asarray(raw)
    if not arr.flags.writeable or not arr.flags.c_contiguous:  # e.g. a read-only memmap of the file
        arr = arr.copy()
    b = torch.from_numpy(arr).reshape(-1).view(torch.uint8)
    if b.numel() != n * k // block * nbytes:
        raise ValueError(f"{t.name} data of {b.numel()} bytes does not hold a {n}x{k} tensor")
    b = b.reshape(n * k // block, nbytes)
    d = b[:, 0:2].contiguous().view(torch.float16).reshape(n, k // block)
    if t == Q.Q8_0:
        q = b[:, 2:].contiguous().view(torch.int8).reshape(n, k)
        return 8, q, d, None
    if t == Q.Q4_K:
        return (4, *_q4_k_to_int(b, n, k))
    qs = b[:, 2:18] if t == Q.Q4_0 else b[:, 4:20]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=1).reshape(n, k)  # ggml: low nibbles are elements 0..15
    m = (d * -8) if t == Q.Q4_0 else b[:, 2:4].contiguous().view(torch.float16).reshape(n, k // block)
    return 4, q, d, m


def _q4_k_to_int(b: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks (144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of
    nibbles) -> int4 q, and per-32 d = d * sc, m = -dmin * mn as float16. ggml's layout: in each 64-weight chunk,
    the 32 low nibbles are sub-block 2i and the 32 high nibbles sub-block 2i + 1."""
    nb = b.shape[0]
    d = b[:, 0:2].contiguous().view(torch.float16).float()           # (nb, 1)
    dmin = b[:, 2:4].contiguous().view(torch.float16).float()
    s = b[:, 4:16].to(torch.int32)                                     # (nb, 12)
    sc = torch.empty(nb, 8, dtype=torch.int32)
    mn = torch.empty(nb, 8, dtype=torch.int32)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    qs = b[:, 16:144].reshape(nb, 4, 1, 32)
    q = torch.cat((qs & 0x0F, qs >> 4), dim=2).reshape(n, k)          # (nb, 4 chunks, 2 sub-blocks, 32)
    dd = (d * sc.float()).to(torch.float16).reshape(n, k // 32)
    mm = (-(dmin * mn.float())).to(torch.float16).reshape(n, k // 32)
    return q, dd, mm


# ----------------------------------------------------------------------------------------------------- layouts
def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat((t, t.new_zeros(rows - t.shape[0], *t.shape[1:])))


def _pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) -> prosa layout uint8 (T, K/4, 16, 4), stored as q + 128; uint8 codes (asymmetric) as they are."""
    n, k = q.shape
    t = -(-n // TILE)
    u = _pad_rows(q, t * TILE).view(torch.uint8)
    u = (u if q.dtype == torch.uint8 else u ^ 0x80).reshape(t, TILE, k // 4, 4)
    return u.permute(0, 2, 1, 3).contiguous()


def _unpack_int8(p: torch.Tensor, n: int, asym: bool = False) -> torch.Tensor:
    t, k4 = p.shape[:2]
    q = p if asym else (p ^ 0x80).view(torch.int8)
    return q.permute(0, 2, 1, 3).reshape(t * TILE, k4 * 4)[:n]


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 0..15 (N, K) -> prosa layout uint8 (T, K/8, 16, 4): byte j = q[k+j] | q[k+4+j] << 4."""
    n, k = q.shape
    t = -(-n // TILE)
    u = _pad_rows(q, t * TILE).reshape(t, TILE, k // 8, 2, 4)
    b = u[..., 0, :] | (u[..., 1, :] << 4)
    return b.permute(0, 2, 1, 3).contiguous()


def _unpack_int4(p: torch.Tensor, n: int) -> torch.Tensor:
    t, k8 = p.shape[:2]
    b = p.permute(0, 2, 1, 3)                                    # (T, 16, K/8, 4)
    q = torch.stack((b & 0x0F, b >> 4), dim=3)                   # (T, 16, K/8, 2, 4)
    return q.reshape(t * TILE, k8 * 8)[:n]


def _pack_scales(s: torch.Tensor) -> torch.Tensor:
    """(N, K/G) -> (T, K/G, 16) fp16."""
    n, ng = s.shape
    t = -(-n // TILE)
    return _pad_rows(s.to(torch.float16), t * TILE).reshape(t, TILE, ng).transpose(1, 2).contiguous()


def _unpack_scales(p: torch.Tensor, n: int) -> torch.Tensor:
    t, ng, _ = p.shape
    return p.transpose(1, 2).reshape(t * TILE, ng)[:n]


@functools.lru_cache(maxsize=64)
def _aten_int4_order(n: int, k: int) -> torch.Tensor:
    """Where aten's int4 CPU packing puts each weight: nibble i of the packed tensor (low nibble of byte j is
    2j, high 2j+1) holds element ``order[i]`` of the flattened (N, K) input. Found by packing the element index,
    4 bits at a time, so it follows whatever layout this torch build uses."""
    idx = torch.arange(n * k, dtype=torch.int64)
    order = torch.zeros(n * k, dtype=torch.int64)
    for shift in range(0, max(4, (n * k - 1).bit_length()), 4):
        q = ((idx >> shift) & 0xF).to(torch.int32).reshape(n, k)
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).reshape(-1)
        nib = torch.stack((p & 0x0F, p >> 4), -1).reshape(-1).to(torch.int64)
        order |= nib << shift
    return order


def _aten_int4_ok(n: int, k: int, group_size: int) -> bool:
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and group_size in (32, 64, 128, 256)
            and k % group_size == 0 and n % 16 == 0)


# ------------------------------------------------------------------------------------------------------ module
ACTIVATIONS = ("float", "int8")


def default_activations() -> str:
    """How the prosa kernels treat activations unless told otherwise: "float" (exact: the result is
    ``F.linear(x, dequantized W)`` up to summation order), or "int8" with ``$PROSA_ACTIVATIONS=int8``."""
    value = os.environ.get("PROSA_ACTIVATIONS", "float")
    return value if value in ACTIVATIONS else "float"


def set_activations(model: nn.Module, activations: str) -> nn.Module:
    """Switch every prosa-backend ``QuantizedLinear`` of ``model`` to float or int8 activations.

    "float" keeps activations in float32 (exact to rounding; the default). "int8" quantizes them to int8 per 32
    values, as llama.cpp does, and uses AVX-512 VNNI dot products: faster (about 1.3x at one sequence, 2x and more
    with several), at the price of ~0.4% noise per layer, which can flip near-ties in greedy decoding.
    """
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}; got {activations!r}")
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            mod.activations = activations
    return model


class QuantizedLinear(nn.Module):
    """Weight-only quantized ``nn.Linear``: ``y = x @ W^T + b`` with ``W`` int8 or int4 group-wise.

    Build it with ``from_linear`` / ``from_float`` / ``from_int`` / ``from_gguf``. The weights are frozen; an input
    that requires grad gets one (adapters trained on a quantized base).
    The bias and the output use the input's dtype; the prosa and aten kernels compute in float32.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, backend: str,
                 tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.backend = bits, group_size, backend
        self.activations = default_activations()
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    # --------------------------------------------------------------------------------------------- builders
    @classmethod
    def from_int(cls, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 backend: str = "auto", bits: int | None = None) -> "QuantizedLinear":
        """From the plain format: int8 q with fp16 d (m None: symmetric int8), uint8 0..15 q with d and m (int4),
        or uint8 0..255 q with d and m and ``bits=8`` (asymmetric int8)."""
        n, k = q.shape
        bits = bits or (8 if q.dtype == torch.int8 else 4)
        if m is None and (bits == 4 or q.dtype != torch.int8):
            raise ValueError("unsigned codes need mins (m); for a symmetric int4 code use m = -8 d")
        group = k // d.shape[1]
        _check_groups(k, group)
        backend = cls._choose_backend(bits, n, k, group, m is not None) if backend == "auto" else backend
        d = d.to(torch.float16)
        m = None if m is None else m.to(torch.float16)
        if backend == "prosa":
            if k % 32 or group % 32:
                raise ValueError(f"the prosa kernels need in_features and group_size multiples of 32 (got {k}, {group})")
            tensors = {"qweight": _pack_int8(q) if bits == 8 else _pack_int4(q), "scales": _pack_scales(d)}
            if m is not None:
                tensors["mins"] = _pack_scales(m)
        elif backend == "aten":
            if bits == 8:
                if group != k or m is not None:
                    raise ValueError("aten's int8 kernel is symmetric and per-channel only (group_size = in_features)")
                tensors = {"qweight": q.contiguous(), "scales": d.to(torch.bfloat16).reshape(n)}
            else:
                if not _aten_int4_ok(n, k, group):
                    raise ValueError(f"aten's int4 kernel needs group_size in 32/64/128/256 dividing in_features "
                                     f"and out_features a multiple of 16 (got {n}x{k}, group {group})")
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
                # aten dequantizes (q - 8) * scale + zero
                sz = torch.stack((d.float(), m.float() + 8 * d.float()), -1).transpose(0, 1).contiguous()
                tensors = {"qweight": packed, "scales_and_zeros": sz.to(torch.bfloat16)}
        elif backend == "torch":
            tensors = {"qweight": q.contiguous(), "scales": d.contiguous()}
            if m is not None:
                tensors["mins"] = m.contiguous()
        else:
            raise ValueError(f"unknown backend {backend!r} (auto, prosa, aten, torch)")
        return cls(k, n, bits, group, backend, tensors, bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, bits: int = 4,
                   group_size: int | None = 32, backend: str = "auto", symmetric: bool = False) -> "QuantizedLinear":
        """Quantize a float weight (N, K). ``group_size=None`` means per-channel (int8 only). int8 is asymmetric
        (``quantize_uint8``) unless ``symmetric`` (``quantize_int8``, which aten's kernel needs)."""
        if bits == 8:
            if symmetric or backend == "aten":
                q, d = quantize_int8(weight, group_size)
                return cls.from_int(q, d, None, bias, backend)
            return cls.from_int(*quantize_uint8(weight, group_size), bias, backend, bits=8)
        if bits == 4:
            if group_size is None:
                raise ValueError("int4 needs a group_size (32, 64, 128 ...)")
            return cls.from_int(*quantize_int4(weight, group_size), bias, backend)
        raise ValueError(f"bits must be 4 or 8, got {bits}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = 32,
                    backend: str = "auto", symmetric: bool = False) -> "QuantizedLinear":
        """Quantize an ``nn.Linear`` (see ``from_float``)."""
        return cls.from_float(linear.weight, linear.bias, bits, group_size, backend, symmetric)

    @classmethod
    def from_gguf(cls, raw, ggml_type, shape: tuple[int, int], bias: torch.Tensor | None = None,
                  row_order: torch.Tensor | None = None, backend: str = "auto") -> "QuantizedLinear":
        """From GGUF Q8_0 / Q4_0 / Q4_1 blocks, exactly (no float round trip).

        ``row_order`` (optional LongTensor) reorders the output rows, e.g. to undo llama.cpp's Q/K permutation:
        row i of the result is row ``row_order[i]`` of the file.
        """
        _, q, d, m = gguf_to_int(raw, ggml_type, shape)
        if row_order is not None:
            q, d = q[row_order], d[row_order]
            m = None if m is None else m[row_order]
        return cls.from_int(q, d, m, bias, backend)

    @staticmethod
    def _choose_backend(bits: int, n: int, k: int, group: int, asym: bool = True) -> str:
        ext = kernels()
        # the portable scalar path of the prosa kernels is slower than aten's; use it only as a last resort
        if k % 32 == 0 and group % 32 == 0 and ext is not None and ext.isa() != "scalar":
            return "prosa"
        if bits == 4 and _aten_int4_ok(n, k, group):
            return "aten"
        if bits == 8 and group == k and not asym and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return "aten"
        return "torch"

    # ---------------------------------------------------------------------------------------------- access
    def to_int(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The plain format ``(q, d, m)`` of this layer, whatever its backend (inverse of ``from_int``)."""
        n, k = self.out_features, self.in_features
        if self.backend == "prosa":
            asym = "mins" in self._buffers
            q = _unpack_int8(self.qweight, n, asym) if self.bits == 8 else _unpack_int4(self.qweight, n)
            d = _unpack_scales(self.scales, n)
            m = _unpack_scales(self.mins, n) if asym else None
            return q.contiguous(), d.contiguous(), None if m is None else m.contiguous()
        if self.backend == "torch":
            return self.qweight, self.scales, getattr(self, "mins", None)
        if self.bits == 8:  # aten per-channel
            return self.qweight, self.scales.to(torch.float16)[:, None], None
        # aten int4: undo the packing permutation; scale/zero are bfloat16, zero = m + 8 d
        p = self.qweight.reshape(-1)
        nib = torch.stack((p & 0x0F, p >> 4), -1).reshape(-1)
        q = torch.empty(n * k, dtype=torch.uint8)
        q[_aten_int4_order(n, k)] = nib
        sz = self.scales_and_zeros.float()
        d32, zero = sz[..., 0].t(), sz[..., 1].t()
        return q.reshape(n, k), d32.to(torch.float16), (zero - 8 * d32).to(torch.float16)

    def to_backend(self, backend: str) -> "QuantizedLinear":
        """The same quantized weights under another backend (a new module)."""
        q, d, m = self.to_int()
        return QuantizedLinear.from_int(q, d, m, self.bias, backend, bits=self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (N, K) this layer multiplies by."""
        if self.backend == "aten":  # exactly what aten multiplies by: bfloat16 scales, (q - 8) * d + zero
            q, _, _ = self.to_int()
            n, k = q.shape
            if self.bits == 8:
                return (q.float() * self.scales.float()[:, None]).to(dtype)
            sz = self.scales_and_zeros.float()
            d32, zero = sz[..., 0].t(), sz[..., 1].t()
            w = (q.float() - 8).reshape(n, -1, self.group_size) * d32[..., None] + zero[..., None]
            return w.reshape(n, k).to(dtype)
        q, d, m = self.to_int()
        return dequantize_int(q, d, m, dtype)

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return _FrozenQuantizedMatmul.apply(x, self)   # training adapters on a quantized base (qlora)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers  # direct dict access: nn.Module.__getattr__ costs ~1 us per buffer
        if self.backend == "prosa":
            ext = _ext if _ext is not None else kernels()
            if ext is None or x.device.type != "cpu":
                return self.forward_reference(x)
            # the C++ op reshapes, casts to float32 and back itself
            if self.bits == 8 and "mins" in b:   # asymmetric int8: the int4 kernels' arguments
                fn = ext.linear_uint8_f32 if self.activations == "float" else ext.linear_uint8
                return fn(x, b["qweight"], b["scales"], b["mins"], b["bias"], self.out_features, self.group_size)
            if self.activations == "float":
                if self.bits == 4:
                    return ext.linear_int4_f32(x, b["qweight"], b["scales"], b["mins"], b["bias"], self.out_features,
                                               self.group_size)
                return ext.linear_int8_f32(x, b["qweight"], b["scales"], b["bias"], self.out_features, self.group_size)
            if torch.compiler.is_compiling():
                if self.bits == 4:
                    return torch.ops.prosa.linear_int4(x, b["qweight"], b["scales"], b["mins"], b["bias"],
                                                       self.out_features, self.group_size)
                return torch.ops.prosa.linear_int8(x, b["qweight"], b["scales"], b["bias"], self.out_features,
                                                   self.group_size)
            if self.bits == 4:
                return ext.linear_int4(x, b["qweight"], b["scales"], b["mins"], b["bias"], self.out_features,
                                       self.group_size)
            return ext.linear_int8(x, b["qweight"], b["scales"], b["bias"], self.out_features, self.group_size)
        if self.backend == "aten":
            # aten's CPU kernels are vectorized for bfloat16 activations only (float32 takes a scalar loop, ~50x
            # slower on this machine), so activations go through bfloat16.
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            if self.bits == 4:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, b["qweight"], self.group_size,
                                                               b["scales_and_zeros"])
            else:
                y = torch.ops.aten._weight_int8pack_mm(x2, b["qweight"], b["scales"])
            y = y.to(x.dtype)
            if b["bias"] is not None:
                y = y + b["bias"].to(x.dtype)
            return y.reshape(*x.shape[:-1], self.out_features)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Pure PyTorch: dequantize the weight, then ``F.linear`` (in the input's dtype)."""
        w = self.dequantize(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={self.backend}, bias={self.bias is not None}"
                + (f", activations={self.activations}" if self.backend == "prosa" else ""))


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """``QuantizedLinear`` with a gradient for its input (the weights stay frozen): backward multiplies by the
    dequantized weight, made for that one product and freed at once, so only the integer copy stays in memory."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return layer._forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.layer.dequantize(grad.dtype)            # (N, K)
        return grad @ w, None


# ------------------------------------------------------------------------------------------------ whole models
def quantize_model(model: nn.Module, mode: str = "int4", group_size: int | None = 32, *,
                   lm_head: str | None = "int8", lm_head_names: Iterable[str] = ("lm_head",),
                   skip: Iterable[str] = (), backend: str = "auto") -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for a ``QuantizedLinear`` (in place; returns the model).

    Args:
        mode: "int4" or "int8".
        group_size: inputs per scale (int4 needs one; None = per-channel for int8). Layers whose in_features it
            does not divide fall back to per-channel int8 (int8 mode) or stay float (int4 mode). With
            ``backend="aten"`` int8 layers are always per-channel.
        lm_head: format of the output layer(s) named in ``lm_head_names``: "int8" (default; the vocabulary
            projection is the most quantization-sensitive layer), "int4", "same" (= mode), or None to keep it float.
            A tied lm_head gets its own quantized copy; the embedding stays float.
        skip: qualified module names to leave float.
        backend: see ``QuantizedLinear``.
    """
    if mode not in ("int4", "int8"):
        raise ValueError(f"mode must be 'int4' or 'int8', got {mode!r}")
    heads, skip = set(lm_head_names), set(skip)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name in skip:
            continue
        leaf = name.rsplit(".", 1)[-1]
        fmt = mode
        if name in heads or leaf in heads:
            if lm_head is None:
                continue
            fmt = mode if lm_head == "same" else lm_head
        bits = 4 if fmt == "int4" else 8
        k = module.in_features
        g = group_size
        if bits == 8 and backend == "aten":  # aten's int8 kernel is per-channel only
            g = None
        if g is not None and k % g:
            if bits == 4:
                continue
            g = None
        q = QuantizedLinear.from_linear(module, bits, g, backend)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, leaf, q)
    return model


# ------------------------------------------------------------------------------------------- bench candidates
def bench_candidates() -> dict:
    """Kernels for ``bench/kernels.py``: name -> (prepare(w fp32) -> (state, nbytes), run(x, state))."""
    out = {}
    ext = kernels(build=True)
    if ext is None:
        print(f"# prosa kernels unavailable: {_ext_error}", file=sys.stderr)
        return out

    def nbytes(mod):
        return sum(b.numel() * b.element_size() for b in mod.buffers())

    for bits, g, label in ((8, 32, "int8 g32"), (8, None, "int8 per-ch"), (4, 32, "int4 g32"), (4, 64, "int4 g64")):
        def prep(w, bits=bits, g=g):
            mod = QuantizedLinear.from_float(w, None, bits, g, backend="prosa")
            return mod, nbytes(mod)
        if bits == 8:
            def run(x, mod):
                return ext.linear_int8(x, mod.qweight, mod.scales, None, mod.out_features, mod.group_size)
        else:
            def run(x, mod):
                return ext.linear_int4(x, mod.qweight, mod.scales, mod.mins, None, mod.out_features, mod.group_size)
        out[f"prosa {label} ({ext.isa()})"] = (prep, run)
    out["prosa int4 g32 QuantizedLinear()"] = (
        lambda w: (lambda mod: (mod, nbytes(mod)))(QuantizedLinear.from_float(w, None, 4, 32, backend="prosa")),
        lambda x, mod: mod(x))
    return out
