"""bench/regimes.py's measuring children (``--worker KIND``): prosa, transformers and llama.cpp decode, prompt
processing through prosa and through llama.cpp's batch API, and the machine's memory read bandwidth; each returns
one dict of results, which the script prints on one line for its parent."""
from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import peers  # noqa: E402  (bench/, the script's own folder; torch-free at import)
from regimes_build import gguf_tensor_bytes, gguf_types  # noqa: E402
from regimes_report import gguf_read_bytes  # noqa: E402


# ------------------------------------------------------------------------------------------ workers (children)
def read_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads from a prosa model: every parameter and buffer, each storage once, but
    the embedding tables (one row is read), unless a table is also another module's weight (tied output)."""
    import torch

    from prosa.weights.gguf_embedding import QuantizedEmbedding

    embed, other = {}, {}
    for mod in model.modules():
        for t in [*mod._parameters.values(), *mod._buffers.values()]:
            if t is None or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            (embed if isinstance(mod, (torch.nn.Embedding, QuantizedEmbedding)) else other)[s.data_ptr()] = s.nbytes()
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
    (one thread), several passes each. ``bandwidth``: the best single pass (bytes / seconds); ``sustained``: all
    of torch.sum's passes together (total bytes / total time), the statistic of a decode rate (tokens / time)."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    n = spec["bytes"] // 4
    a = torch.ones(n, dtype=torch.float32)          # written once: every page is resident
    best = {"torch": 0.0, "numpy": 0.0}
    torch_s = 0.0
    for _ in range(spec["passes"]):
        t = time.perf_counter()
        float(a.sum())
        dt = time.perf_counter() - t
        torch_s += dt
        best["torch"] = max(best["torch"], a.numel() * 4 / dt)
        t = time.perf_counter()
        float(np.add.reduce(a.numpy()))
        best["numpy"] = max(best["numpy"], a.numel() * 4 / (time.perf_counter() - t))
    return {"bandwidth": max(best.values()), **{f"{k}_bytes_s": v for k, v in best.items()},
            "sustained": a.numel() * 4 * spec["passes"] / torch_s, "peak_rss_mb": peers.peak_rss_mb()}


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "prosa": work_prosa, "transformers": peers.run_transformers, "llama.cpp": work_llama_cpp,
    "prefill:prosa": work_prefill_prosa, "prefill:llama.cpp": work_prefill_llama_cpp, "bandwidth": work_bandwidth}
