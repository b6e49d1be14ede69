"""One module per CLI verb: ``register(subparsers)`` adds its parser, ``run(args)`` does the work.

Every verb checks its arguments and input files before it loads a model (a typo must not cost a multi-minute
load): first what needs nothing (numbers, devices, files), then, where a check needs the tokenizer or the
context length, against ``model_probe`` (config and tokenizer, no weights), and only then ``load_model``."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ProsaError

if TYPE_CHECKING:
    from ..language_model import LanguageModel

MODEL_HELP = "model folder, .gguf file or Hub id (default: $PROSA_MODEL or the bundled SmolLM2-135M)"
ESCAPES_HELP = r"(\n, \t and \\ are understood)"
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


class InputError(ProsaError, ValueError):
    """An argument or input file failed a check made before any work (a missing or empty file, a folder where a
    file belongs, a truncated model for ``info``): the CLI prints the one-line message and exits 2."""


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` typed in a flag's value -> newline, tab, backslash (the shell passes them
    as two characters); any other backslash stays as typed (``\\d`` is ``\\d``). The argparse ``type`` of the text
    flags a user types control characters into (--stop, --bad-words, --system), not of prompts and messages,
    which are literal text (code, paths and TeX hold backslashes).

    Args:
        text: the flag's value as the shell passed it.
    Returns:
        the text with those three escapes replaced.
    """
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def add_model_options(p: argparse.ArgumentParser, positional: bool = False, adapter: bool = True) -> None:
    """The options every verb that loads a model shares (``positional``: the model may also be given as the
    first argument, ``prosa info MODEL``; ``adapter``: also ``--adapter DIR``)."""
    add_model_argument(p, positional)
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights/activations dtype (default: auto)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("-q", "--quantize", default="auto", choices=["auto", "none", "bf16", "int8", "int4"],
                   help="weight format: none (float), bf16, int8 or int4 (weight-only, group-wise); auto (default): "
                        "a GGUF file as stored, a float checkpoint in float unless RAM is short")
    p.add_argument("-t", "--threads", type=_positive_int, default=None,
                   help="CPU threads for the matmuls (default: one per physical core)")
    if adapter:
        p.add_argument("--adapter", default=None, metavar="DIR",
                       help="apply a LoRA adapter at load time: the adapter/ folder of prosa finetune, or any PEFT "
                            "LoRA adapter folder for this model")


def add_model_argument(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """``-m/--model`` (every verb), and with ``positional`` an optional first argument MODEL meaning the same;
    ``model_argument`` merges the two."""
    if positional:
        p.add_argument("model_positional", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP + "; or -m")
    p.add_argument("-m", "--model", default=None, help=MODEL_HELP)


def model_argument(args: argparse.Namespace) -> str | None:
    """The model named by MODEL or ``-m`` (stored back in ``args.model``).

    Raises:
        ValueError: both were given, naming different models.
    """
    positional = getattr(args, "model_positional", None)
    if positional is not None and args.model is not None and positional != args.model:
        raise ValueError(f"two models given ({positional} and -m {args.model}); name the model once, as MODEL "
                         "or with -m")
    args.model = args.model if args.model is not None else positional
    return args.model


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def check_seed(seed: int | None) -> None:
    """--seed fits torch's 64-bit generators (a larger one would fail at the first sampled token).

    Raises:
        ValueError: a usage error.
    """
    if seed is not None and not -2**63 <= seed < 2**63:
        raise ValueError(f"--seed must be a 64-bit integer (from -2**63 to 2**63 - 1), got {seed}")


def check_model_options(args: argparse.Namespace) -> None:
    """The checks of ``add_model_options``' flags that need no model: the device exists on this machine,
    ``-q bf16`` agrees with ``--dtype``, the ``--adapter`` folder holds an adapter.

    Raises:
        DeviceError / InputError: one line, exit 2. ValueError: a usage error.
    """
    from ..loader import resolve_device

    model_argument(args)
    resolve_device(args.device)
    if args.quantize == "bf16" and args.dtype not in ("auto", "bfloat16"):
        raise ValueError(f"-q bf16 keeps the weights in bfloat16, which conflicts with --dtype {args.dtype}; drop "
                         "one of the two")
    if getattr(args, "adapter", None) is not None:
        from ..training.export import check_adapter_folder

        try:
            check_adapter_folder(args.adapter)
        except ProsaError as e:
            raise InputError(str(e)) from None


def read_text(path: str, label: str, empty: str) -> str:
    """A UTF-8 text file named on the command line (``-``: standard input), checked before any model loads.

    Args:
        path: the file, or ``-``.
        label: how messages name it, e.g. "--file prompts.txt".
        empty: the end of the message when it holds nothing but white space, e.g. "nothing to score".
    Returns:
        the text.
    Raises:
        InputError: missing, unreadable, a folder, empty, or not text (NUL bytes, not UTF-8).
    """
    import sys

    if path == "-":
        label = "standard input"
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as e:
            raise InputError(f"{label} is not UTF-8 text ({e.reason} at byte {e.start}); pipe in UTF-8 text") from None
        if "\0" in text:
            raise InputError(f"{label} is not text (a NUL character at {text.index(chr(0))}); pipe in UTF-8 text")
    else:
        if Path(path).is_dir():
            raise InputError(f"{label} is a folder, not a text file; name a file in it")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InputError(f"cannot read {label}: {e.strerror or e}") from None
        if b"\0" in data:       # valid UTF-8, but a binary file (an image, a model, a zip) is no text to read
            raise InputError(f"{label} is not a text file (a NUL byte at byte {data.index(0)}); give a UTF-8 "
                             "text file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{label} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 "
                             "(e.g. iconv -t utf-8)") from None
    if not text.strip():
        raise InputError(f"{label} is empty: {empty}")
    return text


def check_output_file(path: str, label: str) -> None:
    """An output file can be written: not a folder, in a folder that exists and is writable (checked before the
    model loads; the file itself is written later).

    Raises:
        InputError: naming the problem.
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise InputError(f"{label} is a folder; name a file (e.g. {Path(path) / 'out.jsonl'})")
    if not parent.is_dir():
        raise InputError(f"{label}: the folder {parent} does not exist; create it first")
    if target.exists() and not os.access(target, os.W_OK):
        raise InputError(f"{label} exists and is not writable; choose another file")
    if not target.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{label}: the folder {parent} is not writable; choose another folder")


def model_probe(args: argparse.Namespace) -> "LanguageModel | None":
    """The model without its weights: config and tokenizer, the network built on the meta device. Its
    ``make_requests``, ``tokenizer`` and ``context_length`` check settings and inputs as the loaded model would,
    in a fraction of a second rather than the minutes a large model's load can take.

    Returns:
        a ``LanguageModel`` that cannot generate, or None for an architecture without a native implementation
        (it runs through transformers; its settings are checked once it is loaded).
    Raises:
        ProsaError: the model cannot be opened (missing, corrupt, unsupported).
    """
    from ..errors import UnsupportedModelError
    from ..language_model import LanguageModel
    from ..loader import build_model, open_checkpoint

    ck = open_checkpoint(args.model, args.revision)
    args.checkpoint = ck        # load_model loads it: the GGUF header and the tokenizer are not read twice
    try:
        model = build_model(ck.config)
    except UnsupportedModelError:
        return None
    return LanguageModel(model=model, tokenizer=ck.tokenizer(), config=ck.config,
                         generation_config=ck.generation_config, name=ck.source, path=ck.path)


def load_model(args: argparse.Namespace):
    """``prosa.load`` with the shared model options (of the checkpoint ``model_probe`` opened, if it ran); says on
    stderr what ``--quantize auto`` chose."""
    import sys

    import prosa

    source = getattr(args, "checkpoint", None) or args.model
    args.checkpoint = None      # the LanguageModel keeps what it needs; the probe's references go
    lm = prosa.load(source, dtype=args.dtype, quantize=args.quantize, revision=args.revision,
                    device=args.device, threads=args.threads, adapter=getattr(args, "adapter", None))
    if args.quantize == "auto":
        print(f"prosa: weights: {lm.quantize} ({lm.weights.split('; auto: ')[-1]})", file=sys.stderr)
    return lm
