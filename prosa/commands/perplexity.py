"""``prosa perplexity FILE``: the perplexity of a text file under a model (sliding-window evaluation; see
``prosa.perplexity``). ``-`` reads standard input; ``--reference`` scores the project's fixed reference text
(the start of Python's help topics) instead of a file."""
from __future__ import annotations

import argparse
import json
import sys

from . import InputError, _positive_int, add_model_options, load_model


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
    p.add_argument("--batch-size", type=_positive_int, default=1, help="windows run through the model together")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    p.set_defaults(run=run, subparser=p)


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
    from . import check_model_options, model_probe, read_text
    from ..perplexity import perplexity, reference_text

    check_model_options(args)
    text = reference_text() if args.reference else read_text(args.file, args.file, "nothing to score")
    probe = model_probe(args)
    if probe is not None:
        _check_against(probe, text, args)
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


def _check_against(probe, text: str, args: argparse.Namespace) -> None:
    """The window against the context length, and a short text's length in tokens, as ``perplexity`` will
    check them once the weights are loaded (``probe``: the model without weights)."""
    from ..perplexity import DEFAULT_MAX_WINDOW

    context = int(probe.context_length)
    window = args.window if args.window is not None else min(context, DEFAULT_MAX_WINDOW)
    if window > context:
        raise ValueError(f"window must be at most the model's context length ({context} tokens), got {window}")
    if args.stride is not None and args.stride > window:
        raise ValueError(f"stride must be at most the window ({window} tokens), got {args.stride}")
    if len(text) < 64:      # a longer text has 2 tokens whatever the tokenizer (encoding a big file twice costs)
        n = len(probe.tokenizer.encode(text))
        if n < 2:
            where = "standard input" if args.file == "-" else args.file
            raise InputError(f"{where} holds {n} token(s); a perplexity needs at least 2: give a longer text")
