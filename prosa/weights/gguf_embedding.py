"""``QuantizedEmbedding``: a token embedding that stays in a GGUF file's blocks; a lookup dequantizes the rows it
reads and nothing else.

A GGUF model's embedding is usually quantized like its linears (the bundled SmolLM2: Q4_1, 49152 x 576). Made
float32 at load it took 113 MB and 0.05 s of the cold start, for a table of which each step reads one row per
sequence. Kept as the file's blocks (Q8_0) it is 30 MB. A lookup is one call of the C++ kernels (``gguf_rows``,
a few microseconds: torch's ops on one row took ~0.15 ms, 3% of a GPT-2-sized decode step), else torch's ops.
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant import extension
from .ggml_types import GGMLType as Q
from .gguf_dequant import _TORCH_QUANTS, dequantize

TYPES = frozenset(t.name for t in _TORCH_QUANTS)     # Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: dequantized in torch


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding``'s forward over GGUF blocks (frozen).

    Args:
        blocks: uint8 (num_embeddings, row bytes), the file's rows (row i is token i's vector), owned by the layer.
        ggml_type: the blocks' type name ("Q4_1", ...; one of ``TYPES``).
        embedding_dim: values per row.
        dtype: the float dtype lookups return (the model's).
    """

    def __init__(self, blocks: torch.Tensor, ggml_type: str, embedding_dim: int, dtype: torch.dtype):
        super().__init__()
        if ggml_type not in TYPES:
            raise ValueError(f"{ggml_type} rows are not dequantized here; one of {sorted(TYPES)}")
        self.num_embeddings, self.embedding_dim = blocks.shape[0], embedding_dim
        self.ggml_type, self.dtype = ggml_type, dtype
        self.register_buffer("blocks", blocks)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (any shape) -> (*ids.shape, embedding_dim) in ``dtype``; exactly the dequantized table's rows."""
        flat = ids.reshape(-1)
        ext = extension._ext if extension._ext is not None else extension.kernels()
        if ext is not None and hasattr(ext, "gguf_rows") and self.blocks.device.type == "cpu":
            w = ext.gguf_rows(self.blocks, flat.long(), int(Q[self.ggml_type]), self.embedding_dim)   # (n, C)
        else:
            rows = self.blocks.index_select(0, flat)                              # (n, row bytes)
            w = dequantize(rows.reshape(-1), Q[self.ggml_type], (rows.shape[0], self.embedding_dim))
        return w.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table dequantized (num_embeddings, embedding_dim): made at each access, for exports."""
        return dequantize(self.blocks.reshape(-1), Q[self.ggml_type],
                          (self.num_embeddings, self.embedding_dim)).to(self.dtype)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() / .bfloat16() convert floating tensors: the lookups follow, as nn.Embedding's
        # table would (the probe tells what fn does to a float tensor of the current dtype)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the state of an nn.Embedding (what exports and the checkpoint names expect), not the blocks
        destination[prefix + "weight"] = self.weight

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.ggml_type} blocks"
