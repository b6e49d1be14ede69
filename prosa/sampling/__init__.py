"""Sampling: every decoding control as a small pure logits processor, batched with per-sequence values.

One step of decoding is ``tokens, dead = sampler.pick(apply(processors, logits, history), generators)``.

Submodules (imports point down this list; none imports the package itself):

- ``params``: ``SamplingParams`` (one sequence's settings) and the ``check_*`` validators; imports nothing of prosa.
- ``history``: ``TokenHistory``, the token state processors read; imports nothing of prosa.
- ``processors``: ``Processor``, one factory per control, ``make_logits_processors`` (application order in its
  docstring) and ``apply``; imports ``params`` and ``history``.
- ``sampler``: ``draw``, ``Sampler``, ``make_sampler``; imports ``params``, ``processors`` and, for the C++
  ``sample_rows`` kernel, ``prosa.quant``'s ``kernels()``.
"""
from .history import TokenHistory
from .params import SamplingParams
from .processors import (Processor, apply, bad_words, logit_bias, make_logits_processors, min_new_tokens, min_p,
                         no_repeat_ngram, presence_frequency_penalty, repetition_penalty, temperature, top_k, top_p,
                         typical_p)
from .sampler import Sampler, make_sampler

__all__ = ["Processor", "Sampler", "SamplingParams", "TokenHistory", "apply", "bad_words", "logit_bias",
           "make_logits_processors", "make_sampler", "min_new_tokens", "min_p", "no_repeat_ngram",
           "presence_frequency_penalty", "repetition_penalty", "temperature", "top_k", "top_p", "typical_p"]
