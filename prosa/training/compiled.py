"""``--compile``: the training step through ``torch.compile`` (the blocks and the loss), with an eager fallback.

Eager PyTorch runs a block's RMSNorm, RoPE, SiLU x up, residual adds and their backward as ~40 separate
kernels, each a pass over (B, T, C) activations; the loss makes (N, V) float32 logits, their log-softmax and its
gradient as more full passes. Inductor fuses these into a few loops per block and one for the loss: measured on
SmolLM2-135M, 2 AMD EPYC cores, 4 x 256 tokens, bf16 autocast, LoRA 230 -> 490 tok/s, full 205 -> 330 tok/s
(docs/benchmarks.md has the bench's figures). The cost is a compile (~10-60 s, once; Inductor caches its
kernels on disk, so later runs compile faster), so ``auto`` turns it on only for runs estimated at a minute or
more.

Only the training forward is compiled: evaluation, sampling and export call the same blocks eagerly (their
shapes and caches differ; a compiled graph for each would cost more than it saves). A compile that fails (no C++
compiler, an operator Inductor cannot lower) is said once and the step runs eagerly.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable

import torch
from torch import nn

CHOICES = ("auto", "on", "off")
AUTO_MIN_SECONDS = 60.0       # estimated eager training time below which ``auto`` does not compile


def _cxx() -> str | None:
    """The C++ compiler Inductor would use on CPU (``CXX``, else the usual names), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def decide(setting: str, device: torch.device, method: str, estimate_s: float) -> tuple[bool, str]:
    """Whether to compile the training step, and why (for the plan line).

    Args:
        setting: "auto", "on" or "off".
        device: the training device.
        method: lora, full or qlora.
        estimate_s: the plan's estimate of the eager training time.
    Returns:
        (compile?, a short reason).
    """
    if setting == "off":
        return False, "off (--compile off)"
    if device.type not in ("cpu", "cuda"):
        return False, f"off (not on {device.type})"
    if device.type == "cpu" and _cxx() is None:
        return False, "off (no C++ compiler found: install g++ for a faster training step)"
    if setting == "on":
        return True, "on (--compile on)"
    if method == "qlora":
        # the int8/int4 kernels are opaque to Inductor: every block would break its graph at each of them
        return False, "off (qlora's quantized layers; --compile on to try)"
    if estimate_s < AUTO_MIN_SECONDS:
        return False, f"off (a short run; the compile would take longer than it saves; --compile on to force)"
    return True, "on (the first step compiles, once; --compile off to skip)"


def chunk_loss(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the output layer ``head`` on hidden states ``h`` (N, C) against labels ``y`` (N,)."""
    return nn.functional.cross_entropy(head(h).float(), y, reduction="sum")


class Compiler:
    """The compiled training step of one model: blocks whose grad-enabled forward runs compiled, and a compiled
    ``loss`` (``chunk_loss``); ``disable()`` returns both to eager for the rest of the run."""

    def __init__(self, model: nn.Module, enabled: bool):
        self.enabled = enabled
        self.verified = not enabled           # a compiled step has completed (failures after that are real)
        self._loss: Callable = chunk_loss
        if not enabled:
            return
        # N (trained tokens per micro-batch) changes from step to step: a dynamic dimension, one graph
        self._loss = torch.compile(chunk_loss, dynamic=True)
        blocks = next(m for m in model.modules() if isinstance(m, nn.ModuleList))
        for block in blocks:
            eager = block.forward
            # every block has the same code and shapes: Dynamo traces one graph with the parameters as inputs
            compiled = torch.compile(eager, dynamic=False)

            def forward(*args, _eager=eager, _compiled=compiled, **kwargs):
                if self.enabled and torch.is_grad_enabled():
                    return _compiled(*args, **kwargs)
                return _eager(*args, **kwargs)
            block.forward = forward

    def loss(self, head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.enabled and torch.is_grad_enabled():
            return self._loss(head, h, y)
        return chunk_loss(head, h, y)

    def disable(self) -> None:
        self.enabled = False
