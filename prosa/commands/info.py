"""``prosa info [MODEL]``: architecture, size, context length, dtype and memory, without reading the weights
(their files are checked to be complete from their headers), and what would run on this machine."""
from __future__ import annotations

import argparse
from collections import Counter

from . import InputError, add_model_options

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a model without loading its weights", description=__doc__)
    add_model_options(p, positional=True, adapter=False)
    p.set_defaults(run=run, subparser=p)


def _device_name(device) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)``, or ``cpu``."""
    if device.type != "cuda":
        return str(device)
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def run(args: argparse.Namespace) -> int:
    import torch

    from . import check_model_options
    from ..errors import CorruptModelError
    from ..loader import build_model, choose_quantize, estimate_bytes, open_checkpoint, resolve_device, resolve_dtype

    check_model_options(args)      # a device this machine lacks is an error, not what info would report
    try:
        ck = open_checkpoint(args.model, args.revision)    # checks that every weight file is complete
    except CorruptModelError as e:  # info's verdict on the files: reported as a failed check, exit 2
        raise InputError(str(e)) from None
    cfg = ck.config
    model = build_model(cfg)   # on the meta device: shapes only
    params = sum(p.numel() for p in model.parameters())
    head = getattr(model, "lm_head", None) or getattr(model, "embed_out", None)
    if getattr(model.args, "tie_word_embeddings", False) and head is not None:
        params -= head.weight.numel()   # the output layer shares the embedding's weights
    stored = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if ck.gguf is not None:
        types = Counter(ck.gguf.tensor_types().values())
        stored = "GGUF " + ", ".join(f"{t} x{n}" for t, n in types.most_common())
    device = resolve_device(args.device)
    run_dtype = resolve_dtype(args.dtype, None if ck.gguf is not None else cfg.get("torch_dtype") or cfg.get("dtype"),
                              device)
    mode, why = choose_quantize(ck, run_dtype, device) if args.quantize == "auto" else (args.quantize, "as asked")
    if mode == "bf16":      # as prosa.load: bf16 weights compute in bfloat16
        run_dtype = torch.bfloat16
    run_name = str(run_dtype).replace("torch.", "")
    shapes = ck.tensor_shapes()
    tied = bool(cfg.get("tie_word_embeddings", True))
    by_format = (", ".join(f"{m} {_size(estimate_bytes(shapes, m, run_dtype, tied))}"
                           for m in ("none", "bf16", "int8", "int4")) if shapes else "unknown (pytorch_model.bin)")
    rows = [
        ("model", ck.source),
        ("path", str(ck.path)),
        ("architecture", f"{cfg.get('model_type')} ({type(model).__module__.rsplit('.', 1)[-1]}.py)"),
        ("parameters", f"{params:,} ({params / 1e6:.1f}M)"),
        ("layers", str(getattr(model.args, "num_hidden_layers", None) or getattr(model.args, "n_layer", None)
                       or getattr(model.args, "num_layers", "?"))),
        ("context length", f"{model.context_length} tokens"),
        ("stored as", f"{ck.fmt}, {stored}"),
        ("runs on", _device_name(device) + ("" if args.device not in (None, "auto") else " (auto)")),
        ("runs as", f"quantize={mode}, activations {run_name} ({why})"),
        ("weights by format", by_format),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
