"""Streaming detokenization: generated token ids to text, one token at a time, never splitting a character.

``StreamingDetokenizer`` (made by ``Tokenizer.detokenizer``) is what the engine uses for every generated sequence,
so ``LanguageModel.generate``/``stream``, chat replies and the server all get their text from it. When a sequence
ends in the middle of a multi-byte UTF-8 character (a token limit cut an emoji after its first byte), the engine
finalizes with ``drop_incomplete=True``: the unfinished character's bytes are dropped instead of becoming U+FFFD.
"""
from __future__ import annotations

import codecs
import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = ["StreamingDetokenizer"]

_REPLACEMENT = "\ufffd"


@functools.lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: the character a ByteLevel vocabulary writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def incomplete_tail(data: bytes) -> int:
    """Length of the unfinished UTF-8 character that ``data`` ends with: 1 to 3 bytes that are a valid start of a
    multi-byte character (a lead byte and the continuation bytes it allows so far), else 0 (complete text, or
    invalid bytes, which stay U+FFFD).

    Args:
        data: the last few bytes of a text (4 are enough).
    Returns:
        How many trailing bytes to drop.
    """
    for k in range(1, min(3, len(data)) + 1):
        byte = data[-k]
        if 0x80 <= byte < 0xC0:           # a continuation byte: its lead is further back
            continue
        need = 2 if 0xC2 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if 0xF0 <= byte < 0xF5 else 0
        if need <= k:                     # a complete character, ASCII, or a byte that never starts one
            return 0
        try:   # the incremental decoder checks the second byte's range (E0 A0.., F0 90.., F4 ..8F, ED ..9F)
            held = codecs.getincrementaldecoder("utf-8")().decode(data[-k:], final=False)
        except UnicodeDecodeError:
            return 0
        return k if held == "" else 0
    return 0


class StreamingDetokenizer:
    """Turns tokens into text one at a time, emitting only text that later tokens cannot change.

    Prefix-offset technique (as in text-generation-inference / vLLM): only the window ``tokens[prefix:]`` is
    decoded, ``tokens[prefix:read]`` (already emitted) serving as left context, so the cost per token does not
    grow with the sequence, and decoders that strip the first token's leading space (Metaspace, ``Strip``)
    treat context and new text alike. Text ending in U+FFFD (a character still missing bytes) is held back;
    with a ByteFallback decoder, so is a run of ``<0xNN>`` tokens until a normal token closes it (one invalid
    byte turns the whole run into U+FFFD). ``"".join(add_token(t) ...) + finalize() == decode(ids, skip)``;
    ``finalize(drop_incomplete=True)`` leaves out an unfinished last character instead.

    Args:
        tokenizer: The tokenizer whose ``decode`` it follows.
        skip_special_tokens: Leave out special tokens.
    """

    #: Without ByteFallback: after this many held-back tokens, look for a safe split (so that a stream of
    #: invalid bytes does not grow the window forever).
    max_held_tokens = 8

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True) -> None:
        self._decode = tokenizer.backend.decode
        self._id_to_token = tokenizer.backend.id_to_token
        self.skip_special_tokens = skip_special_tokens
        self._byte_ids = tokenizer._byte_fallback_ids
        self._byte_level = tokenizer._byte_level_decoder
        self._hidden = tokenizer._skipped_ids if skip_special_tokens else frozenset()
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and text."""
        self.tokens: list[int] = []
        self._prefix = 0  # start of the decoded window
        self._read = 0  # tokens before this index are emitted
        self._prefix_text = ""  # decode(tokens[_prefix:_read])
        self._chunks: list[str] = []

    def _text_of(self, start: int, stop: int | None = None) -> str:
        return self._decode(self.tokens[start:stop], skip_special_tokens=self.skip_special_tokens)

    def _emit(self, window_text: str, stop: int) -> str:
        """Emit ``window_text`` (the decoded ``tokens[prefix:stop]``, longer than the context) past the context,
        and slide the window so that the tokens just emitted become the next context."""
        new = window_text[len(self._prefix_text):]
        self._prefix, self._read = self._read, stop
        self._prefix_text = self._text_of(self._prefix, self._read)
        self._chunks.append(new)
        return new

    def add_token(self, token_id: int) -> str:
        """Add one generated token.

        Args:
            token_id: The token id.
        Returns:
            The new text that is now final (possibly ``""``).
        """
        self.tokens.append(int(token_id))
        if self._byte_ids and self._in_byte_run():
            return ""
        text = self._text_of(self._prefix)
        if len(text) > len(self._prefix_text) and not text.endswith(_REPLACEMENT):
            return self._emit(text, len(self.tokens))
        if not self._byte_ids and len(self.tokens) - self._read > self.max_held_tokens:
            # Still incomplete after many tokens (invalid bytes): split where decoding in two parts
            # changes nothing. Lossy UTF-8 resynchronises there, so that text is final.
            for stop in range(len(self.tokens) - 1, max(self._read, len(self.tokens) - 4), -1):
                head = self._text_of(self._prefix, stop)
                if len(head) > len(self._prefix_text) and head + self._text_of(stop) == text:
                    return self._emit(head, stop)
        return ""

    def _in_byte_run(self) -> bool:
        """Is the last token the decoder will see a ``<0xNN>`` byte token?"""
        for i in range(len(self.tokens) - 1, self._read - 1, -1):
            if self.tokens[i] not in self._hidden:
                return self.tokens[i] in self._byte_ids
        return False

    def finalize(self, drop_incomplete: bool = False) -> str:
        """Flush the text still held back (call once generation ends).

        Args:
            drop_incomplete: Leave out the bytes of an unfinished last character (generation stopped after an
                emoji's first byte, say) rather than emit them as U+FFFD. Invalid bytes elsewhere stay U+FFFD.
        Returns:
            The remaining text (possibly ``""``).
        """
        if self._read >= len(self.tokens):
            return ""
        text = self._text_of(self._prefix)
        if drop_incomplete and text.endswith(_REPLACEMENT):
            text = self._without_incomplete_tail(text)
        if len(text) <= len(self._prefix_text):  # nothing pending, or only invisible tokens
            return ""
        return self._emit(text, len(self.tokens))

    def _without_incomplete_tail(self, text: str) -> str:
        """``text`` (the decoded window, ending in U+FFFD) without the U+FFFD of an unfinished last character.

        Only the held tokens (after ``_read``) are looked at: emitted text never ends inside a character.
        """
        visible = [i for i in range(self._read, len(self.tokens)) if self.tokens[i] not in self._hidden]
        if self._byte_ids:
            # ByteFallback: one byte per <0xNN> token, and an invalid run decodes to one U+FFFD per byte (a whole
            # emoji before the cut included), so drop the unfinished bytes' tokens and decode again.
            run: list[int] = []
            for i in reversed(visible):
                if self.tokens[i] not in self._byte_ids or len(run) == 4:
                    break
                run.insert(0, i)
            unfinished = incomplete_tail(bytes(int(self._id_to_token(self.tokens[i])[3:5], 16) for i in run))
            if not unfinished:
                return text
            cut = set(run[-unfinished:])
            kept = [t for i, t in enumerate(self.tokens[self._prefix:], self._prefix) if i not in cut]
            return self._decode(kept, skip_special_tokens=self.skip_special_tokens)
        if self._byte_level:
            # ByteLevel decodes all bytes at once with lossy UTF-8, which writes an unfinished last character
            # (a valid start of one) as a single U+FFFD: drop that one.
            data = b""
            chars = _byte_level_chars()
            for i in reversed(visible):
                token = self._id_to_token(self.tokens[i]) or ""
                if all(c in chars for c in token):
                    data = bytes(chars[c] for c in token) + data
                else:       # tokenizers' ByteLevel decoder passes such a token (an added one) through as UTF-8
                    data = token.encode("utf-8") + data
                if len(data) >= 4:
                    break
            return text[:-1] if incomplete_tail(data) else text
        return text

    @property
    def text(self) -> str:
        """All text so far: emitted plus held back."""
        held = self._text_of(self._prefix)[len(self._prefix_text):] if self._read < len(self.tokens) else ""
        return "".join(self._chunks) + held
