"""Argument planning: a pipeline call's keywords -> one ``Plan`` (generation settings from ``genconfig`` plus the
pipeline's own parameters and prosa's extras), resolved once per call."""
from __future__ import annotations

import dataclasses
import enum
import logging
import numbers
from typing import TYPE_CHECKING, Any

import torch

from .genconfig import resolve_generation_settings

if TYPE_CHECKING:
    from .text_generation import TextGenerationPipeline

logger = logging.getLogger(__name__)

#: Parameters of the pipeline itself (``TextGenerationPipeline._sanitize_parameters``) and prosa's extras.
_PIPELINE_PARAMS = frozenset({
    "return_full_text", "return_tensors", "return_text", "return_type", "clean_up_tokenization_spaces", "prefix",
    "handle_long_generation", "stop_sequence", "truncation", "max_length", "continue_final_message",
    "skip_special_tokens", "tokenizer_encode_kwargs", "tools", "documents", "add_special_tokens", "padding",
})
_PROSA_PARAMS = frozenset({"stream", "seed", "stop", "logprobs", "context_overflow", "presence_penalty",
                           "frequency_penalty", "logit_bias", "bad_words", "ignore_eos"})
#: ``generate()`` arguments that are not generation-config keys.
_GENERATE_ARGS = frozenset({"streamer", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
                            "synced_gpus", "assistant_model", "negative_prompt_ids",
                            "negative_prompt_attention_mask", "custom_generate", "trust_remote_code", "tokenizer",
                            "assistant_tokenizer"})


class ReturnType(enum.Enum):
    """What each result holds (``transformers.pipelines.text_generation.ReturnType``)."""

    TENSORS = 0
    NEW_TEXT = 1
    FULL_TEXT = 2


@dataclasses.dataclass
class Plan:
    """Everything one call needs, resolved once."""

    sampled: bool
    n: int
    eff: dict[str, Any]                      # effective generation config
    has_default_max_length: bool
    max_new_tokens: int | None
    prefix_length: int
    eos: frozenset[int] | None               # None: the model has no eos (never stop on one)
    pad: int | None
    sampling: dict[str, Any]
    stop_strings: tuple[str, ...]            # stop_sequence / stop_strings: kept in the text
    prosa_stop: tuple[str, ...]              # prosa's stop: cut from the text
    seed: int | None
    logprobs: int | None
    context_overflow: str
    ignore_eos: bool
    max_time: float | None
    return_type: ReturnType
    skip_special_tokens: bool
    streamer: Any


def plan_call(pipe: TextGenerationPipeline, gen: dict[str, Any], params: dict[str, Any]) -> Plan:
    """Resolve a call's settings as ``Pipeline._prepare_generate_kwargs`` + ``generate()`` do.

    Args:
        pipe: the pipeline (its model, tokenizer, prefix and ``_default_generation_config``).
        gen: the call's generation keywords (and ``generation_config``), on top of the pipeline's.
        params: the call's other keywords: pipeline parameters, prosa's extras, ``generate()`` arguments.
    Returns:
        the ``Plan``.
    """
    unknown = sorted(k for k in params if k not in _PIPELINE_PARAMS | _PROSA_PARAMS | _GENERATE_ARGS
                     and params[k] is not None)
    if unknown:
        raise ValueError(f"The following `model_kwargs` are not used by the model: {unknown} (note: typos in the"
                         " generate arguments will also show up in this list)")
    unsupported_args = sorted(k for k in _GENERATE_ARGS - {"streamer", "tokenizer", "trust_remote_code"}
                              if params.get(k) is not None)
    if unsupported_args:
        raise NotImplementedError(f"prosa's pipeline does not support the generate() argument(s) "
                                  f"{', '.join(unsupported_args)}")
    defaults = dict(pipe._default_generation_config)
    if pipe.tokenizer.pad_token is not None and pipe.tokenizer.pad_token_id is not None:
        defaults["pad_token_id"] = pipe.tokenizer.pad_token_id

    def report_ignored(names: list[str]) -> None:       # once per pipeline: it is the model's own config
        if not pipe._warned_ignored:
            pipe._warned_ignored = True
            logger.warning(f"the model's generation config sets {', '.join(names)}, which prosa ignores")

    settings = resolve_generation_settings(pipe.model_generation_params(), gen, defaults,
                                           report_ignored=report_ignored)
    sampling = settings.sampling
    if params.get("logit_bias"):
        sampling["logit_bias"] = {**sampling.get("logit_bias", {}),
                                  **{int(k): float(v) for k, v in params["logit_bias"].items()}}
    for key in ("presence_penalty", "frequency_penalty"):
        if params.get(key) is not None:
            sampling[key] = params[key]
    if params.get("bad_words"):
        words = [params["bad_words"]] if isinstance(params["bad_words"], str) else params["bad_words"]
        extra = pipe.model.bad_words_ids(words) if hasattr(pipe.model, "bad_words_ids") else ()
        sampling["bad_words_ids"] = sampling["bad_words_ids"] + tuple(extra)

    stop_strings = settings.stop_strings
    if params.get("stop_sequence") is not None:
        stop_strings = params["stop_sequence"]
        stop_strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings or ())
    prosa_stop = params.get("stop")
    prosa_stop = (prosa_stop,) if isinstance(prosa_stop, str) else tuple(prosa_stop or ())

    seed = params.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if seed is None and settings.sampled:   # follow torch's global RNG (torch.manual_seed / transformers.set_seed)
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())

    eff, has_default_max_length = settings.eff, settings.has_default_max_length
    prefix = params.get("prefix")
    if prefix is None:
        prefix = pipe.prefix
    prefix_length = 0
    if prefix:
        special = bool(params.get("add_special_tokens"))
        prefix_length = len(pipe.tokenizer.encode(prefix, add_special_tokens=special))
        for length, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            if length in settings.set_params and new_tokens not in settings.set_params:
                eff[length] = eff[length] + prefix_length
                if length == "max_length":
                    has_default_max_length = False
    return Plan(
        sampled=settings.sampled, n=settings.n, eff=eff, has_default_max_length=has_default_max_length,
        max_new_tokens=settings.max_new_tokens, prefix_length=prefix_length, eos=settings.eos, pad=settings.pad,
        sampling=sampling, stop_strings=stop_strings, prosa_stop=prosa_stop, seed=None if seed is None else int(seed),
        logprobs=params.get("logprobs"), context_overflow=params.get("context_overflow") or "error",
        ignore_eos=bool(params.get("ignore_eos")), max_time=settings.max_time, return_type=_return_type(params),
        skip_special_tokens=params.get("skip_special_tokens") is None or bool(params["skip_special_tokens"]),
        streamer=params.get("streamer"))


def alias_n(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with prosa's ``n`` turned into ``num_return_sequences`` (an error when both disagree)."""
    kwargs = dict(kwargs)
    n = kwargs.pop("n")
    if n is not None:
        other = kwargs.get("num_return_sequences")
        if other is not None and other != n:
            raise ValueError(f"n={n} and num_return_sequences={other} disagree; pass one of them")
        kwargs["num_return_sequences"] = n
    return kwargs


def _return_type(params: dict[str, Any]) -> ReturnType:
    """``TextGenerationPipeline._sanitize_parameters``'s return-type rules."""
    full, tensors, text, rtype = (params.get("return_full_text"), params.get("return_tensors"),
                                  params.get("return_text"), params.get("return_type"))
    if full is not None and rtype is None:
        if text is not None:
            raise ValueError("`return_text` is mutually exclusive with `return_full_text`")
        if tensors is not None:
            raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
        rtype = ReturnType.FULL_TEXT if full else ReturnType.NEW_TEXT
    if tensors is not None and rtype is None:
        if text is not None:
            raise ValueError("`return_text` is mutually exclusive with `return_tensors`")
        rtype = ReturnType.TENSORS
    if rtype is None:
        return ReturnType.FULL_TEXT
    if isinstance(rtype, ReturnType):
        return rtype
    if isinstance(rtype, str) and rtype.upper() in ReturnType.__members__:
        return ReturnType[rtype.upper()]
    try:
        return ReturnType(getattr(rtype, "value", rtype))
    except ValueError:
        raise ValueError(f"return_type must be a ReturnType (TENSORS, NEW_TEXT, FULL_TEXT), got {rtype!r}") from None
