"""Quality of the weight formats (none/bf16/int8/int4): perplexity and greedy agreement against float32.

Two tables:

1. The bundled SmolLM2-135M-Instruct GGUF. Its float32 baseline is the file's Q4_1 blocks dequantized, so int4
   (which reuses those blocks) is exact by construction and int8 nearly so: this table checks that prosa runs the
   file faithfully, not what quantization costs.
2. A float model that is not Q4-derived: a GPT-2-shaped model (random init, the bundled model's vocabulary and
   tokenizer, so no download) trained here with ``prosa.finetune(method="full")`` on Python's help topics past the
   first 16000 characters, then evaluated on those first 16000 (held out). This table measures what bf16, int8
   and int4 really cost.

Perplexity is on ``prosa.perplexity.reference_text()`` (the start of ``pydoc_data.topics``: every machine has it);
greedy agreement is how many of the first 32 greedy tokens of each format equal float32's, per prompt.
Targets (issue #4): perplexity within 1% of float32 for int8 and 5% for int4; int8 greedy text equal to float32's
for the first 32 tokens. Both tables are judged.

    .venv/bin/python bench/quality.py                 # prints the markdown section (trains ~5 min on 2 cores)
    .venv/bin/python bench/quality.py --quick         # shorter text, a tiny model trained for seconds (CI)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import emit_section  # noqa: E402  (bench/, the script's own folder)

PROMPTS = ["A story about a man and a dog", "The capital of France is", "def fibonacci(n):",
           "The three most important things in life are", "Water boils at"]
# The trained model only knows Python's documentation, so its prompts come from that world.
DOC_PROMPTS = ["The for statement is used to", "A class definition defines", "def fibonacci(n):",
               "When an exception is raised,", "The import statement"]
FORMATS = ["none", "bf16", "int8", "int4"]
TARGETS = {"int8": 1.0, "int4": 5.0}     # % perplexity above float32
SECTION = "Quality of the weight formats"
EVAL_CHARS = 16000                       # the held-out evaluation text; the trained model never sees it
# The trained model. Its 49152 x 256 output layer is most of its cost per token, so the budget goes to steps,
# not width. The full run trained in 321 s (first-step compile included) on 2 cores shared with a test suite,
# taking held-out perplexity from ~49600 to 382; over 150 steps lr 1e-3 reached 384 where 4e-3 reached 587.
# --quick only exercises the path (seconds).
TRAIN = {False: dict(n_layer=4, n_embd=256, n_positions=512, max_steps=150, batch_size=4, seq_len=256, lr=1e-3),
         True: dict(n_layer=2, n_embd=64, n_positions=128, max_steps=12, batch_size=4, seq_len=64, lr=3e-3)}


def measure_formats(model: str | None, text: str, prompts: list[str], n_new: int) -> dict:
    """Perplexity and greedy agreement of every format of ``model``. Returns {format: {...}}."""
    import prosa
    from prosa.perplexity import perplexity

    out: dict = {}
    ref_tokens = None
    for fmt in FORMATS:
        lm = prosa.load(model, quantize=fmt)
        t = time.perf_counter()
        ppl = perplexity(lm, text, progress=False)
        seconds = time.perf_counter() - t
        tokens = [r.tokens for r in lm.generate(prompts, max_new_tokens=n_new, temperature=0, ignore_eos=True)]
        if ref_tokens is None:
            ref_tokens = tokens
        agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(tokens, ref_tokens)]
        out[fmt] = {"ppl": ppl.perplexity, "tokens_scored": ppl.tokens, "seconds": seconds, "agree": agree,
                    "n_new": n_new, "weights": lm.weights, "window": ppl.window, "stride": ppl.stride}
    return out


def make_gpt2(folder: Path, model: str | None, shape: dict) -> tuple[int, int]:
    """A float32 Hugging Face GPT-2 folder with random weights and ``model``'s tokenizer.
    Returns (vocabulary size, parameters)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from prosa.loader import open_checkpoint
    from prosa.training.export import copy_tokenizer

    ck = open_checkpoint(model)
    eos = ck.config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    bos = ck.config.get("bos_token_id", eos)
    vocab = int(ck.config["vocab_size"])
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=shape["n_positions"], n_embd=shape["n_embd"],
                     n_layer=shape["n_layer"], n_head=max(1, shape["n_embd"] // 64), bos_token_id=bos,
                     eos_token_id=eos, pad_token_id=eos)
    m = GPT2LMHeadModel(cfg)
    m.save_pretrained(folder)
    copy_tokenizer(ck, folder)
    # copy_tokenizer states the source model's context (8192 for SmolLM2); this model has n_positions.
    tc = folder / "tokenizer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "model_max_length": shape["n_positions"]}, indent=2))
    return vocab, sum(p.numel() for p in m.parameters())


def train_float_model(work: Path, quick: bool, model: str | None) -> tuple[Path, dict]:
    """Build the GPT-2-shaped model and train it with prosa on the help topics past ``EVAL_CHARS``.
    Returns (the trained folder, what the report says about the training)."""
    import prosa
    from prosa.perplexity import perplexity, reference_text

    spec = TRAIN[quick]
    base, out = work / "gpt2-init", work / "gpt2-trained"
    vocab, params = make_gpt2(base, model, spec)
    data = work / "train.txt"
    # One long document cut into seq_len windows, like the evaluation text; disjoint from it.
    text = reference_text(10 ** 7)[EVAL_CHARS:]
    data.write_text(text, encoding="utf-8")
    t = time.perf_counter()
    # One checkpoint, at the end: the default's resumable checkpoint every 25 steps (weights + AdamW state)
    # costs seconds of writing each, for a run nobody resumes.
    res = prosa.finetune(str(data), str(out), str(base), method="full", max_steps=spec["max_steps"],
                         batch_size=spec["batch_size"], seq_len=spec["seq_len"], lr=spec["lr"], val_split=0,
                         samples=0, progress=False, compile="auto", save_every=spec["max_steps"])
    seconds = time.perf_counter() - t
    # The untrained model's perplexity (about the vocabulary size: near-uniform logits) shows what training did.
    init = perplexity(prosa.load(str(base)), eval_text(quick)).perplexity
    return out, {**spec, "vocab": vocab, "params": params, "seconds": seconds, "steps": res.steps,
                 "train_loss": res.train_loss, "train_chars": len(text), "init_ppl": init}


def eval_text(quick: bool) -> str:
    """The held-out evaluation text (both tables): the first characters of ``reference_text()``."""
    from prosa.perplexity import reference_text

    return reference_text(4000 if quick else EVAL_CHARS)


def measure(quick: bool = False, model: str | None = None) -> dict:
    """Both tables: {"gguf": {format: ...}, "trained": {format: ...}, "training": {...}}."""
    n_new = 16 if quick else 32
    res = {"gguf": measure_formats(model, eval_text(quick), PROMPTS, n_new)}
    with tempfile.TemporaryDirectory(prefix="prosa-quality-") as tmp:
        folder, res["training"] = train_float_model(Path(tmp), quick, model)
        res["trained"] = measure_formats(str(folder), eval_text(quick), DOC_PROMPTS, n_new)
    return res


def table(res: dict) -> list[str]:
    """Markdown rows of one model's formats, each judged against its target, and the int8 greedy verdict."""
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
        lines += ["", f"int8 greedy text equal to float32 for the first {int8['n_new']} tokens of all "
                      f"{len(int8['agree'])} prompts: {'PASS' if ok else 'MISS'}"]
    none = res["none"]
    lines += ["", f"Perplexity over {none['tokens_scored']} tokens of `reference_text()` "
                  f"(window {none['window']}, stride {none['stride']})."]
    return lines


def markdown(res: dict) -> str:
    """The quality section's body (both tables)."""
    t = res["training"]
    fine = res["trained"]["none"]["ppl"]
    lines = ["### 1. The bundled SmolLM2-135M-Instruct (Q4_1 GGUF): prosa runs the file faithfully", "",
             "The float32 baseline here is the GGUF's Q4_1 blocks dequantized (what transformers runs too), not an "
             "original float model. int4 reuses those exact Q4_1 blocks, so it is exact by construction, and int8 "
             "re-quantizes 4-bit values, so it is nearly exact. This table shows that each format runs the file "
             "faithfully; it does not measure what quantization costs (table 2 does).", ""]
    lines += table(res["gguf"])
    lines += ["", "### 2. A float model that is not Q4-derived: what bf16, int8 and int4 cost", "",
              f"A GPT-2-shaped model ({t['n_layer']} layers, {t['n_embd']} wide, context {t['n_positions']}, "
              f"{t['params'] / 1e6:.1f}M parameters, the bundled model's {t['vocab']}-token vocabulary and "
              f"tokenizer), random init, trained in float32 weights by this bench with `prosa.finetune(method="
              f"\"full\")`: {t['steps']} steps of {t['batch_size']} x {t['seq_len']} tokens, lr {t['lr']:g}, in "
              f"{t['seconds']:.0f} s, on the {t['train_chars']} characters of Python's help topics after the "
              f"first {EVAL_CHARS} (final training loss {t['train_loss']:.2f}). On the held-out evaluation text, "
              f"float32 perplexity {t['init_ppl']:.0f} before training (near-uniform over the vocabulary), "
              f"{fine:.1f} after ({fine / t['vocab']:.2%} of the vocabulary size): a weak model, but one whose "
              "weights are trained float32 values rather than a quantized file's. A model this weak predicts mostly from "
              "token frequencies, so weight noise moves it less than it would a well-trained one: read these deltas "
              "as what quantization costs this model, not as a bound for larger, better-trained ones.", ""]
    lines += table(res["trained"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a shorter text, 16 tokens and a tiny trained model (CI)")
    p.add_argument("-m", "--model", default=None, help="model (default: the bundled SmolLM2)")
    p.add_argument("--output", default=None,
                   help="write the section into this markdown file (replacing an earlier one) instead of printing it")
    args = p.parse_args(argv)
    intro = ("Perplexity of each weight format against float32, and how many greedy tokens match float32's. "
             "Targets (issue #4): perplexity within 1% of float32 for int8 and 5% for int4; int8 greedy text "
             "equal to float32's for the first 32 tokens.")
    section = f"## {SECTION}\n\n{intro}\n\n{markdown(measure(args.quick, args.model))}\n"
    emit_section(args.output, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
