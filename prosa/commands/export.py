"""``prosa export MODEL --gguf OUT.gguf [--type f16|q8_0|q4_1]``: write a model as a GGUF file for llama.cpp and
Ollama. q8_0 / q4_1 hold the integer blocks prosa itself runs (prosa's int8 / int4 rounding, group 32; the
embedding and output layer Q8_0); f16 keeps norms and biases float32."""
from __future__ import annotations

import argparse

from . import add_model_argument, model_argument

TYPES = ("f16", "q8_0", "q4_1")   # = prosa.weights.gguf_export.TYPES, without importing torch for --help


def register(sub) -> None:
    p = sub.add_parser("export", help="write a model as a GGUF file (llama.cpp, Ollama)", description=__doc__)
    add_model_argument(p, positional=True)
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--type", default="f16", metavar="TYPE",
                   help=f"tensor type: {', '.join(TYPES)} (default f16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    p.set_defaults(run=run, subparser=p)


def run(args: argparse.Namespace) -> int:
    # every argument is checked before the model is opened (a typo costs nothing, not a download or a load)
    model_argument(args)
    kind = args.type.lower()
    if kind not in TYPES:
        raise ValueError(f"--type must be one of {', '.join(TYPES)}; got {args.type!r}")
    from ..weights.gguf_export import check_output, export_gguf

    out = check_output(args.gguf, args.overwrite)
    result = export_gguf(args.model, out, kind, revision=args.revision, overwrite=args.overwrite)
    print(result.summary())
    return 0
