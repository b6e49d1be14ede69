"""Linear-layer kernel benchmark on this machine's CPU, for the shapes of SmolLM2-135M.

For each candidate kernel, shape (N out x K in) and batch M it prints the time per call (median of ``--repeat``
runs) and the effective weight bandwidth: bytes of the weight (packed values + scales) / time. At M=1 a linear is
a GEMV and should be limited by memory bandwidth, so GB/s is the figure of merit; at M=256 it is compute-bound
and the µs column matters.

Weights are rotated over enough copies that one pass touches ``--ws-mb`` MB (default 64, about what the model's
quantized layers occupy), so numbers reflect streaming from L3/DRAM rather than a weight sitting in L2. ``--ws-mb 0``
uses one copy (cache-hot).

    .venv/bin/python bench/kernel_speed.py                        # everything (several minutes on 2 cores)
    .venv/bin/python bench/kernel_speed.py --m 1 --only 'int4|prosa'
    .venv/bin/python bench/kernel_speed.py --shapes 576x576,49152x576 --m 1,8 --repeat 9
    .venv/bin/python bench/kernel_speed.py --decode               # end to end: tok/s of the bundled model per format

Candidates: fp32 / bf16 ``F.linear``, ``aten._weight_int8pack_mm`` (per-channel int8), ``aten._weight_int4pack_mm_for_cpu``
(group 32/64/128), torchao weight-only configs when ``import torchao`` works (it wraps the same aten kernels or a
dequantize-then-matmul), dynamic int8 activations x int8 weights through ``torch._int_mm``, and the prosa C++
kernels (``prosa.quant``) when they build.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # name -> (N, K)
    "q/o 576x576": (576, 576),
    "k/v 192x576": (192, 576),
    "qkv 960x576": (960, 576),
    "gate+up 3072x576": (3072, 576),
    "down 576x1536": (576, 1536),
    "lm_head 49152x576": (49152, 576),
}

# A candidate: name -> prepare(w_fp32 (N, K)) -> (state, nbytes), and run(x (M, K) fp32, state) -> (M, N).
Candidate = tuple[Callable[[torch.Tensor], tuple[object, int]], Callable[[torch.Tensor, object], torch.Tensor]]


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def candidates() -> dict[str, Candidate]:
    c: dict[str, Candidate] = {}

    # the ceiling: reading the same bytes as the fp32 weight, nothing else (Tensor.sum is bandwidth-bound)
    c["read-only reference (fp32 .sum)"] = (lambda w: (w.clone(), _nbytes(w)), lambda x, w: w.sum())
    c["fp32 F.linear"] = (lambda w: (w.clone(), _nbytes(w)), lambda x, w: F.linear(x, w))

    def bf16_prep(w):
        wb = w.to(torch.bfloat16)
        return wb, _nbytes(wb)
    c["bf16 F.linear"] = (bf16_prep, lambda x, w: F.linear(x.to(torch.bfloat16), w).float())

    def int8_prep(w):
        s = w.abs().amax(1).clamp_min(1e-12) / 127
        q = torch.round(w / s[:, None]).to(torch.int8)
        return (q, s), _nbytes(q, s)
    # aten's CPU int4/int8 kernels are vectorized for bfloat16 activations only; float32 takes a scalar path
    c["aten int8pack per-ch (fp32 act)"] = (
        int8_prep, lambda x, st: torch.ops.aten._weight_int8pack_mm(x, st[0], st[1]))

    def int8_prep_bf16(w):
        (q, s), nbytes = int8_prep(w)
        return (q, s.to(torch.bfloat16)), nbytes
    c["aten int8pack per-ch (bf16 act)"] = (
        int8_prep_bf16, lambda x, st: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), st[0], st[1]).float())

    for g in (32, 64, 128):
        def int4_prep(w, g=g):
            n, k = w.shape
            wg = w.reshape(n, k // g, g)
            lo, hi = wg.amin(-1), wg.amax(-1)
            s = ((hi - lo) / 15).clamp_min(1e-12)
            q = torch.round((wg - lo[..., None]) / s[..., None]).clamp(0, 15).reshape(n, k).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            sz = torch.stack([s, lo + 8 * s], -1).transpose(0, 1).contiguous()  # (K/g, N, 2)
            return (packed, sz.to(torch.bfloat16)), _nbytes(packed, sz.to(torch.bfloat16))
        c[f"aten int4pack g{g} (bf16 act)"] = (
            int4_prep, lambda x, st, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16), st[0], g, st[1]).float())
        if g == 32:
            c["aten int4pack g32 (fp32 act)"] = (
                lambda w, prep=int4_prep: ((lambda st: ((st[0][0], st[0][1].float()), st[1]))(prep(w))),
                lambda x, st: torch.ops.aten._weight_int4pack_mm_for_cpu(x, st[0], 32, st[1]))

    def dyn_int8_prep(w):
        s = w.abs().amax(1).clamp_min(1e-12) / 127
        q = torch.round(w / s[:, None]).to(torch.int8)
        return (q.t().contiguous().t(), s), _nbytes(q, s)  # _int_mm wants (K, N) column-major-compatible

    def dyn_int8_run(x, st):
        q, s = st
        xs = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        xq = torch.round(x / xs).to(torch.int8)
        return torch._int_mm(xq, q.t()).float() * xs * s
    c["dyn-int8 act x int8 (_int_mm)"] = (dyn_int8_prep, dyn_int8_run)

    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao  # noqa: F401
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    except Exception as e:  # noqa: BLE001 - any import failure just drops the candidate
        print(f"# torchao not usable ({type(e).__name__}: {str(e)[:80]}); skipped", file=sys.stderr)
    else:
        def ao_prep(config, dtype):
            def prep(w):
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data = w.to(dtype)
                quantize_(lin, config)
                nbytes = sum(_nbytes(t) for t in _inner_tensors(lin.weight))
                return lin, nbytes
            return prep
        c["torchao int8 weight-only"] = (ao_prep(Int8WeightOnlyConfig(), torch.float32), lambda x, lin: lin(x))
        c["torchao int4 g32 (bf16 act)"] = (ao_prep(PrototypeInt4WeightOnlyConfig(group_size=32), torch.bfloat16),
                                           lambda x, lin: lin(x.to(torch.bfloat16)).float())

    try:
        from prosa import quant
    except Exception as e:  # noqa: BLE001
        print(f"# prosa.quant not importable ({e}); prosa kernels skipped", file=sys.stderr)
    else:
        c.update(prosa_candidates(quant))
    return c


def prosa_candidates(quant) -> dict[str, Candidate]:
    """The prosa C++ kernels of ``quant`` (``prosa.quant``; compiled now if need be), called directly per format,
    and once through the whole ``QuantizedLinear`` forward (its Python overhead included). Empty when the kernels
    cannot be built."""
    out: dict[str, Candidate] = {}
    try:
        ext = quant.build_kernels()
    except RuntimeError as e:
        print(f"# prosa kernels unavailable: {e}", file=sys.stderr)
        return out

    def nbytes(mod):
        return sum(b.numel() * b.element_size() for b in mod.buffers())

    for bits, g, label in ((8, 32, "int8 g32"), (8, None, "int8 per-ch"), (4, 32, "int4 g32"), (4, 64, "int4 g64")):
        def prep(w, bits=bits, g=g):
            # symmetric int8: the codes linear_int8 below reads (prosa's default int8 is asymmetric, with mins)
            mod = quant.QuantizedLinear.from_float(w, None, bits, g, backend="prosa", symmetric=bits == 8)
            return mod, nbytes(mod)
        if bits == 8:
            def run(x, mod):
                return ext.linear_int8(x, mod.qweight, mod.scales, None, mod.out_features, mod.group_size)
        else:
            def run(x, mod):
                return ext.linear_int4(x, mod.qweight, mod.scales, mod.mins, None, mod.out_features, mod.group_size)
        out[f"prosa {label} ({ext.isa()})"] = (prep, run)
    out["prosa int4 g32 QuantizedLinear()"] = (
        lambda w: (lambda mod: (mod, nbytes(mod)))(quant.QuantizedLinear.from_float(w, None, 4, 32, backend="prosa")),
        lambda x, mod: mod(x))
    return out


def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        out = []
        for n in names:
            out += _inner_tensors(getattr(t, n))
        return out
    return [t]


def calibrate(run, x, states, target_s: float) -> int:
    """Calls per timed run: about ``target_s`` seconds and at least one pass over every copy."""
    n = len(states)
    for i in range(n):  # warm: touch every copy once
        run(x, states[i])
    t0 = time.perf_counter()
    run(x, states[0])
    once = max(time.perf_counter() - t0, 1e-7)
    return max(n, min(20000, int(target_s / once))) if once * n < 2 * target_s else n


CLOCK = time.perf_counter


def timed(run, x, states, iters: int) -> float:
    n = len(states)
    t0 = CLOCK()
    for i in range(iters):
        run(x, states[i % n])
    return (CLOCK() - t0) / iters


def bench_shape(cands, n: int, k: int, ms, args) -> dict:
    """{candidate: {M: seconds per call}}. Candidates are timed in turn within each repeat (interleaved), so a
    change in the machine's load hits all of them alike; the statistic is over repeats."""
    w = torch.randn(n, k) * 0.05
    prepared, results = {}, {}
    for cname, (prep, run) in cands.items():
        try:
            st0, nbytes = prep(w)
        except Exception as e:  # noqa: BLE001
            results[cname] = f"unavailable: {type(e).__name__}: {str(e)[:90]}"
            continue
        copies = max(1, min(64, int(args.ws_mb * 1e6 // nbytes))) if args.ws_mb > 0 else 1
        prepared[cname] = (run, [st0] + [prep(w)[0] for _ in range(copies - 1)], nbytes)
        results[cname] = {}
    for m in ms:
        x = torch.randn(m, k)
        live = {}
        for cname, (run, states, _) in prepared.items():
            if "(fp32 act)" in cname and m > 8:  # aten's scalar float32 path: seconds per call
                continue
            try:
                live[cname] = (run, states, calibrate(run, x, states, args.target_ms / 1e3), [])
            except Exception as e:  # noqa: BLE001
                results[cname][m] = f"{type(e).__name__}"
        for _ in range(args.repeat):
            for cname, (run, states, iters, times) in live.items():
                times.append(timed(run, x, states, iters))
        for cname, (_, _, _, times) in live.items():
            results[cname][m] = min(times) if args.stat == "min" else statistics.median(times)
    return {c: (r, prepared[c][2] if c in prepared else 0) for c, r in results.items()}


# ------------------------------------------------------------------------------------------- end-to-end decoding
def decode_bench(args) -> None:
    """Greedy single-stream decoding of the bundled model: tok/s per configuration, all in one process."""
    import copy

    import prosa
    from prosa import quant
    from prosa.loader import default_model

    path = default_model()
    lm = prosa.load(path, dtype="float32", quantize="none")   # the float reference; formats are applied below
    base = lm.model.eval()
    prompt = lm.tokenizer.encode("A story about a man and a dog")
    configs = {"fp32 eager": lambda m: m}
    configs["int8 (prosa, g32)"] = lambda m: quant.quantize_model(m, "int8", 32)
    configs["int4 g32 + lm_head int8 (prosa)"] = lambda m: quant.quantize_model(m, "int4", 32, lm_head="int8")
    configs["int4 g32 + lm_head int4 (prosa)"] = lambda m: quant.quantize_model(m, "int4", 32, lm_head="same")
    if str(path).endswith(".gguf"):
        # the loader's exact repacking of the file's Q4_1 / Q8_0 blocks (prosa.weights.assemble)
        configs["GGUF blocks as-is (Q4_1 + Q8_0 head, prosa)"] = lambda m: prosa.load(path, quantize="int4").model
    configs["int4 g32 + lm_head int8 (aten, bf16 act)"] = lambda m: quant.quantize_model(
        m, "int4", 32, lm_head="int8", backend="aten")
    only = re.compile(args.only) if args.only else None
    ids0 = torch.tensor([prompt])
    with torch.inference_mode():
        ref_cache = base.make_cache(1)
        ref_logits = base(ids0, cache=ref_cache)[0, -1]
        for name, make in configs.items():
            if only and not only.search(name):
                continue
            model = make(copy.deepcopy(base)).eval()
            cache = model.make_cache(1)
            logits = model(ids0, cache=cache)[0, -1]
            err = float((logits - ref_logits).norm() / ref_logits.norm())
            same = int(logits.argmax()) == int(ref_logits.argmax())
            tok = logits.argmax().view(1, 1)
            for _ in range(4):  # warm-up
                tok = model(tok, cache=cache)[0, -1].argmax().view(1, 1)
            rates = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                for _ in range(args.tokens):
                    tok = model(tok, cache=cache)[0, -1].argmax().view(1, 1)
                rates.append(args.tokens / (time.perf_counter() - t0))
            print(f"{name:46s} {statistics.median(rates):7.1f} tok/s (best {max(rates):6.1f})   "
                  f"prompt logits rel.err {err:.4f}, same argmax {same}", flush=True)
            del model, cache


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma list of NxK (default: the SmolLM2-135M shapes)")
    ap.add_argument("--m", default="1,8,32,256", help="comma list of batch sizes M")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--target-ms", type=float, default=20.0, help="length of one timed run")
    ap.add_argument("--ws-mb", type=float, default=64.0, help="working set per measurement in MB (0: one copy)")
    ap.add_argument("--only", default=None, help="regex on candidate names")
    ap.add_argument("--skip", default=None, help="regex on candidate names to leave out")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="min is the better estimate of the uncontended speed when other jobs share the cores")
    ap.add_argument("--decode", action="store_true",
                    help="instead: greedy decoding tok/s of the bundled model per quantization configuration")
    ap.add_argument("--tokens", type=int, default=32, help="--decode: tokens per timed run")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time (with --threads 1: per-core speed, blind to time the "
                         "scheduler gives other jobs; not to their share of memory bandwidth)")
    args = ap.parse_args(argv)
    global CLOCK
    if args.clock == "cpu":
        if args.threads != 1:
            ap.error("--clock cpu needs --threads 1 (worker threads' time is not counted)")
        CLOCK = time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decode:
        print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; {args.tokens} tokens x "
              f"{args.repeat} runs")
        return decode_bench(args)
    shapes = SHAPES if not args.shapes else {
        s: tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")}
    ms = [int(v) for v in args.m.split(",")]
    cands = {k: v for k, v in candidates().items()
             if (not args.only or re.search(args.only, k)) and not (args.skip and re.search(args.skip, k))}
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, working set {args.ws_mb} MB, {args.stat} of {args.repeat}, "
          f"{args.clock} clock")
    torch.manual_seed(0)
    with torch.inference_mode():
        for sname, (n, k) in shapes.items():
            print(f"\n## {sname}  (N={n}, K={k})")
            print(f"{'kernel':34s} {'MB':>7s} " + " ".join(f"{'M=' + str(m):>17s}" for m in ms))
            print(f"{'':34s} {'':>7s} " + " ".join(f"{'GB/s':>7s} {'us':>9s}" for _ in ms))
            for cname, (res, nbytes) in bench_shape(cands, n, k, ms, args).items():
                if isinstance(res, str):
                    print(f"{cname:34s} {res}")
                    continue
                cells = []
                for m in ms:
                    t = res.get(m)
                    if t is None:
                        cells.append(f"{'-':>7s} {'-':>9s}")
                    elif isinstance(t, str):
                        cells.append(f"{'err':>7s} {t[:9]:>9s}")
                    else:
                        cells.append(f"{nbytes / t / 1e9:7.1f} {t * 1e6:9.1f}")
                print(f"{cname:34s} {nbytes / 1e6:7.2f} " + " ".join(cells), flush=True)

if __name__ == "__main__":
    main()
