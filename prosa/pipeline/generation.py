"""Generation and records: a chunk of ``Item``s -> engine requests -> events -> transformers' result dicts
(``TextGenerationPipeline._forward`` + ``postprocess``)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch

from .inputs import Item, chunks, preprocess
from .planning import Plan, ReturnType

if TYPE_CHECKING:
    from .text_generation import TextGenerationPipeline


def lengths(pipe: TextGenerationPipeline, item: Item, plan: Plan) -> tuple[int, int]:
    """(max_new_tokens, min_new_tokens) for one prompt, as ``_prepare_generated_length`` and
    ``_validate_generated_length`` work them out."""
    length = len(item.ids)          # with no input, generate() starts from [bos]: its length is 1
    eff = plan.eff
    if plan.max_new_tokens is not None:
        max_length = plan.max_new_tokens + length
    elif plan.has_default_max_length:
        max_length = min(eff["max_length"] + length, pipe.model.context_length)
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


def _events(pipe: TextGenerationPipeline, items: list[Item], plan: Plan, start: int):
    """The requests for ``items`` (the call's inputs ``start``, ``start + 1``, ...) and the engine's event
    iterator over them."""
    lm = pipe.model
    requests = []
    for p, item in enumerate(items):
        max_new, min_new = lengths(pipe, item, plan)
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


def generate(pipe: TextGenerationPipeline, items: list[Item], plan: Plan,
             start: int = 0) -> Iterator[tuple[int, int | None, dict | None, Any]]:
    """Run a batch; yield ``(sequence, token or None, finish info or None, prosa Event or None)`` per event,
    sequences numbered prompt-major. Honors ``max_time`` and a transformers-style ``streamer``."""
    requests, events = _events(pipe, items, plan, start)
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


def run(pipe: TextGenerationPipeline, prompts: list[Any], plan: Plan, pre: dict[str, Any],
        start: int = 0) -> list[list[dict]]:
    """Generate for a chunk of inputs and build transformers' records (a list of dicts per input)."""
    items = [preprocess(pipe, p, pre, plan) for p in prompts]
    n = plan.n
    tokens: list[list[int]] = [[] for _ in range(len(items) * n)]
    infos: list[dict] = [{} for _ in range(len(items) * n)]
    logprobs: list[list[dict]] = [[] for _ in range(len(items) * n)]
    for seq, token, info, ev in generate(pipe, items, plan, start):
        if token is not None:
            tokens[seq].append(token)
            if ev is not None and ev.logprob is not None:
                logprobs[seq].append(_logprob_record(pipe, ev))
        if info:
            infos[seq] = info
    return [_records(pipe, item, tokens[p * n:(p + 1) * n], infos[p * n:(p + 1) * n],
                     logprobs[p * n:(p + 1) * n], plan) for p, item in enumerate(items)]


def lazy(pipe: TextGenerationPipeline, inputs: Iterable[Any], plan: Plan, pre: dict[str, Any],
         batch_size: int | None) -> Iterator[list[dict]]:
    """``run`` chunk by chunk, yielding each input's records as its chunk is done (for a generator of inputs)."""
    for start, chunk in chunks(inputs, batch_size):
        yield from run(pipe, chunk, plan, pre, start)


def _logprob_record(pipe: TextGenerationPipeline, ev) -> dict[str, Any]:
    dec = pipe.tokenizer.decode
    return {"token_id": ev.token, "token": dec([ev.token]), "logprob": ev.logprob,
            "top_logprobs": [{"token_id": t, "token": dec([t]), "logprob": lp} for t, lp in ev.top_logprobs or []]}


# -- postprocess -----------------------------------------------------------------------------------------------------
def new_ids(seqs: list[list[int]], plan: Plan) -> list[list[int]]:
    """Generated ids padded (``pad_token_id``) to the longest of the prompt's samples, as ``generate()``
    returns a batch."""
    width = max((len(s) for s in seqs), default=0)
    pad = plan.pad if plan.pad is not None else 0
    return [s + [pad] * (width - len(s)) for s in seqs]


def new_text(pipe: TextGenerationPipeline, item: Item, ids: list[int], info: dict, plan: Plan) -> str:
    """The decoded continuation of one sequence, prosa's ``stop`` string cut off."""
    ids = item.ids + ids if item.empty else ids
    if info.get("finish_reason") == "length" and hasattr(pipe.tokenizer, "detokenizer"):
        # cut by a limit: an unfinished last character is dropped, never shown as U+FFFD (the engine's rule)
        detok = pipe.tokenizer.detokenizer(skip_special_tokens=plan.skip_special_tokens)
        text = "".join(detok.add_token(t) for t in ids) + detok.finalize(drop_incomplete=True)
    else:
        text = pipe.tokenizer.decode(ids, skip_special_tokens=plan.skip_special_tokens)
    stop = info.get("stop_reason")
    if info.get("finish_reason") == "stop" and isinstance(stop, str) and stop in plan.prosa_stop \
            and stop not in plan.stop_strings:
        at = text.find(stop)
        if at >= 0:
            text = text[:at]
    return text


def _full(item: Item, text: str, plan: Plan) -> Any:
    if plan.return_type != ReturnType.FULL_TEXT:
        return text
    if isinstance(item.prompt, str):
        return item.prompt + text
    messages = item.prompt.messages
    if item.continue_final:
        last = messages[-1]
        return list(messages)[:-1] + [{"role": last["role"], "content": last["content"] + text}]
    return list(messages) + [{"role": "assistant", "content": text}]


def _records(pipe: TextGenerationPipeline, item: Item, seqs: list[list[int]], infos: list[dict],
             logprobs: list[list[dict]], plan: Plan) -> list[dict]:
    records = []
    for ids, info, lps in zip(new_ids(seqs, plan), infos, logprobs):
        if plan.return_type == ReturnType.TENSORS:
            record: dict[str, Any] = {"generated_token_ids": item.ids + ids}
        else:
            record = {"generated_text": _full(item, new_text(pipe, item, ids, info, plan), plan)}
        if plan.logprobs is not None:
            record["logprobs"] = lps
        records.append(record)
    return records
