"""``PackedAttention``: the ``Cache`` a model is given while training on packed rows.

It stores nothing (the whole row is one forward) and gives each document of a row its own positions, starting at
0, and its own causal attention: a token sees the earlier tokens of its own document only, within the layer's
sliding window if it has one. So a packed row computes exactly what its documents would compute alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class PackedAttention:
    """``prosa.models.cache.Cache`` for training rows.

    Args:
        segments: (B, T) long, the document of each token (-1 for padding, which sees only other padding).
    """

    def __init__(self, segments: torch.Tensor):
        self.segments = segments
        b, t = segments.shape
        # a row holding one document and no padding needs no mask: SDPA's causal kernel is faster
        self.plain = bool((segments == segments[:, :1]).all()) and bool((segments >= 0).all())
        self._masks: dict[int | None, torch.Tensor] = {}

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
            seg = self.segments.to(device)
            t = seg.shape[1]
            i = torch.arange(t, device=device)[:, None]
            j = torch.arange(t, device=device)[None, :]
            allowed = j <= i
            if window is not None:
                allowed = allowed & (i - j < window)
            same = seg[:, :, None] == seg[:, None, :]              # (B, T, T)
            self._masks[window] = ((same & allowed) | (i == j))[:, None]
        return self._masks[window]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
               scale: float | None = None, upcast: bool = False) -> torch.Tensor:
        """Attention of q (B, H, T, D) over k, v (B, H_kv, T, D) of the same row; (B, H, T, D)."""
        dtype = q.dtype
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        gqa = q.shape[1] != k.shape[1]
        if self.plain and (window is None or window >= q.shape[2]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(window, q.device), scale=scale,
                                                 enable_gqa=gqa)
        return out.to(dtype)
