"""The fused decode step (``prosa.decode``) computes what the model's forward computes.

In float32 the two agree to rounding (the C++ block sums in another order). With int8/int4 weights the kernels
also quantize the activations to int8, so a rounding difference upstream can move one activation by one step:
logits then differ by up to ~1% of their range at rare positions, so those modes are compared on average and on
greedy text.
"""
from __future__ import annotations

import pytest
import torch

import prosa
from prosa import quant
from prosa.decode import decode_step
from prosa.engine.blocks import BlockPool
from prosa.engine.paged import PagedBatch

LLAMA_FAMILY = ["llama", "llama_linear", "qwen2", "mistral"]
# GPT-2 (fused q/k/v), GPT-Neo (local layers of window 7, unscaled scores), GPT-J (pair rotary on 6 of 16
# channels, parallel with one norm), GPT-NeoX (per-head q/k/v, partial half rotary), parallel and sequential
GPT_FAMILY = ["gpt2", "gpt_neo", "gptj", "gpt_neox", "gpt_neox_seq"]
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


def _pool(m, blocks=64):
    layers, heads, dim = m.kv_shape
    return BlockPool(layers, heads, dim, torch.float32, torch.device("cpu"), 4, blocks)


def _prefilled(m, steps):
    """A pool holding PROMPTS (run through the model), each row's blocks interleaved with the others' (tables
    are not contiguous), room for ``steps`` more tokens."""
    pool = _pool(m)
    need = [-(-(len(p) + steps) // 4) for p in PROMPTS]
    tables = [[] for _ in PROMPTS]
    for i in range(max(need)):
        for row, n in enumerate(need):
            if i < n:
                tables[row].append(pool.allocate())
    for p, table in zip(PROMPTS, tables):
        m(torch.tensor([p]), PagedBatch(pool, [table], [0]))
    return pool, tables


def _compare(lm, steps=20):
    """Max and mean |fused - model| / max|model| over ``steps`` decode steps of rows of different lengths, the
    model's forward reading its keys by gathering (PyTorch attention), the fused step by the C++ kernels."""
    m = lm.model
    step = decode_step(m)
    assert step is not m
    g = torch.Generator().manual_seed(0)
    worst, total = 0.0, 0.0
    with torch.inference_mode():
        (pa, tables), (pb, _) = _prefilled(m, steps), _prefilled(m, steps)
        starts = [len(p) for p in PROMPTS]
        for _ in range(steps):   # past mistral's window of 8 tokens
            tok = torch.randint(0, lm.tokenizer.vocab_size, (3, 1), generator=g)
            a = m(tok, PagedBatch(pa, tables, starts))
            b = step(tok, PagedBatch(pb, tables, starts, quant.kernels()))
            starts = [s + 1 for s in starts]
            assert a.shape == b.shape
            scale = a.abs().max().item()
            worst = max(worst, (a - b).abs().max().item() / scale)
            total += (a - b).abs().mean().item() / scale
    return worst, total / steps


def test_paged_cache_equals_the_plain_cache(tiny_checkpoint):
    """Rows of different lengths in the paged cache (gathering and C++ attention alike) give the logits each
    row gets alone in a plain KVCache."""
    for arch in ("gpt_neo", "gptj", "gpt_neox", "gpt2", "mistral"):
        m = prosa.load(tiny_checkpoint(arch), quantize="none").model
        with torch.inference_mode():
            for kernels in (None, quant.kernels()):
                pool, tables = _prefilled(m, 12)
                starts = [len(p) for p in PROMPTS]
                plain = [m.make_cache(1) for _ in PROMPTS]
                for p, c in zip(PROMPTS, plain):
                    m(torch.tensor([p]), c)
                for t in range(12):
                    tok = torch.tensor([[20 + t], [40 + t], [60 + t]])
                    out = m(tok, PagedBatch(pool, tables, starts, kernels))
                    starts = [s + 1 for s in starts]
                    for row, c in enumerate(plain):
                        ref = m(tok[row:row + 1], c)
                        assert torch.allclose(out[row], ref[0], atol=1e-5, rtol=1e-4), (arch, t, row)


@pytest.mark.parametrize("arch", LLAMA_FAMILY + GPT_FAMILY)
def test_fused_step_equals_the_model_in_float32(tiny_checkpoint, arch):
    worst, _ = _compare(prosa.load(tiny_checkpoint(arch), quantize="none"))
    assert worst < 1e-5


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("arch", LLAMA_FAMILY + GPT_FAMILY)
def test_fused_step_matches_the_model_with_integer_weights(tiny_checkpoint, arch, mode):
    worst, mean = _compare(prosa.load(tiny_checkpoint(arch), quantize=mode))
    assert worst < 0.05 and mean < 2e-3, (worst, mean)


@pytest.mark.parametrize("mode,agree", [("none", 32), ("int4", 12)])
def test_fused_greedy_text_equals_the_model(bundled_gguf, monkeypatch, mode, agree):
    """Same greedy text; with int4 only the first tokens are compared (an activation rounding flip can change a
    near-tie later: measured, one digit of one prompt at token 15)."""
    lm = prosa.load(bundled_gguf, quantize=mode)
    prompts = ["A story about a man and a dog", "The capital of France is", "def fib(n):"]
    fused = lm.generate(prompts, max_new_tokens=32, temperature=0, ignore_eos=True)
    assert lm.engine.runner.step is not lm.model
    monkeypatch.setenv("PROSA_FUSED", "0")
    plain = lm.generate(prompts, max_new_tokens=32, temperature=0, ignore_eos=True)
    assert lm.engine.runner.step is lm.model
    # all 32 tokens came on both paths (failed requests end with none, and [] == [] would pass)
    assert [len(r.tokens) for r in fused + plain] == [32] * 6
    assert [r.tokens[:agree] for r in fused] == [r.tokens[:agree] for r in plain]


def test_other_models_and_opt_out_use_the_model(tiny_checkpoint, monkeypatch):
    gpt2 = prosa.load(tiny_checkpoint("gpt2"), quantize="bf16")         # bfloat16 activations: not fused
    assert decode_step(gpt2.model) is gpt2.model
    llama = prosa.load(tiny_checkpoint("llama"), quantize="bf16")       # bfloat16 activations: not fused
    assert decode_step(llama.model) is llama.model
    monkeypatch.setenv("PROSA_FUSED", "0")
    llama = prosa.load(tiny_checkpoint("llama"), quantize="int4")
    assert decode_step(llama.model) is llama.model


def test_swapping_layers_rebuilds_the_step(tiny_checkpoint):
    from prosa import quant

    lm = prosa.load(tiny_checkpoint("llama"), quantize="none")
    first = decode_step(lm.model)
    quant.quantize_model(lm.model, "int8", 32)
    assert decode_step(lm.model) is not first
    assert decode_step(lm.model) is decode_step(lm.model)
    second = decode_step(lm.model)
    lm.model.model.norm.weight = torch.nn.Parameter(lm.model.model.norm.weight.detach().clone())   # a new tensor
    assert decode_step(lm.model) is not second


@pytest.mark.parametrize("arch", GPT_FAMILY)
def test_fused_gpt_family_greedy_text_equals_the_model(tiny_checkpoint, monkeypatch, arch):
    """Through the engine (prompt by the model, then the fused step), rows of different lengths in one batch."""
    lm = prosa.load(tiny_checkpoint(arch), quantize="none")
    prompts = ["A story about a man and a dog", "Olá", "def main():\n    print("]
    fused = lm.generate(prompts, max_new_tokens=24, temperature=0, ignore_eos=True)
    assert lm.engine.runner.step is not lm.model
    monkeypatch.setenv("PROSA_FUSED", "0")
    plain = lm.generate(prompts, max_new_tokens=24, temperature=0, ignore_eos=True)
    assert lm.engine.runner.step is lm.model
    assert [len(r.tokens) for r in fused + plain] == [24] * 6
    assert [r.tokens for r in fused] == [r.tokens for r in plain]
