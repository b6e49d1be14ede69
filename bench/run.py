"""prosa vs transformers, CTranslate2 and llama.cpp: decode speed, time to first token and memory, measured in one
run on one machine and written to a markdown report.

    python bench/run.py [--quick] [--repeat N] [--tokens N] [--threads N] [--output docs/benchmarks.md]

Every configuration (system x model x weight format x sequences) runs in its own fresh process, so that time to
first token counts Python start-up, imports and loading, and peak RSS is that configuration's alone. The
configurations are run round robin ``--repeat`` times, to spread the machine's noise over all of them, and each
cell shows the median [min-max]. ``--quick`` (CI) is a five-row subset with 32 new tokens.

Peers are measured when importable (``make bench-peers`` installs them); their converted checkpoints and the
random GPT-2-shaped one are built once under ~/.cache/prosa/bench ($PROSA_BENCH_CACHE).
"""
from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import peers

HERE = Path(__file__).resolve()
RESULT = "BENCH-RESULT "          # prefix of the worker's JSON line (other stdout output is ignored)
PEERS = {"CTranslate2": ("ctranslate2", "ctranslate2"), "llama.cpp": ("llama_cpp", "llama_cpp_python")}
MODELS = {"smollm2": "SmolLM2-135M-Instruct (bundled Q4_1 GGUF)", "gpt2": "GPT-2-124M shape, random weights",
          "gpt2-4": "GPT-2-124M shape cut to 4 layers, random weights"}
# Children run without progress bars and warnings (their stderr is only read for the error of a failed run).
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
OWN_SECTIONS = ("Targets (issue #4)", "Details")
EXACT = ("int4", "none")          # prosa modes that hold the bundled Q4_1 file exactly (int4: repacked blocks)
NOISY = 0.2                       # other processes' load (cores) above which a measurement is flagged


@dataclass
class Config:
    """One row of the table: a system running a model in a weight format on ``seqs`` sequences at once."""

    system: str
    model: str                    # a key of MODELS
    fmt: str                      # prosa: its quantize mode; peers: their own format name
    seqs: int
    path: str = ""                # filled in once the checkpoint exists
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def label(self) -> str:
        return f"{self.system} {self.model} {self.fmt} x{self.seqs}"

    def median(self, key: str) -> float | None:
        vals = [r[key] for r in self.results if r.get(key) == r.get(key)]   # drops NaN
        return statistics.median(vals) if vals else None


def configs(quick: bool) -> list[Config]:
    """The rows to measure, peers included only when installed."""
    if quick:
        return [Config("prosa", "smollm2", "int4", 1), Config("prosa", "smollm2", "none", 1),
                Config("prosa", "smollm2", "int4", 8),
                Config("prosa", "gpt2-4", "int8", 1), Config("transformers", "gpt2-4", "float32", 1)]
    rows = [Config("prosa", "smollm2", m, 1) for m in ("none", "bf16", "int8", "int4", "int4+a8")]
    rows += [Config("prosa", "smollm2", m, b) for m in ("int4", "int4+a8", "int8", "bf16") for b in (8, 32)]
    rows += [Config("transformers", "smollm2", "float32", b) for b in (1, 8)]
    rows += [Config("prosa", "gpt2", m, 1) for m in ("none", "int8", "int4")]
    rows += [Config("transformers", "gpt2", "float32", 1)]
    if installed("CTranslate2"):
        rows += [Config("CTranslate2", "smollm2", q, b) for q in ("int8", "float32") for b in (1, 8)]
    if installed("llama.cpp"):
        rows += [Config("llama.cpp", "smollm2", "Q4_1", 1)]
    return rows


def installed(system: str) -> bool:
    """Whether a peer's module can be imported (checked without importing it)."""
    return importlib.util.find_spec(PEERS[system][0]) is not None


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


# ------------------------------------------------------------------------------------------------ running
def prepare(cfgs: list[Config], gguf: str) -> None:
    """Build the checkpoints the rows need (each once, cached, in a child process) and set each row's path."""
    done: dict[str, str] = {}
    for c in cfgs:
        if c.model == "smollm2" and c.system != "CTranslate2":
            c.path = gguf
            continue
        what = c.model if c.model.startswith("gpt2") else f"ct2-{c.fmt}"
        if what not in done:
            print(f"checkpoint {what}: building it unless cached ...", flush=True)
            subprocess.run([sys.executable, str(HERE), "--prepare", what, "--gguf", gguf], check=True, env=ENV)
            done[what] = str(peers.checkpoint(what))
        c.path = done[what]


def measure(c: Config, tokens: int, threads: int, timeout: float) -> None:
    """Run one configuration in a fresh process; append its result (or error) to the row."""
    spec = {"system": c.system, "path": c.path, "format": c.fmt, "seqs": c.seqs, "tokens": tokens, "threads": threads}
    busy, child = cpu_busy_s(), children_cpu_s()
    spec["t0"] = time.time()      # just before spawning: the child's time to first token starts here
    try:
        p = subprocess.run([sys.executable, str(HERE), "--worker", json.dumps(spec)], capture_output=True, text=True,
                           timeout=timeout, env=ENV)
    except subprocess.TimeoutExpired:
        c.errors.append(f"timed out after {timeout:.0f} s")
        return
    wall = time.time() - spec["t0"]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)]
    if p.returncode == 0 and lines:
        res = json.loads(lines[-1][len(RESULT):])
        # CPU the rest of the machine used meanwhile, in cores: the noise indicator of a shared machine.
        res["other_load"] = max(0.0, (cpu_busy_s() - busy) - (children_cpu_s() - child)) / wall
        c.results.append(res)
        if res["tokens"] != c.seqs * tokens:
            c.notes.append(f"generated {res['tokens']} tokens, not {c.seqs} x {tokens}")
    else:
        tail = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        c.errors.append(f"exit status {p.returncode}: {tail[:200]}")


def cpu_busy_s() -> float:
    """CPU seconds all processes together have used since boot (/proc/stat; NaN where there is none)."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return float("nan")
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")      # minus idle and iowait


def children_cpu_s() -> float:
    """CPU seconds used by this process's finished children (the measured workers)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def settle(max_wait: float, quiet: float = 0.25) -> None:
    """Wait (at most ``max_wait`` s) until other processes use under ``quiet`` cores over a 1 s window: with every
    core in use the measured systems' threads spin-wait on each other and the numbers become noise."""
    deadline = time.time() + max_wait
    while time.time() < deadline:
        busy = cpu_busy_s()
        time.sleep(1.0)
        if cpu_busy_s() - busy < quiet:
            return


def worker(spec_json: str) -> None:
    """Child process: measure the configuration and print its result as one JSON line."""
    spec = json.loads(spec_json)
    out = peers.RUNNERS[spec["system"]](spec)
    print(RESULT + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------ report
def machine() -> dict[str, str]:
    """CPU model, the SIMD/matrix flags that matter to the kernels, cores and RAM."""
    info = {"cpu": platform.processor() or platform.machine(), "flags": "", "ram": "?"}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                want = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                        "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16"]
                info["flags"] = (f"has {', '.join(f for f in want if f in have) or 'none'}; "
                                 f"lacks {', '.join(f for f in want if f not in have) or 'none'}")
                break
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        info["ram"] = f"{int(mem.split()[1]) / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass                      # not Linux: keep what platform knows
    return info


def cell(vals: list[float], digits: int = 1) -> str:
    if not vals:
        return "—"
    med = f"{statistics.median(vals):.{digits}f}"
    return med if len(vals) == 1 else f"{med} [{min(vals):.{digits}f}–{max(vals):.{digits}f}]"


def table(cfgs: list[Config]) -> list[str]:
    out = ["| system | model | format | sequences | decode tok/s | time to first token (s) | peak RSS (MB) "
           "| weights (MB) | other load (cores) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in cfgs:
        head = f"| {c.system} | {MODELS[c.model]} | {c.fmt} | {c.seqs} |"
        if not c.results:
            out.append(f"{head} failed: {c.errors[-1] if c.errors else 'not run'} | | | | |")
            continue
        wb = c.results[0].get("weight_bytes")
        weights = f"{wb / 1e6:.0f}" if wb else "—"
        out.append(f"{head} {cell([r['decode_tok_s'] for r in c.results])} | "
                   f"{cell([r['ttft_s'] for r in c.results], 2)} | {max(r['peak_rss_mb'] for r in c.results):.0f} | "
                   f"{weights} | {cell([r['other_load'] for r in c.results])} |")
    return out


def find(cfgs: list[Config], system: str, model: str, fmts: tuple[str, ...] | None, seqs: int) -> Config | None:
    """The fastest measured row among the matching ones (None when none was measured)."""
    rows = [c for c in cfgs if c.system == system and c.model == model and c.seqs == seqs
            and (fmts is None or c.fmt in fmts) and c.median("decode_tok_s") is not None]
    return max(rows, key=lambda c: c.median("decode_tok_s"), default=None)


def missing(system: str, quick: bool) -> str:
    if system in PEERS and not installed(system):
        return "not installed (make bench-peers)"
    return "not measured in --quick" if quick else "not measured (failed)"


def noisy(*rows: Config) -> str:
    """A warning for a status that rests on rows measured while other processes kept the CPUs busy."""
    load = max(r.median("other_load") or 0.0 for r in rows)
    return f" (noisy: other load {load:.1f} cores)" if load > NOISY else ""


def targets(cfgs: list[Config], quick: bool) -> list[str]:
    """The ratios against issue #4's targets, PASS/MISS each."""
    out = ["| comparison | measured | target | status |", "|---|---:|---:|---|"]

    def ratio(name: str, ours: Config | None, theirs: Config | None, their_system: str, target: float | None,
              floor: float | None = None) -> None:
        if ours is None or theirs is None:
            why = missing(their_system if theirs is None else "prosa", quick)
            out.append(f"| {name} | {why} | {f'≥ {target:g}x' if target else '—'} | — |")
            return
        r = ours.median("decode_tok_s") / theirs.median("decode_tok_s")
        name += f" ({ours.fmt} x{ours.seqs} vs {theirs.fmt} x{theirs.seqs})"
        if target is None:
            status = "info"
        elif r >= target:
            status = "PASS"
        else:
            status = "MISS" + (f" (≥ {floor:g}x floor met)" if floor is not None and r >= floor else "")
        tgt = "—" if target is None else f"≥ {target:g}x" + (f" (floor {floor:g}x)" if floor else "")
        status += noisy(ours, theirs)
        out.append(f"| {name} | {r:.2f}x | {tgt} | {status} |")

    best1 = find(cfgs, "prosa", "smollm2", EXACT, 1)
    hf1 = find(cfgs, "transformers", "smollm2", None, 1)
    ratio("prosa best exact single stream / transformers fp32", best1, hf1, "transformers", 5)
    ratio("prosa float32 single stream / transformers fp32", find(cfgs, "prosa", "smollm2", ("none",), 1), hf1,
          "transformers", None)
    ratio("prosa best exact single stream / llama.cpp", best1, find(cfgs, "llama.cpp", "smollm2", None, 1),
          "llama.cpp", 1.25, 1.0)
    ratio("prosa best exact single stream / CTranslate2 int8", best1,
          find(cfgs, "CTranslate2", "smollm2", ("int8",), 1), "CTranslate2", 1.2, 1.0)
    fast1 = find(cfgs, "prosa", "smollm2", ("int4+a8",), 1)   # same weights, llama.cpp's int8 activations
    ratio("prosa int4 + int8 activations (opt-in) / llama.cpp", fast1, find(cfgs, "llama.cpp", "smollm2", None, 1),
          "llama.cpp", 1.2, 1.0)
    ratio("prosa int4 + int8 activations (opt-in) / CTranslate2 int8", fast1,
          find(cfgs, "CTranslate2", "smollm2", ("int8",), 1), "CTranslate2", 1.2, 1.0)
    ratio("prosa 8 sequences / CTranslate2 int8 8 sequences", find(cfgs, "prosa", "smollm2", None, 8),
          find(cfgs, "CTranslate2", "smollm2", ("int8",), 8), "CTranslate2", 1.2)
    ratio("prosa 32 sequences / transformers fp32 single stream", find(cfgs, "prosa", "smollm2", None, 32), hf1,
          "transformers", 20)
    gpt = "gpt2-4" if quick else "gpt2"
    ratio(f"{'4-layer ' if quick else ''}GPT-2-shaped prosa int8 / transformers fp32",
          find(cfgs, "prosa", gpt, ("int8",), 1), find(cfgs, "transformers", gpt, None, 1), "transformers", 4)
    # issue #13: cold start and memory against `import torch` measured in the same process (peers.run_prosa)
    for c in cfgs:
        if c.system == "prosa" and c.model == "smollm2" and c.seqs == 1 and c.results:
            over = statistics.median(r["ttft_s"] - r["import_torch_s"] for r in c.results)
            torch_s = c.median("import_torch_s")
            # the target is the default load, the file's blocks as stored; the other formats convert every
            # weight (a pass over them that the target rules out), so their rows are for information
            target, status = ("≤ import torch + 0.6 s", ("PASS" if over <= 0.6 else "MISS") + noisy(c)) \
                if c.fmt.startswith("int4") else ("— (converts every weight)", "info")
            out.append(f"| time to first token from process start, prosa {c.fmt} | {c.median('ttft_s'):.2f} s = "
                       f"import torch {torch_s:.2f} s + {over:.2f} s | {target} | {status} |")
    for c in cfgs:
        if c.system == "prosa" and c.model == "smollm2" and c.seqs == 1 and c.results:
            over = max(r["peak_rss_mb"] - r["import_torch_rss_mb"] for r in c.results)
            wb = c.results[0]["weight_bytes"] / 2**20
            limit = 1.25 * wb + 64
            out.append(f"| peak RSS - import torch RSS, prosa {c.fmt} (weights {wb:.0f} MiB) | {over:.0f} MiB | "
                       f"≤ {limit:.0f} MiB (1.25 x weights + 64) | {'PASS' if over <= limit else 'MISS'} |")
    return out


def report(cfgs: list[Config], args: argparse.Namespace, elapsed: float) -> str:
    m = machine()
    prompt_lens = sorted({(MODELS[c.model], r["prompt_tokens"]) for c in cfgs for r in c.results[:1]})
    lens = "; ".join(f"{n}: {k} tokens" for n, k in dict(prompt_lens).items())
    weights = {f"prosa {c.fmt}": c.results[0]["weights"] for c in cfgs
               if c.system == "prosa" and c.model == "smollm2" and c.results}
    samples = [f"- {c.system} {c.fmt}, {MODELS[c.model]}: `{c.results[0]['sample'].strip()!r}`"
               for c in cfgs if c.seqs == 1 and c.results]
    versions = ", ".join(f"{n} {v}" for n, v in [
        ("Python", platform.python_version()), ("torch", version("torch")), ("transformers", version("transformers")),
        ("prosa", version("prosa")), ("ctranslate2", version("ctranslate2")),
        ("llama-cpp-python", version("llama_cpp_python"))])
    lines = [
        "# Benchmarks", "",
        f"Written by `python bench/run.py{' --quick' if args.quick else ''} --repeat {args.repeat}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} ({elapsed / 60:.1f} min){' — QUICK MODE (CI subset)' if args.quick else ''}.",
        "",
        f"- Machine: {m['cpu']}, {os.cpu_count()} cores ({args.threads} threads used by every system), "
        f"{m['ram']} RAM; CPU flags: {m['flags']}.",
        f"- Versions: {versions}.",
        f"- Workload: prompt \"{peers.PROMPT}\" ({lens}), {args.tokens} new tokens, greedy, end-of-sequence "
        "ignored; with several sequences the same prompt is decoded as one batch.",
        f"- Each configuration ran in a fresh process, {args.repeat} time(s), round robin. Decode tok/s: aggregate "
        "over all sequences, after the first step, median [min–max]. Time to first token: from just before the "
        "process is spawned (Python start-up, imports and model load included) until the first token's text is "
        "available. Peak RSS: the process's VmHWM, max over repeats. Weights: bytes of the model's tensors in "
        "memory (llama.cpp: the mapped GGUF file; CTranslate2: model.bin). Other load: cores kept busy by other "
        "processes during the run; the machine may be shared, and with all cores in use every system here slows "
        f"down (llama.cpp and OpenMP spin-wait, so they collapse), so rows with other load above {NOISY} are noise "
        "(and the targets resting on them are marked noisy).",
        "", *table(cfgs), "",
        "## Targets (issue #4)", "",
        "\"Best exact\" is the faster of prosa's modes that hold the bundled Q4_1 file without further rounding: "
        "int4 (the Q4_1 blocks repacked) and none (dequantized to float32); bf16 and int8 round again.", "",
        *targets(cfgs, args.quick), "",
        "## Details", "",
        "prosa weight formats (`LanguageModel.weights`):", "",
        *[f"- {k}: {v}" for k, v in weights.items()], "",
        "Start of each single-stream continuation (greedy, so equal formats should agree):", "", *samples, ""]
    if not args.quick:
        lines += [f"Peers not installed: {', '.join(s for s in PEERS if not installed(s)) or 'none'} "
                  "(`make bench-peers` installs ctranslate2 and llama-cpp-python).", ""]
    failures = [f"- {c.label()}: {e}" for c in cfgs for e in c.errors + c.notes]
    if failures:
        lines += ["Failed or short runs:", "", *failures, ""]
    return "\n".join(lines)


def other_sections(path: Path) -> str:
    """The "## " sections of an existing report that this script does not write (e.g. bench/quality.py's), so
    that rewriting the table keeps them."""
    if not path.is_file():
        return ""
    parts = path.read_text().split("\n## ")[1:]
    return "".join(f"\n## {p.rstrip()}\n" for p in parts if not p.startswith(OWN_SECTIONS))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CI subset: 5 rows, 32 tokens, 1 repeat")
    p.add_argument("--repeat", type=int, help="runs per configuration (default 3, 1 with --quick)")
    p.add_argument("--tokens", type=int, help="new tokens per sequence (default 128, 32 with --quick)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all usable cores")
    p.add_argument("--output", default="docs/benchmarks.md")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration run")
    p.add_argument("--settle", type=float, help="before each run, wait up to this many seconds for the other "
                   "processes to leave the CPUs idle (default 60, 0 with --quick)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--prepare", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.prepare:
        return peers.prepare(args.prepare, args.gguf)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.tokens = args.tokens or (32 if args.quick else 128)
    args.settle = args.settle if args.settle is not None else (0 if args.quick else 60)

    start = time.time()
    # prosa's bytecode, compiled once as `pip install` does: on a machine that sets PYTHONDONTWRITEBYTECODE (this
    # one does) an editable install would otherwise compile ~60 modules from source in every cold start (0.06 s)
    compileall.compile_dir(str(HERE.parents[1] / "prosa"), quiet=1)
    gguf = subprocess.run([sys.executable, "-c", "from prosa.loader import default_model; print(default_model())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    cfgs = configs(args.quick)
    prepare(cfgs, gguf)
    for rep in range(args.repeat):
        for c in cfgs:
            settle(args.settle)
            t, failed = time.time(), len(c.errors)
            measure(c, args.tokens, args.threads, args.timeout)
            r = c.results[-1] if len(c.errors) == failed else None
            last = f"{r['decode_tok_s']:7.1f} tok/s, other load {r['other_load']:.1f}" if r else f"FAILED: {c.errors[-1]}"
            print(f"[{rep + 1}/{args.repeat}] {c.label():<34} {last}  ({time.time() - t:.0f} s)", flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(cfgs, args, time.time() - start) + other_sections(out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
