"""Perplexity of a text under a model: the sliding-window evaluation of Hugging Face's guide "Perplexity of
fixed-length models", plus the fixed reference text the project uses as its quality check.

The text is tokenized once. Windows of ``window`` tokens start every ``stride`` tokens (the last one ends at the
end of the text); each window is run through the model on its own (no cache) and scores only the tokens that the
previous window did not score, so the ``window - stride`` tokens of overlap are context only. A token is scored
from the logits of the token before it *in the same window*, so:

* the first token of the text is never scored (nothing predicts it);
* with ``stride == window`` (no overlap) the first token of every window is not scored either, as in the guide;
  with ``stride < window`` every token but the first is scored exactly once.

``perplexity = exp(nll)``, ``nll`` the mean negative log-likelihood in nats over the scored tokens, computed from
float32 log-softmax whatever dtype the model runs in.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .language_model import LanguageModel

__all__ = ["PerplexityResult", "perplexity", "reference_text", "DEFAULT_MAX_WINDOW"]

DEFAULT_MAX_WINDOW = 2048   # the default window: the model's context length, but at most this many tokens


@dataclass
class PerplexityResult:
    """The outcome of ``perplexity``.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean negative log-likelihood per scored token, in nats.
        tokens: tokens scored.
        windows: model calls (windows) run.
        window, stride: the window and stride used (in tokens).
        seconds: wall time of the evaluation (tokenization included, model loading not).
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    window: int = 0
    stride: int = 0
    seconds: float = 0.0


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of a sliding evaluation over ``n_tokens`` tokens.

    Returns:
        ``(begin, end, first_scored)`` per window: the window holds tokens ``begin:end`` and scores tokens
        ``first_scored:end`` (``first_scored > begin``; the tokens ``begin:first_scored`` are context only).
    """
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(lm: "LanguageModel", text: str, *, window: int | None = None, stride: int | None = None,
               batch_size: int = 1, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``text`` under ``lm``, by sliding-window evaluation (see the module docstring).

    The text is encoded with ``lm.tokenizer.encode(text)``, special tokens included as the model's tokenizer adds
    them to any input (a bos for Llama-2-style tokenizers; nothing for GPT-2 or SmolLM2), the same ids
    ``transformers``' ``tokenizer(text)`` gives. An added bos is context for the first window, never scored.

    Args:
        lm: a loaded model (``prosa.load``).
        text: the text to score.
        window: tokens per model call; default the model's context length, at most ``DEFAULT_MAX_WINDOW``.
            Must be >= 2 and at most the context length.
        stride: tokens between the starts of consecutive windows, 1 <= stride <= window; default
            ``window // 2``. Smaller strides give every scored token more context and cost more model calls.
        batch_size: windows run through the model together (same result up to float rounding).
        progress: show a tqdm progress bar over the windows (on stderr).
    Returns:
        a ``PerplexityResult``.
    Raises:
        ValueError: a bad ``window``, ``stride`` or ``batch_size`` (the message names it), or a text shorter
            than 2 tokens.
    """
    context = int(lm.context_length)
    if window is None:
        window = min(context, DEFAULT_MAX_WINDOW)
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2, got {window!r}")
    if window > context:
        raise ValueError(f"window must be at most the model's context length ({context} tokens), got {window}")
    if stride is None:
        stride = max(1, window // 2)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    if stride > window:
        raise ValueError(f"stride must be at most the window ({window} tokens), got {stride}; "
                         "a larger stride would skip tokens")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")

    start = time.perf_counter()
    ids = lm.tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError(f"text must be at least 2 tokens long to have a perplexity, got {len(ids)} token(s)")
    spans = windows(len(ids), window, stride)
    device = lm.device
    all_ids = torch.tensor(ids, dtype=torch.long, device=device)

    from tqdm import tqdm

    nll_sum = 0.0
    scored = 0
    with torch.inference_mode(), tqdm(total=len(spans), unit="window", disable=not progress,
                                      desc="perplexity") as bar:
        for i in range(0, len(spans), batch_size):
            group = spans[i:i + batch_size]
            length = max(end - begin for begin, end, _ in group)
            # Right padding: with causal attention, pads after a row's tokens never change that row's logits.
            batch = all_ids.new_zeros(len(group), length)
            for row, (begin, end, _) in enumerate(group):
                batch[row, :end - begin] = all_ids[begin:end]
            logits = lm.model(batch)                                         # (B, T, V)
            for row, (begin, end, first) in enumerate(group):
                # Logit at window position p predicts token begin + p + 1.
                pred = logits[row, first - 1 - begin:end - 1 - begin].float()
                nll = torch.nn.functional.cross_entropy(pred, all_ids[first:end], reduction="sum")
                nll_sum += float(nll)
                scored += end - first
            bar.update(len(group))
    mean = nll_sum / scored
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=scored, windows=len(spans),
                            window=window, stride=stride, seconds=time.perf_counter() - start)


def reference_text(n_chars: int = 16000) -> str:
    """The project's fixed evaluation text: the first ``n_chars`` characters of Python's own help topics
    (``pydoc_data.topics.topics``), entries in sorted key order, each stripped, joined by blank lines.

    16000 characters are about 4000 tokens for the bundled SmolLM2-135M. The text is identical on every machine
    running the same Python minor version (the help text changes between Python releases), so compare
    perplexities measured under the same Python.

    Args:
        n_chars: characters to return (>= 1); the whole text when it is shorter (about 800 000 characters).
    """
    if isinstance(n_chars, bool) or not isinstance(n_chars, int) or n_chars < 1:
        raise ValueError(f"n_chars must be an integer >= 1, got {n_chars!r}")
    from pydoc_data.topics import topics

    parts: list[str] = []
    size = 0
    for key in sorted(topics):
        entry = topics[key].strip()
        parts.append(entry)
        size += len(entry) + 2
        if size >= n_chars:
            break
    return "\n\n".join(parts)[:n_chars]
