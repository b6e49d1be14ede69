"""One module per CLI verb: ``register(subparsers)`` adds its parser, ``run(args)`` does the work."""
import argparse


def add_model_options(p: argparse.ArgumentParser, positional: bool = False, adapter: bool = True) -> None:
    """The options every verb that loads a model shares (``adapter``: also ``--adapter DIR``)."""
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
    p.add_argument("-q", "--quantize", default="auto", choices=["auto", "none", "bf16", "int8", "int4"],
                   help="weight format: none (float), bf16, int8 or int4 (weight-only, group-wise); auto (default): "
                        "a GGUF file as stored, a float checkpoint in float unless RAM is short")
    p.add_argument("-t", "--threads", type=_positive_int, default=None,
                   help="CPU threads for the matmuls (default: one per physical core)")
    if adapter:
        p.add_argument("--adapter", default=None, metavar="DIR",
                       help="apply a LoRA adapter at load time: the adapter/ folder of prosa finetune, or any PEFT "
                            "LoRA adapter folder for this model")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def load_model(args: argparse.Namespace):
    """``prosa.load`` with the shared model options; says on stderr what ``--quantize auto`` chose."""
    import sys

    import prosa

    lm = prosa.load(args.model, dtype=args.dtype, quantize=args.quantize, revision=args.revision,
                    device=args.device, threads=args.threads, adapter=getattr(args, "adapter", None))
    if args.quantize == "auto":
        print(f"prosa: weights: {lm.quantize} ({lm.weights.split('; auto: ')[-1]})", file=sys.stderr)
    return lm
