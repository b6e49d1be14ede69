"""``export_gguf``: a checkpoint prosa reads -> a GGUF file that llama.cpp (and so Ollama) runs.

The exact inverse of the reader, ``prosa.weights.gguf``: its name tables read backwards, llama's Q/K rows permuted
for ggml's rope, GPT-2's Conv1D weights transposed to (out, in), the config as ``{arch}.*`` keys, a byte-level BPE
as ``tokenizer.ggml.*`` (a GGUF source's tokenizer and ``general.*`` keys are copied). Types:

- ``f16``: 2-D weights float16; norms, biases and GPT-2's position embeddings float32, as llama.cpp's converter.
- ``q8_0`` / ``q4_1``: linear layers as prosa's own group-32 blocks (``prosa.quant.quantize_int8`` / ``quantize_int4``),
  Q8_0 / Q4_1 bit for bit, so ``prosa.load(OUT)`` runs exactly the integers llama.cpp runs. The embedding (a tied
  output layer) and the output layer are Q8_0 (prosa's int4 keeps the output layer at 8 bits). A GGUF source's
  blocks that already are the target format are copied as integers (Q4_0 / Q4_K become Q4_1 exactly, Q4_K's scales
  rounded to fp16 as prosa's int4 does). GGUF has no asymmetric 8-bit type: where prosa's int8 (``quantize_uint8``,
  scale and min) would quantize a float weight, the file holds symmetric Q8_0. Partial 32-blocks stay float16.

Written under a temporary name next to OUT, read back with prosa's reader (the model settings and the tokenizer must
come back unchanged), then renamed over OUT.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, LlamaFileType, RopeScalingType

from ..errors import CorruptModelError, UnsupportedModelError
from ..quant import quantize_int4, quantize_int8

# the reader's own rebuilds (tokenizer, llama3 rope): what they accept is exactly what prosa reads back
from .gguf import ARCHS, _llama3_rope, _tokenizer, load_gguf

TYPES = {"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_1": LlamaFileType.MOSTLY_Q4_1}
EXPORTABLE = ("gpt2", "llama", "mistral", "qwen2")
_GROUP = 32
_BYTES = {Q.F32: 4.0, Q.F16: 2.0, Q.Q8_0: 34 / 32, Q.Q4_1: 20 / 32}
# source GGUF types whose integers already are the target's blocks (what prosa.weights.assemble repacks exactly)
_EXACT = {Q.Q8_0: ("Q8_0",), Q.Q4_1: ("Q4_0", "Q4_1", "Q4_K")}
# the tokenizer's pre-tokenizer, as llama.cpp names it: tried in turn until prosa's reader encodes like the source
_PRES = ("gpt-2", "smollm", "llama-bpe", "qwen2")
_PROBES = ["Hello world! It's a test, isn't it? I'LL SEE.", "Ação, coração, pão. Olá, você está?",
           "日本語のテキストと中文的文本。한국어 🙂 👍🏽 👨‍👩‍👧", "def f(x):\n\treturn x**2  # 42\r\n",
           "  spaces   and\n\n\nnewlines 12345 6,789.01 2024", "x  \n y\t\tz "]


@dataclass
class ExportResult:
    """What ``export_gguf`` wrote: the file, its type, tensors per GGUF type, integer blocks copied from the source."""

    path: Path
    type: str
    tensors: Counter
    copied: int
    nbytes: int
    seconds: float

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {t}" for t, n in self.tensors.most_common())
        copied = f"; {self.copied} copied as integers from the source" if self.copied else ""
        return f"wrote {self.path} ({self.type}, {self.nbytes / 1e6:.1f} MB, {kinds}{copied}) in {self.seconds:.1f} s"


def check_output(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate the output path before anything is loaded.

    Args:
        out: the ``.gguf`` file to write; overwrite: replace an existing one.
    Returns:
        the path.
    Raises:
        ValueError: not a .gguf name, a folder, an existing file without ``overwrite``, a missing or read-only folder.
    """
    path, folder = Path(out), Path(out).parent
    for bad, why in ((path.suffix.lower() != ".gguf", f"the output file must end in .gguf, got {str(out)!r}"),
                     (path.is_dir(), f"{path} is a folder; name the .gguf file to write"),
                     (path.exists() and not overwrite, f"{path} already exists; pass --overwrite to replace it"),
                     (not folder.is_dir(), f"folder {folder} does not exist"),
                     (not os.access(folder, os.W_OK | os.X_OK), f"folder {folder} is not writable")):
        if bad:
            raise ValueError(why)
    return path


def export_gguf(source: str | os.PathLike | None, out: str | os.PathLike, qtype: str = "f16", *,
                revision: str | None = None, overwrite: bool = False) -> ExportResult:
    """Write ``source`` (a model folder, Hub id or GGUF file; None: the default model) as a GGUF file.

    Args:
        source: what ``prosa.loader.open_checkpoint`` accepts; revision: its Hub branch, tag or commit.
        out: the ``.gguf`` file (written atomically); overwrite: replace an existing one.
        qtype: "f16", "q8_0" or "q4_1" (see the module docstring).
    Returns:
        an ``ExportResult``.
    Raises:
        ValueError: a bad ``qtype`` or ``out``.
        UnsupportedModelError: an architecture, setting or tokenizer that GGUF, as llama.cpp and prosa read it,
            cannot carry.
    """
    from ..loader import open_checkpoint

    if qtype not in TYPES:
        raise ValueError(f"the GGUF type must be one of {', '.join(TYPES)}; got {qtype!r}")
    out = check_output(out, overwrite)
    start = time.perf_counter()
    ck = open_checkpoint(source, revision)
    arch, args = _architecture(ck.config)
    tok = ck.tokenizer()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        counts, copied = _write(tmp, ck, arch, args, tok, qtype)
        _verify(tmp, args, tok)
        with open(tmp, "rb+") as f:   # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, qtype, counts, copied, out.stat().st_size, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ architecture
def _architecture(config: dict[str, Any]):
    """(GGUF architecture name, the model's ``ModelArgs``) after checking GGUF can carry every setting."""
    from ..models import get_module

    kind = config.get("model_type")
    if kind not in EXPORTABLE:
        raise UnsupportedModelError(f"prosa exports {', '.join(EXPORTABLE)} models to GGUF, not {kind!r} "
                                    "(prosa's GGUF reader could not read the file back)")
    args = get_module(kind).ModelArgs.from_dict(config)

    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"this {kind} model has {what}, which a GGUF file cannot express as llama.cpp "
                                     f"and prosa read it; prosa exports {kind} models without it")

    if kind == "gpt2":
        if args.activation_function != "gelu_new":
            raise refuse(f"activation_function={args.activation_function!r}")
        if not args.scale_attn_weights or args.scale_attn_by_inverse_layer_idx:
            raise refuse("non-standard attention scaling")
        return "gpt2", args
    if args.hidden_act != "silu" or args.mlp_bias or args.partial_rotary_factor != 1:
        raise refuse("a non-SiLU activation, MLP biases or partial rotary")
    if any((w := args.window(i)) and w < args.max_position_embeddings for i in range(args.num_hidden_layers)):
        raise refuse(f"a sliding attention window ({args.sliding_window} tokens)")
    rope = args.rope_scaling or {}
    keys = {"default": set(), "linear": {"factor"}, "yarn": {"factor", "original_max_position_embeddings"},
            "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}
    if set(rope) - {"rope_type", "type"} != keys.get(rope.get("rope_type", rope.get("type", "default"))):
        raise refuse(f"rope scaling {rope}")
    _rope_freqs(args)
    return ("qwen2" if kind == "qwen2" else "llama"), args


def _rope_freqs(args) -> np.ndarray | None:
    """Llama 3 rope scaling as llama.cpp stores it: a ``rope_freqs`` tensor of per-frequency divisors."""
    rope = args.rope_scaling or {}
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    factor, low, high, old = (rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings"))
    # llama.cpp's convert_hf_to_gguf.py: 1 for short wavelengths, `factor` for long ones, blended between
    wavelen = 2 * math.pi * args.rope_theta ** (np.arange(0, args.head_dim, 2, dtype=np.float32) / args.head_dim)
    smooth = (old / wavelen - low) / (high - low)
    factors = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor,
                                                           1 / ((1 - smooth) / factor + smooth))).astype(np.float32)
    try:   # prosa's reader maps the tensor back only for Llama 3's usual parameters
        _llama3_rope(torch.from_numpy(factors), args.rope_theta, args.head_dim)
    except UnsupportedModelError:
        raise UnsupportedModelError(f"this model's llama3 rope scaling {rope} is not Llama 3's own (low 1, high 4, "
                                    "original context 8192), the only one a GGUF file can express") from None
    return factors


def _config_metadata(w: GGUFWriter, arch: str, a) -> None:
    """The ``{arch}.*`` keys prosa's reader and llama.cpp read, as the types llama.cpp expects (uint32, float32)."""
    if arch == "gpt2":
        ints = {"context_length": a.n_positions, "embedding_length": a.n_embd, "block_count": a.n_layer,
                "feed_forward_length": a.n_inner or 4 * a.n_embd, "attention.head_count": a.n_head}
        floats = {"attention.layer_norm_epsilon": a.layer_norm_epsilon}
    else:
        ints = {"context_length": a.max_position_embeddings, "embedding_length": a.hidden_size,
                "block_count": a.num_hidden_layers, "feed_forward_length": a.intermediate_size,
                "attention.head_count": a.num_attention_heads, "attention.head_count_kv": a.num_key_value_heads,
                "rope.dimension_count": a.head_dim, "vocab_size": a.vocab_size}
        if a.head_dim != a.hidden_size // a.num_attention_heads:
            ints.update({"attention.key_length": a.head_dim, "attention.value_length": a.head_dim})
        floats = {"rope.freq_base": a.rope_theta, "attention.layer_norm_rms_epsilon": a.rms_norm_eps}
        rope = a.rope_scaling or {}
        kind = rope.get("rope_type", rope.get("type"))
        if kind in ("linear", "yarn"):
            w.add_rope_scaling_type(RopeScalingType(kind))
            floats["rope.scaling.factor"] = rope["factor"]
        if kind == "yarn":
            ints["rope.scaling.original_context_length"] = rope["original_max_position_embeddings"]
    for key, value in ints.items():
        w.add_uint32(f"{arch}.{key}", int(value))
    for key, value in floats.items():
        w.add_float32(f"{arch}.{key}", float(value))


# ----------------------------------------------------------------------------------------------------- tokenizer
def _put(w: GGUFWriter, key: str, value: Any) -> None:
    """One key with the type llama.cpp reads it as (ids uint32, flags bool, arrays typed by their items)."""
    if isinstance(value, (bool, float, str, list)):
        {bool: w.add_bool, float: w.add_float32, str: w.add_string, list: w.add_array}[type(value)](key, value)
    else:
        w.add_uint32(key, value) if 0 <= value < 2**32 else w.add_int64(key, value)


def _tokenizer_metadata(tok, n_vocab: int, config: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer.*`` keys for a Hugging Face byte-level BPE: llama.cpp's token list (padded to the embedding's
    rows), types, merges, special ids, flags, chat template and the pre-tokenizer that reproduces its splits."""
    data = json.loads(tok.backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or any(model.get(k) for k in ("byte_fallback", "continuing_subword_prefix",
                                                                 "end_of_word_suffix")):
        raise UnsupportedModelError(f"prosa exports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM) to "
                                    f"GGUF; this one is a {model.get('type')} model with other settings")
    added = tok.backend.get_added_tokens_decoder()
    by_id = {i: t for t, i in model["vocab"].items()} | {i: t.content for i, t in added.items()}
    if max(by_id) >= n_vocab:
        raise UnsupportedModelError(f"the tokenizer has {max(by_id) + 1} tokens but the model's embedding only "
                                    f"{n_vocab} rows; llama.cpp needs one row per token")
    # llama.cpp's types: 1 normal, 3 control (special), 4 user-defined, 5 unused (rows past the vocabulary)
    types = [3 if i in added and added[i].special else 4 if i in added else 1 if i in by_id else 5
             for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    first = [v for v in (config.get("bos_token_id"), config.get("eos_token_id"))]
    first = [v[0] if isinstance(v, list) and v else v if isinstance(v, int) else None for v in first]
    bos = tok.bos_token_id if tok.bos_token_id is not None else first[0]
    eos = tok.eos_token_id if tok.eos_token_id is not None else first[1]
    ids = {"bos": bos, "eos": eos, "unknown": tok.unk_token_id,
           "padding": tok.pad_token_id if tok.pad_token is not None else None}
    # more ids that end generation (Llama 3's <|eot_id|>, Qwen's <|endoftext|>): GGUF has two more slots
    ids.update(zip(("eot", "eom"), sorted(i for i in tok.eos_token_ids if i != eos)))
    ids = {k: v for k, v in ids.items() if v is not None}
    full, plain = tok.encode("a"), tok.encode("a", add_special_tokens=False)   # what the post-processor adds
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)],
          "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
          **{f"tokenizer.ggml.{k}_token_id": v for k, v in ids.items()},
          "tokenizer.ggml.add_bos_token": len(full) > len(plain) and full[0] == bos,
          "tokenizer.ggml.add_eos_token": len(full) > len(plain) and full[-1] == eos}
    if tok.chat_template:
        md["tokenizer.chat_template"] = tok.chat_template
    # several names may split a small vocabulary alike: the one the source's pre-tokenizer looks like goes first
    steps = (data.get("pre_tokenizer") or {}).get("pretokenizers") or [data.get("pre_tokenizer") or {}]
    regex = next((str(p.get("pattern", {}).get("Regex")) for p in steps if p and p.get("type") == "Split"), "")
    guess = ("smollm" if any(p and p.get("type") == "Digits" for p in steps) else
             "llama-bpe" if "{1,3}" in regex else "qwen2" if regex else "gpt-2")
    for pre in sorted(_PRES, key=lambda name: name != guess):
        md["tokenizer.ggml.pre"] = pre
        eos_ids = [v for k, v in ids.items() if k in ("eos", "eot", "eom")]
        if _same_tokenizer(tok, _tokenizer(Path("<export>"), md, eos_ids)):
            return md
    raise UnsupportedModelError("no pre-tokenizer llama.cpp knows (gpt-2, smollm, llama-bpe, qwen2) splits text "
                                "as this model's tokenizer does; prosa cannot export its tokenizer to GGUF")


def _same_tokenizer(a, b) -> bool:
    """Same ids (with and without specials) and texts for the probe strings and every special token."""
    texts = _PROBES + [t.content for t in a.backend.get_added_tokens_decoder().values()][:64]
    for text in texts + ["".join(texts)]:
        for special in (True, False):
            ids = a.encode(text, add_special_tokens=special)
            if ids != b.encode(text, add_special_tokens=special) or a.decode(ids) != b.decode(ids):
                return False
    return True


# -------------------------------------------------------------------------------------------------------- tensors
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


def _write(tmp: Path, ck, arch: str, args, tok, mode: str) -> tuple[Counter, int]:
    """Write the whole file to ``tmp``; tensors are converted and written one at a time (peak memory ~ one
    tensor) when the checkpoint lists its shapes up front (safetensors, GGUF), else read whole first."""
    shapes, loaded = ck.tensor_shapes(), None
    if shapes is None:   # pytorch_model.bin: names and shapes are known only once loaded
        loaded = dict(ck.tensors(torch.float32))
        shapes = {n: tuple(t.shape) for n, t in loaded.items()}
    items, dropped = _plan(ck, arch, args, mode, shapes)
    w = GGUFWriter(str(tmp), arch)
    if ck.gguf is not None:   # name, licence ... and the tokenizer exactly as the source file has them
        own = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")
        md = {k: v for k, v in ck.gguf.metadata.items() if k.startswith(("tokenizer.", "general.")) and k not in own}
    else:
        md = {"general.name": Path(str(ck.source)).name, **_tokenizer_metadata(tok, args.vocab_size, ck.config)}
    for key, value in md.items():
        _put(w, key, value)
    _config_metadata(w, arch, args)
    w.add_file_type(int(TYPES[mode]))
    if mode != "f16":
        w.add_quantization_version(2)
    freqs = _rope_freqs(args) if arch == "llama" else None
    if freqs is not None:
        w.add_tensor_info("rope_freqs.weight", freqs.shape, np.dtype(np.float32), freqs.nbytes, raw_dtype=Q.F32)
    for it in items:
        w.add_tensor_info(it.name, it.shape, np.dtype(np.float32), int(math.prod(it.shape) * _BYTES[it.qtype]),
                          raw_dtype=it.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    skip = frozenset(dropped | {it.hf for it in items if it.exact})
    stream = iter(loaded.items()) if loaded is not None else ck.tensors(torch.float32, skip)
    pending: dict[str, torch.Tensor] = {}

    def take(hf: str) -> torch.Tensor:
        while hf not in pending:   # in checkpoint order this reads exactly the next tensor
            name, tensor = next(stream, (None, None))
            if name is None:
                raise CorruptModelError(f"{ck.path}: tensor {hf} is listed but cannot be read")
            pending[name] = tensor
        return pending.pop(hf)

    try:
        if freqs is not None:
            w.write_tensor_data(freqs)
        for it in items:
            w.write_tensor_data(_encode(it, ck, take))
    finally:
        w.close()
    counts = Counter(it.qtype.name for it in items) + Counter({"F32": int(freqs is not None)})
    return +counts, sum(it.exact for it in items)


# --------------------------------------------------------------------------------------------------- read back
def _verify(path: Path, args, tok) -> None:
    """Read the file back with prosa's reader: the model settings and the tokenizer must be the source's."""
    back = load_gguf(path)
    before, after = _comparable(args), _comparable(back.config)
    if diff := sorted(k for k in before if before[k] != after.get(k)):
        raise UnsupportedModelError("the GGUF file would not carry this model's " + ", ".join(
            f"{k} ({before[k]!r}, read back as {after.get(k)!r})" for k in diff))
    if not _same_tokenizer(tok, back.tokenizer):
        raise UnsupportedModelError("the GGUF file's tokenizer would not encode text as the model's own does")


def _comparable(args) -> dict[str, Any]:
    """``ModelArgs`` (or a config) as the settings a GGUF file carries: floats at float32 precision, rope scaling
    normalised, what GGUF drops by design left out (the family name mistral -> llama, windows already refused)."""
    if isinstance(args, dict):
        from ..models import get_module
        args = get_module(args["model_type"]).ModelArgs.from_dict(args)

    def norm(v: Any) -> Any:
        if isinstance(v, float):
            return float(np.float32(v))
        if isinstance(v, dict):
            v = {("rope_type" if k == "type" else k): norm(x) for k, x in v.items()}
            return None if v.get("rope_type", "default") == "default" else v
        return v

    d = {k: norm(v) for k, v in asdict(args).items() if k not in (  # ties follow the tensors written
        "model_type", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
        "tie_word_embeddings")}
    if "n_inner" in d:
        d["n_inner"] = d["n_inner"] or 4 * d["n_embd"]
    return d
