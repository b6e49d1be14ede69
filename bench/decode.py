"""Single-stream decode speed, prosa vs transformers, measured in one run on the same machine.

    python bench/decode.py [--tokens 64] [--reps 3] [--out docs/benchmarks.md]

Both run the bundled SmolLM2-135M-Instruct GGUF dequantized to float32, greedy, a ~10-token prompt; the
runs are interleaved and the median is reported. (The full benchmark with quantized modes, batches and peers is
issue #4's `make bench`; this is its first row.)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

PROMPT = "A story about a man and a dog"


def prosa_run(lm, tokens: int) -> float:
    ids = torch.tensor([lm.encode(PROMPT)])
    with torch.inference_mode():
        cache = lm.model.make_cache(1)
        tok = lm.model(ids, cache)[:, -1].argmax(-1)
        start = time.perf_counter()
        for _ in range(tokens):
            tok = lm.model(tok[:, None], cache)[:, -1].argmax(-1)
        return tokens / (time.perf_counter() - start)


def hf_run(model, tok_ids, tokens: int) -> float:
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        out = model(tok_ids, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(tok[:, None], past_key_values=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
        return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="docs/benchmarks.md")
    args = p.parse_args()

    import prosa
    from prosa.loader import default_model
    from transformers import AutoModelForCausalLM

    path = Path(default_model())
    lm = prosa.load(path, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([lm.encode(PROMPT)])
    ours, theirs = [], []
    for _ in range(args.reps):
        ours.append(prosa_run(lm, args.tokens))
        theirs.append(hf_run(hf, ids, args.tokens))
    import transformers

    a, b = statistics.median(ours), statistics.median(theirs)
    rng = lambda xs: f"{min(xs):.1f}–{max(xs):.1f}"  # noqa: E731
    text = f"""# Benchmarks

Measured by `python bench/decode.py` ({time.strftime('%Y-%m-%d')}): bundled SmolLM2-135M-Instruct (GGUF Q4_1,
dequantized to float32), greedy, {len(lm.encode(PROMPT))}-token prompt, {args.tokens} new tokens, median of {args.reps}
interleaved runs.

Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads),
transformers {transformers.__version__}, Python {platform.python_version()}.

| system | decode tok/s, one stream (median [range]) |
|---|---|
| transformers float32 | {b:.1f} [{rng(theirs)}] |
| prosa float32 | {a:.1f} [{rng(ours)}] |

prosa / transformers: **{a / b:.2f}x**. Quantized modes, batches, time to first token, memory and the llama.cpp /
CTranslate2 peers are issue #4 (see `bench/kernels.py` for the int8/int4 kernels measured so far).
"""
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
