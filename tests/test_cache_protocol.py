"""The cache protocol (``prosa.models.cache.Cache``): every prosa cache implements it, and the transformers
fallback's cache, which cannot, is refused by prosa's models (and the fallback refuses theirs) with a clear
TypeError instead of an AttributeError deep in a layer."""
from __future__ import annotations

import pytest
import torch

import prosa
from prosa.engine.paged import PagedBatch
from prosa.models.cache import Cache, KVCache, checked
from prosa.models.hf_fallback import TransformersCache, TransformersModel
from prosa.training.attention import PackedAttention

IDS = torch.tensor([[5, 17, 42, 99]])


def test_every_prosa_cache_implements_the_protocol():
    for cls in (KVCache, PagedBatch, PackedAttention):
        for method in ("begin", "attend"):
            assert callable(getattr(cls, method, None)), (cls, method)
    assert isinstance(KVCache(2, 1), Cache)
    assert isinstance(PackedAttention(torch.zeros(1, 4, dtype=torch.long)), Cache)
    assert not isinstance(TransformersCache(), Cache)
    cache = KVCache(2, 1)
    assert checked(cache) is cache


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_prosa_model_refuses_the_fallback_cache(tiny_checkpoint, arch):
    model = prosa.load(tiny_checkpoint(arch), dtype="float32", quantize="none").model
    with pytest.raises(TypeError, match="TransformersCache is not a prosa Cache .*lacks begin, attend"):
        model(IDS, cache=TransformersCache())
    assert model(IDS, cache=model.make_cache(1)).shape[:2] == (1, 4)        # its own cache still works


def test_the_fallback_refuses_a_prosa_cache(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("gpt2"), dtype=torch.float32).eval()
    model = TransformersModel(hf)
    with pytest.raises(TypeError, match="transformers fallback keeps transformers' own cache.*got KVCache"):
        model(IDS, cache=KVCache(2, 1))
    with torch.no_grad():
        assert model(IDS, cache=model.make_cache(1)).shape[:2] == (1, 4)
