"""GGUF tokenizer metadata (``tokenizer.ggml.*``) -> a ``prosa.tokenizer.Tokenizer``, built as transformers builds
it: byte-level BPE with llama.cpp's pre-tokenizer regex, or SentencePiece-style BPE with byte fallback."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from prosa.errors import ProsaError, UnsupportedModelError

from .gguf_format import _corrupt

if TYPE_CHECKING:
    from prosa.tokenizer import Tokenizer

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
        # the characters of the vocabulary outside the byte alphabet (none in most files: then no per-token test)
        foreign = set("".join(tokens)) - set(spelling.values())
        in_alphabet = [foreign.isdisjoint(t) for t in tokens] if foreign else [True] * len(tokens)
        # tokens outside the byte alphabet are respelled in it, so the BPE model can reach them
        spelled = [t if ok else "".join(spelling[b] for b in t.encode()) for t, ok in zip(tokens, in_alphabet)]
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
        can_be_special = in_alphabet
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

    try:
        backend = _backend(path, md)
    except ProsaError:
        raise
    except Exception as err:  # tokenizers raises plain Exception for, e.g., a merge that is not "left right"
        raise _corrupt(path, f"its tokenizer metadata cannot be built into a tokenizer ({err!r})") from None
    return Tokenizer(backend, bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"),
                     pad_token=token("padding"),
                     # llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise
                     add_bos_token=md.get("tokenizer.ggml.add_bos_token", md.get("tokenizer.ggml.model") == "llama"),
                     add_eos_token=md.get("tokenizer.ggml.add_eos_token", False), eos_token_ids=eos_ids,
                     chat_template=md.get("tokenizer.chat_template"))
