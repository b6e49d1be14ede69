"""Output that a limit cuts says so, and never ends in half a character.

* The streaming detokenizer drops the bytes of an unfinished last character (never U+FFFD), for byte-level BPE
  and ByteFallback tokenizers, through ``lm.generate`` and ``lm.stream``; invalid bytes mid-text stay U+FFFD.
* A sequence the context window ends reports finish_reason "length" with stop_reason "context".
* Limits nothing can be generated under are refused at the door (max_new_tokens / max_length past the window, a
  prompt filling max_length), with messages naming the fix.
* ``prosa generate`` (the real command, in a subprocess): notices on stderr, records carrying the stop reason,
  ``--file`` indices equal to line numbers with blank lines reported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, normalizers

import prosa
from prosa.detokenizer import _byte_level_chars, incomplete_tail
from prosa.engine import Request
from prosa.tokenizer import Tokenizer

from test_generate import Scripted

_SCRIPT = Path(sys.executable).with_name("prosa")
PROSA = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "prosa.cli"]
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def gpt2(tiny_checkpoint):
    return prosa.load(tiny_checkpoint("gpt2"), dtype="float32")


def byte_fallback_tokenizer() -> Tokenizer:
    """A SentencePiece-style tokenizer (Llama 2): Metaspace normalizer, <0xNN> byte fallback, a decoder that
    strips the leading space; characters outside its tiny vocabulary (every emoji) become byte tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("▁", "a", "b", "o", "k", "H", "i"):
        vocab[piece] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def stream(tok: Tokenizer, ids: list[int], drop: bool = True) -> list[str]:
    detok = tok.detokenizer()
    return [detok.add_token(i) for i in ids] + [detok.finalize(drop_incomplete=drop)]


def common_prefix(a: str, b: str) -> str:
    return os.path.commonprefix([a, b])


# -- the detokenizer ------------------------------------------------------------------------------------------------
def test_incomplete_tail():
    emoji = "🦀".encode()
    assert [incomplete_tail(b"ok " + emoji[:k]) for k in range(4)] == [0, 1, 2, 3]
    assert incomplete_tail(b"ok " + emoji) == 0 and incomplete_tail("é".encode()[:1]) == 1
    # invalid, not unfinished: a lone continuation byte, a byte that never starts a character, a bad second byte
    assert incomplete_tail(b"a\x80") == incomplete_tail(b"a\xff") == incomplete_tail(b"\xe0\x80") == 0
    assert incomplete_tail(b"\xf0\x8f") == incomplete_tail(b"\xc0") == 0


def test_byte_level_cut_inside_a_character(gpt2):
    tok = gpt2.tokenizer
    text = "Hi 🦀🚀 ok, ação 日本"
    ids = tok.encode(text, add_special_tokens=False)
    cuts = 0
    for m in range(1, len(ids) + 1):
        decoded = tok.decode(ids[:m])
        pieces = stream(tok, ids[:m])
        assert all(FFFD not in p for p in pieces), (m, pieces)
        # the complete characters, nothing else: the decoded prefix up to where it stops agreeing with the text
        assert "".join(pieces) == common_prefix(decoded, text), m
        assert "".join(stream(tok, ids[:m], drop=False)) == decoded      # plain finalize(): decode() parity
        cuts += decoded.endswith(FFFD)
    assert cuts >= 2                      # cut inside each emoji at least once


def test_byte_fallback_cut_keeps_the_complete_characters_of_the_run():
    tok = byte_fallback_tokenizer()
    ids = tok.encode("a 🦀🚀", add_special_tokens=False)
    assert len(ids) == 3 + 8
    for k in range(1, 4):   # 🦀 and k bytes of 🚀: decode() turns the whole byte run into U+FFFDs
        assert tok.decode(ids[:7 + k]) == "a " + FFFD * (4 + k)
        assert "".join(stream(tok, ids[:7 + k])) == "a 🦀"
    assert "".join(stream(tok, ids)) == "a 🦀🚀"
    eos = tok.eos_token_id        # an unfinished character before a (hidden) end token
    assert "".join(stream(tok, ids[:9] + [eos])) == "a 🦀"


def test_invalid_bytes_stay_replacement_characters(gpt2):
    fb = byte_fallback_tokenizer()
    byte = {b: fb.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    # mid-text invalid byte, then an unfinished character at the end: only the latter goes
    ids = [byte[0x80]] + fb.encode("ok", add_special_tokens=False) + [byte[0xF0], byte[0x9F]]
    assert "".join(stream(fb, ids)) == FFFD + " ok"          # the space before "ok" is not leading: it stays
    # a lone continuation byte at the end is invalid, not unfinished: it stays
    assert "".join(stream(fb, fb.encode("ok", add_special_tokens=False) + [byte[0x80]])) == "ok" + FFFD
    bl = gpt2.tokenizer
    char = {b: c for c, b in _byte_level_chars().items()}
    single = {b: bl.token_to_id(char[b]) for b in (0x80, 0xF0)}
    ok = bl.encode("ok", add_special_tokens=False)
    assert "".join(stream(bl, [single[0x80]] + ok + [single[0xF0]])) == FFFD + "ok"
    assert "".join(stream(bl, ok + [single[0x80]])) == "ok" + FFFD
    genuine = bl.encode("ok " + FFFD, add_special_tokens=False)     # the character U+FFFD itself, complete
    assert "".join(stream(bl, genuine)) == "ok " + FFFD


# -- through the engine: lm.generate and lm.stream --------------------------------------------------------------------
def scripted(tok: Tokenizer, script: list[int]) -> prosa.LanguageModel:
    model = Scripted(script, tok.vocab_size)
    model.prompt_len = len(tok.encode("x"))
    return prosa.LanguageModel(model, tok, {"vocab_size": tok.vocab_size}, {}, "scripted")


@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback"])
@pytest.mark.parametrize("ending", ["length", "eos"])
def test_generate_and_stream_never_end_in_half_a_character(gpt2, kind, ending):
    tok = gpt2.tokenizer if kind == "byte_level" else byte_fallback_tokenizer()
    ids = tok.encode("Hi 🦀🚀", add_special_tokens=False)
    cut = ids[:len(ids) - 1]              # 🦀 whole, 🚀 short of its last byte (its last token)
    assert tok.decode(cut).endswith(FFFD)
    lm = scripted(tok, cut + [tok.eos_token_id])
    kw = dict(max_new_tokens=len(cut) if ending == "length" else len(cut) + 5, temperature=0)
    res = lm.generate("x", **kw)
    assert res.text == "Hi 🦀" and res.finish_reason == ("length" if ending == "length" else "stop")
    assert res.tokens == cut + ([] if ending == "length" else [tok.eos_token_id])
    chunks = list(lm.stream("x", **kw))
    assert "".join(chunks) == res.text and not any(FFFD in c for c in chunks)
    assert chunks[-1].finish_reason == res.finish_reason
    two = lm.generate("x", n=2, **kw)       # forked samples too
    assert [r.text for r in two] == ["Hi 🦀", "Hi 🦀"]


# -- the context window -----------------------------------------------------------------------------------------------
def test_the_context_window_ending_is_reported(gpt2):
    window = gpt2.context_length
    prompt = "Once upon a time"
    plen = len(gpt2.encode(prompt))
    res = gpt2.generate(prompt, max_new_tokens=window, temperature=0, ignore_eos=True)
    assert len(res.tokens) == window - plen
    assert (res.finish_reason, res.stop_reason) == ("length", "context")
    (req,) = gpt2.make_requests([prompt], max_new_tokens=window)
    assert gpt2.room(req) == window - plen
    short = gpt2.generate(prompt, max_new_tokens=4, temperature=0, ignore_eos=True)
    assert (short.finish_reason, short.stop_reason, len(short.tokens)) == ("length", None, 4)
    chunks = list(gpt2.stream(prompt, max_new_tokens=window, temperature=0, ignore_eos=True))
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == ("length", "context")
    assert sum(len(c.token_ids) for c in chunks) == window - plen
    # max_length == the window: the limit asked for, not the window, ends it
    full = gpt2.generate(prompt, max_length=window, temperature=0, ignore_eos=True)
    assert (full.finish_reason, full.stop_reason, len(full.tokens)) == ("length", None, window - plen)
    slid = gpt2.generate(prompt, max_new_tokens=window + 10, temperature=0, ignore_eos=True, context_overflow="slide")
    assert (slid.finish_reason, slid.stop_reason, len(slid.tokens)) == ("length", None, window + 10)


def test_a_request_whose_prompt_fills_the_window_ends_at_once_saying_why(gpt2):
    window = gpt2.context_length
    events = list(gpt2.run([Request([5] * window, max_new_tokens=3, n=2),
                            Request([5] * 3, max_new_tokens=0)]))
    ends = {(e.request, e.sample): (e.finish_reason, e.stop_reason, e.token) for e in events}
    assert ends == {(0, 0): ("length", "context", -1), (0, 1): ("length", "context", -1),
                    (1, 0): ("length", None, -1)}


def test_limits_nothing_can_come_under_are_refused(gpt2):
    window = gpt2.context_length
    with pytest.raises(ValueError, match=rf"max_new_tokens is {window + 1} but the context window is {window}"
                                         r".*--context-overflow slide"):
        gpt2.generate("hi", max_new_tokens=window + 1)
    with pytest.raises(ValueError, match=rf"max_length is 500 but the context window is {window}"):
        gpt2.generate("hi", max_length=500)
    prompt = "Once upon a time there was"
    plen = len(gpt2.encode(prompt))
    with pytest.raises(ValueError, match=rf"the prompt is {plen} tokens but max_length is {plen}.*nothing can be "
                                         "generated.*max_new_tokens"):
        gpt2.generate(prompt, max_length=plen)
    with pytest.raises(ValueError, match=r"^prompt 1: the prompt is"):
        gpt2.generate(["hi", prompt], max_length=plen)
    assert len(gpt2.generate(prompt, max_length=plen, max_new_tokens=2, ignore_eos=True).tokens) == 2
    with pytest.raises(ValueError, match=r"context window is \d+, prompt included, so no new token fits"):
        gpt2.generate("word " * window, max_new_tokens=2)
    long = gpt2.generate(prompt, max_length=window + 20, temperature=0, ignore_eos=True, context_overflow="slide")
    assert len(long.tokens) == window + 20 - plen


# -- prosa generate ---------------------------------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PROSA, "generate", *args], capture_output=True, text=True, timeout=300)


def test_cli_says_when_the_window_cuts_the_output(tiny_checkpoint):
    m = str(tiny_checkpoint("gpt2"))
    common = ["Once upon a time", "-m", m, "--max-new-tokens", "128", "--temperature", "0", "--ignore-eos"]
    out = cli(*common, "--json")
    assert out.returncode == 0, out.stderr
    (rec,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert (rec["finish_reason"], rec["stop_reason"]) == ("length", "context")
    plen = 128 - len(rec["tokens"])
    assert f"this {plen}-token prompt leaves room for only {128 - plen}" in out.stderr       # before
    assert f"cut at the model's 128-token context window ({plen} prompt + {128 - plen} new tokens; " in out.stderr
    streamed = cli(*common)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == rec["text"] + "\n" and "cut at the model's 128-token context window" in streamed.stderr
    short = cli("Once upon a time", "-m", m, "--max-new-tokens", "3", "--temperature", "0", "--ignore-eos")
    assert short.returncode == 0 and "notice" not in short.stderr


def test_cli_file_keeps_line_numbers_and_reports_blank_lines(tiny_checkpoint, tmp_path):
    m = str(tiny_checkpoint("gpt2"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon\n\nA story\n   \nHello\n\n")
    dest = tmp_path / "out.jsonl"
    run = cli("--file", str(prompts), "--output", str(dest), "-m", m, "--max-length", "8", "--temperature", "0",
              "--ignore-eos", "--batch-size", "2")
    assert run.returncode == 0, run.stderr
    recs = [json.loads(line) for line in dest.read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2, 3, 4, 5]
    assert [r.get("prompt") for r in recs] == ["Once upon", None, "A story", None, "Hello", None]
    assert [r for r in recs if "skipped" in r] == [{"index": i, "skipped": "blank line"} for i in (1, 3, 5)]
    assert all(r["finish_reason"] == "length" and r["stop_reason"] is None for r in recs if "prompt" in r)
    assert "3 of 3 sequences were cut at --max-length 8 (lines 1, 3, 5)" in run.stderr
    text = cli("--file", str(prompts), "-m", m, "--max-new-tokens", "3", "--temperature", "0")
    assert text.returncode == 0, text.stderr
    assert [line for line in text.stdout.splitlines() if line.startswith("---")] == [
        "--- prompt 0 sample 0", "--- prompt 2 sample 0", "--- prompt 4 sample 0"]
    assert "3 blank lines of --file" in text.stderr and "lines 2, 4, 6" in text.stderr


def test_cli_refuses_what_cannot_be_generated(tiny_checkpoint, tmp_path):
    m = str(tiny_checkpoint("gpt2"))
    out = cli("hi", "-m", m, "--max-new-tokens", "100000")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "max_new_tokens is 100000 but the context window is 128" in out.stderr
    assert "--context-overflow slide" in out.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\n\nOnce upon a time there was a little model\n")
    out = cli("--file", str(prompts), "-m", m, "--max-length", "4")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "line 3" in out.stderr and "max_length is 4" in out.stderr and "nothing can be generated" in out.stderr
