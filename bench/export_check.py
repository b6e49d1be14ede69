"""Does llama.cpp run what ``prosa export --gguf`` writes, and greedily generate what prosa generates from it?

Exports the bundled SmolLM2-135M (a Q4_1 GGUF) and tiny random GPT-2, Qwen2 and Llama models (tests/tiny.py, needs
transformers; the Llama one with GQA, linear rope scaling and tied embeddings) to each type, serves each file with
``llama-server`` (temperature 0, /completion, ``n_predict`` tokens) and compares its token ids (prompt ids included)
with ``prosa.load(export).generate(prompt, max_new_tokens=n, temperature=0)``.
llama.cpp rounds the activations to 8 bits per 32 for its Q8_0/Q4_1 matmuls while prosa keeps them in float32 by
default, so on quantized files prosa runs twice: as loaded ("float act.") and with llama.cpp's rounding
(``prosa.quant.set_activations(model, "int8")``, "int8 act."). A row PASSes when the run with llama.cpp's arithmetic
(or the other one) gives exactly llama.cpp's tokens. The random tiny models' logits are nearly tied, so there a row
whose first 8 tokens agree is "near" (a wrong file diverges at once); anything else is a MISS, and exits 1.

    .venv/bin/python bench/export_check.py [--llama-server build/llama-server] [--tokens 32]
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = {"smollm2-135m": ["A story about a man and a dog", "The capital of France is"]}
TINY = {"tiny-gpt2": "gpt2", "tiny-qwen2": "qwen2", "tiny-llama": "llama_linear"}   # tests/tiny.py SPECS
TINY_PROMPTS = ["Once upon a time there was", "def main():\n"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_generate(binary: str, gguf: Path, prompts: list[str], n: int, threads: int) -> list[tuple[list, list]]:
    """(prompt ids, generated ids) per prompt from a llama-server serving ``gguf``."""
    port = free_port()
    proc = subprocess.Popen([binary, "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-np", "1",
                             "-c", "256", "-t", str(threads), "--temp", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base, client = f"http://127.0.0.1:{port}", httpx.Client(timeout=120)
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {proc.stderr.read()[-2000:]}")
            try:
                if client.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        out = []
        for prompt in prompts:
            ids = client.post(base + "/tokenize", json={"content": prompt, "add_special": True,
                                                        "parse_special": True}).json()["tokens"]
            res = client.post(base + "/completion", json={
                "prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1, "repeat_penalty": 1.0,
                "cache_prompt": False, "return_tokens": True, "seed": 0}).json()
            out.append((ids, res["tokens"]))
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def prosa_generate(gguf: Path, prompts: list[str], n: int, activations: str) -> list[tuple[list, list]]:
    """(prompt ids, generated ids, a final eos included as llama.cpp reports it) per prompt."""
    import prosa
    from prosa.quant import set_activations

    lm = prosa.load(gguf)
    set_activations(lm.model, activations)
    return [(lm.tokenizer.encode(p), lm.generate(p, max_new_tokens=n, temperature=0).tokens) for p in prompts]


def agree(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", default=str(ROOT / "build" / "llama-server"), help="llama-server binary")
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate per prompt")
    p.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_1"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not Path(args.llama_server).is_file():
        print(f"export_check: no llama-server at {args.llama_server} (bench/build_llama_server.sh builds it)")
        return 1
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    from prosa.loader import default_model
    from prosa.weights.gguf_export import export_gguf

    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"smollm2-135m": default_model()}
        sources.update({name: str(tiny.make_checkpoint(spec, Path(tmp, spec))) for name, spec in TINY.items()})
        for model, src in sources.items():
            prompts = PROMPTS.get(model, TINY_PROMPTS)
            for kind in args.types:
                out = Path(tmp, f"{model}-{kind}.gguf")
                export_gguf(src, out, kind)
                floats = prosa_generate(out, prompts, args.tokens, "float")
                ints = floats if kind == "f16" else prosa_generate(out, prompts, args.tokens, "int8")
                theirs = llama_generate(args.llama_server, out, prompts, args.tokens, args.threads)
                for prompt, (pid, ft), (_, it), (lid, lt) in zip(prompts, floats, ints, theirs):
                    best = max(agree(ft, lt), agree(it, lt))
                    exact = pid == lid and lt in (ft, it)
                    # a random tiny model's logits are nearly tied: 8 leading tokens rule out a wrong file
                    near = pid == lid and model in TINY and best >= 8
                    ok &= exact or near
                    rows.append((model, kind, repr(prompt)[:24], "same" if pid == lid else "DIFF",
                                 f"{agree(ft, lt)}/{len(lt)}", "-" if kind == "f16" else f"{agree(it, lt)}/{len(lt)}",
                                 "PASS" if exact else "near" if near else "MISS"))
                    if not exact:
                        print(f"# {model} {kind} {prompt!r}\n#   prosa:     {ft}\n#   prosa int8 act.: {it}"
                              f"\n#   llama.cpp: {lt}", file=sys.stderr)
    head = ("model", "type", "prompt", "prompt ids", "agree, float act.", "agree, int8 act.", "result")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths)] + rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
