"""Soak test of `prosa serve` (not in CI): many clients for a long time, with disconnects and bad requests mixed in.

N client threads (default 16) loop for ``--minutes`` (default 10) against a fresh ``prosa serve`` of the bundled
model: streamed chats, plain chats and completions of random lengths, streams dropped after a few chunks, and
malformed or invalid requests. Pass: zero 5xx responses, every valid request answered, and the server's RSS after
the run at most 10% above its RSS after a warm-up minute. The figures go to docs/benchmarks.md (``--output``).

    .venv/bin/python bench/soak.py [--minutes 10] [--clients 16] [--output docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit_section  # noqa: E402  (bench/, the script's own folder)

SECTION = "Soak (issue #10)"
MODEL = "soak"
BAD = [
    {"model": MODEL, "messages": [], "max_tokens": 5},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 1000},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}},
    {"model": "other", "messages": [{"role": "user", "content": "hi"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10 ** 7},
]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def client(base: str, stop: float, seed: int, stats: Counter, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=300) as http:
        while time.time() < stop:
            kind = rng.choices(["stream", "chat", "completion", "drop", "bad", "garbage"], [4, 2, 2, 2, 1, 1])[0]
            msg = [{"role": "user", "content": f"Tell me about {rng.choice(['dogs', 'the sea', 'Lisbon', 'code'])}."}]
            body = {"model": MODEL, "messages": msg, "max_tokens": rng.randint(8, 128), "seed": rng.randrange(10 ** 6)}
            try:
                if kind in ("stream", "drop"):
                    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                        code, tokens = r.status_code, 0
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                tokens += 1
                                if kind == "drop" and tokens >= rng.randint(1, 6):
                                    break             # the client goes away mid-stream
                        if kind == "stream" and code == 200:
                            with lock:
                                stats["stream_tokens"] += tokens
                elif kind == "chat":
                    code = http.post("/v1/chat/completions", json=body).status_code
                elif kind == "completion":
                    code = http.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon a time",
                                                              "max_tokens": body["max_tokens"]}).status_code
                elif kind == "bad":
                    code = http.post("/v1/chat/completions", json=rng.choice(BAD)).status_code
                else:
                    code = http.post("/v1/chat/completions", content=rng.randbytes(rng.randint(0, 300)),
                                     headers={"content-type": "application/json"}).status_code
            except httpx.HTTPError as e:
                code = f"transport:{type(e).__name__}"
            with lock:
                stats[f"{kind} {code}"] += 1


def soak(minutes: float, clients: int, model: str | None) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "prosa", "serve", "--port", str(port), "--model-name", MODEL]
    if model:
        cmd += ["-m", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read())
            time.sleep(0.1)
        stats: Counter = Counter()
        lock = threading.Lock()
        warm = min(60.0, minutes * 60 / 5)

        def run(seconds: float) -> None:
            stop = time.time() + seconds
            threads = [threading.Thread(target=client, args=(base, stop, i, stats, lock)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        run(warm)
        rss_warm = rss_mb(proc.pid)
        start = time.time()
        run(minutes * 60 - warm)
        elapsed = time.time() - start + warm
        rss_end = rss_mb(proc.pid)
        metrics = httpx.get(base + "/metrics").text
        running = float(next(line.split()[-1] for line in metrics.splitlines()
                             if line.startswith("prosa_requests_running ")))
        return {"stats": dict(stats), "rss_warm": rss_warm, "rss_end": rss_end, "elapsed": elapsed,
                "clients": clients, "running_after": running}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def markdown(r: dict) -> str:
    stats = r["stats"]
    total = sum(v for k, v in stats.items() if k != "stream_tokens")
    server_errors = sum(v for k, v in stats.items() if k.split()[-1].startswith("5"))
    transport = sum(v for k, v in stats.items() if "transport" in k)
    valid_fail = sum(v for k, v in stats.items() if k.split()[0] in ("stream", "chat", "completion")
                     and k.split()[-1] != "200")
    growth = 100 * (r["rss_end"] / r["rss_warm"] - 1)
    lines = [f"{r['clients']} clients for {r['elapsed'] / 60:.1f} min against `prosa serve` (bundled model): "
             f"{total} requests, {stats.get('stream_tokens', 0)} streamed tokens.", "",
             "| outcome | requests |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(stats.items()) if k != "stream_tokens"]
    lines += ["", "| check | measured | target | status |", "|---|---:|---|---|",
              f"| 5xx responses | {server_errors} | 0 | {'PASS' if server_errors == 0 else 'MISS'} |",
              f"| valid requests not answered 200 | {valid_fail + transport} | 0 | "
              f"{'PASS' if valid_fail + transport == 0 else 'MISS'} |",
              f"| RSS growth after warm-up ({r['rss_warm']:.0f} -> {r['rss_end']:.0f} MB) | {growth:+.1f}% | < 10% | "
              f"{'PASS' if growth < 10 else 'MISS'} |",
              f"| requests running after the run | {r['running_after']:.0f} | 0 | "
              f"{'PASS' if r['running_after'] == 0 else 'MISS'} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("-m", "--model", default=None, help="model (default: the bundled SmolLM2)")
    p.add_argument("--output", default=None, help="write the section into this markdown file")
    args = p.parse_args(argv)
    result = soak(args.minutes, args.clients, args.model)
    section = (f"## {SECTION}\n\n{__doc__.strip().splitlines()[0]} Measured {time.strftime('%Y-%m-%d %H:%M')}.\n\n"
               f"{markdown(result)}\n")
    emit_section(args.output, SECTION, section)
    print(json.dumps(result["stats"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
