"""Inputs: what a call accepts (strings, chats), chunking into batches, and preprocessing a prompt into token ids
(``TextGenerationPipeline.preprocess`` in transformers: prefix, chat template, truncation, ``hole``)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

from .planning import Plan

if TYPE_CHECKING:
    from .text_generation import TextGenerationPipeline


class Chat:
    """A conversation given as input (transformers' ``Chat`` wrapper)."""

    def __init__(self, messages: Sequence[Mapping[str, Any]]):
        for message in messages:
            if not is_valid_message(message):
                raise ValueError("When passing chat dicts as input, each dict must have a 'role' and 'content' key.")
        self.messages = messages


def is_valid_message(message: Any) -> bool:
    """Whether ``message`` is a chat message (a dict with ``role`` and ``content``)."""
    return isinstance(message, dict) and "role" in message and "content" in message


@dataclasses.dataclass
class Item:
    """One input, ready to generate from."""

    prompt: Any                  # the str or Chat given
    ids: list[int]               # prompt token ids (prefix and bos included), never empty
    empty: bool                  # the tokenized input was empty (generation starts from bos)
    continue_final: bool = False


def as_input(x: Any) -> Any:
    """One element of a list or generator of inputs -> a str or a ``Chat`` (a TypeError for anything else)."""
    if isinstance(x, (list, tuple)) and x and is_valid_message(x[0]):
        return Chat(x)
    if isinstance(x, (str, Chat)):
        return x
    raise TypeError(f"text-generation inputs are strings or chats (lists of {{'role', 'content'}} dicts), "
                    f"got {type(x).__name__}")


def chunks(items: Iterable[Any], size: int | None) -> Iterator[tuple[int, list[Any]]]:
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


def preprocess_params(pipe: TextGenerationPipeline, params: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing settings of a call (prefix, ``handle_long_generation``, tokenizer keywords, chat options).

    Args:
        pipe: the pipeline (its default ``prefix``).
        params: the call's pipeline parameters.
    Returns:
        the dict ``preprocess`` takes.
    """
    prefix = params.get("prefix")
    if prefix is None:
        prefix = pipe.prefix or ""
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


def preprocess(pipe: TextGenerationPipeline, prompt: Any, pre: dict[str, Any], plan: Plan) -> Item:
    """Tokenize one input (a str or a ``Chat``).

    Args:
        pipe: the pipeline (tokenizer, model's context window).
        prompt: the input.
        pre: ``preprocess_params``' result.
        plan: the call's ``Plan``.
    Returns:
        the ``Item`` to generate from.
    """
    tok = pipe.tokenizer
    kwargs = dict(pre["tok"])
    continue_final = False
    if isinstance(prompt, Chat):
        from ..chat_template import apply_chat_template

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
        limit = kwargs.get("max_length") or pipe.model.context_length
        ids = ids[:limit]
    if pre["handle_long_generation"] == "hole":
        new_tokens = plan.max_new_tokens
        if new_tokens is None:
            new_tokens = plan.eff["max_length"] - len(ids)
            if new_tokens < 0:
                raise ValueError("We cannot infer how many new tokens are expected")
        window = pipe.model.context_length
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
    return Item(prompt, list(ids), empty, bool(continue_final))


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
