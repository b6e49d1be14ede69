"""Text <-> token ids: a thin wrapper over a ``tokenizers.Tokenizer`` (its streaming detokenizer is in
``prosa.detokenizer``).

Behaviour follows ``transformers.AutoTokenizer`` (5.x) for byte-level BPE folders:

* ``tokenizer.json`` is loaded as is, post-processor included: when it exists, ``add_bos_token`` /
  ``add_eos_token`` in ``tokenizer_config.json`` are ignored (transformers drops them too).
* ``vocab.json`` + ``merges.txt`` give a GPT-2 style byte-level BPE; there the post-processor is built from
  ``add_bos_token`` / ``add_eos_token`` (both default to false), and bos/eos/unk default to ``<|endoftext|>``.
* Named special tokens missing from the backend are registered as special added tokens.
* ``tokenizer_class: GPT2Tokenizer``: a plain ByteLevel pre-tokenizer takes the config's ``add_prefix_space``
  (default false), and bos/eos/unk default to ``<|endoftext|>`` too.
* ``decode`` never applies ``clean_up_tokenization_spaces`` (transformers 5 ignores it for BPE models).

One deliberate difference: for ``tokenizer_class: GPT2Tokenizer`` transformers 5 rebuilds the backend from the
vocabulary and merges, dropping the normalizer and pre-tokenizer of ``tokenizer.json`` (for example the
individual-digit split of SmolLM / StarCoder). prosa keeps ``tokenizer.json`` whole, as ``tokenizers``,
llama.cpp and the models' training did.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from .detokenizer import StreamingDetokenizer
from .errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError

__all__ = ["Tokenizer", "StreamingDetokenizer"]

_GPT2_DEFAULT = "<|endoftext|>"
# transformers' SPECIAL_TOKENS_ATTRIBUTES, in the order it registers missing ones
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _content(value: Any) -> str | None:
    """The text of a special-token entry: a string, or a dict with ``content``."""
    return value.get("content") if isinstance(value, dict) else None if value is None else str(value)


def _added_token(value: Any, special: bool = True) -> AddedToken:
    """An ``AddedToken`` from a config entry (string, or dict with ``content`` and flags)."""
    if isinstance(value, dict):
        flags = {k: value[k] for k in _ADDED_TOKEN_FLAGS if k in value}
        flags.setdefault("special", special)
        flags.setdefault("normalized", not flags["special"])
        return AddedToken(value["content"], **flags)
    return AddedToken(str(value), special=special, normalized=not special)


def _read_json(path: Path, missing_ok: bool = True) -> dict:
    """Parse a JSON object file (``{}`` if absent and ``missing_ok``), or raise ``CorruptModelError`` naming it."""
    if missing_ok and not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(obj, dict):
            raise ValueError("expected a JSON object")
        return obj
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CorruptModelError(
            f"{path} is unreadable or not valid JSON ({err}). Re-download {path.name} from the model's source."
        ) from None


def _ids(value: Any) -> list[int]:
    """``eos_token_id`` entries may be an int, a list of ints or null."""
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None]


class Tokenizer:
    """Encodes text to token ids and back; wraps (and adjusts in place) a ``tokenizers.Tokenizer``.

    Args:
        backend: The ``tokenizers.Tokenizer`` to use. It is adopted, not copied: padding and truncation are
            switched off, missing special tokens are added to it and, when ``add_bos_token`` or
            ``add_eos_token`` is given, its post-processor is replaced.
        bos_token, eos_token, unk_token, pad_token: Special token strings; any that the backend lacks is
            registered as a special added token (a new id at the end of the vocabulary). Without a pad token,
            ``pad_token_id`` is ``eos_token_id``.
        add_bos_token, add_eos_token: ``None`` (both) keeps the backend's post-processor, which then decides
            what ``encode(add_special_tokens=True)`` adds. If either is given, the post-processor becomes
            ``[bos] $A [eos]`` with each part present only when its flag is true (a missing one counts as
            false), as transformers' ``update_post_processor`` does.
        eos_token_ids: Extra ids that end generation, besides ``eos_token``.
        chat_template: Jinja chat template, if any.
    """

    def __init__(
        self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
        unk_token: str | None = None, pad_token: str | None = None, add_bos_token: bool | None = None,
        add_eos_token: bool | None = None, eos_token_ids: Iterable[int] = (), chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = False
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        for tok in dict.fromkeys((bos_token, eos_token, unk_token, pad_token)):
            if tok and tok not in present:
                backend.add_tokens([AddedToken(tok, special=True, normalized=False)])
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else None
        self.unk_token_id = self.token_to_id(unk_token) if unk_token else None
        self.pad_token_id = self.token_to_id(pad_token) if pad_token else self.eos_token_id
        eos = {int(i) for i in eos_token_ids} | ({self.eos_token_id} if self.eos_token_id is not None else set())
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.chat_template = chat_template
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        specials = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._skipped_ids = frozenset(specials)  # what decode(skip_special_tokens=True) leaves out
        named = (self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id)
        self.all_special_ids: frozenset[int] = frozenset(specials | {i for i in named if i is not None})

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """Make ``encode`` add bos / eos exactly as the flags say (a flag whose token is unknown is ignored)."""
        bos = [self.bos_token] if add_bos and self.bos_token_id is not None else []
        eos = [self.eos_token] if add_eos and self.eos_token_id is not None else []

        def template(seq: str, type_id: int) -> list[str]:
            return [f"{t}:{type_id}" for t in bos] + [f"${seq}:{type_id}"] + [f"{t}:{type_id}" for t in eos]

        special = {t: self.token_to_id(t) for t in bos + eos}
        self._backend.post_processor = processors.TemplateProcessing(
            single=template("A", 0), pair=template("A", 0) + template("B", 1), special_tokens=list(special.items())
        )

    @classmethod
    def from_folder(
        cls, folder: str | Path, *, config: dict | None = None, generation_config: dict | None = None
    ) -> Tokenizer:
        """Load the tokenizer of a Hugging Face style model folder.

        Reads ``tokenizer.json`` (else ``vocab.json`` + ``merges.txt``), ``tokenizer_config.json``,
        ``special_tokens_map.json``, ``added_tokens.json`` and ``chat_template.jinja`` / ``chat_template.json``.

        Args:
            folder: The model folder.
            config: The model's ``config.json`` contents; read from the folder when ``None``.
            generation_config: ``generation_config.json`` contents; read from the folder when ``None``.

        Returns:
            The tokenizer. ``eos_token_ids`` gathers ``eos_token`` and every ``eos_token_id`` of both configs.

        Raises:
            ModelNotFoundError: The folder does not exist or holds no tokenizer files.
            UnsupportedModelError: Only a SentencePiece ``tokenizer.model`` is present.
            CorruptModelError: A tokenizer file is truncated or malformed.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelNotFoundError(f"Model folder {folder} does not exist. Check the path.")
        config = _read_json(folder / "config.json") if config is None else config
        if generation_config is None:
            generation_config = _read_json(folder / "generation_config.json")
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        if "added_tokens_decoder" not in tok_cfg and (folder / "special_tokens_map.json").is_file():
            # transformers reads this legacy file only then, and lets it override tokenizer_config.json
            tok_map = _read_json(folder / "special_tokens_map.json")
            tok_cfg.update({k: v for k, v in tok_map.items() if k in _SPECIAL_KEYS or k.endswith("special_tokens")})

        add_bos = add_eos = None  # with tokenizer.json, its post-processor decides (config flags are ignored)
        tok_class = str(tok_cfg.get("tokenizer_class") or "").removesuffix("Fast")
        gpt2 = tok_class == "GPT2Tokenizer" or (not tok_class and config.get("model_type") == "gpt2")
        if (folder / "tokenizer.json").is_file():
            backend = cls._load_json_backend(folder / "tokenizer.json")
            if gpt2 and isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
                backend.pre_tokenizer.add_prefix_space = bool(tok_cfg.get("add_prefix_space", False))
        elif (folder / "vocab.json").is_file() or (folder / "merges.txt").is_file():
            backend = cls._load_vocab_merges_backend(folder, bool(tok_cfg.get("add_prefix_space", False)))
            gpt2 = True
            add_bos, add_eos = bool(tok_cfg.get("add_bos_token", False)), bool(tok_cfg.get("add_eos_token", False))
        elif (folder / "tokenizer.model").is_file():
            raise UnsupportedModelError(
                f"{folder} has only a SentencePiece tokenizer.model, which prosa cannot read. Convert it once with "
                "transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder) writes tokenizer.json."
            )
        else:
            raise ModelNotFoundError(
                f"No tokenizer in {folder}: expected tokenizer.json (or vocab.json + merges.txt). "
                "Download the model's tokenizer files into that folder."
            )
        try:
            names = cls._register_tokens(backend, tok_cfg, folder, gpt2)
            eos_ids = _ids(generation_config.get("eos_token_id")) + _ids(config.get("eos_token_id"))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            files = "tokenizer_config.json, special_tokens_map.json, added_tokens.json or eos_token_id in the configs"
            msg = f"Malformed token settings in {folder} ({files}): {err!r}."
            raise CorruptModelError(f"{msg} Re-download them from the model's source.") from None
        named = {k: names[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(backend, **named, add_bos_token=add_bos, add_eos_token=add_eos, eos_token_ids=eos_ids,
                   chat_template=cls._find_chat_template(folder, tok_cfg))

    @staticmethod
    def _register_tokens(backend: tokenizers.Tokenizer, tok_cfg: dict, folder: Path, gpt2: bool) -> dict:
        """Add the tokens transformers registers when the backend lacks them: ``added_tokens_decoder`` (by id),
        then the named special tokens, then the extra ones. Returns the named tokens' strings."""
        added = tok_cfg.get("added_tokens_decoder") or {}
        to_add = [_added_token(v, special=False) for _, v in sorted((int(k), v) for k, v in added.items())]
        if not added and (folder / "added_tokens.json").is_file():
            legacy = _read_json(folder / "added_tokens.json")
            named = {_content(tok_cfg.get(k)) for k in _SPECIAL_KEYS}
            to_add = [_added_token(t, special=t in named) for t, _ in sorted(legacy.items(), key=lambda kv: kv[1])]
        names: dict[str, str | None] = {}
        for key in _SPECIAL_KEYS:
            value = tok_cfg.get(key, _GPT2_DEFAULT if gpt2 and key in ("bos_token", "eos_token", "unk_token") else None)
            names[key] = _content(value)
            if value is not None:
                to_add.append(_added_token(value, special=True))
        for key in ("additional_special_tokens", "extra_special_tokens"):
            extra = tok_cfg.get(key) or []
            to_add += [_added_token(v, special=True) for v in (extra.values() if isinstance(extra, dict) else extra)]
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        for token in to_add:
            if token.content not in present:
                backend.add_tokens([token])
                present.add(token.content)
        return names

    @staticmethod
    def _load_json_backend(path: Path) -> tokenizers.Tokenizer:
        """``tokenizers.Tokenizer.from_file``, with a clear error for a damaged file."""
        try:
            return tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises plain Exception for parse errors
            msg = f"The tokenizer file {path} is truncated or malformed ({err})."
            raise CorruptModelError(f"{msg} Re-download tokenizer.json from the model's source.") from None

    @staticmethod
    def _load_vocab_merges_backend(folder: Path, add_prefix_space: bool) -> tokenizers.Tokenizer:
        """A GPT-2 style byte-level BPE from ``vocab.json`` and ``merges.txt`` (as transformers' GPT2Tokenizer)."""
        fix = "Download it (or tokenizer.json) from the model's source."
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise CorruptModelError(f"{folder / name} is missing (vocab.json needs merges.txt). {fix}")
        _read_json(folder / "vocab.json", missing_ok=False)
        try:
            bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                       continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        except Exception as err:
            raise CorruptModelError(f"{folder / 'merges.txt'} or vocab.json is malformed ({err}). {fix}") from None
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        backend.decoder = decoders.ByteLevel()
        return backend

    @staticmethod
    def _find_chat_template(folder: Path, tok_cfg: dict) -> str | None:
        """``chat_template.jinja`` wins over ``tokenizer_config.json``, which wins over ``chat_template.json``."""
        path = folder / "chat_template.jinja"
        try:
            if path.is_file():
                return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise CorruptModelError(f"{path} is unreadable ({err}). Re-download it.") from None
        template = tok_cfg.get("chat_template")
        if template is None and (folder / "chat_template.json").is_file():
            template = _read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = by_name.get("default", next(iter(by_name.values()), None))
        return template if isinstance(template, str) else None

    @functools.cached_property
    def _byte_fallback_ids(self) -> frozenset[int]:
        """Ids of ``<0xNN>`` tokens if the decoder has ByteFallback (a run of them decodes all-or-nothing)."""
        decoder = self._backend.decoder
        if decoder is None or b"ByteFallback" not in decoder.__getstate__():
            return frozenset()
        vocab = self._backend.get_vocab(with_added_tokens=False)
        return frozenset(i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">"))

    @functools.cached_property
    def _byte_level_decoder(self) -> bool:
        """Does the decoder map byte-level characters back to bytes (GPT-2 style: a token may hold part of a
        character)?"""
        decoder = self._backend.decoder
        return decoder is not None and b'"ByteLevel"' in decoder.__getstate__()

    # -- encoding / decoding ---------------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``.

        Args:
            text: The text; special tokens written in it (e.g. ``<|im_start|>``) become their ids.
            add_special_tokens: Let the post-processor add bos / eos (as configured).
        Returns:
            The ids.
        """
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of several texts (in parallel, no padding).

        Args:
            texts: The texts.
            add_special_tokens: As in ``encode``.
        Returns:
            One id list per text.
        """
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids.

        Args:
            ids: Token ids.
            skip_special_tokens: Leave out special tokens (bos, eos, chat markers...).
        Returns:
            The text (bytes that are not valid UTF-8 become U+FFFD).
        """
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, tok: str) -> int | None:
        """Id of a token string (vocabulary or added token), or ``None``.

        Args:
            tok: The token as stored in the vocabulary (byte-level tokens use ``Ġ`` for spaces).
        Returns:
            Its id, or ``None`` if unknown.
        """
        return self._backend.token_to_id(tok)

    def id_to_token(self, i: int) -> str | None:
        """Token string of an id, or ``None``.

        Args:
            i: A token id.
        Returns:
            The token as stored in the vocabulary, or ``None`` if out of range.
        """
        return self._backend.id_to_token(int(i))

    def detokenizer(self, skip_special_tokens: bool = True) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one generated sequence.

        Args:
            skip_special_tokens: Leave out special tokens, as ``decode`` would.
        Returns:
            The detokenizer.
        """
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"
