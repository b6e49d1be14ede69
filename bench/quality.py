"""Quality of the weight formats on the bundled SmolLM2-135M-Instruct: what quantization costs.

* Perplexity of each format on ``prosa.perplexity.reference_text()`` (the start of the standard library's
  ``pydoc_data.topics`` help text: every machine has it), against float32 (the GGUF's Q4_1 blocks dequantized,
  which is what transformers runs).
* Greedy agreement: for a few prompts, how many of the first 32 greedy tokens of each format equal float32's.

Targets (issue #4): perplexity within 1% of float32 for int8 and 5% for int4; int8 greedy text equal to float32's
for the first 32 tokens.

    .venv/bin/python bench/quality.py                 # prints the markdown section
    .venv/bin/python bench/quality.py --quick         # a shorter text (CI)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import emit_section  # noqa: E402  (bench/, the script's own folder)

PROMPTS = ["A story about a man and a dog", "The capital of France is", "def fibonacci(n):",
           "The three most important things in life are", "Water boils at"]
FORMATS = ["none", "bf16", "int8", "int4"]
TARGETS = {"int8": 1.0, "int4": 5.0}     # % perplexity above float32
SECTION = "Quality of the weight formats"


def measure(quick: bool = False, model: str | None = None) -> dict:
    """Perplexity and greedy agreement of every format. Returns {format: {...}}."""
    import prosa
    from prosa.perplexity import perplexity, reference_text

    text = reference_text(4000 if quick else 16000)
    n_new = 16 if quick else 32
    out: dict = {}
    ref_tokens = None
    for fmt in FORMATS:
        lm = prosa.load(model, quantize=fmt)
        t = time.perf_counter()
        ppl = perplexity(lm, text, progress=False)
        seconds = time.perf_counter() - t
        tokens = [r.tokens for r in lm.generate(PROMPTS, max_new_tokens=n_new, temperature=0, ignore_eos=True)]
        if ref_tokens is None:
            ref_tokens = tokens
        agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(tokens, ref_tokens)]
        out[fmt] = {"ppl": ppl.perplexity, "tokens_scored": ppl.tokens, "seconds": seconds, "agree": agree,
                    "n_new": n_new, "weights": lm.weights}
    return out


def markdown(res: dict) -> str:
    """The quality section of docs/benchmarks.md."""
    base = res["none"]["ppl"]
    lines = ["| format | perplexity | vs float32 | target | greedy tokens equal to float32 (per prompt) | "
             "weights |", "|---|---|---|---|---|---|"]
    for fmt, r in res.items():
        delta = 100 * (r["ppl"] / base - 1)
        target = TARGETS.get(fmt)
        verdict = "" if target is None else (f"<= {target:.0f}%: " + ("PASS" if delta <= target else "MISS"))
        agree = ", ".join(f"{a}/{r['n_new']}" for a in r["agree"])
        lines.append(f"| {fmt} | {r['ppl']:.3f} | {delta:+.2f}% | {verdict} | {agree} | {r['weights']} |")
    int8 = res.get("int8")
    if int8:
        ok = all(a == int8["n_new"] for a in int8["agree"])
        lines.append("")
        lines.append(f"int8 greedy text equal to float32 for the first {int8['n_new']} tokens of all "
                     f"{len(int8['agree'])} prompts: {'PASS' if ok else 'MISS'}")
    n = res["none"]["tokens_scored"]
    lines.append("")
    lines.append(f"Perplexity over {n} tokens of `reference_text()` (window 2048, stride 1024).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a shorter text and 16 tokens (CI)")
    p.add_argument("-m", "--model", default=None, help="model (default: the bundled SmolLM2)")
    p.add_argument("--output", default=None,
                   help="write the section into this markdown file (replacing an earlier one) instead of printing it")
    args = p.parse_args(argv)
    section = f"## {SECTION}\n\n{__doc__.strip().splitlines()[0]}\n\n{markdown(measure(args.quick, args.model))}\n"
    emit_section(args.output, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
