"""The training loop of ``prosa finetune``: one ``Run`` per call, on one process or several (torchrun + DDP).

A step takes ``batch_size`` rows from a stream of seeded epoch permutations (step ``s`` always takes rows
``s*B .. s*B+B-1`` of the stream, so resuming needs only the step number), splits them into micro-batches over
processes and accumulation steps, and normalises the loss over every trained token of the step: the sum of
per-token losses divided by the step's trained-token count (counted over all processes before any backward).
So accumulation, more processes and packing change nothing but float rounding.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ProsaError
from .attention import PackedAttention
from .compiled import chunk_loss
from .data import IGNORE, Rows

LOSS_CHUNK = 256      # trained tokens whose logits are made at once: (256, 49152) bf16 is 25 MB, and the output
                      # layer's matmul runs 1.03x faster on the whole step than in one (1024, 49152) piece
KEEP_LOGITS = 2048    # above this many trained tokens, the chunks' logits are recomputed in backward instead of
                      # kept (the logits of 8 x 512 tokens of a 49k vocabulary would take 800 MB)


class TrainingInterrupted(ProsaError):
    """Ctrl-C or SIGTERM: the run saved a checkpoint and stopped; ``--resume`` continues it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Dist:
    """The process group (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK), or a single process."""

    def __init__(self, device: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        from ..loader import resolve_device

        dev = resolve_device(device)
        if dev.type == "cuda" and self.world > 1:
            dev = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(dev)
        self.device = dev
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Sum numbers over processes (float64, exact for counts)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


@contextlib.contextmanager
def hidden_states(model: nn.Module, name: str):
    """Within the block the model's output layer is an Identity (the loss applies it chunk by chunk)."""
    head = model.get_submodule(name)
    setattr(model, name, nn.Identity())
    try:
        yield head
    finally:
        setattr(model, name, head)


def loss_sum(forward: nn.Module, model: nn.Module, head_name: str, rows: Rows, autocast,
             head: nn.Module | None = None, chunk: Callable = chunk_loss,
             explicit_attention: bool = False) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the trained tokens of ``rows`` and their count.

    Args:
        forward: what runs the rows (the model, or its DDP wrapper); model: the model itself.
        autocast: a context factory (autocast or nullcontext).
        head: the output layer to apply (default: the model's own).
        chunk: the summed loss of one chunk, ``chunk(head, h, y)`` (``compiled.chunk_loss`` or its compiled form).
        explicit_attention: attention as plain operations (``PackedAttention``'s ``explicit``; for a compiled step).

    Only trained positions get logits: the hidden states (B, T, C) are gathered at labelled positions (N, C) and
    the output layer runs on those alone, in checkpointed chunks when there are many.
    """
    device = next(model.parameters()).device
    ids, labels, segs = rows.ids.to(device), rows.labels.to(device), rows.segments.to(device)
    with autocast(), hidden_states(model, head_name) as own:
        head = head if head is not None else own
        h = forward(ids, cache=PackedAttention(segs, explicit_attention))               # (B, T, C)
        keep = labels != IGNORE
        h, y = h[keep], labels[keep]                                # (N, C), (N,)
        n = y.numel()
        if n <= KEEP_LOGITS or not torch.is_grad_enabled():
            total = sum((chunk(head, h[i:i + LOSS_CHUNK], y[i:i + LOSS_CHUNK])
                         for i in range(0, n, LOSS_CHUNK)), torch.zeros((), device=device))
        else:
            from torch.utils.checkpoint import checkpoint

            total = sum((checkpoint(chunk, head, h[i:i + LOSS_CHUNK], y[i:i + LOSS_CHUNK], use_reentrant=False)
                         for i in range(0, n, LOSS_CHUNK)), torch.zeros((), device=device))
    return total, n


def lr_lambda(warmup: int, total: int):
    """Linear warmup over ``warmup`` steps, then cosine decay to 10% of the peak at step ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class Stream:
    """Rows of step ``s``: positions ``s*B .. s*B+B-1`` of seeded epoch permutations of the training rows."""

    def __init__(self, rows: Rows, batch: int, seed: int):
        self.rows, self.batch, self.seed = rows, batch, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.rows), generator=g)}
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        n = len(self.rows)
        return torch.stack([self._perm(g // n)[g % n] for g in range(step * self.batch, (step + 1) * self.batch)])

    def epoch(self, step: int) -> float:
        return step * self.batch / len(self.rows)


class Signals:
    """Ctrl-C / SIGTERM set a flag that the loop checks after each step (handlers only on the main thread)."""

    def __init__(self):
        self.caught: int | None = None
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.caught is not None and signum == signal.SIGINT:     # a second Ctrl-C: stop now, unsaved
            raise KeyboardInterrupt
        self.caught = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def native_bf16(device: torch.device) -> bool:
    from ..loader import _cpu_has_native_bf16

    return torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_has_native_bf16()


def sample(model: nn.Module, head_name: str, tokenizer, prompt: list[int], tokens: int, seed: int, autocast,
           head: nn.Module | None = None) -> str:
    """A short sampled continuation (temperature 0.8, top-k 40, seeded) of ``prompt`` for the progress output;
    the output layer runs on the last position only."""
    from ..models.cache import KVCache

    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    cache, out = KVCache(len(_blocks(model)), 1), []
    ids = torch.tensor([prompt], device=device)
    limit = getattr(model, "context_length", 1 << 30)
    with torch.no_grad(), autocast(), hidden_states(model, head_name) as own:
        for _ in range(min(tokens, limit - len(prompt))):
            h = model(ids, cache=cache)[:, -1]                                     # (1, C)
            logits = (head if head is not None else own)(h)[0].float() / 0.8       # (V,)
            top = logits.topk(min(40, logits.numel()))
            pick = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=g)]
            if int(pick) in tokenizer.eos_token_ids:
                break
            out.append(int(pick))
            ids = pick.view(1, 1)
    return tokenizer.decode(out, skip_special_tokens=True)


def _blocks(model: nn.Module) -> nn.ModuleList:
    return next(m for m in model.modules() if isinstance(m, nn.ModuleList))


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), tied ones once."""
    params = {id(p): p for p in model.parameters()}.values()
    from ..quant import QuantizedLinear

    frozen_q = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + frozen_q
