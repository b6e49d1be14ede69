"""``prosa perplexity FILE``: the perplexity of a text file under a model (sliding-window evaluation; see
``prosa.perplexity``). ``-`` reads standard input; ``--reference`` scores the project's fixed reference text
(the start of Python's help topics) instead of a file."""
from __future__ import annotations

import argparse
import json
import sys

from . import add_model_options, load_model


def register(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text file under a model", description=__doc__)
    p.add_argument("file", nargs="?", metavar="FILE", help="UTF-8 text file to score ('-' reads standard input)")
    p.add_argument("--reference", action="store_true",
                   help="score prosa.perplexity.reference_text() (about 4000 tokens) instead of FILE")
    add_model_options(p)
    p.add_argument("--window", type=int, default=None,
                   help="tokens per model call (default: the context length, at most 2048)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts, at most --window (default: window // 2)")
    p.add_argument("--batch-size", type=int, default=1, help="windows run through the model together")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    p.set_defaults(run=run, subparser=p)


def _read(path: str) -> str:
    from ..errors import ProsaError

    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ProsaError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ProsaError(f"cannot read {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def run(args: argparse.Namespace) -> int:
    if (args.file is None) == (not args.reference):
        raise ValueError("give exactly one of FILE ('-' for standard input) and --reference")
    # Cheap checks first, so that a bad flag costs no model load (the rest are checked by perplexity()).
    if args.window is not None and args.window < 2:
        raise ValueError(f"window must be an integer >= 2, got {args.window}")
    if args.stride is not None and args.stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {args.stride}")
    if args.window is not None and args.stride is not None and args.stride > args.window:
        raise ValueError(f"stride must be at most the window ({args.window} tokens), got {args.stride}")
    if args.batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {args.batch_size}")
    from ..perplexity import perplexity, reference_text

    text = reference_text() if args.reference else _read(args.file)
    lm = load_model(args)
    res = perplexity(lm, text, window=args.window, stride=args.stride, batch_size=args.batch_size,
                     progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps({"model": lm.name, "file": "<reference>" if args.reference else args.file,
                          "dtype": str(lm.dtype).replace("torch.", ""), "perplexity": res.perplexity,
                          "nll": res.nll, "tokens": res.tokens, "windows": res.windows, "window": res.window,
                          "stride": res.stride, "seconds": round(res.seconds, 3)}))
        return 0
    print(f"perplexity  {res.perplexity:.4f}")
    print(f"nll         {res.nll:.6f} nats/token")
    print(f"tokens      {res.tokens} scored")
    print(f"windows     {res.windows} (window {res.window}, stride {res.stride})")
    print(f"seconds     {res.seconds:.2f}")
    return 0
