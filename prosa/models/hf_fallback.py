"""The slow path: a model_type prosa does not implement runs through transformers (when it is installed),
behind the same call as native models: ``model(input_ids, cache, attention_mask) -> logits``.
Remote code is never trusted."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn


def available() -> bool:
    """True when transformers can be imported (and has not been blocked with ``sys.modules[...] = None``)."""
    if "transformers" in sys.modules:
        return sys.modules["transformers"] is not None
    return importlib.util.find_spec("transformers") is not None


class TransformersCache:
    """transformers' own cache object plus the attention mask of every slot so far, (B, S).

    Not a ``prosa.models.cache.Cache``: transformers attends inside its own layers, so there is no ``begin`` /
    ``attend`` to offer. The two refuse each other: ``TransformersModel`` takes only this cache, and prosa's models
    (``cache.checked``) refuse this one; the engine runs the fallback on ``SoloRunner``, never on the paged cache.
    """

    def __init__(self):
        self.past = None
        self.mask: torch.Tensor | None = None


class TransformersModel(nn.Module):
    """Adapter from a transformers causal LM to prosa's model call."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        cfg = hf_model.config
        self._context = (getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
                         or getattr(cfg, "seq_length", None) or 2048)

    @property
    def context_length(self) -> int:
        return self._context

    def make_cache(self, batch_size: int) -> TransformersCache:
        return TransformersCache()

    def forward(self, input_ids: torch.Tensor, cache: TransformersCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if cache is None:
            cache = TransformersCache()
        elif not isinstance(cache, TransformersCache):
            raise TypeError(f"the transformers fallback keeps transformers' own cache: give it the TransformersCache "
                            f"its make_cache() returns, or None (got {type(cache).__name__})")
        new = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
        full = new if cache.mask is None else torch.cat([cache.mask, new], dim=1)      # (B, S)
        positions = (full.cumsum(1) - 1).clamp_min(0)[:, -input_ids.shape[1]:]         # (B, T)
        out = self.hf(input_ids=input_ids, attention_mask=full, position_ids=positions,
                      past_key_values=cache.past, use_cache=True)
        cache.past, cache.mask = out.past_key_values, full
        return out.logits

    def sanitize(self, weights):  # weights are loaded by transformers itself
        return weights


def load(path: Path, dtype: torch.dtype, device: torch.device) -> TransformersModel:
    """Load ``path`` with transformers (never trusting remote code)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False)
    return TransformersModel(hf.to(device).eval())
