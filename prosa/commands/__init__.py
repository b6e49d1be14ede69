"""One module per CLI verb: ``register(subparsers)`` adds its parser, ``run(args)`` does the work."""
import argparse


def add_model_options(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """The options every verb that loads a model shares."""
    if positional:
        p.add_argument("model", nargs="?", default=None,
                       help="model folder, .gguf file or Hub id (default: $PROSA_MODEL or the bundled SmolLM2-135M)")
    else:
        p.add_argument("-m", "--model", default=None,
                       help="model folder, .gguf file or Hub id (default: $PROSA_MODEL or the bundled SmolLM2-135M)")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights/activations dtype (default: auto)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
