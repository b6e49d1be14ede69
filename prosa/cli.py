"""``prosa <verb>``: the command-line dispatcher. Each verb lives in ``prosa.commands.<verb>`` and owns its
argparse (``register(subparsers)``) and its work (``run(args) -> exit status``).

Exit status: 0 done; 2 a usage error (a bad argument value, device or input file), found before any model is
loaded; 1 a model that cannot be opened or loaded (missing, corrupt, unsupported); 130 Ctrl-C."""
from __future__ import annotations

import argparse
import importlib
import sys

VERBS = ["generate", "info", "chat", "perplexity", "serve", "finetune", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prosa", description="Local text generation with GPT-style models.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"prosa {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb in VERBS:
        importlib.import_module(f"prosa.commands.{verb}").register(sub)
    _plain_help(parser)
    return parser


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """Drop reST markup (``code``) from every help text: descriptions are module docstrings, written for Sphinx
    and code readers, and ``--help`` shows them as typed."""
    def plain(text: str | None) -> str | None:
        return text.replace("``", "") if isinstance(text, str) else text

    parser.description = plain(parser.description)
    for action in parser._actions:          # argparse keeps no public list of a parser's arguments
        action.help = plain(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:      # the one-line help of each verb in `prosa --help`
                choice.help = plain(choice.help)
            for sub in dict.fromkeys(action.choices.values()):
                _plain_help(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prosa`` console script. User errors print one line and exit non-zero."""
    from .errors import ProsaError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except ProsaError as e:
        # A ProsaError that is also a ValueError (InputError, DeviceError) is a bad argument or input file: exit 2
        # as a usage error, in one line (the usage would hide the message); the others (a model that cannot be
        # opened or loaded) exit 1.
        print(f"prosa: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    except ValueError as e:         # a bad parameter value: usage error, like argparse's
        args.subparser.print_usage(sys.stderr)
        print(f"prosa {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:         # `prosa generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
