"""``prosa generate PROMPT``: continue a prompt and print the continuation as it is generated."""
from __future__ import annotations

import argparse
import sys

from . import add_model_options


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt", description=__doc__)
    p.add_argument("prompt", help="the text to continue ('-' reads standard input)")
    add_model_options(p)
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the model's generation_config, greedy if it says nothing)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.set_defaults(run=run, subparser=p)


def run(args: argparse.Namespace) -> int:
    import prosa

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    lm = prosa.load(args.model, dtype=args.dtype, revision=args.revision, device=args.device)
    for piece in lm.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
