"""Transcript mode: the play-script prompt of a model without a chat template, and the streaming cut where the
model starts a new speaker line::

    {system}

    You: {message}
    He: {reply}
    You: {message}
    He:

The reply ends where the model starts a new speaker line (``SpeakerLines``): a line beginning with ``You:`` /
``He:`` (the names given, any case, ``He :`` too) or with any ``Capitalised Words:`` (1 to 4 capitalised words, at
most 40 characters, then a colon), or -- after the reply's first line -- a line whose first word is the user's name
(``You (laughing) ...``: the model speaking for the user). The first line is checked too (``He: You: hi`` gives no
reply). While streaming, a line that could still become a speaker line is held back (as stop strings are), so no
part of a speaker line is ever shown (``_SpeakerFilter``); the reply is stripped at both ends, whitespace held back
while streaming (``_Trim``), so the streamed pieces join to exactly the reply kept.

Pure text: imports nothing else of prosa.
"""
from __future__ import annotations

from typing import Mapping, Sequence

_NAME_CHARS = frozenset("'’-.")


def _word_ok(word: str) -> bool:
    """Is ``word`` (non-empty) a capitalised name word?"""
    if not word[0].isupper():
        return False
    return all(ch.isalnum() or ch in _NAME_CHARS for ch in word[1:])


class SpeakerLines:
    """Recognises transcript speaker lines.

    A line (after optional spaces/tabs) is a speaker line when it starts with

    * one of ``names`` (any case, spaces allowed before the colon) and a colon, or
    * 1 to ``max_words`` capitalised words (at most ``max_len`` characters) and a colon, or
    * except on a reply's first line (which follows ``Bot:``), the user's name as a whole word (``You (laughs)``,
      ``You, ...``, a line that is just ``You``): the model speaking for the user.

    ``classify(line, first)`` says whether a line, possibly still incomplete, is one: True (it is), False (it
    cannot become one, whatever follows) or None (undecided: it could still become one).
    """

    max_words = 4
    max_len = 40

    def __init__(self, names: Sequence[str], user: str | None = None):
        self.names = [n for n in dict.fromkeys(names) if n]
        self._lower = [n.lower() for n in self.names]
        self.user = user

    def is_name(self, head: str) -> bool:
        if head.rstrip(" \t").lower() in self._lower:
            return True
        if not head or len(head) > self.max_len:
            return False
        words = head.split(" ")
        return len(words) <= self.max_words and all(w and _word_ok(w) for w in words)

    def _user_word(self, s: str) -> bool | None:
        """Does ``s`` start with the user's name as a whole word? (None: cannot tell yet.)"""
        if not self.user:
            return False
        if len(s) <= len(self.user):
            return None if self.user.startswith(s) else False
        if not s.startswith(self.user):
            return False
        nxt = s[len(self.user)]
        return not (nxt.isalnum() or nxt in "'’_-")

    def classify(self, line: str, first: bool = False) -> bool | None:
        s = line.lstrip(" \t")
        user_word = False if first else self._user_word(s)
        if user_word:
            return True
        colon = s.find(":")
        if colon >= 0:
            return self.is_name(s[:colon])
        if user_word is None and s:
            return None
        low = s.lower()
        if any(n.startswith(low) for n in self._lower) or s.rstrip(" \t").lower() in self._lower:
            return None
        if len(s) > self.max_len:
            return False
        words = s.split(" ")
        if len(words) > self.max_words:
            return False
        for i, w in enumerate(words):
            if not w:
                if i == len(words) - 1:
                    continue          # a trailing space: the next word has not started
                return False          # two spaces in a row
            if not _word_ok(w):
                return False
        return None

    def complete(self, line: str, first: bool = False) -> bool:
        """Is a finished line (nothing follows it) a speaker line?"""
        verdict = self.classify(line, first)
        return bool(verdict) or (not first and bool(self.user) and line.strip(" \t") == self.user)


class _SpeakerFilter:
    """Streams a transcript reply, cutting it before the first speaker line and holding back any line that could
    still become one. With ``strip_leading``, speaker tags at the very start are removed instead of ending it."""

    def __init__(self, speakers: SpeakerLines, strip_leading: bool = False):
        self.speakers = speakers
        self.strip_leading = strip_leading
        self.buf = ""
        self.out = 0            # buf[:out] was released
        self.line_start = 0     # start of the current (last, incomplete) line
        self.plain_line = -1    # line_start of a line already known not to be a speaker line

    def _cut(self) -> str:
        cut = max(self.line_start - 1, self.out)     # drop the newline before the speaker line too
        released = self.buf[self.out:cut]
        self.buf, self.out = self.buf[:cut], cut
        return released

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text now safe to show, whether a speaker line ended the reply)."""
        self.buf += text
        while True:
            nl = self.buf.find("\n", self.line_start)
            line = self.buf[self.line_start:nl if nl >= 0 else len(self.buf)]
            first = self.line_start == 0
            if self.plain_line == self.line_start:
                verdict = False
            elif nl >= 0:
                verdict = self.speakers.complete(line, first)
            else:
                verdict = self.speakers.classify(line, first)
            if verdict is True:
                if self.strip_leading and first:
                    s = line.lstrip(" \t")
                    self.buf = self.buf[len(line) - len(s) + s.index(":") + 1:] if ":" in s else self.buf[len(line):]
                    self.out = 0
                    continue
                return self._cut(), True
            if nl < 0:
                if verdict is False:
                    self.plain_line = self.line_start
                    hold = len(self.buf)
                else:
                    hold = max(self.line_start - 1, 0)
                break
            self.line_start = nl + 1
        hold = max(hold, self.out)
        released, self.out = self.buf[self.out:hold], hold
        return released, False

    def finish(self) -> str:
        """The text still held when generation ended (the last line is complete now)."""
        line = self.buf[self.line_start:]
        if self.plain_line != self.line_start and self.speakers.complete(line, self.line_start == 0):
            return self._cut()
        released, self.out = self.buf[self.out:], len(self.buf)
        return released


class _Trim:
    """Streams text stripped at both ends: leading whitespace dropped, trailing whitespace held until more text."""

    def __init__(self):
        self.started = False
        self.pending = ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending + text
        core = text.rstrip()
        self.pending = text[len(core):]
        return core


def render_transcript(messages: Sequence[Mapping[str, str]], user_name: str = "You", bot_name: str = "He",
                      add_generation_prompt: bool = True) -> str:
    """The transcript-mode prompt of a conversation (see the module docstring)."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            if m["content"].strip():
                parts.append(m["content"].strip() + "\n\n")
        else:
            name = user_name if m["role"] == "user" else bot_name
            parts.append(f"{name}: {m['content']}\n")
    if add_generation_prompt:
        parts.append(f"{bot_name}:")
    return "".join(parts)
