"""Preparing a loaded model for training: tied parameters made one, frozen weights stored in the autocast dtype,
blocks recomputed in backward, the optimizer, the thread count."""
from __future__ import annotations

import torch
from torch import nn


def frozen_in(model: nn.Module, dtype: torch.dtype, head_name: str) -> nn.Module:
    """Store the frozen base weights of the adapters in ``dtype`` (the autocast dtype), so that autocast does not
    cast every weight again at every step (it caches casts of trained leaves only): half the memory and traffic.
    The exported model is unaffected (it is the source's weights plus the adapters' changes).

    Returns:
        a frozen ``dtype`` copy of the output layer for the loss (the model keeps its own, tied to the embedding).
    """
    from .lora import LoRALinear

    for mod in model.modules():
        if isinstance(mod, LoRALinear) and isinstance(mod.base, nn.Linear):
            mod.base.to(dtype)
    head = model.get_submodule(head_name)
    copy = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    copy.weight = nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)
    if head.bias is not None:
        copy.bias = nn.Parameter(head.bias.detach().to(dtype), requires_grad=False)
    return copy


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over every parameter: 1.05x a full fine-tuning step) where torch has it."""
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):       # an older torch: no fused AdamW on this device
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def set_threads(threads: int | None) -> None:
    """CPU threads for this process: ``threads``, else the cores shared among the processes on this machine."""
    import os

    if threads:
        torch.set_num_threads(threads)
    elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(os.environ["LOCAL_WORLD_SIZE"])))


def tie_parameters(model: nn.Module) -> None:
    """Make a tied output layer use the embedding's Parameter itself (one parameter, trained once)."""
    by_ptr: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_ptr.setdefault(p.data_ptr(), []).append(name)
    for names in by_ptr.values():
        if len(names) > 1:
            first = model.get_parameter(names[0])
            for other in names[1:]:
                holder, _, leaf = other.rpartition(".")
                setattr(model.get_submodule(holder), leaf, first)


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (``--grad-checkpoint``)."""
    from torch.utils.checkpoint import checkpoint

    blocks = next(m for m in model.modules() if isinstance(m, nn.ModuleList))
    for block in blocks:
        forward = block.forward

        def wrapped(*args, _f=forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_f, *args, use_reentrant=False, **kwargs)
            return _f(*args, **kwargs)
        block.forward = wrapped
