"""``prosa finetune DATA -o OUT``: teach a model your own texts (LoRA by default), then generate, chat and serve
with OUT. DATA is a .txt/.md file or a folder of them (one document per file), a .jsonl of {"text"},
{"prompt", "completion"} or {"messages"} records, or a one-column .csv. Several processes:
``torchrun --nproc_per_node N -m prosa finetune ...``."""
from __future__ import annotations

import argparse
import sys

from . import _positive_int


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on your own texts", description=__doc__)
    p.add_argument("data", help="training data: a file (.txt, .md, .jsonl, .csv) or a folder of them")
    p.add_argument("-m", "--model", default=None, help="base model: folder, .gguf file or Hub id (default: "
                                                        "$PROSA_MODEL or the bundled SmolLM2-135M)")
    p.add_argument("-o", "--out", default=None, help="output folder (required unless in --config)")
    p.add_argument("--config", default=None, metavar="RUN.yaml",
                   help="YAML file of settings (keys as these options, e.g. lora-rank: 8); options given here win")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit of the base model")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["lora", "full", "qlora"], default=None,
                   help="lora (default): small adapters on every linear layer; full: every weight; qlora: adapters "
                        "on a base kept in int4 (see --quantize)")
    g.add_argument("--lora-rank", type=_positive_int, default=None, help="adapter rank r (default 16)")
    g.add_argument("--lora-alpha", type=float, default=None, help="adapter scale alpha; updates are x alpha/r "
                                                                   "(default 2 x rank)")
    g.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (default 0)")
    g.add_argument("--quantize", choices=["int4", "int8"], default=None, help="qlora's base format (default int4)")
    g = p.add_argument_group("schedule")
    g.add_argument("--max-steps", type=_positive_int, default=None, help="optimizer steps (default: --epochs 3)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the training data")
    g.add_argument("--batch-size", type=_positive_int, default=None,
                   help="sequences per optimizer step, over all processes and accumulation steps (default 8)")
    g.add_argument("--grad-accum", type=_positive_int, default=None,
                   help="micro-batches per step on each process (less memory, same result; default 1)")
    g.add_argument("--seq-len", type=_positive_int, default=None,
                   help="tokens per sequence (default: 512 or the model's context if shorter)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 LoRA, 5e-5 full)")
    g.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of the run)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
    g.add_argument("--seed", type=int, default=None, help="seed of everything random (default 0)")
    g = p.add_argument_group("data")
    g.add_argument("--val-split", type=_fraction, default=None,
                   help="fraction of documents held out for validation (default 0.1; 0 = none)")
    g.add_argument("--split-on-blank-lines", action="store_true", default=None,
                   help="each blank-line-separated block of a .txt/.md file is a document")
    g.add_argument("--train-on-prompt", action="store_true", default=None,
                   help="train on prompts and user turns too (default: completions and assistant turns only)")
    g.add_argument("--no-packing", dest="packing", action="store_false", default=None,
                   help="one document per sequence (default: short documents packed together, never attending "
                        "to each other)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=_positive_int, default=None, help="steps between evaluations (default: 10 "
                                                                           "per run)")
    g.add_argument("--save-every", type=_positive_int, default=None, help="steps between checkpoints (default: 10"
                                                                           "%% of the run, at least 25)")
    g.add_argument("--patience", type=int, default=None,
                   help="stop after this many evaluations without a better validation loss (default 5; 0 = never)")
    g.add_argument("--samples", type=int, default=None, help="sample generations printed at each evaluation "
                                                             "(default 2)")
    g.add_argument("--resume", action="store_true", default=None, help="continue the run in OUT from its newest "
                                                                       "checkpoint")
    g.add_argument("--overwrite", action="store_true", default=None, help="start over in an existing OUT")
    g.add_argument("--dry-run", action="store_true", default=None,
                   help="print the data, the split and the time/memory estimate, then stop")
    g = p.add_argument_group("hardware")
    g.add_argument("--grad-checkpoint", action="store_true", default=None,
                   help="recompute activations in the backward pass (less memory, ~30%% slower)")
    g.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                   help="torch.compile the training step (fused kernels: ~1.5-2x faster after a one-off compile of "
                        "10-60 s); auto (default) turns it on for runs estimated at a minute or more")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="auto (default): bfloat16 autocast where the CPU has native bf16 (or CUDA), else float32")
    g.add_argument("-t", "--threads", type=_positive_int, default=None,
                   help="CPU threads (default: cores / processes on this machine)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(run=run, subparser=p)


SETTINGS = ("model", "out", "revision", "method", "lora_rank", "lora_alpha", "lora_dropout", "quantize", "max_steps",
            "epochs", "batch_size", "grad_accum", "seq_len", "lr", "warmup", "weight_decay", "seed", "val_split",
            "split_on_blank_lines", "train_on_prompt", "packing", "eval_every", "save_every", "patience", "samples",
            "resume", "overwrite", "dry_run", "grad_checkpoint", "compile", "dtype", "threads", "device", "progress")


def run(args: argparse.Namespace) -> int:
    from ..training import TrainingInterrupted
    from ..training.config import Settings
    from ..training.run import Run

    settings = Settings.from_sources(args.config, data=args.data,
                                     **{k: getattr(args, k) for k in SETTINGS})
    job = Run(settings)
    job.plan()
    if settings.dry_run:
        return 0
    job.setup()
    try:
        job.train()
    except TrainingInterrupted as e:
        print(f"prosa finetune: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0

