"""Generation settings as transformers resolves them: the generation-config tables, and
``resolve_generation_settings``, which turns a model's generation config plus a caller's generation keywords into
prosa's sampling settings.

Layers, lowest first (``generation/utils.py`` ``_prepare_generation_config``, ``pipelines/base.py``
``_prepare_generate_kwargs``): transformers' global defaults (``GLOBAL_DEFAULTS``) <- the model's generation config
(``model_generation_params``) <- the caller's ``generation_config`` <- the caller's generation keywords. A caller's
``defaults`` (the pipeline's ``PIPELINE_DEFAULTS``) fill in only what no layer above the global defaults sets.
Values are checked where transformers checks them, with its messages.

Imports nothing from the rest of ``prosa.pipeline``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..defaults import FRONT_ENDS

logger = logging.getLogger(__name__)

#: transformers 5.24 ``GenerationConfig`` attributes (``vars(GenerationConfig())``, public ones).
GENERATION_KEYS = frozenset({
    "assistant_confidence_threshold", "assistant_early_exit", "assistant_ensemble_weight", "assistant_lookbehind",
    "bad_words_ids", "begin_suppress_tokens", "bos_token_id", "cache_config", "cache_implementation",
    "compile_config", "constraints", "continuous_batching_config", "decoder_start_token_id", "disable_compile",
    "diversity_penalty", "do_sample", "dola_layers", "early_stopping", "encoder_no_repeat_ngram_size",
    "encoder_repetition_penalty", "eos_token_id", "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty",
    "force_words_ids", "forced_bos_token_id", "forced_eos_token_id", "guidance_scale", "is_assistant",
    "length_penalty", "low_memory", "max_cache_len", "max_length", "max_matching_ngram_size", "max_new_tokens",
    "max_time", "min_length", "min_new_tokens", "min_p", "no_repeat_ngram_size", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "num_beam_groups", "num_beams", "num_return_sequences", "output_attentions",
    "output_hidden_states", "output_logits", "output_scores", "pad_token_id", "penalty_alpha", "prefill_chunk_size",
    "prompt_lookup_num_tokens", "remove_invalid_values", "renormalize_logits", "repetition_penalty",
    "return_dict_in_generate", "sequence_bias", "speculation_type", "stop_strings", "suppress_tokens",
    "target_lookbehind", "temperature", "token_healing", "top_h", "top_k", "top_p", "transformers_version",
    "typical_p", "use_cache", "use_mtp", "watermarking_config",
})

#: ``GenerationConfig._get_default_generation_params()`` (the generation-relevant part).
GLOBAL_DEFAULTS: dict[str, Any] = {
    "max_length": 20, "min_length": 0, "do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 50,
    "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
    "bad_words_ids": None, "num_return_sequences": 1, "early_stopping": False, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "output_scores": False, "return_dict_in_generate": False,
    "remove_invalid_values": False,
}

#: ``TextGenerationPipeline._default_generation_config`` (text_generation.py), in transformers' terms: the
#: "pipeline" front-end's row of ``prosa.defaults.FRONT_ENDS`` (the top-k 50 comes from ``GLOBAL_DEFAULTS``).
PIPELINE_DEFAULTS: dict[str, Any] = {"max_new_tokens": FRONT_ENDS["pipeline"]["max_new_tokens"], "do_sample": True,
                                     "temperature": FRONT_ENDS["pipeline"]["temperature"]}

#: Pipeline defaults that only apply when sampling (``base.py`` ``_prepare_generate_kwargs``).
_SAMPLING_PARAMS = frozenset({"temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff",
                              "eta_cutoff"})

#: Generation parameters prosa does not implement, with the value at which they do nothing.
_UNSUPPORTED: dict[str, Any] = {
    "top_h": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "token_healing": False, "guidance_scale": 1.0, "watermarking_config": None,
    "output_scores": False, "output_logits": False, "return_dict_in_generate": False, "penalty_alpha": None,
    "dola_layers": None, "constraints": None, "force_words_ids": None, "prompt_lookup_num_tokens": None,
    "assistant_early_exit": None, "use_mtp": False, "speculation_type": None, "assistant_ensemble_weight": None,
    "max_matching_ngram_size": None,
}
#: Parameters transformers ignores (with a warning) unless beam search is on.
_BEAM_ONLY = ("early_stopping", "length_penalty", "num_beam_groups", "diversity_penalty")


@dataclasses.dataclass
class GenerationSettings:
    """The outcome of ``resolve_generation_settings``."""

    eff: dict[str, Any]                      # effective generation config (every layer merged)
    set_params: dict[str, Any]               # what the model and the caller set (no defaults of any kind)
    has_default_max_length: bool             # no layer above the global defaults sets max_length
    sampled: bool
    n: int                                   # num_return_sequences
    max_new_tokens: int | None
    sampling: dict[str, Any]                 # keywords of prosa's SamplingParams (temperature 0: greedy)
    eos: frozenset[int] | None               # None: the model has no eos (never stop on one)
    pad: int | None
    stop_strings: tuple[str, ...]            # stop_strings: kept in the text
    max_time: float | None


def model_generation_params(lm: Any, task: str = "text-generation",
                            use_task_specific_params: bool = True) -> dict[str, Any]:
    """The model's generation settings as transformers reads them.

    Args:
        lm: a ``prosa.LanguageModel`` (``generation_config``, ``config``, ``path``).
        task: the key of ``config.json``'s ``task_specific_params`` to apply.
        use_task_specific_params: apply ``task_specific_params[task]`` on top (transformers 4.x).
    Returns:
        ``generation_config.json`` (or, for a folder without one, the generation keys of ``config.json``), non-null
        values only (``to_diff_dict``), with the task-specific parameters on top when asked.
    """
    gc = dict(lm.generation_config or {})
    path = getattr(lm, "path", None)
    no_file = (path is not None and Path(path).is_dir() and not (Path(path) / "generation_config.json").exists()) \
        or (path is None and not gc)
    if no_file:        # GenerationConfig.from_model_config(config.json)
        gc = {k: v for k, v in (lm.config or {}).items() if k in GENERATION_KEYS}
    params = {k: v for k, v in gc.items() if k in GENERATION_KEYS and k != "transformers_version" and v is not None}
    if use_task_specific_params:
        task_params = ((lm.config or {}).get("task_specific_params") or {}).get(task) or {}
        params.update({k: v for k, v in task_params.items() if k in GENERATION_KEYS})
    return params


def resolve_generation_settings(model_params: Mapping[str, Any], call: Mapping[str, Any],
                                defaults: Mapping[str, Any] = PIPELINE_DEFAULTS, *,
                                report_ignored: Callable[[list[str]], None] | None = None) -> GenerationSettings:
    """Resolve a call's generation settings as ``Pipeline._prepare_generate_kwargs`` + ``generate()`` do.

    Args:
        model_params: the model's generation config (``model_generation_params``).
        call: the caller's generation keywords (``GENERATION_KEYS``), and optionally ``generation_config`` (a
            transformers ``GenerationConfig`` or a dict) whose non-null values sit between the model's and them.
        defaults: settings used only when nothing above the global defaults sets them (``max_new_tokens`` also not
            when ``max_length`` is set; sampling parameters only when sampling).
        report_ignored: called with the unsupported parameters the model's own config sets (which are ignored);
            default: a warning.
    Returns:
        the ``GenerationSettings``.
    Raises:
        NotImplementedError: the caller asked for something prosa does not implement (beam search, ...).
        ValueError: a value transformers refuses, with its message.
    """
    user_gc = _config_dict(call.get("generation_config"))
    user = {k: v for k, v in call.items() if k != "generation_config"}
    model_gc = dict(model_params)
    set_params = {**model_gc, **user_gc, **user}
    added = {k: v for k, v in defaults.items()
             if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
    if not {**set_params, **added}.get("do_sample"):
        added = {k: v for k, v in added.items() if k not in _SAMPLING_PARAMS}
    eff = {**GLOBAL_DEFAULTS, **model_gc, **user_gc, **user, **added}
    has_default_max_length = (user.get("max_length") is None and user_gc.get("max_length") is None
                              and model_gc.get("max_length") is None)

    # Things prosa cannot do: error for what the caller asked, a warning for the model's own defaults.
    asked = {**user_gc, **user}
    bad = sorted(k for k, neutral in _UNSUPPORTED.items() if eff.get(k, neutral) not in (neutral, None)
                 and not (neutral is False and not eff.get(k)))
    if eff.get("num_beams") not in (None, 1):
        bad.insert(0, "num_beams")
    bad_asked = [k for k in bad if k in asked]
    if bad_asked:
        raise NotImplementedError(
            f"prosa's pipeline does not implement the generation parameter(s) "
            f"{', '.join(f'{k}={eff[k]!r}' for k in bad_asked)} (beam search, contrastive search, forced or "
            "suppressed tokens ...); leave them out")
    if bad:
        if report_ignored is None:
            logger.warning(f"the model's generation config sets {', '.join(bad)}, which prosa ignores")
        else:
            report_ignored(bad)
    for key in _BEAM_ONLY:
        if key in asked and eff.get(key) not in (None, GLOBAL_DEFAULTS[key]):
            logger.warning(f"`num_beams` is set to 1. However, `{key}` is set to `{eff[key]}` -- this flag is "
                           f"only used in beam-based generation modes. You should set `num_beams>1` or unset "
                           f"`{key}`.")

    sampled = bool(eff.get("do_sample"))
    n = eff.get("num_return_sequences") or 1
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"num_return_sequences must be an integer, got {n!r}")
    n = int(n)
    if n > 1 and not sampled:
        raise ValueError("Greedy methods (do_sample != True) without beam search do not support "
                         f"`num_return_sequences` different than 1 (got {n}).")
    max_new = eff.get("max_new_tokens")
    if max_new is not None and max_new <= 0:
        raise ValueError(f"`max_new_tokens` must be greater than 0, but is {max_new}.")
    if max_new is not None and not has_default_max_length and eff.get("max_length") is not None:
        logger.warning(f"Both `max_new_tokens` (={max_new}) and `max_length`(={eff['max_length']}) seem to have "
                       "been set. `max_new_tokens` will take precedence. Please refer to the documentation for "
                       "more information. (https://huggingface.co/docs/transformers/main/en/main_classes/"
                       "text_generation)")

    sampling = _sampling_params(eff, sampled)
    bias = _sequence_bias(eff.get("sequence_bias"))
    if bias:
        sampling["logit_bias"] = bias
    eos_value = eff.get("eos_token_id")
    eos = None if eos_value is None else frozenset(_ids(eos_value))
    pad = eff.get("pad_token_id")
    if pad is None and eos:
        pad = _ids(eos_value)[0]
    stop_strings = eff.get("stop_strings")
    stop_strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings or ())
    return GenerationSettings(
        eff=eff, set_params=set_params, has_default_max_length=has_default_max_length, sampled=sampled, n=n,
        max_new_tokens=max_new, sampling=sampling, eos=eos, pad=pad, stop_strings=stop_strings,
        max_time=eff.get("max_time"))


def _config_dict(config: Any) -> dict[str, Any]:
    """Non-null settings of a generation config given as a transformers ``GenerationConfig`` or a dict."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        data = dict(config)
    elif hasattr(config, "to_diff_dict"):
        data = config.to_diff_dict()
    elif hasattr(config, "to_dict"):
        data = config.to_dict()
    else:
        raise TypeError(f"generation_config must be a GenerationConfig or a dict, got {type(config).__name__}")
    return {k: v for k, v in data.items() if k in GENERATION_KEYS and k != "transformers_version" and v is not None}


def _ids(value: Any) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return [int(v) for v in (value if isinstance(value, (list, tuple, set, frozenset)) else [value])]


def _sampling_params(eff: dict[str, Any], sampled: bool) -> dict[str, Any]:
    """prosa's sampling settings for an effective transformers generation config. Values are checked where
    transformers' processors check them, with their messages: only when the processor is active (``top_p=1.5``
    is "off", ``top_p=-0.1`` an error). Integer values are accepted where transformers insists on floats."""
    out: dict[str, Any] = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0}
    penalty = eff.get("repetition_penalty")
    if penalty is not None and penalty != 1.0 and not (_real(penalty) and penalty > 0):
        raise ValueError(f"`penalty` has to be a strictly positive float, but is {penalty}")
    out["repetition_penalty"] = 1.0 if penalty is None else float(penalty)
    ngram = eff.get("no_repeat_ngram_size")
    if ngram is not None and _real(ngram) and ngram > 0 and not _integer(ngram):
        raise ValueError(f"`ngram_size` has to be a strictly positive integer, but is {ngram}")
    out["no_repeat_ngram_size"] = int(ngram) if ngram is not None and _real(ngram) and ngram > 0 else 0
    words = eff.get("bad_words_ids")
    if words is not None:
        if not isinstance(words, (list, tuple)) or len(words) == 0:
            raise ValueError(f"`bad_words_ids` has to be a non-empty list, but is {words}.")
        if any(not isinstance(w, (list, tuple)) for w in words):
            raise ValueError(f"`bad_words_ids` has to be a list of lists, but is {words}.")
        if any(any(not _integer(t) or t < 0 for t in w) for w in words):
            raise ValueError(f"Each list in `bad_words_ids` has to be a list of positive integers, but is {words}.")
    out["bad_words_ids"] = tuple(tuple(int(t) for t in w) for w in (words or ()) if w)
    if not sampled:                 # warpers only act when sampling (greedy: temperature 0)
        return out
    temperature = eff.get("temperature")
    out["temperature"] = 1.0
    if temperature is not None and temperature != 1.0:
        if not (_real(temperature) and temperature > 0):
            message = (f"`temperature` (={temperature}) has to be a strictly positive float, otherwise your next token "
                       "scores will be invalid.")
            if _real(temperature) and temperature == 0:
                message += " If you're looking for greedy decoding strategies, set `do_sample=False`."
            raise ValueError(message)
        out["temperature"] = float(temperature)
    top_k = eff.get("top_k")
    if top_k is not None and top_k != 0:
        if not (_integer(top_k) and top_k > 0):
            raise ValueError(f"`top_k` has to be a strictly positive integer, but is {top_k}")
        out["top_k"] = int(top_k)
    top_p = eff.get("top_p")
    if top_p is not None and float(top_p) < 1.0:
        if float(top_p) < 0:
            raise ValueError(f"`top_p` has to be a float > 0 and < 1, but is {float(top_p)}")
        out["top_p"] = max(float(top_p), sys.float_info.min)     # 0 keeps the most likely token only
    min_p = eff.get("min_p")
    if min_p is not None:
        if not (0 <= min_p <= 1.0):
            raise ValueError(f"`min_p` has to be a float in the [0, 1] interval, but is {min_p}")
        out["min_p"] = float(min_p)
    typical_p = eff.get("typical_p")
    if typical_p is not None and float(typical_p) < 1.0:
        if not float(typical_p) > 0:
            raise ValueError(f"`typical_p` has to be a float > 0 and < 1, but is {float(typical_p)}")
        out["typical_p"] = float(typical_p)
    return out


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(float(value))


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _sequence_bias(bias: Any) -> dict[int, float]:
    """transformers' ``sequence_bias`` ({(ids...): bias} or [[[ids], bias], ...]) -> prosa's logit_bias; only
    single-token sequences are supported."""
    if not bias:
        return {}
    pairs = bias.items() if isinstance(bias, Mapping) else [(tuple(k), v) for k, v in bias]
    out: dict[int, float] = {}
    for ids, value in pairs:
        ids = tuple(ids) if isinstance(ids, (list, tuple)) else (ids,)
        if len(ids) != 1:
            raise NotImplementedError("prosa supports sequence_bias for single tokens only; got a bias for "
                                      f"the sequence {list(ids)}")
        out[int(ids[0])] = float(value)
    return out
