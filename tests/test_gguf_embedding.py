"""A GGUF's token embedding kept in the file's blocks (``QuantizedEmbedding``) in the int8/int4 formats: lookups,
logits and the state dict equal the float table's; it stays float where a float output layer is made from it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

import prosa  # noqa: E402
from prosa.weights.gguf import load_gguf  # noqa: E402
from prosa.weights.gguf_embedding import QuantizedEmbedding  # noqa: E402
from test_gguf import bpe_metadata, bpe_vocab, llama_file  # noqa: E402,F401  (bpe_vocab: the fixture)

# (embedding type, tied, format) -> kept in blocks? A tied output layer is repacked from the embedding's blocks
# where they are its format (Q4_x in int4, Q8_0 in either); otherwise it is quantized from the float table, which
# must then be made.
CASES = [("Q8_0", True, "int4", True), ("Q4_0", True, "int4", True), ("Q4_1", True, "int4", True),
         ("Q5_0", True, "int4", False), ("Q4_1", True, "int8", False), ("Q5_1", False, "int4", True),
         ("Q4_0", False, "int8", True)]


@pytest.mark.parametrize("kind,tied,fmt,kept", CASES)
def test_embedding_kept_in_its_blocks_equals_the_float_table(tmp_path, bpe_vocab, kind, tied, fmt, kept):
    vocab = len(bpe_vocab[0])
    path, _ = llama_file(tmp_path / "m.gguf", bpe_metadata(bpe_vocab, "qwen2"), vocab, tied=tied, quantized=True,
                         embed_qtype=Q[kind])
    table = dict(load_gguf(path).tensors())["model.embed_tokens.weight"]          # (V, C) float32, dequantized
    lm = prosa.load(str(path), quantize=fmt)
    emb = lm.model.model.embed_tokens
    assert isinstance(emb, QuantizedEmbedding) is kept
    ids = torch.arange(vocab).flip(0)[None]                                      # (1, V): every row
    assert torch.equal(emb(ids), table.flip(0)[None])
    if not kept:
        return
    block, block_bytes = gguf.GGML_QUANT_SIZES[Q[kind]]
    assert emb.blocks.dtype == torch.uint8 and emb.blocks.numel() == table.numel() // block * block_bytes
    assert torch.equal(lm.model.state_dict()["model.embed_tokens.weight"], table)     # what exports read
    prompt = [5, 9, 2, 31, 7, 3]
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt]))
    greedy = lm.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True).tokens
    lm.model.model.embed_tokens = nn.Embedding.from_pretrained(table)     # the float table: the same everything
    with torch.inference_mode():
        assert torch.equal(lm.model(torch.tensor([prompt])), logits)
    assert lm.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True).tokens == greedy


def test_bundled_model_keeps_its_embedding_quantized(bundled_gguf):
    """The bundled SmolLM2 (tied, Q8_0 embedding, Q4_1 elsewhere): the embedding stays 30 MB of blocks instead of
    113 MB of float32, and the fused decode step still runs."""
    from prosa import decode

    lm = prosa.load(str(bundled_gguf))
    emb = lm.model.model.embed_tokens
    assert isinstance(emb, QuantizedEmbedding) and emb.ggml_type == "Q8_0"
    assert emb.blocks.numel() == 49152 * 576 // 32 * 34
    assert decode.decode_step(lm.model) is not lm.model


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_kernel_rows_equal_torch_rows(monkeypatch, kind):
    """The C++ lookup (``gguf_rows``) and the torch fallback both give exactly gguf-py's dequantized rows; an id
    out of range is an IndexError, as with ``nn.Embedding``."""
    from gguf import quants

    from prosa.quant import extension

    rng = torch.Generator().manual_seed(0)
    table = torch.randn(50, 96, generator=rng)
    blocks = torch.from_numpy(quants.quantize(table.numpy(), Q[kind])).view(torch.uint8).reshape(50, -1)
    expected = torch.from_numpy(quants.dequantize(blocks.numpy(), Q[kind]))
    emb = QuantizedEmbedding(blocks.clone(), kind, 96, torch.float32)
    ids = torch.tensor([[3, 49, 0], [7, 7, 21]])
    if extension.kernels() is not None:
        assert torch.equal(emb(ids), expected[ids])
        with pytest.raises(IndexError):
            emb(torch.tensor([50]))
    monkeypatch.setattr(extension, "_ext", None)
    monkeypatch.setattr(extension, "kernels", lambda: None)
    assert torch.equal(emb(ids), expected[ids])
    with pytest.raises(IndexError):
        emb(torch.tensor([50]))


@pytest.mark.parametrize("kind,fmt,symmetric", [("Q5_0", "int4", True), ("Q4_1", "int8", False)])
def test_output_layer_requantized_from_a_symmetric_type_is_symmetric(tmp_path, bpe_vocab, kind, fmt, symmetric):
    """A tied output layer made from the float table is int8 with no minimum when the file's type has none (Q5_0,
    Q6_K...: the faster kernel, no less exact), with a minimum otherwise (Q4_1); either is the table to int8
    rounding."""
    vocab = len(bpe_vocab[0])
    path, _ = llama_file(tmp_path / "m.gguf", bpe_metadata(bpe_vocab, "qwen2"), vocab, tied=True, quantized=True,
                         embed_qtype=Q[kind])
    table = dict(load_gguf(path).tensors())["model.embed_tokens.weight"]
    head = prosa.load(str(path), quantize=fmt).model.lm_head
    assert head.bits == 8 and ("mins" not in head._buffers) is symmetric
    step = table.abs().reshape(vocab, -1, 32).amax(-1, keepdim=True) / 127          # a symmetric int8 step
    err = (head.dequantize() - table).abs().reshape(vocab, -1, 32)
    assert (err <= step * 0.5 + 1e-3 * step.max()).all()


def test_lookups_follow_the_models_dtype():
    """``model.to(dtype)`` converts what a lookup returns, as it would an ``nn.Embedding``'s table; the blocks
    stay bytes."""
    blocks = torch.zeros(4, 34, dtype=torch.uint8)
    model = nn.Sequential(QuantizedEmbedding(blocks, "Q8_0", 32, torch.float32))
    assert model(torch.tensor([1])).dtype == torch.float32
    model.to(torch.bfloat16)
    assert model(torch.tensor([1])).dtype == torch.bfloat16 and model[0].blocks.dtype == torch.uint8
    model.float()
    assert model(torch.tensor([1])).dtype == torch.float32
