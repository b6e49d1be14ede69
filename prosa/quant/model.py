"""``quantize_model``: every ``nn.Linear`` of a model swapped for a ``QuantizedLinear``, in place."""
from __future__ import annotations

from torch import nn

from .linear import QuantizedLinear


def quantize_model(model: nn.Module, mode: str = "int4", group_size: int | None = 32, *,
                   lm_head: str | None = "int8", backend: str = "auto") -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for a ``QuantizedLinear`` (in place; returns the model).

    Args:
        mode: "int4" or "int8".
        group_size: inputs per scale (int4 needs one; None = per-channel for int8). Layers whose in_features it
            does not divide fall back to per-channel int8 (int8 mode) or stay float (int4 mode). With
            ``backend="aten"`` int8 layers are always per-channel.
        lm_head: format of the output layer(s) (modules named ``lm_head``): "int8" (default; the vocabulary
            projection is the most quantization-sensitive layer), "int4", "same" (= mode), or None to keep it float.
            A tied lm_head gets its own quantized copy; the embedding stays float.
        backend: see ``QuantizedLinear``.
    Returns:
        ``model``.
    """
    if mode not in ("int4", "int8"):
        raise ValueError(f"mode must be 'int4' or 'int8', got {mode!r}")
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        fmt = mode
        if leaf == "lm_head":
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

