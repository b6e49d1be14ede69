"""Export tensors: the plan (checkpoint name -> GGUF name, shape, type, row permutation) and each tensor's bytes as
GGUF stores them (float32 / float16, or prosa's int8 / int4 group-32 blocks as Q8_0 / Q4_1)."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from ..errors import UnsupportedModelError
from ..quant import quantize_int4, quantize_int8

# the reader's name tables, read backwards
from .gguf_config import ARCHS

_GROUP = 32
_BYTES = {Q.F32: 4.0, Q.F16: 2.0, Q.Q8_0: 34 / 32, Q.Q4_1: 20 / 32}
# source GGUF types whose integers already are the target's blocks (what prosa.weights.assemble repacks exactly)
_EXACT = {Q.Q8_0: ("Q8_0",), Q.Q4_1: ("Q4_0", "Q4_1", "Q4_K")}


@dataclass
class _Item:
    hf: str                 # checkpoint name
    name: str               # GGUF name
    shape: tuple[int, ...]  # as stored: torch order, (out, in) for matrices
    qtype: Q
    exact: bool             # integers copied from the source's GGUF blocks
    transpose: bool         # HF Conv1D (in, out) -> (out, in)
    heads: int | None       # llama.cpp's Q/K row permutation over this many heads


def _plan(ck, arch: str, args, mode: str, shapes: dict[str, tuple[int, ...]]) -> tuple[list[_Item], set[str]]:
    """One ``_Item`` per tensor to write, in checkpoint order, and the checkpoint names not written."""
    spec = ARCHS[arch]
    top = {hf: gg for gg, hf in spec.top.items()}
    block = {hf: gg for gg, hf in spec.block.items()}
    layer = re.compile(rf"{re.escape(spec.layers)}\.(\d+)\.(.+)\.(weight|bias)")
    head = "lm_head.weight"
    tied = args.tie_word_embeddings or head not in shapes
    source_types = ck.gguf.tensor_types() if ck.gguf is not None else {}
    items, dropped = [], set()
    for hf, shape in shapes.items():
        name = hf
        if arch == "gpt2" and not hf.startswith(("transformer.", "lm_head.")):
            name = "transformer." + hf   # base-model checkpoints (openai-community/gpt2) lack the prefix
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")) or (tied and name == head):
            dropped.add(hf)   # attention masks, rotary caches, a tied output layer: nothing llama.cpp loads
            continue
        if m := layer.fullmatch(name):
            part, gg = block.get(m[2]), f"blk.{m[1]}.{block.get(m[2])}.{m[3]}"
        else:
            part = top.get(name.rsplit(".", 1)[0])
            gg = f"{part}.{name.rsplit('.', 1)[1]}"
        if part is None:
            raise UnsupportedModelError(f"{ck.path} holds tensor {hf!r}, which llama.cpp's {arch} has no place for")
        transpose = part in spec.transposed and len(shape) == 2
        shape = tuple(reversed(shape)) if transpose else tuple(shape)
        if len(shape) != 2 or name.endswith(".bias") or part == "position_embd":
            qtype = Q.F32
        elif mode == "f16" or shape[1] % _GROUP:   # rows of partial blocks: llama.cpp's converter keeps F16 too
            qtype = Q.F16
        else:
            qtype = Q.Q8_0 if mode == "q8_0" or part in ("token_embd", "output") else Q.Q4_1
        if qtype == Q.Q8_0 and mode == "q4_1" and source_types.get(hf) in _EXACT[Q.Q4_1]:
            qtype = Q.Q4_1   # an embedding already in 4 bits: Q8_0 would only add rounding, prosa reads both
        exact = source_types.get(hf) in _EXACT.get(qtype, ())
        heads = None
        if spec.permute_qk and part in ("attn_q", "attn_k"):
            heads = args.num_attention_heads if part == "attn_q" else args.num_key_value_heads
        items.append(_Item(hf, gg, shape, qtype, exact, transpose, heads))
    return items, dropped


def _halves(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1).contiguous().view(torch.uint8)   # one fp16 per block -> its 2 bytes


def _q8_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """int8 (N, K) and fp16 scales (N, K/32) -> Q8_0 bytes (N, K/32 * 34): per block fp16 d, 32 x int8."""
    return torch.cat((_halves(d), q.reshape(-1, 32).view(torch.uint8)), 1).reshape(q.shape[0], -1).numpy()


def _q4_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """uint8 0..15 (N, K), fp16 d and m (N, K/32) -> Q4_1 bytes (N, K/32 * 20): d, m, then 16 bytes whose low
    nibbles are elements 0..15 and high nibbles 16..31 (ggml's order)."""
    b = q.reshape(-1, 32)
    return torch.cat((_halves(d), _halves(m), b[:, :16] | (b[:, 16:] << 4)), 1).reshape(q.shape[0], -1).numpy()


def _encode(item: _Item, ck, take: Callable[[str], torch.Tensor]) -> np.ndarray:
    """One tensor's bytes as stored: rows in llama.cpp's order, each row encoded on its own."""
    if item.exact:   # the source's integers, in HF row order and (out, in) orientation
        _, q, d, m = ck.gguf.int_weight(item.hf)
        data = _q8_0(q, d) if item.qtype == Q.Q8_0 else _q4_1(q, d, m)
    else:
        w = take(item.hf).float()
        w = w.t() if item.transpose else w
        if item.qtype == Q.F32:
            data = w.contiguous().numpy()
        elif item.qtype == Q.F16:
            data = w.half().numpy()
            if not np.isfinite(data).all():
                raise UnsupportedModelError(f"{item.hf} holds values beyond float16's range; export as q8_0")
        elif item.qtype == Q.Q8_0:
            data = _q8_0(*quantize_int8(w, _GROUP))
        else:
            data = _q4_1(*quantize_int4(w, _GROUP))
    if item.heads:   # row i of the file is row order[i] of HF's (each row's blocks are independent)
        rows = item.shape[0]
        order = torch.arange(rows).reshape(item.heads, 2, rows // item.heads // 2).transpose(1, 2).reshape(-1)
        data = data.reshape(rows, -1)[order.numpy()].reshape(data.shape)
    return np.ascontiguousarray(data)
