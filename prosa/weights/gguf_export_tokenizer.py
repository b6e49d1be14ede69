"""A Hugging Face byte-level BPE tokenizer -> GGUF ``tokenizer.*`` keys, checked by rebuilding it with prosa's
reader: the pre-tokenizer name is the first of llama.cpp's that encodes the probe texts as the source does."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UnsupportedModelError

# the reader's own tokenizer rebuild: what it accepts is exactly what prosa reads back
from .gguf_tokenizer import _tokenizer

# the tokenizer's pre-tokenizer, as llama.cpp names it: tried in turn until prosa's reader encodes like the source
_PRES = ("gpt-2", "smollm", "llama-bpe", "qwen2")
_PROBES = ["Hello world! It's a test, isn't it? I'LL SEE.", "Ação, coração, pão. Olá, você está?",
           "日本語のテキストと中文的文本。한국어 🙂 👍🏽 👨‍👩‍👧", "def f(x):\n\treturn x**2  # 42\r\n",
           "  spaces   and\n\n\nnewlines 12345 6,789.01 2024", "x  \n y\t\tz "]


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
