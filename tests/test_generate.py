"""The generation loop: stop strings, streaming, n samples sharing one prefill, seeds, logprobs, sliding past
the context window, parameter validation, the reproducibility record, and `prosa generate` on the command line."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import prosa
from prosa.engine.paged import PagedBatch
from prosa.models.cache import KVCache

CLI = [sys.executable, "-m", "prosa.cli"]


@pytest.fixture(scope="module")
def gpt2(tiny_checkpoint):
    return prosa.load(tiny_checkpoint("gpt2"), dtype="float32")


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return prosa.load(tiny_checkpoint("llama"), dtype="float32")


class Counting:
    """Records the shape of every batch of tokens fed to the model: each forward, and the fused decode step,
    starts with ``begin`` on the engine's paged cache (or on the plain cache of a model without one)."""

    def __init__(self, lm=None):
        self.calls: list[tuple[int, int]] = []
        self.saved = []

    def __enter__(self):
        for cls in (PagedBatch, KVCache):
            orig = cls.begin

            def counted(cache, input_ids, attention_mask=None, _orig=orig):
                self.calls.append(tuple(input_ids.shape))
                return _orig(cache, input_ids, attention_mask)
            self.saved.append((cls, orig))
            cls.begin = counted
        return self

    def __exit__(self, *exc):
        for cls, orig in self.saved:
            cls.begin = orig

    @property
    def tokens(self) -> int:
        return sum(b * t for b, t in self.calls)


class Scripted(torch.nn.Module):
    """A fake model that emits a fixed token script (one-hot logits), to test text handling exactly."""

    def __init__(self, script: list[int], vocab: int, context: int = 512):
        super().__init__()
        self.script, self.vocab, self.context_length = script, vocab, context
        self.w = torch.nn.Parameter(torch.zeros(1))

    def make_cache(self, b):
        return KVCache(1, b)

    def forward(self, ids, cache=None, attention_mask=None):
        cache = cache or self.make_cache(ids.shape[0])
        start = cache.offset
        cache.begin(ids, attention_mask)
        out = torch.full((ids.shape[0], ids.shape[1], self.vocab), -1e9)
        step = start + ids.shape[1] - self.prompt_len
        out[:, -1, self.script[min(step, len(self.script) - 1)]] = 0
        return out


def scripted_lm(lm, text: str, prompt: str = "x") -> prosa.LanguageModel:
    script = lm.tokenizer.encode(text, add_special_tokens=False) + [lm.tokenizer.eos_token_id]
    model = Scripted(script, lm.tokenizer.vocab_size)
    model.prompt_len = len(lm.encode(prompt))
    return prosa.LanguageModel(model, lm.tokenizer, lm.config, {}, "scripted")


TRICKY = "Olá, ação! 🙂👍🏽 日本語のテキスト 👨‍👩‍👧 done. STOP here"


def test_stream_never_splits_characters_and_joins_to_the_text(gpt2):
    lm = scripted_lm(gpt2, TRICKY)
    full = lm.generate("x", max_new_tokens=200, temperature=0)
    assert full.text == TRICKY and full.finish_reason == "stop"
    chunks = list(lm.stream("x", max_new_tokens=200, temperature=0))
    assert "".join(c.text for c in chunks) == TRICKY
    assert all("\ufffd" not in c.text for c in chunks)
    assert sum(len(c.token_ids) for c in chunks) == len(full.tokens)


@pytest.mark.parametrize("stop", ["STOP", "テキスト", "🙂👍", "ção! 🙂"])
def test_stop_string_split_over_tokens(gpt2, stop):
    lm = scripted_lm(gpt2, TRICKY)
    ids = lm.tokenizer.encode(stop, add_special_tokens=False)
    assert len(ids) > 1                          # the stop string spans several tokens
    res = lm.generate("x", max_new_tokens=200, temperature=0, stop=[stop, "never"])
    assert res.text == TRICKY[:TRICKY.index(stop)]
    assert res.finish_reason == "stop" and res.stop_reason == stop
    streamed = [c.text for c in lm.stream("x", max_new_tokens=200, temperature=0, stop=stop)]
    assert "".join(streamed) == res.text
    assert not any(stop in c for c in streamed)


def test_partial_stop_match_is_released(gpt2):
    lm = scripted_lm(gpt2, "abc STOX def")
    res = lm.generate("x", max_new_tokens=50, temperature=0, stop="STOP")
    assert res.text == "abc STOX def" and res.stop_reason == lm.tokenizer.eos_token_id


def test_same_seed_same_text_and_batch_equals_alone(llama):
    kw = dict(max_new_tokens=20, temperature=1.0, seed=11)
    a, b = llama.generate("A story", **kw), llama.generate("A story", **kw)
    assert a.tokens == b.tokens and a.text == b.text
    assert llama.generate("A story", **{**kw, "seed": 12}).tokens != a.tokens
    batch = llama.generate(["Hello there, friend", "A story", "x"], **kw)
    assert batch[1].tokens == a.tokens and batch[1].index == 1
    assert "".join(c.text for c in llama.stream("A story", **kw)) == a.text


def test_greedy_batch_equals_alone(gpt2):
    prompts = ["Once upon a time there was", "A", "def main():\n    print("]
    batch = gpt2.generate(prompts, max_new_tokens=24, temperature=0, ignore_eos=True)
    # one result per prompt, in order (zip alone would pass on a short or empty batch)
    assert [r.index for r in batch] == [0, 1, 2] and all(len(r.tokens) == 24 for r in batch)
    for p, r in zip(prompts, batch):
        assert gpt2.generate(p, max_new_tokens=24, temperature=0, ignore_eos=True).tokens == r.tokens


def test_n_samples_share_one_prefill(llama):
    prompt = "Eu estou bem, obrigado. A little model"       # no other test's prompt starts so (prefix cache)
    plen = len(llama.encode(prompt))
    with Counting(llama) as c:
        res = llama.generate(prompt, n=4, max_new_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    assert len(res) == 4 and [r.sample for r in res] == [0, 1, 2, 3]
    assert c.calls[0] == (1, plen)                       # the prompt ran once
    assert all(shape == (4, 1) for shape in c.calls[1:])
    assert c.tokens == plen + 4 * 5
    assert len({tuple(r.tokens) for r in res}) > 1       # different samples
    assert res[2].tokens == llama.generate(prompt, max_new_tokens=6, temperature=1.0, seed=5,
                                           ignore_eos=True).tokens   # sample j uses seed + j


def test_finished_sequences_leave_the_batch(gpt2):
    res = gpt2.generate(["a b c", "hello"], max_new_tokens=8, temperature=0, ignore_eos=True)
    assert [len(r.tokens) for r in res] == [8, 8]
    stop = gpt2.tokenizer.decode(res[1].tokens[:2])           # ends "hello" after two tokens
    assert stop and stop not in gpt2.tokenizer.decode(res[0].tokens)
    with Counting() as c:
        out = gpt2.generate(["a b c", "hello"], max_new_tokens=8, temperature=0, ignore_eos=True, stop=stop)
    assert out[0].tokens == res[0].tokens and out[1].finish_reason == "stop" and len(out[1].tokens) == 2
    # both rows for one step, then "a b c" alone (the prompts ran first, one forward each)
    assert c.calls.count((2, 1)) == 1 and c.calls[-6:] == [(1, 1)] * 6 and len(c.calls) == 2 + 1 + 6


def test_context_overflow(gpt2):
    window = gpt2.context_length
    res = gpt2.generate("Once upon a time", max_new_tokens=3 * window, temperature=0.8, seed=1,
                        ignore_eos=True, context_overflow="slide")
    assert len(res.tokens) == 3 * window and res.finish_reason == "length"
    plen = len(res.prompt_tokens)
    capped = gpt2.generate("Once upon a time", max_new_tokens=window, temperature=0, ignore_eos=True)
    assert len(capped.tokens) == window - plen and capped.finish_reason == "length"
    with pytest.raises(ValueError, match="max_new_tokens .*context window"):       # at the door, before any work
        gpt2.generate("Once upon a time", max_new_tokens=window + 1)
    long_prompt = "word " * (2 * window)
    with pytest.raises(ValueError, match="context window"):
        gpt2.generate(long_prompt, max_new_tokens=5)
    slid = gpt2.generate(long_prompt, max_new_tokens=5, context_overflow="slide", temperature=0)
    assert len(slid.tokens) == 5


def test_logprobs(llama):
    res = llama.generate("A story", max_new_tokens=5, temperature=0, logprobs=3, ignore_eos=True)
    assert len(res.logprobs) == 5
    ids = torch.tensor([res.prompt_tokens + res.tokens])
    with torch.no_grad():
        lp = torch.log_softmax(llama.model(ids)[0].float(), -1)
    for i, entry in enumerate(res.logprobs):
        row = lp[len(res.prompt_tokens) - 1 + i]
        assert entry.token == res.tokens[i]
        assert math.isclose(entry.logprob, row[entry.token].item(), abs_tol=1e-4)
        assert entry.top[0][0] == entry.token            # greedy picks the top alternative
        assert len(entry.top) == 3 and entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]
    assert llama.generate("A story", max_new_tokens=2, temperature=0).logprobs is None


def test_reproducibility_record(llama):
    res = llama.generate("A story", max_new_tokens=4, temperature=0.7, top_k=5, seed=9, stop=["\n\n"])
    s = res.settings
    assert s["seed"] == 9 and s["model"] == llama.name and s["temperature"] == 0.7 and s["top_k"] == 5
    for name in ("top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                 "no_repeat_ngram_size", "logit_bias", "min_new_tokens", "max_new_tokens", "stop"):
        assert name in s, name
    again = llama.generate("A story", **{k: s[k] for k in ("max_new_tokens", "temperature", "top_k", "seed", "stop")})
    assert len(res.tokens) == 4 and again.tokens == res.tokens        # (two failed runs would be equal too)
    json.dumps(s)   # the record is JSON-serialisable


@pytest.mark.parametrize("kw, name", [
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"n": 0}, "n"),
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"min_p": 2.0}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"context_overflow": "wrap"}, "context_overflow"),
])
def test_bad_parameters(gpt2, kw, name):
    with pytest.raises(ValueError, match=name):
        gpt2.generate("hi", **kw)


def cli(*args, stdin=None):
    return subprocess.run([*CLI, "generate", *args], capture_output=True, text=True, input=stdin, timeout=300)


def test_cli_flags(tiny_checkpoint, tmp_path):
    m = str(tiny_checkpoint("gpt2"))
    out = cli("Once upon", "-m", m, "--max-new-tokens", "8", "--temperature", "0.8", "--seed", "4", "--top-k", "20",
              "--top-p", "0.9", "--repetition-penalty", "1.2", "-n", "2", "--json", "--logprobs", "2")
    assert out.returncode == 0, out.stderr
    recs = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(recs) == 2 and recs[0]["settings"]["top_k"] == 20 and len(recs[0]["logprobs"]) == len(recs[0]["tokens"])
    lm = prosa.load(m, dtype="float32")
    assert recs[0]["text"] == lm.generate("Once upon", max_new_tokens=8, temperature=0.8, seed=4, top_k=20,
                                          top_p=0.9, repetition_penalty=1.2).text
    streamed = cli("-", "-m", m, "--max-new-tokens", "8", "--temperature", "0", stdin="Once upon")
    assert streamed.returncode == 0 and streamed.stdout == lm.generate("Once upon", max_new_tokens=8, temperature=0).text + "\n"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon\nA story\n\nHello\n")
    dest = tmp_path / "out.jsonl"
    run = cli("--file", str(prompts), "--output", str(dest), "-m", m, "--max-new-tokens", "4", "--temperature", "0",
              "--stop", "zz", "--max-length", "30")
    assert run.returncode == 0, run.stderr
    recs = [json.loads(line) for line in dest.read_text().splitlines()]
    assert [r.get("prompt") for r in recs] == ["Once upon", "A story", None, "Hello"] and [r["index"] for r in recs] == [0, 1, 2, 3]


@pytest.mark.parametrize("args, word", [
    (["--temperature", "-1"], "temperature"), (["--top-p", "1.5"], "top_p"), (["--top-k", "-2"], "top_k"),
    (["-n", "0"], "n"), (["--max-new-tokens", "-1"], "max_new_tokens"), (["--temperature", "nan"], "temperature"),
])
def test_cli_bad_parameters_are_usage_errors(tiny_checkpoint, args, word):
    out = cli("hi", "-m", str(tiny_checkpoint("gpt2")), *args)
    assert out.returncode == 2, out.stderr
    assert "usage:" in out.stderr and word in out.stderr and "Traceback" not in out.stderr
