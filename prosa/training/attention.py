"""``PackedAttention``: the ``Cache`` a model is given while training on packed rows.

It stores nothing (the whole row is one forward) and gives each document of a row its own positions, starting at
0, and its own causal attention: a token sees the earlier tokens of its own document only, within the layer's
sliding window if it has one. So a packed row computes exactly what its documents would compute alone.

In a compiled training step (``--compile``, ``explicit=True``), attention over short rows is written out (scores, mask,
softmax, weighted sum) instead of calling SDPA: Inductor fuses the scale, mask and softmax around two batched
matmuls, where PyTorch's CPU flash kernel (bf16, 64-wide heads) runs at ~80 GFLOP/s. Measured on SmolLM2-135M
(4 x 256 tokens, 2 EPYC cores, bf16): forward + backward of one layer 21 -> 16 ms, the whole LoRA step 1.10x.
The written-out form keeps the (B, H, T, T) probabilities for backward, so it is used only while they stay small.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EXPLICIT_MAX_BYTES = 16 * 2**20   # written-out attention while one layer's float32 scores fit in this


class PackedAttention:
    """``prosa.models.cache.Cache`` for training rows.

    Args:
        segments: (B, T) long, the document of each token (-1 for padding, which sees only other padding).
        explicit: write attention out as plain operations (for Inductor to fuse) while it is small enough. Set by
            the caller rather than detected, so that a block recomputed by activation checkpointing takes the same
            path as its forward did.
    """

    def __init__(self, segments: torch.Tensor, explicit: bool = False):
        self.segments, self.explicit = segments, explicit
        b, t = segments.shape
        # a row holding one document and no padding needs no mask: SDPA's causal kernel is faster
        self.plain = bool((segments == segments[:, :1]).all()) and bool((segments >= 0).all())
        self._masks: dict[int | None, torch.Tensor] = {}
        # the explicit form's mask, made here (eagerly, before any compiled block): a compiled block then loads
        # one byte per score instead of comparing int64 document ids for each of them, twice
        self._blocked = ~self._allowed(None, segments.device) if explicit else None      # (B, 1, T, T)

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Positions (B, T): the index of each token within its document."""
        seg = self.segments.to(input_ids.device)
        idx = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
        first = torch.ones_like(seg, dtype=torch.bool)
        first[:, 1:] = seg[:, 1:] != seg[:, :-1]
        start = torch.where(first, idx, torch.zeros_like(idx)).cummax(dim=1).values
        return idx - start

    def mask(self, window: int | None, device: torch.device) -> torch.Tensor:
        """(B, 1, T, T) bool: same document, causal, within ``window`` when given; the diagonal always."""
        if window not in self._masks:
            self._masks[window] = self._allowed(window, device)
        return self._masks[window]

    def _allowed(self, window: int | None, device: torch.device) -> torch.Tensor:
        seg = self.segments.to(device)
        t = seg.shape[1]
        i = torch.arange(t, device=device)[:, None]
        j = torch.arange(t, device=device)[None, :]
        allowed = j <= i
        if window is not None:
            allowed = allowed & (i - j < window)
        same = seg[:, :, None] == seg[:, None, :]              # (B, T, T)
        return ((same & allowed) | (i == j))[:, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
               scale: float | None = None, upcast: bool = False) -> torch.Tensor:
        """Attention of q (B, H, T, D) over k, v (B, H_kv, T, D) of the same row; (B, H, T, D)."""
        dtype = q.dtype
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        b, h, t, _ = q.shape
        if self.explicit and b * h * t * t * 4 <= EXPLICIT_MAX_BYTES:
            return self._explicit(q, k, v, window, scale).to(dtype)
        gqa = q.shape[1] != k.shape[1]
        if self.plain and (window is None or window >= q.shape[2]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(window, q.device), scale=scale,
                                                 enable_gqa=gqa)
        return out.to(dtype)

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                  scale: float | None) -> torch.Tensor:
        """Masked softmax attention as plain operations, for Inductor; (B, H, T, D) in q's dtype."""
        b, h, t, d = q.shape
        hk = k.shape[1]
        g = h // hk
        # grouped-query heads: the g query heads of a key head share one (g*T, D) @ (D, T) matmul
        s = (q.reshape(b, hk, g * t, d) @ k.transpose(-1, -2)).view(b, hk, g, t, t)
        s = s.float() * (scale if scale is not None else d ** -0.5)
        # a window shorter than the row needs its own mask: made here, not cached (no side effect in a compiled
        # graph; Inductor fuses it into the masking loop)
        blocked = (self._blocked.to(q.device) if window is None or window >= t
                   else ~self._allowed(window, q.device))                     # (B, 1, T, T)
        s = s.masked_fill(blocked[:, :, None], float("-inf"))
        p = s.softmax(-1).to(q.dtype).view(b, hk, g * t, t)
        return (p @ v).view(b, h, t, d)
