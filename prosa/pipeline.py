"""``pipeline("text-generation", model=...)``: transformers' text-generation pipeline, run by prosa's engine.

Code written for ``transformers.pipeline`` runs unchanged except the import::

    from prosa import pipeline

    generator = pipeline('text-generation', model='gpt2')
    generated = generator("A story about a man and a dog", max_length=100, num_return_sequences=1)
    for sequence in generated:
        print(sequence['generated_text'])

It reproduces the observable behaviour of transformers 5.24's ``TextGenerationPipeline`` (inputs, outputs and
their types, argument handling, defaults and their precedence, error messages); greedy output is token for token
the same. What it does, with the transformers source it follows:

* **Inputs** (``pipelines/base.py`` ``Pipeline.__call__``): a string -> ``[{"generated_text": str}, ...]`` (one
  dict per returned sequence); a list of strings -> a list of such lists; a chat (a list of
  ``{"role", "content"}`` dicts) -> ``[{"generated_text": messages + [{"role": "assistant", "content": reply}]}]``;
  a list of chats -> a list of such lists; a generator -> a lazy iterator of results.
* **Outputs** (``text_generation.py`` ``postprocess``): the continuation is ``decode(new token ids,
  skip_special_tokens=True)``; ``return_full_text`` (default True) puts the prompt string (without ``prefix``)
  in front, or for a chat appends the reply as an assistant message (or extends the final message when
  ``continue_final_message``); ``return_full_text=False`` gives the continuation alone (a string, chats
  included); ``return_tensors=True`` gives ``{"generated_token_ids": prompt ids + new ids}``. ``return_text``
  only conflicts with the others, as in transformers.
* **Generation settings** (``base.py`` ``_prepare_generate_kwargs``, ``generation/utils.py``
  ``_prepare_generation_config``/``_prepare_generated_length``/``_validate_generated_length``): a call's
  parameters, on top of those given to ``pipeline(...)`` (a call's ``generation_config`` replaces the latter), on
  top of the model's ``generation_config.json`` (or, when the folder has none, the generation keys of
  ``config.json``), on top of the pipeline defaults ``max_new_tokens=256, do_sample=True, temperature=0.7`` (each
  used only when nothing above sets it; ``max_new_tokens`` also not when ``max_length`` is set anywhere;
  ``temperature`` only when sampling), on top of transformers' global defaults (``max_length=20`` total,
  ``top_k=50``, ``top_p=1.0``, ...). ``max_new_tokens`` wins over ``max_length`` (the total length, prompt
  included); ``min_new_tokens`` over ``min_length``. ``do_sample=False`` is greedy whatever the temperature.
  ``task_specific_params["text-generation"]`` in ``config.json`` (e.g. GPT-2's ``do_sample: true, max_length: 50``)
  apply over ``generation_config.json``, as transformers 4.x applied them and as the tutorials people copy
  expect; transformers 5.x dropped that, and ``pipeline(..., use_task_specific_params=False)`` does the same.
* **Errors** as transformers raises them (same types and messages): greedy with ``num_return_sequences > 1``, a
  prompt at least ``max_length`` long, ``max_new_tokens <= 0``, ``temperature <= 0`` with ``do_sample``,
  ``return_full_text``/``return_text``/``return_tensors`` together, and parameters that are neither pipeline nor
  generation parameters (``ValueError: The following `model_kwargs` are not used by the model: [...]``).
  Generation parameters prosa does not implement (beam search, contrastive search, ``suppress_tokens``, ...) raise
  ``NotImplementedError`` naming them instead of being silently ignored.

prosa extras: ``stream=True`` (an iterator of text pieces instead of the result list, see
``TextGenerationPipeline.__call__``), ``seed``, ``stop`` (strings that end generation and are left out of the
text; ``stop_sequence`` keeps them, as in transformers), ``logprobs``, ``context_overflow``, ``n`` (alias of
``num_return_sequences``), ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``bad_words``,
``ignore_eos``.

Deviations from transformers, all deliberate:

* A list of prompts is decoded as one prosa batch (``batch_size`` caps how many run together; default: all), and
  every sequence gives the tokens it would alone. transformers runs prompts one by one by default, and with
  ``batch_size > 1`` needs a pad token and returns left padding inside ``generated_token_ids``; prosa never does.
  Sequences are padded with ``pad_token_id`` only among one prompt's ``num_return_sequences`` samples.
* Generation stops at the model's context window (``finish_reason`` "length"; ``context_overflow="slide"`` goes
  on); transformers runs past it and crashes (GPT-2: ``IndexError``) or degrades. Likewise ``truncation=True``
  without ``max_length`` and ``handle_long_generation="hole"`` use the context window where transformers uses
  the tokenizer's ``model_max_length``.
* Sampling uses prosa's per-sequence generators: the text differs from transformers' for the same
  ``torch.manual_seed``, but ``torch.manual_seed`` (or ``seed=``) still makes a call repeatable.
* ``task_specific_params``: ignored as in transformers 5.x, or applied on request (see above).
* Integer values are accepted where transformers' processors insist on floats (``temperature=2``,
  ``repetition_penalty=2``).
* Generation parameters and ``generate()`` arguments prosa does not implement raise ``NotImplementedError``
  (``num_beams > 1``, ``penalty_alpha``, ``suppress_tokens``, ``forced_*_token_id``, ``epsilon_cutoff``,
  ``output_scores``, custom ``logits_processor``/``stopping_criteria``, an ``assistant_model`` ...); set in the
  model's own generation config they are ignored with a warning. Beam-only settings (``length_penalty``,
  ``early_stopping``) are ignored with a warning, as transformers does without beam search.
* ``clean_up_tokenization_spaces`` is ignored (transformers 5 ignores it for BPE tokenizers too); chat replies are
  never parsed with a tokenizer ``response_template`` (transformers' tool-call parsing).
* An empty list gives ``[]`` (transformers raises ``IndexError``).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import math
import numbers
import os
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from .errors import ProsaError

logger = logging.getLogger(__name__)

__all__ = ["pipeline", "TextGenerationPipeline", "ReturnType", "SUPPORTED_TASKS"]

SUPPORTED_TASKS = ("text-generation",)

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

#: ``TextGenerationPipeline._default_generation_config`` (text_generation.py).
PIPELINE_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}

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


class UnsupportedTaskError(ProsaError, ValueError, KeyError):
    """``pipeline()`` was asked for a task other than text generation (a ``ValueError``; also a ``KeyError``,
    which is what transformers raises for an unknown task)."""

    def __str__(self) -> str:        # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Chat:
    """A conversation given as input (transformers' ``Chat`` wrapper)."""

    def __init__(self, messages: Sequence[Mapping[str, Any]]):
        for message in messages:
            if not _is_valid_message(message):
                raise ValueError("When passing chat dicts as input, each dict must have a 'role' and 'content' key.")
        self.messages = messages


def _is_valid_message(message: Any) -> bool:
    return isinstance(message, dict) and "role" in message and "content" in message


@dataclasses.dataclass
class _Item:
    """One input, ready to generate from."""

    prompt: Any                  # the str or Chat given
    ids: list[int]               # prompt token ids (prefix and bos included), never empty
    empty: bool                  # the tokenized input was empty (generation starts from bos)
    continue_final: bool = False


@dataclasses.dataclass
class _Plan:
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


# -- the pipeline ---------------------------------------------------------------------------------------------------
class TextGenerationPipeline:
    """transformers' ``TextGenerationPipeline`` on a prosa ``LanguageModel``; build it with ``pipeline()``.

    Attributes:
        model: the ``prosa.LanguageModel`` (``.config``, ``.generation_config``, ``.generate``, ...).
        tokenizer: its ``prosa.tokenizer.Tokenizer``.
        task: ``"text-generation"``.
        device: where the model runs.
    """

    _default_generation_config = PIPELINE_DEFAULTS

    def __init__(self, model, tokenizer=None, *, task: str = "text-generation", batch_size: int | None = None,
                 num_workers: int | None = None, use_task_specific_params: bool = True, **kwargs: Any):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.task = task
        self.use_task_specific_params = bool(use_task_specific_params)
        self._batch_size = batch_size
        self._num_workers = num_workers
        for name in ("dtype", "torch_dtype", "args_parser", "device", "binary_output", "feature_extractor",
                     "image_processor", "video_processor", "processor"):
            kwargs.pop(name, None)
        if "n" in kwargs:
            kwargs = _alias_n(kwargs)
        # As Pipeline.__init__: generation parameters apply to every call (unless a call passes a generation_config).
        keys = (GENERATION_KEYS | {"generation_config"}) & kwargs.keys()
        self._generate_kwargs = {key: kwargs.pop(key) for key in keys}
        self._init_params = kwargs                          # pipeline params, prosa extras, unknown ones
        self.prefix = self.model.config.get("prefix") if isinstance(self.model.config, Mapping) else None
        self._warned_ignored = False

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __repr__(self) -> str:
        return f"TextGenerationPipeline(model={self.model.name!r}, device={self.device})"

    # -- call ------------------------------------------------------------------------------------------------------
    def __call__(self, text_inputs, *args, num_workers: int | None = None, batch_size: int | None = None,
                 **kwargs: Any):
        """Complete the prompt(s).

        Args:
            text_inputs: a string, a list of strings, a chat (list of ``{"role", "content"}`` dicts), a list of
                chats, or a generator of strings or chats (then the results come lazily, as an iterator).
            return_full_text: (default True) prompt + continuation; False: the continuation alone.
            return_tensors: ``{"generated_token_ids": [ids]}`` (prompt + continuation) instead of text.
            return_text, return_type, clean_up_tokenization_spaces (ignored: prosa's byte-level BPE tokenizers,
                like transformers 5's, never clean up), prefix, handle_long_generation ("hole"), stop_sequence
                (kept in the text), truncation, max_length, continue_final_message, skip_special_tokens,
                tokenizer_encode_kwargs, tools, documents, add_special_tokens: as transformers.
            max_new_tokens, max_length, min_new_tokens, min_length, do_sample, temperature, top_k, top_p, min_p,
                typical_p, repetition_penalty, no_repeat_ngram_size, bad_words_ids, num_return_sequences,
                eos_token_id, pad_token_id, stop_strings, max_time, sequence_bias (single tokens),
                generation_config (a transformers ``GenerationConfig`` or a dict), streamer: generation parameters,
                resolved as ``generate()`` does.
            batch_size: prompts decoded together (default: all of a list at once).
            stream: (prosa) return an iterator instead of the results. For one string or chat with one sequence
                it yields text pieces (``str``) whose concatenation equals the ``generated_text`` the same call
                returns without ``stream`` (the prompt comes first as its own piece when ``return_full_text``);
                for a chat the pieces are the reply's text. When the call makes several sequences (a list of
                prompts or chats, or ``num_return_sequences > 1``) it yields ``(i, piece)`` tuples, ``i`` being the
                position of the sequence in the flattened results (prompt-major: prompt ``p``'s sample ``j`` is
                ``p * num_return_sequences + j``); sequences of a batch interleave.
            seed: (prosa) sampling seed: sample ``j`` of prompt ``p`` uses ``seed + p * n + j``. Default: drawn
                from torch's global RNG, so ``torch.manual_seed(s)`` makes calls repeatable.
            stop: (prosa) strings that end generation, left out of the text.
            logprobs: (prosa) k: add ``"logprobs"`` to each result (per generated token: ``token_id``,
                ``token``, ``logprob`` and the k most likely alternatives ``top_logprobs``).
            n: (prosa) alias of ``num_return_sequences``.
            context_overflow, presence_penalty, frequency_penalty, logit_bias, bad_words, ignore_eos: (prosa)
                as ``LanguageModel.generate``.
        Returns:
            as transformers: a list of dicts per input (a list of such lists for a list of inputs).
        """
        if args:
            logger.warning(f"Ignoring args : {args}")
        if batch_size is None:
            batch_size = self._batch_size
        if "n" in kwargs:
            kwargs = _alias_n(kwargs)
        params = {**self._init_params, **{k: v for k, v in kwargs.items() if k not in GENERATION_KEYS
                                          and k != "generation_config"}}
        call_gen = {k: v for k, v in kwargs.items() if k in GENERATION_KEYS or k == "generation_config"}
        if "max_length" in kwargs:              # also the tokenizer's max_length, as in transformers
            params["max_length"] = kwargs["max_length"]
        gen = call_gen if "generation_config" in call_gen else {**self._generate_kwargs, **call_gen}
        stream = bool(params.pop("stream", False))

        single = True
        if isinstance(text_inputs, types.GeneratorType):
            inputs: Iterable[Any] = (self._as_input(x) for x in text_inputs)
            single = False
        elif isinstance(text_inputs, (list, tuple)) and text_inputs and _is_valid_message(text_inputs[0]):
            inputs = [Chat(text_inputs)]
        elif isinstance(text_inputs, (list, tuple)) and text_inputs and isinstance(text_inputs[0], (list, tuple)) \
                and all(chat and _is_valid_message(chat[0]) for chat in text_inputs):
            inputs, single = [Chat(chat) for chat in text_inputs], False
        elif isinstance(text_inputs, list):
            inputs, single = [self._as_input(x) for x in text_inputs], False
        else:
            inputs = [self._as_input(text_inputs)]

        plan = self._plan(gen, params)
        pre = self._preprocess_params(params)
        if stream:
            if plan.return_type == ReturnType.TENSORS:
                raise ValueError("stream=True streams text; it cannot be combined with return_tensors")
            return self._stream(inputs, plan, pre, batch_size, single)
        if isinstance(text_inputs, types.GeneratorType):
            return self._lazy(inputs, plan, pre, batch_size)
        results = [records for start, chunk in _chunks(inputs, batch_size)
                   for records in self._run(chunk, plan, pre, start)]
        return results[0] if single else results

    @staticmethod
    def _as_input(x: Any) -> Any:
        if isinstance(x, (list, tuple)) and x and _is_valid_message(x[0]):
            return Chat(x)
        if isinstance(x, (str, Chat)):
            return x
        raise TypeError(f"text-generation inputs are strings or chats (lists of {{'role', 'content'}} dicts), "
                        f"got {type(x).__name__}")

    def _lazy(self, inputs, plan, pre, batch_size) -> Iterator[list[dict]]:
        for start, chunk in _chunks(inputs, batch_size):
            yield from self._run(chunk, plan, pre, start)

    # -- settings --------------------------------------------------------------------------------------------------
    def model_generation_params(self) -> dict[str, Any]:
        """The model's generation settings as transformers reads them: ``generation_config.json`` (or, for a folder
        without one, the generation keys of ``config.json``), non-null values only (``to_diff_dict``); with
        ``use_task_specific_params``, ``task_specific_params["text-generation"]`` on top (transformers 4.x)."""
        lm = self.model
        gc = dict(lm.generation_config or {})
        path = getattr(lm, "path", None)
        no_file = (path is not None and Path(path).is_dir() and not (Path(path) / "generation_config.json").exists()) \
            or (path is None and not gc)
        if no_file:        # GenerationConfig.from_model_config(config.json)
            gc = {k: v for k, v in (lm.config or {}).items() if k in GENERATION_KEYS}
        params = {k: v for k, v in gc.items() if k in GENERATION_KEYS and k != "transformers_version" and v is not None}
        if self.use_task_specific_params:
            task = ((lm.config or {}).get("task_specific_params") or {}).get(self.task) or {}
            params.update({k: v for k, v in task.items() if k in GENERATION_KEYS})
        return params

    def _plan(self, gen: dict[str, Any], params: dict[str, Any]) -> _Plan:
        """Resolve a call's generation settings as ``Pipeline._prepare_generate_kwargs`` + ``generate()`` do."""
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
        user_gc = _config_dict(gen.get("generation_config"))
        user = {k: v for k, v in gen.items() if k != "generation_config"}
        model_gc = self.model_generation_params()
        set_params = {**model_gc, **user_gc, **user}
        defaults = dict(self._default_generation_config)
        if self.tokenizer.pad_token is not None and self.tokenizer.pad_token_id is not None:
            defaults["pad_token_id"] = self.tokenizer.pad_token_id
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
        if bad and not self._warned_ignored:
            self._warned_ignored = True
            logger.warning(f"the model's generation config sets {', '.join(bad)}, which prosa ignores")
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
        if params.get("logit_bias"):
            bias = {**bias, **{int(k): float(v) for k, v in params["logit_bias"].items()}}
        if bias:
            sampling["logit_bias"] = bias
        for key in ("presence_penalty", "frequency_penalty"):
            if params.get(key) is not None:
                sampling[key] = params[key]
        if params.get("bad_words"):
            words = [params["bad_words"]] if isinstance(params["bad_words"], str) else params["bad_words"]
            extra = self.model.bad_words_ids(words) if hasattr(self.model, "bad_words_ids") else ()
            sampling["bad_words_ids"] = sampling["bad_words_ids"] + tuple(extra)

        eos_value = eff.get("eos_token_id")
        eos = None if eos_value is None else frozenset(_ids(eos_value))
        pad = eff.get("pad_token_id")
        if pad is None and eos:
            pad = _ids(eos_value)[0]
        stop_strings = eff.get("stop_strings")
        if params.get("stop_sequence") is not None:
            stop_strings = params["stop_sequence"]
        stop_strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings or ())
        prosa_stop = params.get("stop")
        prosa_stop = (prosa_stop,) if isinstance(prosa_stop, str) else tuple(prosa_stop or ())

        seed = params.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if seed is None and sampled:        # follow torch's global RNG (torch.manual_seed / transformers.set_seed)
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())

        prefix = params.get("prefix")
        if prefix is None:
            prefix = self.prefix
        prefix_length = 0
        if prefix:
            special = bool(params.get("add_special_tokens"))
            prefix_length = len(self.tokenizer.encode(prefix, add_special_tokens=special))
            for length, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
                if length in set_params and new_tokens not in set_params:
                    eff[length] = eff[length] + prefix_length
                    if length == "max_length":
                        has_default_max_length = False
        return _Plan(
            sampled=sampled, n=n, eff=eff, has_default_max_length=has_default_max_length, max_new_tokens=max_new,
            prefix_length=prefix_length, eos=eos, pad=pad, sampling=sampling, stop_strings=stop_strings,
            prosa_stop=prosa_stop, seed=None if seed is None else int(seed), logprobs=params.get("logprobs"),
            context_overflow=params.get("context_overflow") or "error", ignore_eos=bool(params.get("ignore_eos")),
            max_time=eff.get("max_time"), return_type=_return_type(params),
            skip_special_tokens=params.get("skip_special_tokens") is None or bool(params["skip_special_tokens"]),
            streamer=params.get("streamer"))

    def _preprocess_params(self, params: dict[str, Any]) -> dict[str, Any]:
        prefix = params.get("prefix")
        if prefix is None:
            prefix = self.prefix or ""
        handle = params.get("handle_long_generation")
        if handle is not None and handle != "hole":
            raise ValueError(f"{handle} is not a valid value for `handle_long_generation` parameter expected"
                             " [None, 'hole']")
        tok_kwargs = {k: params[k] for k in ("add_special_tokens", "truncation", "max_length")
                      if params.get(k) is not None}
        extra = dict(params.get("tokenizer_encode_kwargs") or {})
        for k in ("padding", "return_tensors", "return_attention_mask"):
            extra.pop(k, None)
        wrong = sorted(set(extra) - {"add_special_tokens", "truncation", "max_length"})
        if wrong:
            raise TypeError(f"tokenizer_encode_kwargs: prosa's tokenizer does not take {', '.join(wrong)}")
        tok_kwargs.update(extra)
        return {"prefix": prefix, "handle_long_generation": handle, "tok": tok_kwargs,
                "continue_final_message": params.get("continue_final_message"),
                "tools": params.get("tools"), "documents": params.get("documents")}

    # -- preprocess ------------------------------------------------------------------------------------------------
    def _preprocess(self, prompt: Any, pre: dict[str, Any], plan: _Plan) -> _Item:
        tok = self.tokenizer
        kwargs = dict(pre["tok"])
        continue_final = False
        if isinstance(prompt, Chat):
            from .chat_template import apply_chat_template

            kwargs.pop("add_special_tokens", None)
            continue_final = pre["continue_final_message"]
            if continue_final is None:
                continue_final = prompt.messages[-1]["role"] == "assistant"
            text = _render_chat(tok, prompt.messages, bool(continue_final), pre["tools"], pre["documents"],
                                apply_chat_template)
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(pre["prefix"] + prompt, add_special_tokens=kwargs.get("add_special_tokens", True))
        truncation = kwargs.get("truncation")
        if truncation is None and kwargs.get("max_length") is not None and not isinstance(prompt, Chat):
            # The tokenizer, given max_length without truncation, defaults to "longest_first" truncation
            # (apply_chat_template's truncation defaults to False instead).
            truncation = True
        if truncation and truncation != "do_not_truncate":
            limit = kwargs.get("max_length") or self.model.context_length
            ids = ids[:limit]
        if pre["handle_long_generation"] == "hole":
            new_tokens = plan.max_new_tokens
            if new_tokens is None:
                new_tokens = plan.eff["max_length"] - len(ids)
                if new_tokens < 0:
                    raise ValueError("We cannot infer how many new tokens are expected")
            window = self.model.context_length
            if len(ids) + new_tokens > window:
                keep = window - new_tokens
                if keep <= 0:
                    raise ValueError("We cannot use `hole` to handle this generation the number of desired tokens "
                                     "exceeds the models max length")
                ids = ids[-keep:]
        empty = not ids
        if empty:       # generate() starts from bos when there is no input
            bos = plan.eff.get("bos_token_id")
            if bos is None:
                bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if bos is None:
                raise ValueError("`bos_token_id` has to be defined when no `input_ids` are provided.")
            ids = [int(bos)]
        return _Item(prompt, list(ids), empty, bool(continue_final))

    def _lengths(self, item: _Item, plan: _Plan) -> tuple[int, int]:
        """(max_new_tokens, min_new_tokens) for one prompt, as ``_prepare_generated_length`` and
        ``_validate_generated_length`` work them out."""
        length = len(item.ids)          # with no input, generate() starts from [bos]: its length is 1
        eff = plan.eff
        if plan.max_new_tokens is not None:
            max_length = plan.max_new_tokens + length
        elif plan.has_default_max_length:
            max_length = min(eff["max_length"] + length, self.model.context_length)
        else:
            max_length = eff["max_length"]
        if length >= max_length:
            raise ValueError(f"Input length of input_ids is {length}, but `max_length` is set to {max_length}. This "
                             "can lead to unexpected behavior. You should consider increasing `max_length` or, "
                             "better yet, setting `max_new_tokens`.")
        if eff.get("min_new_tokens") is not None:
            min_new = int(eff["min_new_tokens"])
        else:
            min_new = max(0, int(eff.get("min_length") or 0) - length)
        return max_length - length, min_new

    # -- generation ------------------------------------------------------------------------------------------------
    def _events(self, items: list[_Item], plan: _Plan, start: int):
        """The requests for ``items`` (the call's inputs ``start``, ``start + 1``, ...) and the engine's event
        iterator over them."""
        lm = self.model
        requests = []
        for p, item in enumerate(items):
            max_new, min_new = self._lengths(item, plan)
            sampling = dict(plan.sampling)
            if min_new:
                sampling["min_new_tokens"] = min_new
            if plan.context_overflow != "slide":
                max_new = min(max_new, lm.context_length)     # the window ends it anyway ("length")
            (req,) = lm.make_requests(
                [item.ids], max_new_tokens=max_new, stop=plan.stop_strings + plan.prosa_stop, n=plan.n,
                seed=0 if plan.seed is None else plan.seed + (start + p) * plan.n, logprobs=plan.logprobs,
                context_overflow=plan.context_overflow, ignore_eos=plan.ignore_eos or plan.eos is None, **sampling)
            req.eos_ids = plan.eos
            req.skip_special_tokens = plan.skip_special_tokens
            requests.append(req)
        return requests, lm.run(requests)

    def _generate(self, items: list[_Item], plan: _Plan,
                  start: int = 0) -> Iterator[tuple[int, int | None, dict | None, Any]]:
        """Run a batch; yield ``(sequence, token or None, finish info or None, prosa Event or None)`` per event,
        sequences numbered prompt-major. Honors ``max_time`` and a transformers-style ``streamer``."""
        requests, events = self._events(items, plan, start)
        n = plan.n
        streamer = plan.streamer
        if streamer is not None:
            if len(items) * n != 1:
                raise ValueError("`streamer` only supports a single sequence (one prompt, num_return_sequences=1)")
            streamer.put(torch.tensor([items[0].ids]))
        start = time.monotonic()
        done: set[int] = set()
        total = len(items) * n
        try:
            for ev in events:
                seq = ev.request * n + ev.sample
                token = ev.token if ev.token >= 0 else None
                if token is not None and streamer is not None:
                    streamer.put(torch.tensor([token]))
                info = None
                if ev.finish_reason:
                    done.add(seq)
                    info = {"finish_reason": ev.finish_reason, "stop_reason": ev.stop_reason}
                yield seq, token, info, ev
                if plan.max_time is not None and time.monotonic() - start > plan.max_time and len(done) < total:
                    for s in range(total):
                        if s not in done:
                            yield s, None, {"finish_reason": "length", "stop_reason": None}, None
                    break
        finally:
            events.close()
            if streamer is not None:
                streamer.end()

    def _run(self, prompts: list[Any], plan: _Plan, pre: dict[str, Any], start: int = 0) -> list[list[dict]]:
        """Generate for a chunk of inputs and build transformers' records."""
        items = [self._preprocess(p, pre, plan) for p in prompts]
        n = plan.n
        tokens: list[list[int]] = [[] for _ in range(len(items) * n)]
        infos: list[dict] = [{} for _ in range(len(items) * n)]
        logprobs: list[list[dict]] = [[] for _ in range(len(items) * n)]
        for seq, token, info, ev in self._generate(items, plan, start):
            if token is not None:
                tokens[seq].append(token)
                if ev is not None and ev.logprob is not None:
                    logprobs[seq].append(self._logprob_record(ev))
            if info:
                infos[seq] = info
        return [self._records(item, tokens[p * n:(p + 1) * n], infos[p * n:(p + 1) * n],
                              logprobs[p * n:(p + 1) * n], plan) for p, item in enumerate(items)]

    def _logprob_record(self, ev) -> dict[str, Any]:
        dec = self.tokenizer.decode
        return {"token_id": ev.token, "token": dec([ev.token]), "logprob": ev.logprob,
                "top_logprobs": [{"token_id": t, "token": dec([t]), "logprob": lp} for t, lp in ev.top_logprobs or []]}

    # -- postprocess -----------------------------------------------------------------------------------------------
    def _new_ids(self, seqs: list[list[int]], plan: _Plan) -> list[list[int]]:
        """Generated ids padded (``pad_token_id``) to the longest of the prompt's samples, as ``generate()``
        returns a batch."""
        width = max((len(s) for s in seqs), default=0)
        pad = plan.pad if plan.pad is not None else 0
        return [s + [pad] * (width - len(s)) for s in seqs]

    def _new_text(self, item: _Item, new_ids: list[int], info: dict, plan: _Plan) -> str:
        ids = item.ids + new_ids if item.empty else new_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=plan.skip_special_tokens)
        stop = info.get("stop_reason")
        if isinstance(stop, str) and stop in plan.prosa_stop and stop not in plan.stop_strings:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
        return text

    def _full(self, item: _Item, new_text: str, plan: _Plan) -> Any:
        if plan.return_type != ReturnType.FULL_TEXT:
            return new_text
        if isinstance(item.prompt, str):
            return item.prompt + new_text
        messages = item.prompt.messages
        if item.continue_final:
            last = messages[-1]
            return list(messages)[:-1] + [{"role": last["role"], "content": last["content"] + new_text}]
        return list(messages) + [{"role": "assistant", "content": new_text}]

    def _records(self, item: _Item, seqs: list[list[int]], infos: list[dict], logprobs: list[list[dict]],
                 plan: _Plan) -> list[dict]:
        records = []
        for new_ids, info, lps in zip(self._new_ids(seqs, plan), infos, logprobs):
            if plan.return_type == ReturnType.TENSORS:
                record: dict[str, Any] = {"generated_token_ids": item.ids + new_ids}
            else:
                record = {"generated_text": self._full(item, self._new_text(item, new_ids, info, plan), plan)}
            if plan.logprobs is not None:
                record["logprobs"] = lps
            records.append(record)
        return records

    # -- streaming -------------------------------------------------------------------------------------------------
    @staticmethod
    def _stream_text(item: _Item, new_text: str, plan: _Plan) -> str:
        """What a stream spells out: the ``generated_text`` of a string prompt; a chat's reply text."""
        if plan.return_type == ReturnType.FULL_TEXT and isinstance(item.prompt, str):
            return item.prompt + new_text
        return new_text

    def _stream(self, inputs, plan: _Plan, pre: dict[str, Any], batch_size: int | None,
                single: bool) -> Iterator[Any]:
        """Stream the engine's text pieces (final as they come: never a half character or a possible stop
        string); once a sequence ends, whatever its final record adds (a kept ``stop_strings`` match, the text
        of an empty prompt's start) follows, so that the pieces join to its ``generated_text``."""
        n = plan.n
        for start, chunk in _chunks(inputs, batch_size):
            offset = start * n
            items = [self._preprocess(p, pre, plan) for p in chunk]
            count = len(items) * n
            plain = single and count == 1
            tokens: list[list[int]] = [[] for _ in range(count)]
            infos: list[dict] = [{} for _ in range(count)]
            pieces: list[list[str]] = [[] for _ in range(count)]
            sent = [""] * count

            def emit(seq: int, text: str):
                piece, sent[seq] = text[len(sent[seq]):], text
                if piece:
                    return piece if plain else (offset + seq, piece)
                return None

            if plan.return_type == ReturnType.FULL_TEXT:
                for p, item in enumerate(items):
                    if isinstance(item.prompt, str):
                        for j in range(n):
                            out = emit(p * n + j, item.prompt)
                            if out is not None:
                                yield out
            for seq, token, info, ev in self._generate(items, plan, start):
                if token is not None:
                    tokens[seq].append(token)
                if info:
                    infos[seq] = info
                    continue            # the final text comes once the batch is done (padding, stop strings)
                if ev is not None and ev.text:
                    pieces[seq].append(ev.text)
                    out = emit(seq, self._stream_text(items[seq // n], "".join(pieces[seq]), plan))
                    if out is not None:
                        yield out
            for p, item in enumerate(items):
                for j, new_ids in enumerate(self._new_ids(tokens[p * n:(p + 1) * n], plan)):
                    seq = p * n + j
                    text = self._stream_text(item, self._new_text(item, new_ids, infos[seq], plan), plan)
                    if not text.startswith(sent[seq]):       # cannot happen with byte-level BPE; never lose text
                        logger.warning("streamed text diverged from the final decoding; sending the rest as is")
                        sent[seq] = text[:len(sent[seq])]
                    out = emit(seq, text)
                    if out is not None:
                        yield out


# -- helpers ----------------------------------------------------------------------------------------------------------
def _alias_n(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    n = kwargs.pop("n")
    if n is not None:
        other = kwargs.get("num_return_sequences")
        if other is not None and other != n:
            raise ValueError(f"n={n} and num_return_sequences={other} disagree; pass one of them")
        kwargs["num_return_sequences"] = n
    return kwargs


def _chunks(items: Iterable[Any], size: int | None) -> Iterator[tuple[int, list[Any]]]:
    """(index of the chunk's first item, chunk) for chunks of ``size`` items (all of them when None)."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {size!r}")
    chunk: list[Any] = []
    start = 0
    for item in items:
        chunk.append(item)
        if size is not None and len(chunk) >= size:
            yield start, chunk
            start, chunk = start + len(chunk), []
    if chunk:
        yield start, chunk


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


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _render_chat(tok, messages, continue_final: bool, tools, documents, apply_chat_template) -> str:
    """The chat prompt text, as transformers' ``apply_chat_template(add_generation_prompt=not continue_final,
    continue_final_message=continue_final, tools=..., documents=...)`` renders it."""
    messages = [dict(m) for m in messages]
    final = None
    if continue_final:
        final = messages[-1].get("content")
        if not isinstance(final, str):
            raise ValueError('continue_final_message is set but the final message has no "content" to continue!')
        messages[-1]["content"] = final + _CONTINUE_TAG
    text = apply_chat_template(tok, messages, add_generation_prompt=not continue_final, tokenize=False,
                               tools=tools, documents=documents)
    if continue_final:
        if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
            raise ValueError("continue_final_message is set but the final message does not appear in the chat after "
                             "applying the chat template!")
        at = text.rindex(_CONTINUE_TAG.strip())
        text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text


@contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _device(device: Any) -> Any:
    """transformers' ``device`` argument (int: -1 = CPU, i >= 0 = the i-th accelerator) -> prosa's."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, bool):
        raise ValueError(f"device must be an int, a string or a torch.device, got {device!r}")
    if isinstance(device, int):
        if device < 0 or not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{device}"
    return str(device)


# -- the factory ------------------------------------------------------------------------------------------------------
def pipeline(task: str | None = None, model: Any = None, config: Any = None, tokenizer: Any = None,
             feature_extractor: Any = None, image_processor: Any = None, video_processor: Any = None,
             processor: Any = None, revision: str | None = None, use_fast: bool = True, token: str | bool | None = None,
             device: int | str | torch.device | None = None, device_map: Any = None,
             dtype: str | torch.dtype | None = "auto", trust_remote_code: bool | None = None,
             model_kwargs: dict[str, Any] | None = None, pipeline_class: type | None = None,
             **kwargs: Any) -> TextGenerationPipeline:
    """``transformers.pipeline`` for ``"text-generation"``, on prosa's engine.

    Args:
        task: ``"text-generation"`` (or None, the only task prosa has); anything else raises
            ``UnsupportedTaskError`` (a ValueError).
        model: a Hub id (``"gpt2"``), a local folder or ``.gguf`` file (loaded with ``prosa.load``), a
            ``prosa.LanguageModel``, or None for prosa's default model (``$PROSA_MODEL`` or the bundled
            SmolLM2-135M-Instruct).
        tokenizer: None (the model's), a ``prosa.tokenizer.Tokenizer``, or a folder / Hub id to load one from.
        revision: Hub branch, tag or commit. token: a Hub token (else ``HF_TOKEN``).
        device: -1 / "cpu", an accelerator index, "cuda", a ``torch.device``, or None (CUDA when available).
        device_map: a device string is used as ``device``; a dict is not supported.
        dtype / torch_dtype: "auto", "float32", "bfloat16", "float16" or a torch dtype.
        model_kwargs: ``dtype``/``torch_dtype``/``revision``/``device_map`` are used; other loading options of
            transformers do not apply to prosa and are ignored.
        trust_remote_code: prosa never runs code from the Hub; True is ignored with a warning.
        pipeline_class: a ``TextGenerationPipeline`` subclass to build.
        batch_size, num_workers, generation parameters, pipeline parameters: defaults for every call (see
            ``TextGenerationPipeline.__call__``).
        quantize: (prosa) the weight format, as for ``prosa.load``: "auto" (default), "none", "bf16", "int8", "int4".
        use_task_specific_params: (prosa) apply ``task_specific_params["text-generation"]`` of ``config.json``
            over the model's generation config, as transformers 4.x did (5.x ignores them).
    Returns:
        a ``TextGenerationPipeline``.
    """
    if task is None:
        if model is None:
            raise RuntimeError("Impossible to instantiate a pipeline without either a task or a model being "
                               "specified. Please provide a task class or a model")
        task = "text-generation"
    if task not in SUPPORTED_TASKS:
        raise UnsupportedTaskError(f"Unknown task {task}: prosa's pipeline supports {', '.join(SUPPORTED_TASKS)} "
                                   "only (use transformers for other tasks)")
    if model is None and tokenizer is not None:
        raise RuntimeError("Impossible to instantiate a pipeline with tokenizer specified but not the model as the "
                           "provided tokenizer may not be compatible with the default model. Please provide a "
                           "PreTrainedModel class or a path/identifier to a pretrained model when providing "
                           "tokenizer.")
    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise NotImplementedError("prosa's pipeline reads the config from the model; pass config=None")
    if trust_remote_code:
        logger.warning("prosa never runs code from the Hub; trust_remote_code=True is ignored")
    model_kwargs = dict(model_kwargs or {})
    torch_dtype = kwargs.pop("torch_dtype", None)
    if torch_dtype is not None:
        dtype = torch_dtype if dtype == "auto" else dtype
    if "torch_dtype" in model_kwargs or "dtype" in model_kwargs:
        if dtype not in ("auto", None):
            raise ValueError('You cannot use both `pipeline(... dtype=..., model_kwargs={"dtype":...})` as those'
                             " arguments might conflict, use only one.)")
        dtype = model_kwargs.pop("dtype", None) or model_kwargs.pop("torch_dtype", None)
    if dtype is None:
        dtype = "auto"
    if isinstance(dtype, str) and dtype.startswith("torch."):
        dtype = dtype[len("torch."):]
    revision = revision or model_kwargs.pop("revision", None)
    device_map = device_map if device_map is not None else model_kwargs.pop("device_map", None)
    if device_map is not None:
        if isinstance(device_map, Mapping):
            raise NotImplementedError("prosa runs a model on one device; pass device=... instead of a device_map dict")
        if device is None and device_map != "auto":
            device = device_map
    for name in ("local_files_only", "code_revision", "_commit_hash"):
        kwargs.pop(name, None)
    quantize = kwargs.pop("quantize", None) or model_kwargs.pop("quantize", "auto")
    dev = _device(device)

    from .language_model import LanguageModel
    from .loader import load

    if model is None or isinstance(model, (str, os.PathLike)):
        with _env("HF_TOKEN", token if isinstance(token, str) else None):
            lm = load(None if model is None else str(model), dtype=dtype, revision=revision, device=dev,
                      quantize=quantize)
    elif isinstance(model, LanguageModel):
        lm = model
        if dev is not None and torch.device(dev) != lm.device:
            lm.model.to(torch.device(dev))
    else:
        raise TypeError(f"model must be a name, a path or a prosa LanguageModel, got {type(model).__name__} "
                        "(prosa runs its own engine, not transformers models)")

    tok = None
    if tokenizer is not None:
        from .tokenizer import Tokenizer

        if isinstance(tokenizer, Tokenizer):
            tok = tokenizer
        elif isinstance(tokenizer, (str, os.PathLike)):
            if isinstance(model, (str, os.PathLike)) and str(tokenizer) == str(model):
                tok = None
            else:
                from .weights import hub

                with _env("HF_TOKEN", token if isinstance(token, str) else None):
                    tok = Tokenizer.from_folder(hub.resolve(str(tokenizer), revision))
        else:
            raise TypeError(f"tokenizer must be a prosa Tokenizer, a folder or a Hub id, got "
                            f"{type(tokenizer).__name__}")
        if tok is not None:
            lm = dataclasses.replace(lm, tokenizer=tok)
    cls = pipeline_class or TextGenerationPipeline
    return cls(lm, task=task, **kwargs)
