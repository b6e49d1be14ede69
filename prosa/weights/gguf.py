"""GGUF checkpoints (llama.cpp's format) -> the config, tensors and tokenizer a Hugging Face folder would hold.

A GGUF file carries config and tokenizer as metadata and its weights under llama.cpp's names, often quantized.
``load_gguf`` returns a HF ``config.json``-style dict, a ``prosa.tokenizer.Tokenizer`` and a generator of tensors
under HF names and layouts, dequantized one at a time so peak memory stays near one tensor.

The header is parsed with ``struct`` over an ``mmap`` rather than ``gguf.GGUFReader``, which builds one numpy view
per metadata element and needs ~4 s for a 49k-token vocabulary (longer than loading the model). The ``gguf``
package still supplies the type tables and the reference dequantizers for the K-quants.
"""
from __future__ import annotations

import math
import mmap
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import quants as _gguf_quants

from prosa.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError

if TYPE_CHECKING:
    from prosa.tokenizer import Tokenizer

MAGIC = b"GGUF"
# Metadata value types (GGUF spec): fixed-size ones by struct format; 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# Tensor types: the hot ones are dequantized in torch below, the K-quants by gguf-py's numpy reference.
_FLOAT = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
_TORCH_QUANTS = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}
_NUMPY_QUANTS = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}

# GGUF tensor name -> HF name, per architecture: "blk.N.<part>" -> f"{layers}.N.{block[part]}", else top[name].
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
             "output_norm": "transformer.ln_f", "output": "lm_head"}
_GPT2_BLOCK = {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc",
               "ffn_down": "mlp.c_proj", "attn_norm": "ln_1", "ffn_norm": "ln_2"}


class _Arch(NamedTuple):
    model_type: str
    hf_class: str
    top: dict[str, str]
    block: dict[str, str]
    layers: str
    permute_qk: bool = False  # llama.cpp's llama converter reorders Q/K rows for its rope kernel
    transposed: frozenset[str] = frozenset()  # HF GPT-2 uses Conv1D: (in, out) weights


ARCHS = {
    "llama": _Arch("llama", "LlamaForCausalLM", _LLAMA_TOP, _LLAMA_BLOCK, "model.layers", permute_qk=True),
    # qwen2 files keep HF's row order (its converter does not permute) and have q/k/v biases
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", _LLAMA_TOP, _LLAMA_BLOCK, "model.layers"),
    "gpt2": _Arch("gpt2", "GPT2LMHeadModel", _GPT2_TOP, _GPT2_BLOCK, "transformer.h",
                  transposed=frozenset({"attn_qkv", "attn_output", "ffn_up", "ffn_down"})),
}


class _TensorInfo(NamedTuple):
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order (GGUF lists dims fastest-moving first)
    ggml_type: int
    start: int  # absolute byte offset in the file
    nbytes: int


# ---------------------------------------------------------------------------------------------------------- reading
def _corrupt(path: Path, why: str) -> CorruptModelError:
    return CorruptModelError(f"{path} is truncated or corrupt: {why}. Re-download it.")


def _parse(path: Path, mm: mmap.mmap) -> tuple[dict[str, Any], list[_TensorInfo]]:
    """Metadata and tensor table of a little-endian GGUF v2/v3 file, bounds-checked against the file size."""
    size = len(mm)

    def unpack(fmt: str, pos: int) -> tuple[Any, int]:
        return struct.unpack_from(fmt, mm, pos)[0], pos + struct.calcsize(fmt)

    def string(pos: int) -> tuple[str, int]:
        n, pos = unpack("<Q", pos)
        if pos + n > size:
            raise _corrupt(path, f"a string of {n} bytes at offset {pos} runs past the end of the file")
        return mm[pos:pos + n].decode("utf-8"), pos + n

    def value(kind: int, pos: int) -> tuple[Any, int]:
        if kind in _SCALAR:
            return unpack(_SCALAR[kind], pos)
        if kind == 8:
            return string(pos)
        if kind != 9:
            raise _corrupt(path, f"unknown metadata value type {kind}")
        (item, count), pos = struct.unpack_from("<IQ", mm, pos), pos + 12
        if item in _SCALAR:  # numeric arrays (scores, token types) in one read
            dtype = np.dtype(_SCALAR[item].replace("?", "b1"))
            if pos + count * dtype.itemsize > size:
                raise _corrupt(path, "a metadata array runs past the end of the file")
            return np.frombuffer(mm, dtype, count, pos).tolist(), pos + count * dtype.itemsize
        items = []
        for _ in range(count):  # strings (vocabulary, merges) or nested arrays
            v, pos = value(item, pos)
            items.append(v)
        return items, pos

    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
    if version not in (2, 3):
        if version == 1 or struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
            kind = "GGUF v1" if version == 1 else "a big-endian GGUF"
            raise UnsupportedModelError(f"{path} is {kind}; prosa reads little-endian GGUF v2/v3. "
                                        "Convert it again with a current llama.cpp.")
        raise _corrupt(path, f"unknown GGUF version {version}")
    pos, metadata = 24, {}
    for _ in range(n_kv):
        key, pos = string(pos)
        kind, pos = unpack("<I", pos)
        metadata[key], pos = value(kind, pos)

    table = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        ndim, pos = unpack("<I", pos)
        if ndim > 4:
            raise _corrupt(path, f"tensor {name!r} claims {ndim} dimensions")
        dims = struct.unpack_from(f"<{ndim}Q", mm, pos)
        ggml_type, offset = struct.unpack_from("<IQ", mm, pos + 8 * ndim)
        pos += 8 * ndim + 12
        table.append((name, tuple(reversed(dims)), ggml_type, offset))
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _corrupt(path, f"general.alignment={align!r} is not a power of two")
    data_start = -(-pos // align) * align

    tensors = []
    for name, shape, ggml_type, offset in table:
        if ggml_type not in GGML_QUANT_SIZES:
            raise _corrupt(path, f"tensor {name!r} has unknown type id {ggml_type}")
        block, block_bytes = GGML_QUANT_SIZES[Q(ggml_type)]
        if shape and shape[-1] % block:
            raise _corrupt(path, f"tensor {name!r} rows of {shape[-1]} are not whole {Q(ggml_type).name} blocks")
        nbytes = math.prod(shape) // block * block_bytes
        if data_start + offset + nbytes > size:
            raise _corrupt(path, f"tensor {name!r} ends at byte {data_start + offset + nbytes:,} but the file "
                                 f"has {size:,} bytes")
        tensors.append(_TensorInfo(name, shape, ggml_type, data_start + offset, nbytes))
    return metadata, tensors


# ---------------------------------------------------------------------------------------------- dequantization
def _halves(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The ggml_half (fp16) at byte ``start`` of every block, as a float32 column."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 packed bytes -> 32 4-bit values; ggml puts low nibbles at elements 0..15 and high ones at 16..31."""
    q = torch.empty((qs.shape[0], 32), dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=q[:, :16])
    torch.bitwise_right_shift(qs, 4, out=q[:, 16:])
    return q


def _nibbles5(qs: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """Q5 values: 4 low bits from ``qs``, the 5th from bit j of the little-endian uint32 ``qh`` (element j)."""
    bits = (qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return _nibbles(qs).bitwise_or_((bits << 4).reshape(qh.shape[0], 32))


def _unsupported_type(ggml_type: int) -> UnsupportedModelError:
    name = Q(ggml_type).name
    return UnsupportedModelError(f"GGUF tensor type {name} is not supported; use a file quantized as F16, BF16, "
                                 "Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q5_0/1 or Q4_0/1.")


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes (uint8) of one tensor -> a tensor of ``shape``: float32 for quantized types, else its own dtype.

    Bit-for-bit ``gguf.quants.dequantize``: each scale * quant product is exact in float32 (11 + 8 bits at most),
    so ``m + d*q`` rounds once however it is computed. The block types small models ship with are vectorised in
    torch (about twice as fast as gguf-py's numpy); the K-quants use gguf-py's code.
    """
    if ggml_type in _FLOAT:
        return raw.view(_FLOAT[Q(ggml_type)]).reshape(shape)
    if ggml_type not in _TORCH_QUANTS | _NUMPY_QUANTS:
        raise _unsupported_type(ggml_type)
    ggml_type = Q(ggml_type)
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    if ggml_type in _NUMPY_QUANTS:
        rows = raw.numpy().reshape(-1, shape[-1] // block * block_bytes)
        return torch.from_numpy(_gguf_quants.dequantize(rows, ggml_type)).reshape(shape)
    b = raw.reshape(-1, block_bytes)
    d = _halves(b, 0)
    if ggml_type == Q.Q8_0:  # d, 32 x int8
        w = d * b[:, 2:].view(torch.int8)
    elif ggml_type == Q.Q4_0:  # d, 32 x (4 bits - 8)
        w = torch.addcmul(d * -8, d, _nibbles(b[:, 2:]))
    elif ggml_type == Q.Q4_1:  # d, m, 32 x 4 bits
        w = torch.addcmul(_halves(b, 2), d, _nibbles(b[:, 4:]))
    elif ggml_type == Q.Q5_0:  # d, qh, 32 x (5 bits - 16)
        w = torch.addcmul(d * -16, d, _nibbles5(b[:, 6:], b[:, 2:6]))
    else:  # Q5_1: d, m, qh, 32 x 5 bits
        w = torch.addcmul(_halves(b, 2), d, _nibbles5(b[:, 8:], b[:, 4:8]))
    return w.reshape(shape)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run a tensor's dequantization on one thread. It is a few cheap elementwise passes, and with intra-op threads
    each pass is a parallel region whose barrier waits for every core: on a busy 2-core machine the 135M model took
    10 s (and 6x the CPU time) instead of 1.5 s. Restored before the tensor is handed over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _release(mm: mmap.mmap, info: _TensorInfo) -> None:
    """Unmap the file pages of a tensor just copied out (they stay in the page cache; RSS drops by their size)."""
    lo = info.start // mmap.PAGESIZE * mmap.PAGESIZE
    hi = min(-(-(info.start + info.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE, len(mm))
    if hasattr(mm, "madvise") and hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _read(mm: mmap.mmap, info: _TensorInfo) -> torch.Tensor:
    """One tensor, dequantized. A single copy out of the page cache, so the result owns its memory."""
    raw = torch.from_numpy(np.frombuffer(mm, np.uint8, info.nbytes, info.start).copy())
    _release(mm, info)
    return dequantize(raw, info.ggml_type, info.shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order.

    The converter does ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)``, interleaving the two
    rotary halves of each head (ggml's rope rotates adjacent pairs, HF's rotates halves).
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------------------- config
def _hf_name(arch: _Arch, name: str) -> tuple[str, str] | None:
    """GGUF tensor name -> (HF name, GGUF part such as "attn_q"), or None for a name this arch does not have."""
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
        return (f"{arch.layers}.{m[1]}.{arch.block[m[2]]}.{m[3]}", m[2]) if m[2] in arch.block else None
    if m := re.fullmatch(r"(\w+)\.(weight|bias)", name):
        return (f"{arch.top[m[1]]}.{m[2]}", m[1]) if m[1] in arch.top else None
    return None


def _llama3_rope(factors: torch.Tensor, theta: float, head_dim: int) -> dict[str, Any]:
    """Llama 3.1+ files store rope scaling as a ``rope_freqs`` tensor (one divisor per frequency), not as HF's
    ``rope_scaling``. The factor is the largest divisor; the other parameters have been the same in every Llama 3.x
    release, and must reproduce the tensor."""
    factor, low, high, original = float(factors.max()), 1.0, 4.0, 8192
    wavelen = 2 * math.pi * theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    smooth = (original / wavelen - low) / (high - low)
    expected = torch.where(wavelen < original / high, 1.0,
                           torch.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if factors.shape != expected.shape or not torch.allclose(factors.double(), expected, rtol=1e-4):
        raise UnsupportedModelError("this GGUF's rope_freqs tensor is not Llama 3 rope scaling with the usual "
                                    "parameters; prosa cannot map it to a rope_scaling config.")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": original}


def _config(path: Path, md: dict[str, Any], arch_name: str, tensors: dict[str, _TensorInfo],
            rope_freqs: torch.Tensor | None) -> dict[str, Any]:
    """The HF ``config.json`` for this file, from llama.cpp's ``{arch}.*`` metadata keys."""
    def key(name: str, default: Any = KeyError) -> Any:
        value = md.get(f"{arch_name}.{name}", default)
        if value is KeyError:
            raise _corrupt(path, f"metadata key {arch_name}.{name} is missing")
        return value

    # the embedding matrix is what the model is built around; the vocab_size key is optional in GGUF
    vocab = tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors else key("vocab_size")
    # like transformers: a half-precision file runs in its half type, a quantized one in float32
    types = {t.ggml_type for t in tensors.values()}
    half = types - {Q.F32} if types <= set(_FLOAT) else set()
    config = {"architectures": [ARCHS[arch_name].hf_class], "model_type": arch_name, "vocab_size": vocab,
              "tie_word_embeddings": "output.weight" not in tensors,
              "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
              "torch_dtype": "bfloat16" if Q.BF16 in half else "float16" if half else "float32"}
    if "tokenizer.ggml.padding_token_id" in md:
        config["pad_token_id"] = md["tokenizer.ggml.padding_token_id"]
    hidden, heads, context = key("embedding_length"), key("attention.head_count"), key("context_length")
    if arch_name == "gpt2":
        return {**config, "n_embd": hidden, "n_layer": key("block_count"), "n_head": heads, "n_positions": context,
                "n_ctx": context, "n_inner": key("feed_forward_length", 4 * hidden),
                "layer_norm_epsilon": key("attention.layer_norm_epsilon"), "activation_function": "gelu_new"}

    head_dim, theta = key("attention.key_length", hidden // heads), float(key("rope.freq_base", 10000.0))
    kind, rope_scaling = key("rope.scaling.type", None), None
    if kind in ("linear", "yarn"):
        rope_scaling = {"rope_type": kind, "factor": float(key("rope.scaling.factor"))}
        if kind == "yarn":
            rope_scaling["original_max_position_embeddings"] = key("rope.scaling.original_context_length")
    elif kind not in (None, "none"):
        raise UnsupportedModelError(f"{path} uses rope scaling {kind!r}; prosa supports linear, yarn and llama3.")
    if rope_freqs is not None and not bool((rope_freqs == 1).all()):
        rope_scaling = _llama3_rope(rope_freqs, theta, head_dim)
    config.update(
        hidden_size=hidden, intermediate_size=key("feed_forward_length"), num_hidden_layers=key("block_count"),
        num_attention_heads=heads, num_key_value_heads=key("attention.head_count_kv", heads), head_dim=head_dim,
        hidden_act="silu", max_position_embeddings=context, rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
        rope_theta=theta, rope_scaling=rope_scaling, mlp_bias=False,
        attention_bias="blk.0.attn_q.bias" in tensors)
    if arch_name == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None)
    return config


# ---------------------------------------------------------------------------------------------------- tokenizer
# `tokenizer.ggml.pre` names the pre-tokenizer regex llama.cpp uses; names not listed split like GPT-2 (as in
# transformers). The digit family splits digits one by one, as llama.cpp and these models' tokenizer.json do.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLITS = {**dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"),
                           _LLAMA3_SPLIT),
           **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT)}
_DIGIT_SPLIT = {"smollm", "starcoder", "refact"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece files have scores, no merges: each split of a token into two vocabulary tokens is a merge,
    ranked by the merged token's score (as transformers' ``generate_merges``, ties included)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        pairs = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges += sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))
    merges.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _backend(path: Path, md: dict[str, Any]):
    """The ``tokenizers.Tokenizer`` transformers builds from this file's metadata (digit family aside)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers as pre
    from tokenizers.models import BPE

    kind, tokens = md.get("tokenizer.ggml.model"), md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise _corrupt(path, "it has no tokenizer.ggml.tokens vocabulary")
    types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    if kind == "gpt2":  # byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM ...)
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        # tokens outside the byte alphabet are respelled in it, so the BPE model can reach them
        spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens]
        tok = Tokenizer(BPE({t: i for i, t in enumerate(spelled)}, merges, dropout=None,
                            continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        split = md.get("tokenizer.ggml.pre", "default")
        if split in _SPLITS:
            tok.pre_tokenizer = pre.Sequence([pre.Split(Regex(_SPLITS[split]), behavior="isolated"),
                                              pre.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif split in _DIGIT_SPLIT:
            tok.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True),
                                              pre.ByteLevel(add_prefix_space=False)])
        else:
            tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # llama.cpp sometimes marks tokens outside the byte alphabet as control: not real specials
        can_be_special = [set(t) <= alphabet for t in tokens]
    elif kind == "llama":  # SentencePiece-style BPE with byte fallback (Llama 2, TinyLlama, Mistral ...)
        merges = merges or _merges_from_scores(tokens, md["tokenizer.ggml.scores"])
        tok = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=True, byte_fallback=True,
                            dropout=None))
        prefix = md.get("tokenizer.ggml.add_space_prefix", True)
        tok.pre_tokenizer = pre.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
        spelled, can_be_special = tokens, [True] * len(tokens)
    else:
        raise UnsupportedModelError(f"{path} uses tokenizer model {kind!r}; prosa supports 'gpt2' (byte-level BPE) "
                                    "and 'llama' (SentencePiece BPE).")
    # control tokens and the named bos/eos/unk/pad are special (matched whole, skippable when decoding);
    # user-defined ones (e.g. <think>) are matched whole too but decode as ordinary text
    named = {md.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    tok.add_special_tokens([AddedToken(spelled[i], special=True, normalized=False) for i in range(len(tokens))
                            if can_be_special[i] and (types[i] == 3 or i in named)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == 4])
    return tok


def _tokenizer(path: Path, md: dict[str, Any], eos_ids: list[int]) -> Tokenizer:
    from prosa.tokenizer import Tokenizer

    tokens = md["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = md.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    return Tokenizer(_backend(path, md), bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"),
                     pad_token=token("padding"),
                     # llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise
                     add_bos_token=md.get("tokenizer.ggml.add_bos_token", md.get("tokenizer.ggml.model") == "llama"),
                     add_eos_token=md.get("tokenizer.ggml.add_eos_token", False), eos_token_ids=eos_ids,
                     chat_template=md.get("tokenizer.chat_template"))


# ------------------------------------------------------------------------------------------------------- public
@dataclass
class GGUFCheckpoint:
    """A parsed GGUF file: HF-style config, generation config and tokenizer; tensors are read on demand."""

    path: Path
    config: dict
    generation_config: dict
    tokenizer: Tokenizer
    metadata: dict = field(repr=False)  # raw GGUF key/values (general.name, general.file_type, ...)
    _mm: mmap.mmap = field(repr=False)
    _arch: _Arch = field(repr=False)
    _entries: list[tuple[_TensorInfo, str, str]] = field(repr=False)  # (tensor, HF name, GGUF part)

    def tensors(self, dtype: torch.dtype = torch.float32,
                skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(HF name, tensor)`` in HF layout, one at a time, as ``dtype``; names in ``skip`` are not read.

        Quantized tensors are dequantized in float32 and then cast (as transformers does); float ones are cast
        from their stored type. GPT-2's Conv1D weights come as transposed views.
        """
        for info, hf_name, part in self._entries:
            if hf_name in skip:
                continue
            with one_thread():
                w = _read(self._mm, info)
                if self._arch.permute_qk and part in ("attn_q", "attn_k"):
                    w = _unpermute(w, self._heads(part))
                w = w.to(dtype)
            yield hf_name, w.t() if part in self._arch.transposed and w.dim() == 2 else w

    def _heads(self, part: str) -> int:
        return self.config["num_attention_heads" if part == "attn_q" else "num_key_value_heads"]

    def tensor_types(self) -> dict[str, str]:
        """HF name -> GGUF storage type name ("Q4_1", "F32", ...)."""
        return {hf_name: Q(info.ggml_type).name for info, hf_name, _ in self._entries}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape as ``tensors()`` yields it."""
        return {hf_name: info.shape[::-1] if part in self._arch.transposed and len(info.shape) == 2 else info.shape
                for info, hf_name, part in self._entries}

    def int_weight(self, hf_name: str):
        """A Q8_0 / Q4_0 / Q4_1 weight as integers, exactly, or a Q4_K one with float16 scales:
        ``(bits, q, d, m)`` (see ``prosa.quant.gguf_to_int``), in ``nn.Linear`` orientation (out, in) with
        llama.cpp's Q/K row order undone; None for other types."""
        from ..quant import gguf_to_int

        for info, name, part in self._entries:
            if name != hf_name:
                continue
            if Q(info.ggml_type).name not in ("Q8_0", "Q4_0", "Q4_1", "Q4_K") or len(info.shape) != 2:
                return None
            raw = np.frombuffer(self._mm, np.uint8, info.nbytes, info.start).copy()
            _release(self._mm, info)
            bits, q, d, m = gguf_to_int(raw, info.ggml_type, info.shape)
            if self._arch.permute_qk and part in ("attn_q", "attn_k"):
                order = _unpermute(torch.arange(info.shape[0])[:, None], self._heads(part))[:, 0]
                q, d, m = q[order], d[order], None if m is None else m[order]
            return bits, q, d, m
        raise KeyError(hf_name)


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:  # missing, a folder, unreadable
        return False


def find_gguf(folder: str | Path) -> Path | None:
    """The one ``.gguf`` file in ``folder``, or None. Several (e.g. two quantizations) raise ModelNotFoundError."""
    found = sorted(p for p in Path(folder).glob("*.gguf") if p.is_file()) if Path(folder).is_dir() else []
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelNotFoundError(f"{folder} holds several GGUF files ({names}); pass the path of the one to use.")
    return found[0] if found else None


def load_gguf(path: str | Path) -> GGUFCheckpoint:
    """Parse a GGUF file (or the one in a folder): config, tokenizer and tensor table. No tensor data is read.

    Raises:
        ModelNotFoundError: ``path`` does not exist.
        CorruptModelError: not a GGUF file, or truncated / malformed.
        UnsupportedModelError: an architecture, tensor type, rope scaling or tokenizer prosa cannot run.
    """
    path = Path(path)
    if path.is_dir() and (found := find_gguf(path)) is not None:
        path = found
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist or is not a GGUF file.")
    with open(path, "rb") as f:
        head = f.read(24)
        if head[:4] != MAGIC:
            raise CorruptModelError(f"{path} is not a GGUF file (it does not start with b'GGUF'). Re-download it.")
        if len(head) < 24:
            raise _corrupt(path, f"it is only {len(head)} bytes long")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after the file is closed
    try:
        metadata, infos = _parse(path, mm)
    except struct.error as err:
        raise _corrupt(path, "its header ends before its last field") from err
    except (UnicodeDecodeError, ValueError, OverflowError, MemoryError) as err:
        raise _corrupt(path, f"its header cannot be parsed ({type(err).__name__}: {err})") from err

    arch_name = metadata.get("general.architecture")
    if arch_name not in ARCHS:
        raise UnsupportedModelError(f"{path} is a GGUF of architecture {arch_name!r}; prosa runs GGUF files of "
                                    f"architecture {', '.join(sorted(ARCHS))}.")
    if metadata.get("split.count", 1) > 1:
        raise UnsupportedModelError(f"{path} is one part of a split GGUF; merge the parts first "
                                    "(llama-gguf-split --merge) and load the merged file.")
    arch, entries, rope_freqs = ARCHS[arch_name], [], None
    for info in infos:
        if info.ggml_type not in set(_FLOAT) | _TORCH_QUANTS | _NUMPY_QUANTS:
            raise _unsupported_type(info.ggml_type)
        if info.name == "rope_freqs.weight" and arch.permute_qk:  # Llama 3 rope scaling: config, not a weight
            rope_freqs = _read(mm, info).float()
            continue
        if (mapped := _hf_name(arch, info.name)) is None:
            raise UnsupportedModelError(f"{path} holds tensor {info.name!r}, which prosa's {arch_name} model has "
                                        "no place for (a variant of the architecture prosa does not run).")
        entries.append((info, *mapped))
    config = _config(path, metadata, arch_name, {t.name: t for t in infos}, rope_freqs)
    # end-of-turn / end-of-message ids (Llama 3 chat) stop generation as eos does
    eos_ids = list(dict.fromkeys(i for k in ("eos", "eot", "eom")
                                 if (i := metadata.get(f"tokenizer.ggml.{k}_token_id")) is not None))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos_ids,
                  "pad_token_id": config.get("pad_token_id")}
    generation = {k: v for k, v in generation.items() if v not in (None, [])}
    tokenizer = _tokenizer(path, metadata, eos_ids)
    return GGUFCheckpoint(path, config, generation, tokenizer, metadata, mm, arch, entries)
