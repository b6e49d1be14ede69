"""Streaming (prosa's ``stream=True``): the engine's text pieces, so that they join to the ``generated_text`` the
same call returns without ``stream``."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .generation import generate, new_ids, new_text
from .inputs import Item, chunks, preprocess
from .planning import Plan, ReturnType

if TYPE_CHECKING:
    from .text_generation import TextGenerationPipeline

logger = logging.getLogger(__name__)


def _stream_text(item: Item, text: str, plan: Plan) -> str:
    """What a stream spells out: the ``generated_text`` of a string prompt; a chat's reply text."""
    if plan.return_type == ReturnType.FULL_TEXT and isinstance(item.prompt, str):
        return item.prompt + text
    return text


def stream(pipe: TextGenerationPipeline, inputs: Iterable[Any], plan: Plan, pre: dict[str, Any],
           batch_size: int | None, single: bool) -> Iterator[Any]:
    """Stream the engine's text pieces (final as they come: never a half character or a possible stop
    string); once a sequence ends, whatever its final record adds (a kept ``stop_strings`` match, the text
    of an empty prompt's start) follows, so that the pieces join to its ``generated_text``.

    Args:
        pipe: the pipeline.
        inputs: the call's inputs (str or ``Chat``).
        plan: the call's ``Plan``; pre: its preprocessing settings.
        batch_size: inputs decoded together (None: all).
        single: the call got one input: with one sequence, pieces are plain ``str``.
    Returns:
        an iterator of ``str`` pieces, or of ``(sequence index, piece)`` when the call makes several sequences.
    """
    n = plan.n
    for start, chunk in chunks(inputs, batch_size):
        offset = start * n
        items = [preprocess(pipe, p, pre, plan) for p in chunk]
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
        for seq, token, info, ev in generate(pipe, items, plan, start):
            if token is not None:
                tokens[seq].append(token)
            if info:
                infos[seq] = info
                continue            # the final text comes once the batch is done (padding, stop strings)
            if ev is not None and ev.text:
                pieces[seq].append(ev.text)
                out = emit(seq, _stream_text(items[seq // n], "".join(pieces[seq]), plan))
                if out is not None:
                    yield out
        for p, item in enumerate(items):
            for j, ids in enumerate(new_ids(tokens[p * n:(p + 1) * n], plan)):
                seq = p * n + j
                text = _stream_text(item, new_text(pipe, item, ids, infos[seq], plan), plan)
                if not text.startswith(sent[seq]):       # cannot happen with byte-level BPE; never lose text
                    logger.warning("streamed text diverged from the final decoding; sending the rest as is")
                    sent[seq] = text[:len(sent[seq])]
                out = emit(seq, text)
                if out is not None:
                    yield out
