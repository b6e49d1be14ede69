"""``prosa <verb>``: the command-line dispatcher. Each verb lives in ``prosa.commands.<verb>`` and owns its
argparse (``register(subparsers)``) and its work (``run(args) -> exit status``)."""
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prosa`` console script. User errors print one line and exit non-zero."""
    from .errors import ProsaError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except ProsaError as e:
        print(f"prosa: error: {e}", file=sys.stderr)
        return 1
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
