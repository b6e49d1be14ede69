"""What a run tells its user: the plan before training (documents, tokens, split, time and memory estimate),
a tqdm bar while training, ``OUT/log.jsonl`` (every step and evaluation), ``OUT/loss.png`` and ``OUT/run.json``.
Only the main process (rank 0) writes or prints."""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def rss_mb() -> tuple[float, float]:
    """(resident, peak resident) memory of this process in MB (Linux /proc; 0 elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return 0.0, 0.0


def matmul_gflops(seconds: float = 0.25, dtype: torch.dtype = torch.float32) -> float:
    """Matmul speed of this machine in ``dtype`` (GFLOP/s), measured on a 512 x 1024 x 1024 product."""
    a, b = torch.randn(512, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 512 * 1024 * 1024 * n / (time.perf_counter() - start) / 1e9


def estimate(settings, shapes: dict[str, tuple[int, ...]], steps: int, layers: int, hidden: int,
             vocab: int, amp_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """A rough (seconds, peak MB) for the run, from the weight shapes alone (before loading).

    FLOPs per token: 2N forward, 2N backward through the activations, 2N more for the weights' gradients in full
    fine-tuning (N = weights in matmuls); 2N extra with activation checkpointing. Assumes 40% of the measured
    matmul speed (in the autocast dtype). Memory: the weights (float32, or ~0.6 byte each in qlora int4), gradients and Adam's two
    moments for what is trained, and the activations of one micro-batch (~34 values per hidden unit per layer).
    """
    matmul = sum(math.prod(s) for n, s in shapes.items() if len(s) == 2 and "embed" not in n and "wte" not in n
                 and "wpe" not in n)
    total = sum(math.prod(s) for s in shapes.values())
    factor = (6 if settings.method == "full" else 4) + (2 if settings.grad_checkpoint else 0)
    tokens = steps * settings.batch_size * settings.seq_len
    seconds = tokens * factor * matmul / (0.4 * matmul_gflops(dtype=amp_dtype or torch.float32) * 1e9)
    weight_bytes = total * (0.6 if settings.method == "qlora" and settings.quantize == "int4" else
                            1.1 if settings.method == "qlora" else 4)
    train_bytes = total * 12 if settings.method == "full" else 0
    micro = settings.batch_size // settings.grad_accum
    per_token = (2 if settings.grad_checkpoint else 34) * hidden * layers * 4 + min(vocab, 4 * hidden) * 4
    activations = micro * settings.seq_len * per_token
    return seconds, (weight_bytes + train_bytes + activations) / 2 ** 20 + 300


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """The bar, the step log and the plot of one run (inactive on processes other than rank 0).

    Args:
        out: the output folder (log.jsonl, loss.png, run.json go there).
        total: optimizer steps of the run.
        start: the step the run starts at (resumed runs keep the log up to there).
    """

    def __init__(self, out: Path, total: int, start: int, active: bool, bar: bool):
        self.out, self.total, self.active = out, total, active
        self.records: list[dict[str, Any]] = []
        self.bar = None
        self.last: dict[str, Any] = {}
        if not active:
            return
        log = out / "log.jsonl"
        if start and log.is_file():    # keep what the resumed checkpoint had seen, drop what came after it
            self.records = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("step", 0) <= start]
        log.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                            desc="finetune")

    def _write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with (self.out / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, **record: Any) -> None:
        """Log one optimizer step (step, loss, lr, tokens, trained_tokens, step_s, tok_s, elapsed_s, epoch)."""
        if not self.active:
            return
        rss, _ = rss_mb()
        record["rss_mb"] = round(rss, 1)
        self._write(record)
        self.last.update(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_s']:.0f}", mem=f"{rss:.0f}MB")
        if self.bar is not None:
            self.bar.set_postfix(self.last, refresh=False)
            self.bar.update(1)

    def evaluation(self, step: int, val_loss: float, samples: list[str]) -> None:
        """Log a validation loss and print the sample generations."""
        if not self.active:
            return
        ppl = math.exp(min(val_loss, 50))
        self._write({"step": step, "val_loss": val_loss, "val_ppl": ppl})
        self.last["val"] = f"{val_loss:.3f}"
        self.say(f"step {step}: validation loss {val_loss:.4f}, perplexity {ppl:.2f}")
        for i, text in enumerate(samples):
            self.say(f"  sample {i + 1}: {text!r}")

    def say(self, message: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def plot(self) -> None:
        """OUT/loss.png: training loss per step and validation loss at each evaluation."""
        if not self.active:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from .export import write_atomic

        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            ax.plot(*zip(*train), label="training loss", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        write_atomic(self.out / "loss.png", lambda p: fig.savefig(p, format="png"))
        plt.close(fig)


def run_record(settings, data_sha: str, extra: dict[str, Any]) -> dict[str, Any]:
    """run.json: versions, the data's hash and every setting."""
    from .. import __version__

    return {"prosa": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "data_sha256": data_sha, "settings": settings.as_dict(), **extra}
