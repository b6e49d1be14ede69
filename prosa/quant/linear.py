"""``QuantizedLinear``: a drop-in for ``nn.Linear`` whose weight is int8 or int4 plus per-group scales.

Same ``forward(x)`` (any leading dims, optional bias); the weight is stored in one of ``formats.py``'s plain
formats, laid out for one backend (``QuantizedLinear.backend``):

- ``"prosa"``: the C++ kernels (``extension.kernels()``), weights row-interleaved 16 rows at a time
  (``layout.py``). Two kinds of kernels (``QuantizedLinear.activations``, ``set_activations``): "float" (default)
  dequantizes the weights in registers and keeps the activations in float32, so the result equals the float
  reference up to summation order; "int8" quantizes the activations to int8 per 32 values on the fly (as llama.cpp
  does) and uses VNNI integer dot products: faster, but results differ from the float reference by that rounding
  (~0.4% relative per layer, ~1.5% on SmolLM2-135M logits).
- ``"aten"``: PyTorch's own CPU kernels: ``aten._weight_int4pack_mm_for_cpu`` (int4; needs
  ``in_features % group_size == 0`` and ``group_size`` in 32/64/128/256) and ``aten._weight_int8pack_mm``
  (int8 per-channel only).
- ``"torch"``: plain layout; forward dequantizes and calls ``F.linear``. Runs anywhere (any device and dtype).

``backend="auto"`` picks, per layer, the fastest one measured on a 2-core Sapphire Rapids (see
``bench/kernel_speed.py``): prosa when its kernels load and the shape suits them, else aten where it applies, else
torch. ``QuantizedLinear.forward_reference(x)`` is the pure-PyTorch path (dequantize, then ``F.linear``) for any
backend.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import extension
from .extension import kernels
from .formats import _check_groups, dequantize_int, quantize_int4, quantize_int8, quantize_uint8
from .layout import (_aten_int4_ok, _aten_int4_unpack, _pack_int4, _pack_int8, _pack_prosa_chunks, _pack_scales,
                     _unpack_int4, _unpack_int8, _unpack_scales, symmetric_int4)

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

    Build it with ``from_linear`` / ``from_float`` / ``from_int`` (GGUF blocks: ``from_int(*gguf_to_int(...)[1:])``).
    The weights are frozen; an input that requires grad gets one (adapters trained on a quantized base).
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
            if bits == 4 and symmetric_int4(d, m):
                m = None    # W = d (q - 8) (GGUF Q4_0): the kernels derive the mins, 10% fewer bytes to read
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
    def from_int_chunks(cls, n: int, k: int, group: int, bits: int, asym: bool,
                        chunks: Iterable[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]],
                        backend: str = "auto") -> "QuantizedLinear":
        """``from_int`` of an (N, K) weight given as row chunks ``(first row, q, d, m)`` (in order; each but the
        last a whole number of 16 rows): for the prosa backend each chunk is packed into its place as it comes,
        so a layer read from a file never exists whole in the plain format (other backends join the chunks and
        call ``from_int``). ``asym``: the chunks carry mins (int4, asymmetric int8)."""
        _check_groups(k, group)
        backend = cls._choose_backend(bits, n, k, group, asym) if backend == "auto" else backend
        if backend == "prosa" and k % 32 == 0 and group % 32 == 0:
            return cls(k, n, bits, group, backend, _pack_prosa_chunks(n, k, group, bits, asym, chunks), None)
        parts = list(chunks)
        q, d = torch.cat([c[1] for c in parts]), torch.cat([c[2] for c in parts])
        m = torch.cat([c[3] for c in parts]) if asym else None
        return cls.from_int(q, d, m, None, backend, bits)

    @classmethod
    def from_gguf_rows(cls, kind: str, parts: list[tuple[torch.Tensor, torch.Tensor | None]],
                       n: int, k: int) -> "QuantizedLinear | None":
        """A prosa-backend layer straight from GGUF Q8_0 / Q4_0 / Q4_1 blocks, by the C++ repacking (one pass over
        the file's bytes, nothing allocated but the result): what ``from_int_chunks`` of ``gguf_to_int``'s
        integers makes, bit for bit.

        Args:
            kind: the GGUF type name of every part.
            parts: ``(bytes, order)`` per row block of the weight in order (a fused projection's parts): bytes
                uint8 (rows, K / 32 * block bytes), e.g. a read-only view of the file's map (only read); order
                int64 (rows,) (output row r of the part is its row ``order[r]``) or None.
            n, k: the layer's out and in features (n = the parts' rows).
        Returns:
            the layer, or None where this path does not apply (another type, the kernels unavailable or another
            backend chosen for the shape): the caller then goes through ``from_int_chunks``.
        """
        ids = {"Q8_0": 8, "Q4_0": 2, "Q4_1": 3}
        bits = 8 if kind == "Q8_0" else 4
        ext = kernels()
        if kind not in ids or ext is None or not hasattr(ext, "gguf_repack") or \
                cls._choose_backend(bits, n, k, 32, kind != "Q8_0") != "prosa":
            return None
        none = torch.empty(0, dtype=torch.int64)
        bufs = ext.gguf_repack([p for p, _ in parts], [none if o is None else o for _, o in parts], ids[kind], k)
        return cls(k, n, bits, 32, "prosa", dict(zip(("qweight", "scales", "mins"), bufs)), None)

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
            d = _unpack_scales(self.scales, n).contiguous()
            m = _unpack_scales(self.mins, n).contiguous() if asym else (d * -8 if self.bits == 4 else None)
            return q.contiguous(), d, m
        if self.backend == "torch":
            return self.qweight, self.scales, getattr(self, "mins", None)
        if self.bits == 8:  # aten per-channel
            return self.qweight, self.scales.to(torch.float16)[:, None], None
        # aten int4: undo the packing permutation; scale/zero are bfloat16, zero = m + 8 d
        q = _aten_int4_unpack(self.qweight, n, k)
        sz = self.scales_and_zeros.float()
        d32, zero = sz[..., 0].t(), sz[..., 1].t()
        return q, d32.to(torch.float16), (zero - 8 * d32).to(torch.float16)

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
            ext = extension._ext if extension._ext is not None else kernels()
            if ext is None or x.device.type != "cpu":
                return self.forward_reference(x)
            # the C++ op reshapes, casts to float32 and back itself
            if self.bits == 8 and "mins" in b:   # asymmetric int8: the int4 kernels' arguments
                fn = ext.linear_uint8_f32 if self.activations == "float" else ext.linear_uint8
                return fn(x, b["qweight"], b["scales"], b["mins"], b["bias"], self.out_features, self.group_size)
            if self.activations == "float":
                if self.bits == 4:
                    return ext.linear_int4_f32(x, b["qweight"], b["scales"], b.get("mins"), b["bias"], self.out_features,
                                               self.group_size)
                return ext.linear_int8_f32(x, b["qweight"], b["scales"], b["bias"], self.out_features, self.group_size)
            if torch.compiler.is_compiling():
                if self.bits == 4:
                    return torch.ops.prosa.linear_int4(x, b["qweight"], b["scales"], b.get("mins"), b["bias"],
                                                       self.out_features, self.group_size)
                return torch.ops.prosa.linear_int8(x, b["qweight"], b["scales"], b["bias"], self.out_features,
                                                   self.group_size)
            if self.bits == 4:
                return ext.linear_int4(x, b["qweight"], b["scales"], b.get("mins"), b["bias"], self.out_features,
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
