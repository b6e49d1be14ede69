"""LoRA on prosa's own model classes: ``y = base(x) + (alpha / r) * B (A x)``, the base frozen.

Every linear layer inside the blocks gets an adapter (PEFT's "all-linear": the output layer does not), including
the fused ``qkv_proj`` / ``gate_up_proj`` of the Llama family. A fused layer has one A (r, in) and one B
(out_q + out_k + out_v, r); on export (``prosa.training.export``) B is split by rows and A copied to each part,
which gives exactly the same weight change as PEFT's separate adapters. The base may be an ``nn.Linear`` or a
``QuantizedLinear`` (qlora: gradients flow through the integer weights to the adapters before them).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import QuantizedLinear


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    Args:
        base: the ``nn.Linear`` or ``QuantizedLinear`` it wraps (frozen).
        rank: r, the inner dimension of the update.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapter's input (0 = none).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        device = next(iter(base.buffers() if isinstance(base, QuantizedLinear) else base.parameters())).device
        # A as nn.Linear's default init (kaiming uniform, a=sqrt(5)), B zero: the update starts at 0 (as PEFT)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, in) -> (…, out)"""
        y = self.base(x)                                                    # (…, out)
        # the scale goes on the rank-r product, and B's product is added by the matmul itself (addmm): two passes
        # over the (…, out) activations fewer than base + (B A x) * scale
        h = F.linear(self.dropout(x), self.lora_A) * self.scale              # (…, r)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, self.rank).to(y.dtype),
                          self.lora_B.t().to(y.dtype))
        return out.view(y.shape)

    def delta(self) -> torch.Tensor:
        """The weight change (out, in) in float32: ``scale * B @ A``."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale


def output_layer(model: nn.Module) -> str:
    """The output layer's name (``lm_head`` / ``embed_out``): every model registers it last among its linear
    layers, float, quantized or adapted."""
    names = [name for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, QuantizedLinear, LoRALinear))
             and not name.endswith(".base")]
    return names[-1]


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the linear layers that get adapters: every ``nn.Linear`` / ``QuantizedLinear`` but the output
    layer."""
    head = output_layer(model)
    return [name for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, QuantizedLinear)) and name != head]


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, seed: int = 0) -> list[str]:
    """Freeze ``model`` and wrap its target layers in ``LoRALinear`` (in place).

    Args:
        seed: seeds the initialisation of the A matrices (the same seed gives the same start).
    Returns:
        the wrapped layers' names.
    """
    model.requires_grad_(False)
    names = lora_targets(model)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name in names:
            parent, _, leaf = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            setattr(holder, leaf, LoRALinear(getattr(holder, leaf), rank, alpha, dropout))
    finally:
        torch.random.set_rng_state(gen_state)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> adapter, for every ``LoRALinear`` in ``model``."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, LoRALinear)}
