"""The regimes issue #13 adds to the bench: the seed's model family, prompt processing, a memory-bound model, bf16.

    .venv/bin/python bench/regimes.py [--repeat N] [--only family,prefill,scale,bf16] [--output docs/benchmarks.md]

Every configuration runs in its own fresh process (``--worker``), round robin over ``--repeat`` rounds with the
peer and the baseline in the same run, each after waiting (``--settle`` s at most) for the other processes on the
machine to go quiet; each cell is the median [min-max], and every row carries the load other processes put on
the CPUs meanwhile. Four regimes:

* family: GPT-2-124M, GPT-Neo-125M, a small GPT-J (12 x 768, rotary_dim 64) and GPT-NeoX/Pythia-160M shapes with
  random weights (transformers ``save_pretrained``, cached under ~/.cache/prosa/bench): prosa int8 and int4 against
  transformers float32, and whether prosa's fused decode step ran. For GPT-2 also llama.cpp on the same weights
  converted by llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist under build/) to Q8_0,
  and by llama.cpp's quantize (``llama_model_quantize``) from the F32 conversion to Q4_0; prosa runs those files too.
* prefill: a 512-token prompt on the bundled model, prosa's default (int4) against llama.cpp on the same GGUF: time
  to first token and prefill tok/s, for 1 prompt and for 8 prompts at once.
* scale: a TinyLlama-1.1B-shaped Q4_0 GGUF with random weights written by this script with the ``gguf`` writer;
  the machine's memory read bandwidth (``torch.sum`` over 1 GB, 8 passes per round in the same round robin as the
  decode runs: the median round's total bytes / total time, and the best single pass); prosa and llama.cpp decode on
  that file, and prosa's fraction of the bandwidth limit (weight bytes read per token / bandwidth).
* bf16: ``quantize="bf16"`` and ``dtype="auto"`` against float32 on a bfloat16 SmolLM2-135M-shaped HF folder (random
  weights), 1 and 8 sequences, with the
  matmul implementation oneDNN reports (``ONEDNN_VERBOSE``) for one short generation.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from regimes_build import (ENV, FAMILIES, bf16_folder, bundled_gguf, child, convert_hf, family_folder,  # noqa: E402
                           gguf_tensor_bytes, gguf_types, gpt2_gguf, make_bf16_llama, make_family,
                           prepare_gpt2_gguf,
                           prepare_tinyllama, prompt_ids, quantize_gguf, tinyllama_gguf)
from regimes_report import (PREFILL_SEQS, PROMPT_LEN, REGIMES, SECTION, Row, gguf_read_bytes,  # noqa: E402
                            report)
from regimes_work import WORKERS  # noqa: E402
from report import emit_section  # noqa: E402
from run import children_cpu_s, cpu_busy_s, settle  # noqa: E402

RESULT = "REGIMES-RESULT "


# ------------------------------------------------------------------------------------------ parent
def llama_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def plan(only: set[str], gguf: str) -> list[Row]:
    rows: list[Row] = []
    llama = llama_installed()
    if "family" in only:
        for fam in FAMILIES:
            folder = str(family_folder(fam))
            rows += [Row("family", "prosa", fam, q, source="HF folder", path=folder) for q in ("int8", "int4")]
            rows.append(Row("family", "transformers", fam, "float32", source="HF folder", path=folder))
            if fam == "gpt2" and llama:
                for q, gfmt in (("int8", "Q8_0"), ("int4", "Q4_0")):
                    rows.append(Row("family", "prosa", fam, q, source=f"GGUF {gfmt}", path=str(gpt2_gguf(gfmt))))
                    rows.append(Row("family", "llama.cpp", fam, gfmt, source=f"GGUF {gfmt}",
                                    path=str(gpt2_gguf(gfmt))))
    if "prefill" in only:
        for n in (1, PREFILL_SEQS):
            rows.append(Row("prefill", "prosa", "smollm2", "default", n, path=gguf))
            if llama:
                rows.append(Row("prefill", "llama.cpp", "smollm2", "Q4_1", n, path=gguf))
    if "scale" in only:
        rows.append(Row("scale", "machine", "", "read bandwidth"))
        tl = str(tinyllama_gguf())
        rows.append(Row("scale", "prosa", "tinyllama", "int4", path=tl, source="GGUF Q4_0"))
        # the same weights with llama.cpp's arithmetic (int8 activations, prosa's opt-in VNNI kernels)
        rows.append(Row("scale", "prosa", "tinyllama", "int4+a8", path=tl, source="GGUF Q4_0"))
        if llama:
            rows.append(Row("scale", "llama.cpp", "tinyllama", "Q4_0", path=tl, source="GGUF Q4_0"))
    if "bf16" in only:
        folder = str(bf16_folder())       # a bfloat16 checkpoint: what dtype="auto" keeps where the CPU runs it
        for n in (1, 8):
            rows += [Row("bf16", "prosa", "smollm2-bf16", "none", n, dtype="float32", path=folder),
                     Row("bf16", "prosa", "smollm2-bf16", "bf16", n, path=folder),
                     Row("bf16", "prosa", "smollm2-bf16", "none", n, dtype="auto", path=folder)]
    return rows


def spec_for(row: Row, args: argparse.Namespace, rep: int) -> tuple[str, dict[str, Any]]:
    base = {"path": row.path, "seqs": row.seqs, "tokens": args.tokens, "threads": args.threads,
            "format": row.fmt}
    if row.system == "machine":
        return "bandwidth", {"threads": args.threads, "bytes": 2 ** 30, "passes": 8}
    if row.regime == "prefill":
        # vocabulary ids well inside SmolLM2's 49152, past its special tokens; new prompts every round
        prompts = [prompt_ids(1000 * rep + i, PROMPT_LEN, 1000, 40000) for i in range(row.seqs + 1)]
        return f"prefill:{row.system}", {**base, "prompts": prompts}
    spec = dict(base)
    if row.system == "prosa":
        spec["dtype"] = row.dtype
        spec["probe"] = row.regime == "bf16"
    return row.system, spec


def measure(row: Row, args: argparse.Namespace, rep: int) -> None:
    """Run one configuration in a fresh process and append its result (with the other load) or error."""
    kind, spec = spec_for(row, args, rep)
    busy, kids = cpu_busy_s(), children_cpu_s()
    spec["t0"] = time.time()
    try:
        p = subprocess.run([sys.executable, str(HERE), "--worker", kind, json.dumps(spec)], capture_output=True,
                           text=True, timeout=args.timeout, env=ENV)
    except subprocess.TimeoutExpired:
        row.errors.append(f"timed out after {args.timeout:.0f} s")
        return
    wall = time.time() - spec["t0"]
    line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith(RESULT)), None)
    if p.returncode != 0 or line is None:
        tail = [x for x in p.stderr.strip().splitlines() if x.strip()] or [f"exit status {p.returncode}"]
        row.errors.append(f"exit status {p.returncode}: {tail[-1][:300]}")
        return
    res = json.loads(line[len(RESULT):])
    res["other_load"] = max(0.0, (cpu_busy_s() - busy) - (children_cpu_s() - kids)) / wall
    res["wall_s"] = wall
    row.results.append(res)


def worker(kind: str, spec_json: str) -> None:
    out = WORKERS[kind](json.loads(spec_json))
    print(RESULT + json.dumps(out), flush=True)


def prepare(rows: list[Row], args: argparse.Namespace, notes: list[str]) -> None:
    """Build what the rows need, each step in a child process and cached; a failed step fails its rows."""
    steps: dict[str, list[str]] = {}
    for r in rows:
        if r.regime == "family":
            steps.setdefault(f"family:{r.model}", [])
            if r.source.startswith("GGUF"):
                steps.setdefault("gpt2-gguf", [])
        if r.model == "tinyllama":
            steps.setdefault("tinyllama", [])
        if r.model == "smollm2-bf16":
            steps.setdefault("bf16-folder", [])
    failed: dict[str, str] = {}
    for step in steps:
        t = time.time()
        try:
            child(["--prepare", step, str(args.threads)])
            print(f"prepared {step} ({time.time() - t:.0f} s)", flush=True)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            failed[step] = str(e)
            notes.append(f"could not prepare {step}: {e}")
            print(f"could not prepare {step}: {e}", flush=True)
    for r in rows:
        for step, why in failed.items():
            if (step.startswith("family:") and r.regime == "family" and r.model == step.split(":")[1]) or \
                    (step == "gpt2-gguf" and r.source.startswith("GGUF") and r.regime == "family") or \
                    (step == "tinyllama" and r.model == "tinyllama") or \
                    (step == "bf16-folder" and r.model == "smollm2-bf16"):
                r.errors.append(why)
                r.blocked = True


def prepare_step(step: str, threads: int) -> None:
    if step.startswith("family:"):
        make_family(step.split(":", 1)[1])
    elif step == "gpt2-gguf":
        make_family("gpt2")
        prepare_gpt2_gguf(threads)
    elif step == "tinyllama":
        prepare_tinyllama()
    elif step == "bf16-folder":
        make_bf16_llama()
    else:
        raise ValueError(step)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], argv[2])
        return 0
    if argv[:1] == ["--prepare"]:
        prepare_step(argv[1], int(argv[2]))
        return 0
    if argv[:1] == ["--convert"]:
        convert_hf(*argv[1:4])
        return 0
    if argv[:1] == ["--quantize"]:
        quantize_gguf(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="fresh-process runs per configuration, round robin")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per sequence (decode rows)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all usable cores")
    p.add_argument("--only", default=",".join(REGIMES), help=f"comma-separated subset of {','.join(REGIMES)}")
    p.add_argument("--settle", type=float, default=60, help="before each run, wait up to this many seconds for "
                   "the other processes to leave the CPUs idle")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration run")
    p.add_argument("--output", default=None, help="write the section into this markdown file (else print it)")
    args = p.parse_args(argv)
    args.only = [x for x in args.only.split(",") if x]
    if set(args.only) - set(REGIMES):
        p.error(f"--only takes {', '.join(REGIMES)}")
    start = time.time()
    gguf = bundled_gguf()
    rows = plan(set(args.only), gguf)
    notes: list[str] = []
    if not llama_installed():
        notes.append("llama-cpp-python is not installed (`make bench-peers`): no llama.cpp rows.")
    prepare(rows, args, notes)
    args.file_info = {}
    if "scale" in args.only and tinyllama_gguf().is_file():
        sizes = gguf_tensor_bytes(str(tinyllama_gguf()))
        args.file_info = {"types": gguf_types(str(tinyllama_gguf())), "mb": tinyllama_gguf().stat().st_size / 1e6,
                          "read_bytes": gguf_read_bytes(sizes)}
    for rep in range(args.repeat):
        for r in rows:
            if r.blocked:
                continue          # its checkpoint could not be built
            settle(args.settle)
            t, before = time.time(), len(r.errors)
            measure(r, args, rep)
            if len(r.errors) > before:
                what = f"FAILED: {r.errors[-1][:200]}"
            else:
                res = r.results[-1]
                val = res.get("decode_tok_s", res.get("prefill_tok_s", res.get("bandwidth", float("nan")) / 1e9))
                what = f"{val:8.1f} ({'GB/s' if r.system == 'machine' else 'tok/s'}), other load {res['other_load']:.2f}"
            print(f"[{rep + 1}/{args.repeat}] {r.label():<62} {what}  ({time.time() - t:.0f} s)", flush=True)
    section = report(rows, args, time.time() - start, notes)
    emit_section(args.output, SECTION, section)
    if args.output:
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
