"""Architecture registry: Hugging Face ``model_type`` -> the module that implements it."""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UnsupportedModelError

# model_type -> module under prosa.models. Mistral and Qwen2 are Llama with a window / biases (see llama.py).
MODEL_TYPES: dict[str, str] = {
    "gpt2": "gpt2",
    "gpt_neo": "gpt_neo",
    "gptj": "gptj",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}


def supported() -> list[str]:
    """The model_types prosa runs natively."""
    return sorted(MODEL_TYPES)


def get_module(model_type: str | None) -> ModuleType:
    """The module (with ``ModelArgs`` and ``Model``) for ``model_type``.

    Raises:
        UnsupportedModelError: the type is not implemented natively.
    """
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported natively; supported: {', '.join(supported())}. "
            "Install transformers (pip install transformers) to run it through the slower transformers path.")
    return importlib.import_module(f"{__name__}.{MODEL_TYPES[model_type]}")
