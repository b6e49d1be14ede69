"""Generation defaults: the one resolver every front-end uses (``lm.generate``/``lm.stream``, ``prosa generate``,
``prosa chat`` and ``Chat``, ``pipeline()``, ``prosa serve``).

A setting's value is, by precedence:

1. what the caller gave (a keyword argument, a flag, a request field, ``/set``);
2. what the model's ``generation_config.json`` states, read as transformers reads it: its sampling settings
   (temperature, top-k, top-p, min-p, typical-p) count only when it says ``do_sample: true`` (then an unstated
   top-k is transformers' 50); ``do_sample: false`` means greedy; repetition penalty, no-repeat n-gram size and
   ``max_new_tokens`` count either way;
3. the front-end's documented defaults (``FRONT_ENDS``): prosa's own (greedy, 128 new tokens) for the Python API,
   the CLI and chat; OpenAI's documented ones for the server; transformers' text-generation pipeline's for
   ``pipeline()``, whose contract is to behave as transformers' does.

Sampling settings not named anywhere are off (temperature 0 = greedy, top-k 0, top-p 1, ...).
"""
from __future__ import annotations

from typing import Any, Mapping

#: Settings a model's generation_config can set in prosa, and when (transformers' reading).
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "typical_p")      # only when do_sample is true
ALWAYS_KEYS = ("repetition_penalty", "no_repeat_ngram_size", "max_new_tokens")
TRANSFORMERS_TOP_K = 50       # GenerationConfig's top_k when a sampling config does not state one

#: Each front-end's documented defaults (the README's "Generation settings" table).
FRONT_ENDS: dict[str, dict[str, Any]] = {
    # lm.generate / lm.stream / Chat / prosa generate / prosa chat: transformers' generate() and mlx-lm: greedy
    "prosa": {"temperature": 0.0, "max_new_tokens": 128},
    # prosa serve: the OpenAI API's documented defaults (max_tokens is the endpoint's: 16 for completions, the
    # window for chat; the server sets it)
    "openai": {"temperature": 1.0, "top_p": 1.0},
    # pipeline(): transformers' TextGenerationPipeline._default_generation_config
    "pipeline": {"temperature": 0.7, "top_k": TRANSFORMERS_TOP_K, "max_new_tokens": 256},
}


def model_defaults(generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a model's generation_config states, transformers' way.

    Args:
        generation_config: the model's generation_config.json (possibly empty).
    Returns:
        prosa setting names -> values; empty when the config says nothing prosa uses.
    """
    gc, out = generation_config, {}
    if "do_sample" in gc:
        if gc["do_sample"]:
            out["temperature"] = float(gc.get("temperature") or 1.0)     # unset (or a meaningless 0): 1
            out["top_k"] = TRANSFORMERS_TOP_K
            out.update({k: gc[k] for k in SAMPLING_KEYS[1:] if gc.get(k) is not None})
        else:
            out["temperature"] = 0.0
    out.update({k: gc[k] for k in ALWAYS_KEYS if gc.get(k) is not None})
    return out


def resolve(generation_config: Mapping[str, Any], given: Mapping[str, Any], front_end: str = "prosa"
            ) -> dict[str, Any]:
    """Every setting's value: the caller's (``given``; None = not given), else the model's, else the front-end's.

    Args:
        generation_config: the model's generation_config.json.
        given: what the caller set; keys whose value is None count as not set.
        front_end: "prosa", "openai" or "pipeline" (``FRONT_ENDS``).
    Returns:
        the merged settings (only keys that one of the three layers names).
    """
    out = dict(FRONT_ENDS[front_end])
    out.update(model_defaults(generation_config))
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def samples(settings: Mapping[str, Any]) -> bool:
    """Whether resolved ``settings`` sample (temperature above 0) rather than decode greedily."""
    return float(settings.get("temperature") or 0.0) > 0
