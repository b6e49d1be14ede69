"""Serving load on the engine: clients arriving over time vs a static batch, and no regression for one script.

* Serving load: N clients (1, 4, 8, 16) arrive evenly over ``--arrival`` seconds, each asking ``--tokens`` new
  tokens (sampled, eos ignored, a prompt of its own), each from its own thread through ``LanguageModel.run``.
  Aggregate decode tok/s (steady) = tokens generated while all N clients decode / that time (from the last
  client's first token to the first client's last); "span" = every token over the whole run, arrival ramp and
  tail included (information). Time to first token per client from its submission. The same N prompts as one static batch (``generate([...])``) give the
  reference throughput. Targets (issue #9): 16 staggered clients >= 90% of the static batch-16 throughput;
  aggregate at 16 >= 3.5x a single stream; a newcomer's first token p95 <= 2x the solo time to first token while
  the others decode.
* No regression: single-stream and static-batch-8 greedy decode tok/s of this tree and of ``--baseline`` (the
  commit before the engine), each in fresh processes, round robin in one run; target >= 95%.

    .venv/bin/python bench/serving.py [--quick] [--output docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import emit_section  # noqa: E402  (bench/, the script's own folder)
SECTION = "Serving load (issue #9)"
BASELINE = "3924d56"               # the last commit before the engine
PROMPT = "A story about a man and a dog"
RESULT = "SERVING-RESULT "
MIN_STEADY_S = 0.5                 # a shorter stretch with every client decoding gives no steady rate


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def _rates(stamps: list[list[float]], min_steady: float = 0.0) -> tuple[float, float]:
    """(steady, span) decode tok/s of sequences with these token timestamps: steady counts the tokens made while
    every sequence was decoding (from the last one's first token to the first one's last token), span all tokens
    after each sequence's first from the first token of any to the last of any."""
    start, end = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    inside = sum(1 for s in stamps for t in s if start < t <= end)
    steady = inside / (end - start) if end > start and end - start >= min_steady else float("nan")
    span = sum(len(s) - 1 for s in stamps) / (max(s[-1] for s in stamps) - min(s[0] for s in stamps))
    return steady, span


def clients(lm, n: int, tokens: int, arrival: float) -> dict:
    """N clients arriving evenly over ``arrival`` seconds: their decode rates and first-token latencies."""
    stamps: list[list[float]] = [[] for _ in range(n)]
    ttft = [0.0] * n
    start = time.perf_counter()

    def client(i: int) -> None:
        time.sleep(max(0.0, start + arrival * i / max(1, n) - time.perf_counter()))
        requests = lm.make_requests([f"Client {i}. {PROMPT}"], max_new_tokens=tokens, temperature=0.8, seed=i,
                                    ignore_eos=True)
        submitted = time.perf_counter()
        for ev in lm.run(requests):
            if ev.token >= 0:
                stamps[i].append(time.perf_counter())
        ttft[i] = stamps[i][0] - submitted

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steady, span = _rates(stamps, MIN_STEADY_S if n > 1 else 0.0)
    return {"steady": steady, "span": span, "ttft": ttft}


def static(lm, n: int, tokens: int) -> float:
    """The same prompts as one batch: decode tok/s while all decode."""
    requests = lm.make_requests([f"Client {i}. {PROMPT}" for i in range(n)], max_new_tokens=tokens,
                                temperature=0.8, seed=0, ignore_eos=True)
    stamps: list[list[float]] = [[] for _ in range(n)]
    for ev in lm.run(requests):
        stamps[ev.request].append(time.perf_counter())
    return _rates(stamps)[0]


def serving(model: str | None, sizes: list[int], tokens: int, arrival: float) -> dict:
    import prosa

    lm = prosa.load(model)
    lm.generate(PROMPT, max_new_tokens=4)                       # warm: kernels, engine thread, allocator
    solo = [clients(lm, 1, 8, 0.0)["ttft"][0] for _ in range(5)]
    out = {"model": lm.name, "weights": lm.weights, "solo_ttft": statistics.median(solo), "rows": {}}
    for n in sizes:
        lm.engine.clear_prefix_cache()
        stag = clients(lm, n, tokens, arrival)
        out["rows"][n] = {"staggered": stag["steady"], "span": stag["span"], "static": static(lm, n, tokens),
                          "ttft_p50": _percentile(stag["ttft"], 0.5), "ttft_p95": _percentile(stag["ttft"], 0.95),
                          "newcomer_p95": _percentile(stag["ttft"][1:], 0.95) if n > 1 else None}
    return out


# ------------------------------------------------------------------------------------------ no regression
WORKER = """
import json, sys, time, prosa
lm = prosa.load(None, quantize="int4")
spec = json.loads(sys.argv[1])
out = {}
for b in spec["batches"]:
    _, events = lm.events(["%s"] * b, max_new_tokens=spec["tokens"], temperature=0, ignore_eos=True)
    first = last = None; count = 0
    for ev in events:
        now = time.perf_counter(); first = first or now; last = now; count += 1
    out[b] = (count - b) / (last - first)
print("%s" + json.dumps(out), flush=True)
""" % (PROMPT, RESULT)


def baseline_tree(rev: str) -> Path:
    """A worktree of ``rev`` with its kernels built (under build/), made once."""
    where = ROOT / "build" / f"baseline-{rev}"
    if not (where / ".built").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(where), rev], check=True,
                       capture_output=True)
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=where, check=True,
                       capture_output=True)
        (where / ".built").write_text(rev)
    return where


def regression(rev: str, tokens: int, repeat: int) -> dict:
    trees = {"engine": ROOT, "baseline": baseline_tree(rev)}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    spec = json.dumps({"batches": [1, 8], "tokens": tokens})
    for _ in range(repeat):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"}
            p = subprocess.run([sys.executable, "-c", WORKER, spec], capture_output=True, text=True, env=env,
                               cwd=tree, timeout=900)
            line = next((x for x in p.stdout.splitlines() if x.startswith(RESULT)), None)
            if line is None:
                raise RuntimeError(f"{name} worker failed: {p.stderr[-2000:]}")
            runs[name].append({int(k): v for k, v in json.loads(line[len(RESULT):]).items()})
    return {name: {b: statistics.median(r[b] for r in rs) for b in (1, 8)} for name, rs in runs.items()}


# ------------------------------------------------------------------------------------------------ report
def machine() -> str:
    """CPU model, cores, date and load average (the report's other sections may come from another machine)."""
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {cpu}, {os.cpu_count()} cores, load average "
            f"{load:.2f} at the end (this script's own work included).")


def markdown(serve: dict, reg: dict | None, args) -> str:
    rows = serve["rows"]
    lines = [machine(), "",
             f"Model: {Path(serve['model']).name} ({serve['weights']}); {args.tokens} new tokens per client, sampled, eos "
             f"ignored; clients arrive evenly over {args.arrival:g} s, each in its own thread.", "",
             "| clients | staggered tok/s (steady) | static batch tok/s | staggered / static | staggered tok/s "
             "(span) | TTFT p50 (s) | TTFT p95 (s) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in rows.items():
        steady = "—" if r["staggered"] != r["staggered"] else f"{r['staggered']:.1f}"
        ratio = "—" if r["staggered"] != r["staggered"] else f"{r['staggered'] / r['static']:.2f}"
        lines.append(f"| {n} | {steady} | {r['static']:.1f} | {ratio} | {r['span']:.1f} | {r['ttft_p50']:.3f} | "
                     f"{r['ttft_p95']:.3f} |")
    lines += ["", f"Solo time to first token: {serve['solo_ttft']:.3f} s. —: the first clients were done before the "
              f"last arrived (no {MIN_STEADY_S:g} s with all of them decoding).", "",
              "| target | measured | | status |", "|---|---:|---:|---|"]
    top = max(rows)
    r = rows[top]

    def row(name, value, target, ok, fmt="{:.2f}"):
        lines.append(f"| {name} | {fmt.format(value)} | {target} | {'PASS' if ok else 'MISS'} |")

    row(f"{top} staggered / static batch {top}", r["staggered"] / r["static"], ">= 0.90",
        r["staggered"] / r["static"] >= 0.9)
    if 1 in rows:
        ratio = r["staggered"] / rows[1]["staggered"]
        row(f"aggregate at {top} / single stream", ratio, ">= 3.5x", ratio >= 3.5, "{:.2f}x")
    if r["newcomer_p95"] is not None:
        ratio = r["newcomer_p95"] / serve["solo_ttft"]
        row(f"newcomer TTFT p95 / solo TTFT (with {top - 1} decoding)", ratio, "<= 2x", ratio <= 2.0, "{:.2f}x")
    if reg:
        lines += ["", f"No regression (greedy, {args.tokens} tokens, int4, fresh processes, median of "
                  f"{args.repeat}): this tree vs {args.baseline} (before the engine).", "",
                  "| sequences | before tok/s | engine tok/s | ratio | target | status |", "|---:|---:|---:|---:|---|---|"]
        for b in (1, 8):
            old, new = reg["baseline"][b], reg["engine"][b]
            lines.append(f"| {b} | {old:.1f} | {new:.1f} | {new / old:.2f} | >= 0.95 | "
                         f"{'PASS' if new / old >= 0.95 else 'MISS'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 and 4 clients, 32 tokens, no baseline (CI)")
    p.add_argument("-m", "--model", default=None, help="model (default: the bundled SmolLM2)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--arrival", type=float, default=2.0, help="seconds over which the clients arrive")
    p.add_argument("--baseline", default=BASELINE, help="commit to compare single/static decode with ('' = skip)")
    p.add_argument("--repeat", type=int, default=3, help="fresh-process runs per tree for the regression rows")
    p.add_argument("--output", default=None, help="write the section into this markdown file")
    args = p.parse_args(argv)
    sizes = [1, 4] if args.quick else [1, 4, 8, 16]
    if args.quick:
        args.tokens, args.baseline = min(args.tokens, 32), ""
    serve = serving(args.model, sizes, args.tokens, args.arrival)
    reg = regression(args.baseline, args.tokens, args.repeat) if args.baseline else None
    section = f"## {SECTION}\n\n{__doc__.strip().splitlines()[0]}\n\n{markdown(serve, reg, args)}\n"
    emit_section(args.output, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
