"""Every native architecture against transformers (the oracle), on the tiny random checkpoints of ``tiny.SPECS``:
prompt logits, cached decoding, greedy generation, left-padded batches, and the weight formats.

Each architecture's checkpoint, transformers model and prosa model are built once per module. Greedy tokens may
only differ where the reference's two best logits are a near-tie, which float rounding alone may flip.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import prosa
import tiny
from tiny import left_pad
from prosa.loader import build_model

NAMES = list(tiny.SPECS)
TOL = 1e-4                 # max abs logit difference
TIE = 1e-4                 # a greedy mismatch is accepted only where the top-2 logits are this close
# ~22 tokens with the tiny BPE: longer than GPT-Neo's local window (7) and Mistral's sliding window (8).
PROMPT = "Once upon a time there was a little dog, Rex."
BATCH = ["Hello", "You: Do you like pizza?", PROMPT]     # 2, 9 and 22 tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads slow to a crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    """name -> (folder, transformers model, prosa LanguageModel), built once per architecture."""
    from transformers import AutoModelForCausalLM

    built = {}

    def get(name):
        if name not in built:
            folder = tiny_checkpoint(name)
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            built[name] = folder, hf, prosa.load(folder, dtype="float32")
        return built[name]

    return get


def ids_of(lm, text: str) -> torch.Tensor:
    return torch.tensor([lm.encode(text)])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def until_eos(tokens: list[int], eos: frozenset[int]) -> list[int]:
    """``tokens`` up to and including the first eos."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def assert_same_greedy(ours: list[int], theirs: list[int], prompt: list[int], logits_of) -> None:
    """Two greedy continuations of ``prompt`` are equal, unless they part where the reference logits
    (``logits_of(ids (1, T)) -> (1, T, V)``) have a near-tie between their two best tokens."""
    if ours == theirs:
        return
    i = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    with torch.inference_mode():
        last = logits_of(torch.tensor([prompt + theirs[:i]]))[0, -1].float()
    top2 = last.topk(2).values
    margin = (top2[0] - top2[1]).item()
    assert margin < TIE, f"continuations differ at step {i} (margin {margin:.2e}):\nours   {ours}\ntheirs {theirs}"


@pytest.mark.parametrize("name", NAMES)
def test_prompt_logits(pair, name):
    _, hf, lm = pair(name)
    ids = ids_of(lm, PROMPT)
    assert ids.shape[1] >= 16
    with torch.inference_mode():
        diff = max_diff(lm.model(ids), hf(ids).logits)
    assert diff < TOL, f"{name}: prompt logits differ by {diff:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_cached_decode_steps(pair, name):
    """Feed transformers' greedy tokens to both; every step's logits agree."""
    _, hf, lm = pair(name)
    seq = ids_of(lm, PROMPT)
    n = seq.shape[1]
    with torch.inference_mode():
        for _ in range(32):                                   # the reference's greedy continuation
            seq = torch.cat([seq, hf(seq).logits[:, -1:].argmax(-1)], dim=1)
        ref = hf(seq).logits                                  # (1, n + 32, V)
        cache = lm.model.make_cache(1)
        steps = [lm.model(seq[:, :n], cache)[:, -1]]
        steps += [lm.model(seq[:, i:i + 1], cache)[:, -1] for i in range(n, n + 32)]
    diffs = [max_diff(s, ref[:, n - 1 + i]) for i, s in enumerate(steps)]
    assert max(diffs) < TOL, f"{name}: step logits differ by up to {max(diffs):.2e} (step {diffs.index(max(diffs))})"


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation(pair, name):
    _, hf, lm = pair(name)
    prompt = lm.encode(PROMPT)
    eos = lm.tokenizer.eos_token_ids
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=32, pad_token_id=min(eos))
    theirs = until_eos(out[0, len(prompt):].tolist(), eos)
    ours = lm.generate(PROMPT, max_new_tokens=32, temperature=0).tokens
    assert len(ours) == 32 or ours[-1] in eos
    assert_same_greedy(until_eos(ours, eos), theirs, prompt, lambda ids: hf(ids).logits)


@pytest.mark.parametrize("name", NAMES)
def test_batch_generation_equals_single(pair, name):
    _, _, lm = pair(name)
    batched = lm.generate(BATCH, max_new_tokens=16, temperature=0)
    # one result per prompt (zip alone passes on fewer), each generated (two failed runs are equal: no tokens)
    assert [(r.index, r.finish_reason in ("length", "stop") and len(r.tokens) > 0) for r in batched] == \
        [(0, True), (1, True), (2, True)]
    for text, res in zip(BATCH, batched):
        alone = lm.generate(text, max_new_tokens=16, temperature=0)
        assert_same_greedy(res.tokens, alone.tokens, lm.encode(text), lm.model)


@pytest.mark.parametrize("name", NAMES)
def test_batched_logits_equal_unbatched(pair, name):
    """Left-padded prompts of different lengths, then 10 decode steps (past every window), match each prompt
    run alone."""
    _, _, lm = pair(name)
    prompts = [lm.encode(t) for t in BATCH]
    assert len({len(p) for p in prompts}) == 3
    ids, mask = left_pad(prompts, lm.tokenizer.pad_token_id or 0)
    assert mask is not None
    steps = torch.tensor([[5, 17, 40, 99, 3, 250, 7, 7, 120, 64]] * len(prompts))   # (B, 10) fed to every sequence
    with torch.inference_mode():
        cache = lm.model.make_cache(len(prompts))
        batched = [lm.model(ids, cache, mask)] + [lm.model(steps[:, i:i + 1], cache) for i in range(steps.shape[1])]
        for b, p in enumerate(prompts):
            cache = lm.model.make_cache(1)
            alone = lm.model(torch.tensor([p]), cache)                              # (1, T, V)
            diff = max_diff(batched[0][b, ids.shape[1] - len(p):], alone[0])
            for i in range(steps.shape[1]):
                diff = max(diff, max_diff(batched[i + 1][b], lm.model(steps[b:b + 1, i:i + 1], cache)[0]))
            assert diff < TOL, f"{name}: sequence {b} differs by {diff:.2e} batched"


@pytest.mark.parametrize("name", NAMES)
def test_no_meta_tensors_left(pair, name):
    _, _, lm = pair(name)
    tensors = itertools.chain(lm.model.parameters(), lm.model.buffers(), lm.model.state_dict().values())
    assert not any(t.is_meta for t in tensors)
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"


@pytest.mark.parametrize("name", NAMES)
def test_bin_and_sharded_checkpoints(pair, name, tmp_path):
    _, _, lm = pair(name)
    ids = ids_of(lm, PROMPT)
    bin_dir = tiny.make_checkpoint(name, tmp_path / "bin", safe_serialization=False)
    shard_dir = tiny.make_checkpoint(name, tmp_path / "sharded", max_shard_size="40KB")
    assert (bin_dir / "pytorch_model.bin").is_file() and not list(bin_dir.glob("*.safetensors"))
    assert (shard_dir / "model.safetensors.index.json").is_file()
    with torch.inference_mode():
        ref = lm.model(ids)
        for folder in (bin_dir, shard_dir):
            diff = max_diff(prosa.load(folder, dtype="float32").model(ids), ref)
            assert diff < 1e-5, f"{name}: {folder.name} checkpoint gives logits {diff:.2e} away from safetensors"


# Body prefix, and the buffers older transformers versions saved (causal masks, rotary frequencies).
LEGACY = {
    "gpt_neo": ("transformer.", ["h.0.attn.attention.bias", "h.1.attn.attention.masked_bias"]),
    "gptj": ("transformer.", ["h.0.attn.bias", "h.1.attn.masked_bias"]),
    "gpt_neox": ("gpt_neox.", ["layers.0.attention.bias", "layers.1.attention.masked_bias",
                               "layers.0.attention.rotary_emb.inv_freq"]),
}


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_old_checkpoint_names(pair, name):
    """Names without the body prefix (base-model checkpoints), ``lm_head`` for NeoX's ``embed_out`` and the
    legacy buffers all load into the same model."""
    from safetensors.torch import load_file

    folder, _, lm = pair(name)
    prefix, buffers = LEGACY[name]
    old = {k.removeprefix(prefix).replace("embed_out.", "lm_head."): v
           for k, v in load_file(folder / "model.safetensors").items()}
    old.update({b: torch.ones(1, 1, 4, 4, dtype=torch.bool) for b in buffers})
    model = build_model(lm.config)
    model.load_state_dict(model.sanitize(old), strict=True, assign=True)
    ids = ids_of(lm, PROMPT)
    with torch.inference_mode():
        assert max_diff(model.eval()(ids), lm.model(ids)) == 0
