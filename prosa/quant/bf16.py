"""``Bf16Linear``: an ``nn.Linear`` with a bfloat16 weight whose decode-sized calls run prosa's bf16 kernel.

A ``quantize="bf16"`` model on a CPU computes in bfloat16. Decoding reads every weight once per token, so bf16
should be about twice as fast as float32; PyTorch's bf16 GEMV (oneDNN) was not on an Intel Xeon VM with AVX-512
BF16 and no AMX (0.60x float32 with one sequence, bench/regimes.py). ``prosa/csrc/bf16.cpp`` streams the weight once
and sums exact bf16 products in float32, as oneDNN does, so the numbers are the same up to summation order; it
needs only AVX-512F. Calls with more than ``MAX_ROWS`` rows (prompts), or that need gradients, or on another
device, go through ``F.linear`` (oneDNN's blocked matmuls are the faster ones there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .extension import kernels

MAX_ROWS = 16   # rows of x up to which the kernel beats oneDNN (2 Xeon vCPUs: 2x at 1 row, 1.3-2x at 8, even at 32)


class Bf16Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) with a bfloat16 weight; see the module docstring."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Bf16Linear":
        """A ``Bf16Linear`` holding ``linear``'s own parameters (no copy: a tied weight stays tied).

        Args:
            linear: an ``nn.Linear`` whose weight is bfloat16.
        Returns:
            the new layer.
        """
        if linear.weight.dtype != torch.bfloat16:
            raise ValueError(f"Bf16Linear needs a bfloat16 weight, got {linear.weight.dtype}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // max(1, x.shape[-1])
        ext = None
        if (rows <= MAX_ROWS and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)
                and w.is_contiguous() and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and not torch.compiler.is_compiling()):
            ext = kernels()
        if ext is None or not hasattr(ext, "linear_bf16"):
            return F.linear(x, w, self.bias)
        y = ext.linear_bf16(x.reshape(rows, x.shape[-1]), w, self.bias)   # (rows, N) in x's dtype
        return y.reshape(*x.shape[:-1], self.out_features)


def use_bf16_kernel(model: nn.Module) -> int:
    """Swap every CPU ``nn.Linear`` of ``model`` with a bfloat16 weight for a ``Bf16Linear`` (in place).

    Args:
        model: a model loaded with bfloat16 weights.
    Returns:
        the number of layers swapped (0 where the kernels are unavailable).
    """
    ext = kernels()
    if ext is None or not hasattr(ext, "linear_bf16"):
        return 0
    swapped = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and mod.weight.dtype == torch.bfloat16 and mod.weight.device.type == "cpu":
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, Bf16Linear.from_linear(mod))
            swapped += 1
    return swapped
