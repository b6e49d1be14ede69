"""prosa chat: an interactive conversation that streams each reply as it is generated and keeps the history.

Type a message and press Enter. A line ending in a backslash continues on the next line; a line holding only
three double quotes (\"\"\") starts a block that ends at the next such line. Ctrl-C while a reply streams stops it
(the partial reply is kept; stopped before any text, the message is dropped as if never sent); Ctrl-C at the
prompt clears the line; Ctrl-D (or /quit) leaves. Type /help for the commands. --once MESSAGE, or a message on
standard input when it is not a terminal, prints one reply and exits.

Models with a chat template (tokenizer_config.json, chat_template.jinja or GGUF metadata) use it; models without
one, or --transcript, use transcript mode: "You: ..." / "He: ..." lines (--user-name, --bot-name), the reply
ending where the model starts a new speaker line.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys

from . import ESCAPES_HELP, add_model_options, load_model, unescape
from .generate import add_sampling_options, sampling_kwargs

HELP = """\
commands:
  /help               this help
  /reset              forget the conversation (system prompt and settings stay)
  /undo               drop the last exchange (your last message and its reply)
  /retry              a new reply to your last message
  /system [TEXT]      show or set the system prompt (/system "" clears it)
  /set [NAME VALUE]   show the settings, or change one (e.g. /set temperature 0.7; VALUE none = model default)
  /save FILE          write the conversation (system prompt, messages, settings) as JSON
  /load FILE          restore a conversation written by /save
  /history            show the conversation
  /quit               leave (Ctrl-D too)
input: a line ending in \\ continues on the next line; a line with only \"\"\" starts and ends a block.
Ctrl-C stops a reply (the partial reply is kept) or clears the line being typed."""

PROMPT, MORE = "> ", "... "


def register(sub) -> None:
    p = sub.add_parser("chat", help="talk with a model", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--system", type=unescape, default=None, help="system prompt " + ESCAPES_HELP)
    p.add_argument("--transcript", action="store_true",
                   help="transcript mode ('You: ...' / 'He: ...' lines) even when the model has a chat template")
    p.add_argument("--user-name", default="You", help="your name in transcript mode (default: You)")
    p.add_argument("--bot-name", default="He", help="the model's name in transcript mode (default: He)")
    p.add_argument("--once", default=None, metavar="MESSAGE",
                   help="send one message, print the reply and exit (the message is taken as typed, like a prompt)")
    add_sampling_options(p)
    p.set_defaults(run=run, subparser=p)


def _settings(args: argparse.Namespace) -> dict:
    kw = sampling_kwargs(args)
    if kw.pop("context_overflow", "error") != "error":
        raise ValueError("--context-overflow does not apply to chat: a conversation that outgrows the context "
                         "window drops its oldest turns")
    return kw


def run(args: argparse.Namespace) -> int:
    from ..chat import Chat, check_settings
    from . import check_model_options, check_seed, model_probe

    # Every argument is checked before the model loads: the flags, then the settings against the model's
    # vocabulary and context window (model_probe: config and tokenizer, no weights).
    settings = check_settings(_settings(args))            # a bad value: ValueError -> usage error, exit 2
    check_seed(args.seed)
    if args.user_name.strip() == args.bot_name.strip() or not args.user_name.strip() or not args.bot_name.strip():
        raise ValueError("--user-name and --bot-name must be different, non-empty names")
    if args.once is not None and not args.once.strip():
        raise ValueError("--once needs a message: the MESSAGE given is empty")
    check_model_options(args)
    interactive = args.once is None and sys.stdin.isatty()
    message = args.once
    if args.once is None and not interactive:
        message = sys.stdin.read()
        if not message.strip():
            raise ValueError("no message: standard input is empty (pass --once MESSAGE or type in a terminal)")
    probe = model_probe(args)
    if probe is not None:
        _check_against(probe, settings)
    if interactive:
        print(f"loading {args.model or 'the default model'} ...", file=sys.stderr, flush=True)
    lm = load_model(args)

    def notice(msg: str) -> None:
        print(f"[{msg}]", file=sys.stderr, flush=True)

    chat = Chat(lm, args.system, transcript=True if args.transcript else None, user_name=args.user_name,
                bot_name=args.bot_name, on_notice=notice, **settings)
    if not interactive:
        for piece in chat.stream(message.strip("\n")):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    return Repl(chat).loop()


def _check_against(probe, settings: dict) -> None:
    """The settings against the model's tokenizer and context window (logit-bias ids in the vocabulary,
    max_new_tokens within the window), as the first reply would check them, on a one-token request."""
    from ..language_model import SAMPLING_FIELDS

    known = set(SAMPLING_FIELDS) | {"max_new_tokens", "stop", "seed", "bad_words"}
    probe.make_requests([[0]], **{k: v for k, v in settings.items() if k in known})


class Repl:
    """The interactive loop around a ``Chat``."""

    def __init__(self, chat, out=None):
        self.chat = chat
        self.out = out or sys.stdout

    # -- output -------------------------------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def error(self, text: str) -> None:
        self.out.flush()
        print(f"error: {text}", file=sys.stderr, flush=True)

    # -- input --------------------------------------------------------------------------------------------------
    def read_message(self) -> str | None:
        """One message (multiline rules applied), or None at end of input. Ctrl-C clears it and asks again."""
        while True:
            lines: list[str] = []
            try:
                line = input(PROMPT)
                if line.strip() == '"""':
                    while True:
                        line = input(MORE)
                        if line.strip() == '"""':
                            break
                        lines.append(line)
                else:
                    while line.endswith("\\"):
                        lines.append(line[:-1])
                        line = input(MORE)
                    lines.append(line)
                return "\n".join(lines)
            except KeyboardInterrupt:
                self.out.write("\n")          # the line (and any unfinished block) is dropped
                self.out.flush()
            except EOFError:
                self.out.write("\n")
                self.out.flush()
                return None

    # -- the loop -----------------------------------------------------------------------------------------------
    def loop(self) -> int:
        try:
            importlib.import_module("readline")   # line editing and history for input()
        except ImportError:
            pass
        chat = self.chat
        mode = (f"transcript mode as {chat.user_name!r} with {chat.bot_name!r}" if chat.transcript
                else "chat template mode")
        self.say(f"prosa chat: {chat.lm.name} ({mode}). /help for commands, Ctrl-D to leave.")
        while True:
            text = self.read_message()
            if text is None:
                return 0
            if text.startswith("/") and "\n" not in text:
                if self.command(text) == "quit":
                    return 0
                continue
            if not text.strip():
                continue
            self.respond(lambda: chat.stream(text))

    def respond(self, start) -> None:
        """Stream a reply; the first Ctrl-C stops it at the next token, a second one at once."""
        chat = self.chat

        def on_sigint(signum, frame):
            if chat._stop:
                raise KeyboardInterrupt
            chat.interrupt()

        from ..errors import ProsaError

        previous = signal.signal(signal.SIGINT, on_sigint)
        wrote = stopped = False
        gen = None
        try:
            gen = start()
            for piece in gen:
                self.out.write(piece)
                self.out.flush()
                wrote = True
        except KeyboardInterrupt:
            stopped = True
        except (ProsaError, ValueError) as e:
            if wrote:
                self.say()
            self.error(str(e))
            return
        finally:
            if gen is not None:
                gen.close()
            signal.signal(signal.SIGINT, previous)
        outcome = chat.last_outcome
        stopped = stopped or (outcome is not None and outcome.interrupted)
        if wrote:
            self.say()
        if stopped:
            self.say("[stopped; partial reply kept]" if wrote else "[stopped; message dropped]")
        elif not wrote:
            self.say("[the model ended its reply at once]")
        self.say()

    def command(self, line: str) -> str | None:
        chat = self.chat
        name, _, rest = line[1:].partition(" ")
        name, rest = name.lower(), rest.strip()
        try:
            if name in ("quit", "exit", "q"):
                return "quit"
            elif name in ("help", "h", "?"):
                self.say(HELP)
            elif name == "reset":
                chat.reset()
                self.say("[conversation cleared]")
            elif name == "undo":
                removed = chat.undo()
                self.say(f"[dropped the last exchange ({len(removed)} message{'s' if len(removed) != 1 else ''})]")
            elif name == "retry":
                gen = chat.stream_retry()
                if chat.settings.get("temperature", chat.lm.sampling_defaults().get("temperature", 1.0)) == 0:
                    self.say("[greedy decoding (temperature 0) gives the same reply; /set temperature 0.7 "
                             "for another]")
                self.respond(lambda: gen)
            elif name == "system":
                if not rest:
                    self.say(f"[system prompt: {chat.system!r}]" if chat.system else "[no system prompt]")
                else:
                    chat.system = None if rest in ('""', "''") else rest
                    self.say("[system prompt cleared]" if chat.system is None else "[system prompt set]")
            elif name == "set":
                self.set(rest)
            elif name in ("save", "load"):
                path = self.path_arg(rest, name)
                if path is None:
                    return None
                if name == "save":
                    self.say(f"[saved to {chat.save(path)}]")
                else:
                    chat.load(path)
                    n = len(chat.history)
                    self.say(f"[loaded {n} message{'s' if n != 1 else ''} from {path}]")
            elif name == "history":
                self.history()
            else:
                self.error(f"unknown command /{name}; /help lists them")
        except (ValueError, OSError) as e:
            self.error(str(e))
        except Exception as e:  # noqa: BLE001 -- ProsaError and friends: one line, the session goes on
            from ..errors import ProsaError

            if not isinstance(e, ProsaError):
                raise
            self.error(str(e))
        return None

    def path_arg(self, rest: str, name: str) -> str | None:
        try:
            parts = shlex.split(rest)
        except ValueError as e:
            self.error(f"/{name}: {e}")
            return None
        if len(parts) != 1:
            self.error(f"usage: /{name} FILE")
            return None
        return os.path.expanduser(parts[0])

    def set(self, rest: str) -> None:
        from ..chat import SETTABLE, parse_setting

        chat = self.chat
        if not rest:
            shown = {k: chat.settings.get(k) for k in SETTABLE}
            defaults = chat.lm.sampling_defaults()
            for k, v in shown.items():
                note = ("" if v is not None else f"  (model default: {defaults[k]})" if k in defaults
                        else "  (default)")
                self.say(f"  {k} = {v}{note}")
            return
        name, _, value = rest.partition(" ")
        if not value.strip():
            raise ValueError(f"usage: /set NAME VALUE (settable: {', '.join(SETTABLE)})")
        key, typed = parse_setting(name, value)
        chat.set(key, typed)
        self.say(f"[{key} = {typed if typed is not None else 'model default'}]")

    def history(self) -> None:
        chat = self.chat
        if chat.system:
            self.say(f"[system] {chat.system}")
        for m in chat.history:
            who = (chat.user_name if m["role"] == "user" else chat.bot_name) if chat.transcript else m["role"]
            self.say(f"[{who}] {m['content']}")
        if not chat.history:
            self.say("[the conversation is empty]")
