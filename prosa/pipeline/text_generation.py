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

import logging
import types
from typing import Any, Iterable, Mapping

import torch

from .generation import lazy, run
from .genconfig import GENERATION_KEYS, PIPELINE_DEFAULTS, model_generation_params
from .inputs import Chat, as_input, chunks, is_valid_message, preprocess_params
from .planning import Plan, ReturnType, alias_n, plan_call
from .streaming import stream

logger = logging.getLogger(__name__)


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
            kwargs = alias_n(kwargs)
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
            kwargs = alias_n(kwargs)
        params = {**self._init_params, **{k: v for k, v in kwargs.items() if k not in GENERATION_KEYS
                                          and k != "generation_config"}}
        call_gen = {k: v for k, v in kwargs.items() if k in GENERATION_KEYS or k == "generation_config"}
        if "max_length" in kwargs:              # also the tokenizer's max_length, as in transformers
            params["max_length"] = kwargs["max_length"]
        gen = call_gen if "generation_config" in call_gen else {**self._generate_kwargs, **call_gen}
        streaming = bool(params.pop("stream", False))

        single = True
        if isinstance(text_inputs, types.GeneratorType):
            inputs: Iterable[Any] = (as_input(x) for x in text_inputs)
            single = False
        elif isinstance(text_inputs, (list, tuple)) and text_inputs and is_valid_message(text_inputs[0]):
            inputs = [Chat(text_inputs)]
        elif isinstance(text_inputs, (list, tuple)) and text_inputs and isinstance(text_inputs[0], (list, tuple)) \
                and all(chat and is_valid_message(chat[0]) for chat in text_inputs):
            inputs, single = [Chat(chat) for chat in text_inputs], False
        elif isinstance(text_inputs, list):
            inputs, single = [as_input(x) for x in text_inputs], False
        else:
            inputs = [as_input(text_inputs)]

        plan = self._plan(gen, params)
        pre = preprocess_params(self, params)
        if streaming:
            if plan.return_type == ReturnType.TENSORS:
                raise ValueError("stream=True streams text; it cannot be combined with return_tensors")
            return stream(self, inputs, plan, pre, batch_size, single)
        if isinstance(text_inputs, types.GeneratorType):
            return lazy(self, inputs, plan, pre, batch_size)
        results = [records for start, chunk in chunks(inputs, batch_size)
                   for records in run(self, chunk, plan, pre, start)]
        return results[0] if single else results

    # -- settings --------------------------------------------------------------------------------------------------
    def model_generation_params(self) -> dict[str, Any]:
        """The model's generation settings as transformers reads them: ``generation_config.json`` (or, for a folder
        without one, the generation keys of ``config.json``), non-null values only (``to_diff_dict``); with
        ``use_task_specific_params``, ``task_specific_params["text-generation"]`` on top (transformers 4.x)."""
        return model_generation_params(self.model, self.task, self.use_task_specific_params)

    def _plan(self, gen: dict[str, Any], params: dict[str, Any]) -> Plan:
        """Resolve a call's generation settings (``planning.plan_call``)."""
        return plan_call(self, gen, params)
