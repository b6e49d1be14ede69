"""bench/regimes.py's report side, pure (no measuring, no subprocess): one configuration's row and its results,
the PASS / MISS arithmetic against the targets, the bandwidth limit, and the markdown section with its four tables."""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from regimes_build import FAMILIES, MODELS, gguf_types, gpt2_gguf  # noqa: E402
from run import NOISY, cell, machine, version  # noqa: E402

SECTION = "Model family, prompt processing, memory-bound scale, bf16 (issue #13)"
# the first line of bench/regimes.py's docstring, the section's opening line
HEADLINE = ("The regimes issue #13 adds to the bench: the seed's model family, prompt processing, a memory-bound "
            "model, bf16.")
REGIMES = ("family", "prefill", "scale", "bf16")
PROMPT_LEN, PREFILL_SEQS = 512, 8
TARGETS = {"int8_vs_hf": 4.0, "int4_vs_hf": 5.0, "vs_llama": 1.1, "prefill": 1.0, "scale_vs_llama": 1.1,
           "bandwidth": 0.80}


# ------------------------------------------------------------------------------------------ pure helpers
def ratio_status(ratio: float | None, target: float | None, strict: bool = False) -> str:
    """PASS / MISS of a measured ratio against a ``>=`` target (``>`` when strict); "info" without a target."""
    if ratio is None or ratio != ratio:
        return "—"
    if target is None:
        return "info"
    return "PASS" if (ratio > target if strict else ratio >= target) else "MISS"


def noisy_note(loads: Iterable[float | None]) -> str:
    """" (noisy: ...)" when any of the rows a status rests on had other load above NOISY cores."""
    worst = max((x for x in loads if x is not None), default=0.0)
    return f" (noisy: other load {worst:.1f} cores)" if worst > NOISY else ""


def target_row(name: str, ratio: float | None, target: float | None, loads: Iterable[float | None] = (),
               unit: str = "x", strict: bool = False, why: str = "") -> str:
    """One line of a targets table: | comparison | measured | target | status |."""
    if ratio is None or ratio != ratio:
        return f"| {name} | {why or 'not measured'} | {fmt_target(target, unit, strict)} | — |"
    shown = f"{100 * ratio:.0f}%" if unit == "%" else f"{ratio:.2f}x"
    return (f"| {name} | {shown} | {fmt_target(target, unit, strict)} | "
            f"{ratio_status(ratio, target, strict)}{noisy_note(loads) if target is not None else ''} |")


def fmt_target(target: float | None, unit: str = "x", strict: bool = False) -> str:
    if target is None:
        return "—"
    return f"{'>' if strict else '≥'} {100 * target:.0f}%" if unit == "%" else f"{'>' if strict else '≥'} {target:g}x"


def bandwidth_limit(bytes_per_token: float, bandwidth: float) -> float:
    """The decode rate (tok/s) at which reading ``bytes_per_token`` of weights per token takes all of ``bandwidth``
    (bytes/s): the memory-bound ceiling of single-stream decode."""
    return bandwidth / bytes_per_token


def fraction_of_limit(tok_s: float, bytes_per_token: float, bandwidth: float) -> float:
    """How much of the bandwidth a decode rate uses: tok/s x bytes read per token / bandwidth."""
    return tok_s * bytes_per_token / bandwidth


def gguf_read_bytes(tensor_bytes: dict[str, int]) -> int:
    """Weight bytes a decode step reads from a GGUF's tensors: all of them but the token embedding, of which one
    row is read (unless there is no output.weight: then the embedding is the output layer, read whole)."""
    tied = "output.weight" not in tensor_bytes
    return sum(n for name, n in tensor_bytes.items() if tied or not name.startswith("token_embd."))


@dataclass
class Row:
    """One configuration: a system running a model in a format on ``seqs`` sequences."""

    regime: str
    system: str                   # prosa, transformers, llama.cpp, machine
    model: str                    # a key of MODELS ("" for the machine)
    fmt: str
    seqs: int = 1
    dtype: str = ""               # prosa's dtype= ("" = its default)
    source: str = ""              # what file it ran: "HF folder", "GGUF Q8_0", ...
    path: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    blocked: bool = False         # what it runs could not be built: not measured

    def label(self) -> str:
        extra = f" dtype={self.dtype}" if self.dtype else ""
        src = f" [{self.source}]" if self.source else ""
        return f"{self.regime}: {self.system} {self.model} {self.fmt}{extra} x{self.seqs}{src}"

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.results if isinstance(r.get(key), (int, float)) and r[key] == r[key]]

    def median(self, key: str) -> float | None:
        vals = self.values(key)
        return statistics.median(vals) if vals else None

    def first(self, key: str, default: Any = None) -> Any:
        return next((r[key] for r in self.results if key in r), default)


# ------------------------------------------------------------------------------------------ report
def find(rows: list[Row], regime: str, system: str, model: str, fmt: str | None = None, seqs: int = 1,
         source: str | None = None, dtype: str | None = None) -> Row | None:
    for r in rows:
        if (r.regime, r.system, r.model, r.seqs) == (regime, system, model, seqs) and (fmt is None or r.fmt == fmt) \
                and (source is None or r.source == source) and (dtype is None or r.dtype == dtype):
            return r
    return None


def ratio(a: Row | None, b: Row | None, key: str = "decode_tok_s") -> float | None:
    if a is None or b is None:
        return None
    x, y = a.median(key), b.median(key)
    return x / y if x is not None and y else None


def why_missing(*rows: Row | None) -> str:
    for r in rows:
        if r is None:
            return "not measured (peer not installed: make bench-peers)"
        if not r.results:
            return f"failed: {r.errors[-1][:120]}" if r.errors else "not measured"
    return "not measured"


def loads(*rows: Row | None) -> list[float | None]:
    return [r.median("other_load") for r in rows if r is not None]


def failed_cells(r: Row, n: int) -> str:
    return f" failed: {r.errors[-1][:160] if r.errors else 'not run'} |" + " |" * (n - 1)


def family_section(rows: list[Row]) -> list[str]:
    out = ["### The seed's model family", "",
           "Random weights (transformers' own initialisation, seed 0, `save_pretrained`), bench/peers.py's 50257-id "
           "byte-level tokenizer, the bench prompt, 128 greedy tokens, 1 sequence, end of sequence ignored. Fused: "
           "`prosa.decode.decode_step(lm.model) is not lm.model` in the measuring process after the run (prosa's one "
           "native call per block).", "",
           "| model | system | weights | format | decode tok/s | time to first token (s) | peak RSS (MB) "
           "| fused decode step | other load (cores) |", "|---|---|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        if r.regime != "family":
            continue
        head = f"| {MODELS[r.model]} | {r.system} | {r.source} | {r.fmt} |"
        if not r.results:
            out.append(head + failed_cells(r, 5))
            continue
        fused = {True: "yes", False: "no"}.get(r.first("fused"), "—")
        out.append(f"{head} {cell(r.values('decode_tok_s'))} | {cell(r.values('ttft_s'), 2)} | "
                   f"{max(r.values('peak_rss_mb')):.0f} | {fused} | {cell(r.values('other_load'))} |")
    out += ["", "| comparison | measured | target | status |", "|---|---:|---:|---|"]
    for fam in FAMILIES:
        hf = find(rows, "family", "transformers", fam)
        for q, key in (("int8", "int8_vs_hf"), ("int4", "int4_vs_hf")):
            ours = find(rows, "family", "prosa", fam, q, source="HF folder")
            out.append(target_row(f"{FAMILIES[fam]}: prosa {q} / transformers fp32", ratio(ours, hf), TARGETS[key],
                                  loads(ours, hf), why=why_missing(ours, hf)))
    for q, gfmt in (("int8", "Q8_0"), ("int4", "Q4_0")):
        peer = find(rows, "family", "llama.cpp", "gpt2", gfmt)
        same = find(rows, "family", "prosa", "gpt2", q, source=f"GGUF {gfmt}")
        ours = same if same is not None and same.results else find(rows, "family", "prosa", "gpt2", q,
                                                                  source="HF folder")
        which = "the same GGUF" if ours is same else "the HF folder (prosa could not run the GGUF)"
        out.append(target_row(f"GPT-2: prosa {q} ({which}) / llama.cpp {gfmt}", ratio(ours, peer),
                              TARGETS["vs_llama"], loads(ours, peer), why=why_missing(peer, ours)))
    return out


def prefill_section(rows: list[Row]) -> list[str]:
    pr = [r for r in rows if r.regime == "prefill"]
    how = {r.system: r.first("how") for r in pr if r.results}
    ours = next((r for r in pr if r.system == "prosa" and r.results), None)
    chunk = ours.first("prefill_chunk") if ours else None
    out = ["### Prompt processing", "",
           f"{PROMPT_LEN}-token prompts of pseudo-random token ids (ids 1000-39999 of the bundled vocabulary, new "
           "prompts every round, the same ids for both systems), one new token each, after one warm-up prompt of the "
           "same length in the same process (then prosa's prefix cache and llama.cpp's KV memory are cleared). Time "
           "to first token: from the submission to the last of the prompts' first tokens (in the warm process: no "
           "start-up or load); prefill tok/s = prompt tokens in all / that time. "
           f"prosa: default load of the bundled GGUF ({(ours.first('weights') or '—').split(';')[0] if ours else '—'}), "
           f"{how.get('prosa', '—')}, its default prefill_chunk {chunk} tokens per step. "
           f"llama.cpp: {how.get('llama.cpp', '—')} — llama.cpp's batched way (as its batched example and "
           "llama-server's slots), faster than 8 separate contexts sharing 2 cores.", "",
           "| system | prompts | prefill tok/s | time to first token (s) | first prompt's first token (s) "
           "| peak RSS (MB) | other load (cores) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in pr:
        head = f"| {r.system} | {r.seqs} x {PROMPT_LEN} |"
        if not r.results:
            out.append(head + failed_cells(r, 5))
            continue
        out.append(f"{head} {cell(r.values('prefill_tok_s'))} | {cell(r.values('ttft_s'), 3)} | "
                   f"{cell(r.values('ttft_first_s'), 3)} | {max(r.values('peak_rss_mb')):.0f} | "
                   f"{cell(r.values('other_load'))} |")
    out += ["", "| comparison | measured | target | status |", "|---|---:|---:|---|"]
    for n in (1, PREFILL_SEQS):
        a, b = find(rows, "prefill", "prosa", "smollm2", seqs=n), find(rows, "prefill", "llama.cpp", "smollm2", seqs=n)
        out.append(target_row(f"prefill tok/s, {n} prompt(s): prosa / llama.cpp", ratio(a, b, "prefill_tok_s"),
                              TARGETS["prefill"], loads(a, b), why=why_missing(a, b)))
        inv = ratio(b, a, "ttft_s")          # llama.cpp's time / prosa's: >= 1 when prosa's first token is sooner
        out.append(target_row(f"time to first token, {n} prompt(s): llama.cpp / prosa", inv, TARGETS["prefill"],
                              loads(a, b), why=why_missing(a, b)))
    return out


def scale_section(rows: list[Row], file_info: dict[str, Any]) -> list[str]:
    bw_row = find(rows, "scale", "machine", "")
    # The limit divides by the bandwidth the memory gave over a round (all passes: total bytes / total time), median
    # over the rounds: the statistic of the decode rates it is compared with (tokens / time, median over the same
    # interleaved rounds). The best single pass over all rounds is a peak that a shared VM gives for a moment; the
    # fraction against it is printed too. Results from before "sustained" existed fall back to the best pass.
    bws = bw_row.values("bandwidth") if bw_row else []
    peak = max(bws) if bws else None
    bw = (bw_row.median("sustained") if bw_row else None) or peak
    detail = ""
    if bw_row and bw_row.results:
        t = max(r["torch_bytes_s"] for r in bw_row.results) / 1e9
        n = max(r["numpy_bytes_s"] for r in bw_row.results) / 1e9
        sus = cell([v / 1e9 for v in bw_row.values("sustained")])
        detail = (f"torch.sum with the bench's threads: all passes of a round together {sus} GB/s, best single "
                  f"pass {t:.1f} GB/s; numpy.sum (1 thread) best {n:.1f} GB/s; "
                  f"other load {cell(bw_row.values('other_load'))} cores")
    out = ["### Memory-bound scale", "",
           f"{MODELS['tinyllama']}: {file_info.get('types', '—')}, {file_info.get('mb', 0):.0f} MB, written by this "
           "script with gguf-py's `GGUFWriter` (random Q4_0 blocks; a 32000-token SentencePiece-style vocabulary); "
           "the bench prompt, 128 greedy tokens, end of sequence ignored. "
           f"Read bandwidth: {bw / 1e9:.1f} GB/s ({len(bws)} rounds x 8 passes over 1 GB, interleaved with the "
           f"decode runs: {detail})." if bw else "Read bandwidth: not measured.",
           "Weight bytes read per token: every weight but the token embedding (one row of it is read): for prosa the "
           "bytes of its in-memory tensors, for llama.cpp the GGUF's tensor data. Limit = bandwidth / those bytes; "
           "fraction = decode tok/s / limit.", "",
           "| system | format | decode tok/s | time to first token (s) | weights read per token (MB) "
           "| bandwidth limit (tok/s) | fraction of the limit | peak RSS (MB) | other load (cores) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.regime != "scale" or r.system == "machine":
            continue
        head = f"| {r.system} | {r.fmt} ({r.first('weights', r.source)}) |"
        if not r.results:
            out.append(head + failed_cells(r, 7))
            continue
        rb, tok_s = r.first("read_bytes"), r.median("decode_tok_s")
        lim = f"{bandwidth_limit(rb, bw):.1f}" if bw and rb else "—"
        frac = f"{100 * fraction_of_limit(tok_s, rb, bw):.0f}%" if bw and rb and tok_s else "—"
        out.append(f"{head} {cell(r.values('decode_tok_s'))} | {cell(r.values('ttft_s'), 2)} | "
                   f"{rb / 1e6:.0f} | {lim} | {frac} | {max(r.values('peak_rss_mb')):.0f} | "
                   f"{cell(r.values('other_load'))} |")
    ours, peer = find(rows, "scale", "prosa", "tinyllama", "int4"), find(rows, "scale", "llama.cpp", "tinyllama")
    a8 = find(rows, "scale", "prosa", "tinyllama", "int4+a8")
    out += ["", "| comparison | measured | target | status |", "|---|---:|---:|---|",
            target_row("TinyLlama-1.1B shape Q4_0: prosa (default: float activations) / llama.cpp decode",
                       ratio(ours, peer), TARGETS["scale_vs_llama"], loads(ours, peer), why=why_missing(ours, peer))]
    if a8 is not None:
        out.append(target_row("TinyLlama-1.1B shape Q4_0: prosa int4+a8 (int8 activations, llama.cpp's arithmetic) / "
                              "llama.cpp decode", ratio(a8, peer), TARGETS["scale_vs_llama"], loads(a8, peer),
                              why=why_missing(a8, peer)))
    frac = None
    if ours is not None and ours.results and bw:
        frac = fraction_of_limit(ours.median("decode_tok_s"), ours.first("read_bytes"), bw)
    out.append(target_row("prosa's fraction of the bandwidth limit (its own bytes read per token)", frac,
                          TARGETS["bandwidth"], loads(ours, bw_row), unit="%", why=why_missing(ours, bw_row)))
    if ours is not None and ours.results and peak and peak != bw:
        f3 = fraction_of_limit(ours.median("decode_tok_s"), ours.first("read_bytes"), peak)
        out.append(target_row("prosa's fraction against the best single bandwidth pass (a moment's peak)", f3, None,
                              unit="%"))
    if ours is not None and ours.results and bw and file_info.get("read_bytes"):
        f2 = fraction_of_limit(ours.median("decode_tok_s"), file_info["read_bytes"], bw)
        out.append(target_row("prosa's decode against the file's limit (the GGUF's bytes read per token)", f2, None,
                              unit="%"))
    return out


def bf16_section(rows: list[Row], flags: str) -> list[str]:
    have = flags.split(";")[0]
    native = "avx512_bf16" in have or "amx_bf16" in have
    out = ["### bf16", "",
           f"{MODELS['smollm2-bf16']} (config dtype bfloat16: what `dtype=\"auto\"` keeps where the CPU runs bf16 "
           "natively), the bench prompt, 128 greedy tokens, end of sequence ignored. This CPU "
           f"{'has' if native else 'lacks'} native bf16 (avx512_bf16 / amx_bf16 in /proc/cpuinfo). Matmul path: "
           "oneDNN's implementation names from its verbose log during a 3-token generation after the timed one "
           "(`…_bf16` / `amx` = native bf16 instructions), whether prosa's fused decode step ran, and the layer types.",
           "", "| quantize | dtype (resolved) | sequences | decode tok/s | time to first token (s) | peak RSS (MB) "
           "| matmul path | other load (cores) |", "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if r.regime != "bf16":
            continue
        head = f"| {r.fmt} | {r.dtype or 'auto'} ({r.first('dtype', '?')}) | {r.seqs} |"
        if not r.results:
            out.append(head + failed_cells(r, 5))
            continue
        out.append(f"{head} {cell(r.values('decode_tok_s'))} | {cell(r.values('ttft_s'), 2)} | "
                   f"{max(r.values('peak_rss_mb')):.0f} | {r.first('matmul', '—')} | {cell(r.values('other_load'))} |")
    out += ["", "| comparison | measured | target | status |", "|---|---:|---:|---|"]
    for n in (1, 8):
        f32 = find(rows, "bf16", "prosa", "smollm2-bf16", "none", n, dtype="float32")
        for fmt, dt, name in (("bf16", "", "quantize=bf16"), ("none", "auto", "dtype=auto")):
            r = find(rows, "bf16", "prosa", "smollm2-bf16", fmt, n, dtype=dt)
            resolved = r.first("dtype") if r is not None else None
            label = f"{name} ({resolved}) / float32, {n} sequence(s)"
            # dtype=auto keeps float32 where bf16 measured slower (prosa.loader._bf16_beats_float32): then the row
            # compares float32 with itself, for information
            target = 1.0 if native and not (fmt == "none" and resolved == "float32") else None
            out.append(target_row(label, ratio(r, f32), target, loads(r, f32), strict=True,
                                  why=why_missing(r, f32)))
    return out


def report(rows: list[Row], args: argparse.Namespace, elapsed: float, notes: list[str]) -> str:
    m = machine()
    versions = ", ".join(f"{n} {v}" for n, v in [
        ("Python", platform.python_version()), ("torch", version("torch")), ("transformers", version("transformers")),
        ("prosa", version("prosa")), ("llama-cpp-python", version("llama_cpp_python")), ("gguf", version("gguf"))])
    only = set(args.only)
    lines = [f"## {SECTION}", "", HEADLINE, "",
             f"`bench/regimes.py --repeat {args.repeat}`{' --only ' + ','.join(args.only) if only != set(REGIMES) else ''}"
             f", {time.strftime('%Y-%m-%d %H:%M')} ({elapsed / 60:.1f} min), on {m['cpu']}, {os.cpu_count()} cores "
             f"({args.threads} threads for every system), {m['ram']} RAM; CPU flags: {m['flags']}. "
             f"Versions: {versions}. Each configuration in a fresh process, {args.repeat} round(s) round robin, the "
             f"peer and the baseline in the same run; median [min–max]; peak RSS: max over rounds. Other load: cores "
             f"busy with other processes during the configuration's run (above {NOISY}: noisy, and so marked).", ""]
    if "family" in only:
        lines += family_section(rows) + [""]
        if any(r.source.startswith("GGUF") for r in rows if r.regime == "family"):
            q8, q4 = gpt2_gguf("Q8_0"), gpt2_gguf("Q4_0")
            kinds = {p.name: gguf_types(str(p)) for p in (q8, q4) if p.is_file()}
            lines += ["GPT-2 GGUF files: " + "; ".join(f"`{k}`: {v}" for k, v in kinds.items()) + ". Q8_0: "
                      "`convert_hf_to_gguf.py --outtype q8_0`; Q4_0: `convert_hf_to_gguf.py --outtype f32`, then "
                      "llama.cpp's quantizer (`llama_model_quantize`, LLAMA_FTYPE_MOSTLY_Q4_0, its default choices "
                      "for the other tensors). The script is imported as a module with "
                      "`TextModel.get_vocab_base_pre` overridden to return \"gpt-2\": the random tokenizer of "
                      "bench/peers.py is unknown to its pre-tokenizer hash check (the script itself is not edited). "
                      "prosa's GGUF rows run those same files (int8 repacks Q8_0, int4 repacks Q4_0).", ""]
    if "prefill" in only:
        lines += prefill_section(rows) + [""]
    if "scale" in only:
        lines += scale_section(rows, args.file_info) + [""]
    if "bf16" in only:
        lines += bf16_section(rows, m["flags"]) + [""]
    errors = [f"- {r.label()}: {e}" for r in rows for e in r.errors]
    if notes or errors:
        lines += ["Failed runs and notes:", "", *[f"- {n}" for n in notes], *errors, ""]
    return "\n".join(lines).rstrip() + "\n"
