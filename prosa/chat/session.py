"""The conversation object: ``Chat`` keeps the history, the settings and (through the engine's prefix cache) the
KV cache between turns, and saves / loads conversations as JSON. The top of ``prosa.chat``: imports ``settings``,
``prompt`` and ``reply``; nothing imports it but ``prosa.chat`` itself.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ProsaError
from .prompt import _check_messages, _options, _render_ids, _warn
from .reply import _generate, _Outcome
from .settings import check_settings

SAVE_FORMAT = "prosa-chat"


class Chat:
    """A conversation with a model: keeps the history, the settings and the KV cache between turns.

    Args:
        lm: a ``prosa.LanguageModel``.
        system: the system prompt (None: none; templates may add their own default).
        transcript: None = template mode when the model has a chat template, else transcript mode; True forces
            transcript mode.
        user_name, bot_name: transcript-mode speaker names (default ``You`` and ``He``).
        template: a Jinja chat template to use instead of the model's.
        on_notice: called with notices (e.g. old turns dropped to fit the context); default ``warnings.warn``.
        settings: max_new_tokens, seed, stop, bad_words and every sampling control (temperature, top_k, top_p,
            min_p, typical_p, repetition_penalty, presence_penalty, frequency_penalty, no_repeat_ngram_size,
            logit_bias, bad_words_ids, min_new_tokens); None = the model's default. With a seed, the n-th reply
            drawn in this chat (retries included) uses ``seed + n``, so a conversation replays exactly.

    Attributes:
        history: the user/assistant messages, oldest first (the system prompt is ``system``; ``messages`` has both).
        settings: the generation settings in force (``set`` changes them).
        last_prompt: the token ids of the last prompt.
    """

    def __init__(self, lm, system: str | None = None, *, transcript: bool | None = None, user_name: str = "You",
                 bot_name: str = "He", template: str | None = None,
                 on_notice: Callable[[str], None] | None = None, **settings: Any):
        self.lm = lm
        self._opts = _options(lm, transcript, template, user_name, bot_name)
        self.system = self._check_system(system)
        self.settings = check_settings(settings)
        self.history: list[dict[str, str]] = []
        self.last_prompt: list[int] = []
        self.last_outcome: _Outcome | None = None
        self.draws = 0
        self.on_notice = on_notice
        self._stop = False

    # -- properties ----------------------------------------------------------------------------------------------
    @property
    def transcript(self) -> bool:
        """True in transcript mode, False in template mode."""
        return self._opts.transcript

    @property
    def user_name(self) -> str:
        return self._opts.user_name

    @property
    def bot_name(self) -> str:
        return self._opts.bot_name

    @property
    def messages(self) -> list[dict[str, str]]:
        """The system prompt (if any) followed by the history."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + [dict(m) for m in self.history]

    @staticmethod
    def _check_system(system: Any) -> str | None:
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system must be a string or None, got {system!r}")
        return system or None

    # -- turns ---------------------------------------------------------------------------------------------------
    def send(self, text: str) -> str:
        """Send a user message; return the reply (also appended to ``history``)."""
        return "".join(self.stream(text))

    def stream(self, text: str) -> Iterator[str]:
        """Send a user message; yield the reply as it is generated (nothing happens until the iteration starts).
        When the reply ends (or the iteration is stopped, or ``interrupt`` is called) the reply so far joins the
        history; a reply stopped before any text leaves no trace (the user message is dropped too)."""
        if not isinstance(text, str):
            raise ValueError(f"a message must be a string, got {text!r}")
        return self._respond(text)

    def retry(self) -> str:
        """Replace the last reply with a new one (the next seed); return it."""
        return "".join(self.stream_retry())

    def stream_retry(self) -> Iterator[str]:
        """``retry``, streamed. Stopped before any text, the old reply stays.

        Raises:
            ValueError: there is no user message to answer again.
        """
        h = self.history
        if not (h and (h[-1]["role"] == "user" or len(h) > 1 and h[-2]["role"] == "user")):
            raise ValueError("nothing to retry: the conversation has no message yet")
        return self._respond(None)

    def _respond(self, text: str | None) -> Iterator[str]:
        """Answer ``text`` (a new user message) or, with None, the last user message again (retry)."""
        previous = None
        if text is not None:
            self.history.append({"role": "user", "content": text})
        elif self.history[-1]["role"] == "assistant":
            previous = self.history.pop()
        self._stop = False
        outcome = _Outcome()
        pieces: list[str] = []

        def next_seed():
            seed = self.settings.get("seed")
            self.draws += 1
            return None if seed is None else seed + self.draws - 1

        notice = self.on_notice or _warn
        finished = False
        try:
            for piece in _generate(self.lm, self.messages, self._opts, self.settings, next_seed,
                                   lambda: self._stop, outcome, notice):
                pieces.append(piece)
                yield piece
            finished = True
        finally:
            self.last_outcome = outcome
            if outcome.prompt is not None:
                self.last_prompt = outcome.prompt
            if outcome.dropped:
                del self.history[:outcome.dropped]
            text = "".join(pieces)
            if text or (finished and not outcome.interrupted):
                self.history.append({"role": "assistant", "content": text})
            elif previous is not None:
                self.history.append(previous)           # a retry stopped before any text: keep the old reply
            elif self.history and self.history[-1]["role"] == "user":
                self.history.pop()                      # stopped before any text: as if never sent
            self._stop = False

    def interrupt(self) -> None:
        """Stop the reply being streamed at the next token (safe to call from a signal handler)."""
        self._stop = True

    def undo(self) -> list[dict[str, str]]:
        """Drop the last exchange (the last user message and the replies after it); return what was removed."""
        if not self.history:
            raise ValueError("nothing to undo: the conversation is empty")
        i = len(self.history) - 1
        while i > 0 and self.history[i]["role"] != "user":
            i -= 1
        removed, self.history = self.history[i:], self.history[:i]
        return removed

    def reset(self) -> None:
        """Forget the conversation (the system prompt and settings stay), and the keys/values the engine's prefix
        cache kept of it: its last prompt and the replies after it, all but the system prompt's part that the next
        conversation starts with too (the KV memory shrinks back at the engine's next step)."""
        self._forget()
        self.history = []

    def _forget(self) -> None:
        """Release the engine's cached keys/values of this conversation but its shared start (see ``reset``)."""
        if self.last_prompt:
            self.lm.engine.forget_prefix(self.last_prompt, keep=self._shared_start(self.last_prompt))
        self.last_prompt, self.last_outcome = [], None

    def _shared_start(self, ids: list[int]) -> int:
        """How many leading tokens of ``ids`` a new conversation's prompt starts with too (the system prompt and
        the template's header), found by rendering a conversation with an empty first message."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        try:
            fresh = _render_ids(self.lm, system + [{"role": "user", "content": ""}], self._opts)
        except (ProsaError, ValueError):            # a template that refuses an empty message: keep nothing
            return 0
        n = 0
        while n < min(len(ids), len(fresh)) and ids[n] == fresh[n]:
            n += 1
        return n

    def set(self, name: str, value: Any) -> None:
        """Change one setting (None = the model's default).

        Raises:
            ValueError: an unknown name or a bad value; nothing changes then.
        """
        key = name.replace("-", "_")
        new = dict(self.settings)
        new[key] = value
        self.settings = check_settings(new)

    # -- files ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The conversation as JSON-ready data (what ``save`` writes)."""
        settings = {}
        for k, v in self.settings.items():
            if k == "logit_bias":
                v = {str(t): b for t, b in v.items()}
            elif k == "bad_words_ids":
                v = [list(w) for w in v]
            settings[k] = v
        return {"format": SAVE_FORMAT, "version": 1, "model": getattr(self.lm, "name", ""),
                "mode": "transcript" if self.transcript else "template",
                "user_name": self.user_name, "bot_name": self.bot_name, "system": self.system,
                "messages": [dict(m) for m in self.history], "settings": settings, "draws": self.draws}

    def save(self, path: str | Path) -> Path:
        """Write the conversation (system prompt, messages, settings) as JSON."""
        path = Path(path).expanduser()
        try:
            path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise ProsaError(f"cannot write {path}: {e.strerror or e}") from None
        return path

    def load(self, path: str | Path) -> None:
        """Restore a conversation written by ``save`` (or a plain JSON list of messages). Nothing changes when the
        file is unreadable or invalid.

        Raises:
            ProsaError: the file cannot be read or is not a conversation (the message says why).
        """
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ProsaError(f"cannot read {path}: {e.strerror or e}") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise ProsaError(f"{path} is not valid JSON ({e})") from None
        try:
            self.from_dict(data)
        except ValueError as e:
            raise ProsaError(f"{path} is not a prosa conversation: {e}") from None

    def from_dict(self, data: Any) -> None:
        """Restore a conversation from ``to_dict`` data (or a list of messages); all-or-nothing.

        Raises:
            ValueError: the data is not a conversation.
        """
        if isinstance(data, list):
            data = {"messages": data}
        if not isinstance(data, dict) or not isinstance(data.get("messages", []), list):
            raise ValueError("expected a JSON object with a 'messages' list (or a list of messages)")
        if data.get("format", SAVE_FORMAT) != SAVE_FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        messages = _check_messages(data.get("messages", []))
        system = self._check_system(data.get("system"))
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"] or None, messages[1:]
        if any(m["role"] == "system" for m in messages):
            raise ValueError("a system message may only come first")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        raw = data.get("settings") or {}
        if not isinstance(raw, dict):
            raise ValueError("'settings' must be an object")
        raw = dict(raw)
        if isinstance(raw.get("logit_bias"), dict):
            try:
                raw["logit_bias"] = {int(k): v for k, v in raw["logit_bias"].items()}
            except ValueError:
                raise ValueError("logit_bias keys must be token ids") from None
        settings = check_settings(raw) if "settings" in data else self.settings
        opts = self._opts
        if "mode" in data or "user_name" in data or "bot_name" in data:
            mode = data.get("mode", "transcript" if opts.transcript else "template")
            if mode not in ("transcript", "template"):
                raise ValueError(f"mode must be 'transcript' or 'template', got {mode!r}")
            opts = _options(self.lm, mode == "transcript", opts.template, data.get("user_name", opts.user_name),
                            data.get("bot_name", opts.bot_name))
        draws = data.get("draws", 0)
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
            raise ValueError(f"draws must be an integer >= 0, got {draws!r}")
        self._forget()                               # the old conversation's cached keys/values go, as on reset
        self._opts, self.system, self.settings, self.history, self.draws = opts, system, settings, messages, draws
