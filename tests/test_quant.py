"""prosa.quant: weight-only int8/int4 linear layers, their kernels and GGUF block repacking.

Tolerances are relative errors ``|y - ref| / |ref|`` (Frobenius norms) on random Gaussian weights:
- quantized vs float linear: int8 <= 1.5%, int4 group 32 <= 9%, int4 group 64/128 <= 11% (measured ~0.5%, ~6.5%, ~8%);
- kernel vs its pure-PyTorch reference (same quantized weight): <= 1% (prosa quantizes activations to int8 per 32
  values, aten's kernels run in bfloat16; measured ~0.4% and ~0.25%);
- prosa AVX-512 vs its portable scalar path: <= 1e-5 (same integer sums, float order differs).

The prosa C++ kernels are tested only when they load (built by `make setup`, or ``python -c "import prosa.quant as q;
q.build_kernels()"``, ~1 min); the rest runs everywhere.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import prosa
from prosa import quant
from prosa.quant import KernelsUnavailableWarning, QuantizedLinear
from prosa.quant import extension
from prosa.quant.layout import _aten_int4_ok

EXT = quant.kernels(build=False)
needs_ext = pytest.mark.skipif(EXT is None, reason="prosa kernels not built (prosa.quant.build_kernels())")
HAS_ATEN4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")

BACKENDS = ["torch", pytest.param("aten", marks=pytest.mark.skipif(not HAS_ATEN4, reason="no aten int4 op")),
            pytest.param("prosa", marks=needs_ext)]
FORMATS = [(8, 32, 0.015), (8, None, 0.015), (4, 32, 0.09), (4, 64, 0.11), (4, 128, 0.11)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def linear(n: int, k: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


def supported(backend: str, bits: int, group, n: int, k: int) -> bool:
    if backend == "aten":
        return (bits == 8 and group is None) or (bits == 4 and _aten_int4_ok(n, k, group))
    return True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,group,tol", FORMATS)
def test_close_to_float_linear(backend, bits, group, tol):
    n, k = 208, 512
    lin = linear(n, k)
    if not supported(backend, bits, group, n, k):
        with pytest.raises(ValueError):
            QuantizedLinear.from_linear(lin, bits, group, backend=backend)
        return
    q = QuantizedLinear.from_linear(lin, bits, group, backend=backend)
    assert q.backend == backend
    x = torch.randn(3, 5, k)
    with torch.inference_mode():
        y, ref, yf = q(x), q.forward_reference(x), lin(x)
    assert y.shape == (3, 5, n) and y.dtype == torch.float32
    assert rel(ref, yf) < tol
    assert rel(y, ref) < (1e-5 if backend == "torch" else 0.01)


@needs_ext
@pytest.mark.parametrize("bits,group", [(8, 32), (8, None), (4, 32), (4, 64)])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 13])
def test_prosa_kernel_shapes(bits, group, m):
    """Ragged N (not a multiple of the 16-row tile), every M-block remainder, bias, scalar path = AVX-512."""
    n, k = 37, 128 if group != 64 else 192
    lin = linear(n, k)
    q = QuantizedLinear.from_linear(lin, bits, group, backend="prosa")
    x = torch.randn(m, k)
    with torch.inference_mode():
        y = q(x)
        assert rel(y, q.forward_reference(x)) < 0.01
        EXT.force_scalar(True)
        try:
            ys = q(x)
        finally:
            EXT.force_scalar(False)
    assert rel(ys, y) < 1e-5


@needs_ext
def test_prosa_dtypes_and_empty():
    q = QuantizedLinear.from_linear(linear(48, 64), 4, 32, backend="prosa")
    with torch.inference_mode():
        xb = torch.randn(2, 3, 64, dtype=torch.bfloat16)
        y = q(xb)
        assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 48)
        assert rel(y, q.forward_reference(xb.float())) < 0.02
        assert q(torch.randn(0, 64)).shape == (0, 48)
        assert q(torch.randn(64)).shape == (48,)
        xt = torch.randn(64, 4).t()  # non-contiguous
        assert rel(q(xt), q.forward_reference(xt)) < 0.01


@pytest.mark.parametrize("bits,group,sym", [(8, 32, False), (8, 32, True), (8, None, False), (8, None, True),
                                            (4, 32, False), (4, 64, False)])
def test_backends_hold_the_same_integers(bits, group, sym):
    lin = linear(208, 256, bias=False)
    ref = QuantizedLinear.from_linear(lin, bits, group, backend="torch", symmetric=sym)
    q0, d0, m0 = ref.to_int()
    assert (m0 is None) == (bits == 8 and sym)
    for backend in ["prosa"] * (EXT is not None) + ["aten"] * HAS_ATEN4:
        if not supported(backend, bits, group, 208, 256) or (backend == "aten" and bits == 8 and not sym):
            continue
        other = QuantizedLinear.from_int(q0, d0, m0, None, backend, bits=bits)   # the same integers, repacked
        q1, d1, m1 = other.to_int()
        assert torch.equal(q1, q0)
        if backend == "prosa":  # fp16 scales kept exactly; aten's are bfloat16
            assert torch.equal(d1, d0) and (m0 is None or torch.equal(m1, m0))
            assert torch.equal(other.dequantize(), ref.dequantize())


def test_bad_arguments():
    with pytest.raises(ValueError):
        QuantizedLinear.from_linear(linear(16, 100), 4, 32, backend="torch")   # 100 not a multiple of 32
    with pytest.raises(ValueError):
        QuantizedLinear.from_linear(linear(16, 64), 4, None, backend="torch")  # int4 needs groups
    with pytest.raises(ValueError):
        QuantizedLinear.from_linear(linear(16, 64), 8, 32, backend="aten")     # aten int8 is per-channel
    with pytest.raises(ValueError):
        QuantizedLinear.from_linear(linear(16, 64), 4, 32, backend="nope")


# ------------------------------------------------------------------------------------------------------ GGUF
def from_gguf(raw, ggml_type, shape, backend="auto") -> QuantizedLinear:
    """A layer from GGUF blocks as the loader makes one (prosa.weights): the integers, no float round trip."""
    bits, q, d, m = quant.gguf_to_int(raw, ggml_type, shape)
    return QuantizedLinear.from_int(q, d, m, None, backend, bits=bits)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("prosa", marks=needs_ext)])
def test_gguf_blocks_repack_exactly(kind, backend):
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((40, 96)) * 0.05 + rng.standard_normal((40, 1)) * 0.02).astype(np.float32)
    raw = quants.quantize(w, T[kind])
    expected = torch.from_numpy(quants.dequantize(raw, T[kind]))
    q = from_gguf(raw, kind, (40, 96), backend=backend)
    assert (q.bits, q.group_size) == ((8, 32) if kind == "Q8_0" else (4, 32))
    torch.testing.assert_close(q.dequantize(), expected, rtol=2e-7, atol=1e-9)
    assert torch.equal(from_gguf(raw, T[kind], (40, 96), backend=backend).dequantize(), q.dequantize())  # enum = name
    x = torch.randn(2, 96)
    with torch.inference_mode():
        assert rel(q(x), x @ expected.t()) < (1e-5 if backend == "torch" else 0.01)


def test_gguf_bundled_tensors(bundled_gguf):
    """Real blocks from the bundled SmolLM2 file: a Q4_1 projection and the Q8_0 embedding."""
    from gguf import GGUFReader
    from gguf import quants

    reader = GGUFReader(bundled_gguf)
    found = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in ("Q4_1", "Q8_0") and kind not in found:
            found[kind] = t
    assert set(found) == {"Q4_1", "Q8_0"}
    for kind, t in found.items():
        shape = tuple(int(v) for v in reversed(t.shape))   # GGUF lists the fastest dim first
        rows = t.data[:256] if kind == "Q8_0" else t.data  # a slice of the 49152-row embedding is enough
        shape = (rows.shape[0], shape[1])
        expected = torch.from_numpy(quants.dequantize(rows, t.tensor_type)).reshape(shape)
        q = from_gguf(rows, t.tensor_type, shape, backend="torch")
        torch.testing.assert_close(q.dequantize(), expected, rtol=2e-7, atol=1e-9)


# ------------------------------------------------------------------------------------------------ whole model
def tiny_llama():
    from prosa.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = llama.Model(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02 if p.shape[0] != 256 else 1.0)
    return model.eval()


# measured on this random model: int8 ~2% (all backends), int4 ~18% (lm_head int8) / ~20% (int4 head); the
# random Gaussian weights are harder to quantize than trained ones
@pytest.mark.parametrize("mode,lm_head,tol", [("int8", "int8", 0.04), ("int4", "int8", 0.3), ("int4", "same", 0.3)])
def test_quantize_model_keeps_logits(mode, lm_head, tol):
    model = tiny_llama()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids)
        quant.quantize_model(model, mode, 32, lm_head=lm_head)
        got = model(ids)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    qs = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert not linears and len(qs) == n_linear
    assert model.lm_head.bits == (8 if lm_head == "int8" or mode == "int8" else 4)
    assert isinstance(model.model.embed_tokens, nn.Embedding)  # the tied embedding stays float
    assert rel(got, ref) < tol
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.96


def test_quantize_model_options():
    model = quant.quantize_model(tiny_llama(), "int4", 32, lm_head=None, backend="torch")
    assert isinstance(model.model.layers[0].self_attn.o_proj, QuantizedLinear)
    assert model.model.layers[1].mlp.down_proj.backend == "torch"
    assert isinstance(model.lm_head, nn.Linear)
    # int4 layers whose in_features the group does not divide stay float; int8 ones fall back to per-channel
    model = quant.quantize_model(tiny_llama(), "int4", 128, lm_head="int8", backend="torch")
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)           # in_features 64
    assert model.model.layers[0].mlp.down_proj.group_size == 128                    # in_features 128
    assert (model.lm_head.bits, model.lm_head.group_size) == (8, 64)                # per-channel
    with pytest.raises(ValueError):
        quant.quantize_model(tiny_llama(), "int3")


def test_q4_k_blocks_repack_with_float16_scales():
    """Q4_K super-blocks -> int4 per 32: the nibbles exactly, ``d * sc`` and ``dmin * m`` rounded to float16
    (relative error below 2^-11 of each scale). Random blocks with sane fp16 super-scales, against gguf-py."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q, quants

    rng = np.random.default_rng(0)
    n, k = 48, 512
    nb = n * k // 256
    raw = rng.integers(0, 256, (nb, 144), dtype=np.uint8)
    raw[:, 0:2] = (rng.random(nb) * 0.01 + 0.001).astype(np.float16).view(np.uint8).reshape(nb, 2)
    raw[:, 2:4] = (rng.random(nb) * 0.01).astype(np.float16).view(np.uint8).reshape(nb, 2)
    ref = torch.from_numpy(quants.dequantize(raw.reshape(n, -1), Q.Q4_K)).reshape(n, k)
    bits, q, d, m = quant.gguf_to_int(raw, Q.Q4_K, (n, k))
    assert bits == 4 and q.max() <= 15 and d.shape == m.shape == (n, k // 32)
    w = quant.dequantize_int(q, d, m)
    assert (w - ref).abs().max() <= 1e-3 * ref.abs().max()
    lin = from_gguf(raw, Q.Q4_K, (n, k))
    assert torch.equal(lin.dequantize(), w)


# ------------------------------------------------------------------------------------------- kernel fallback
@pytest.fixture
def without_kernels(monkeypatch, tmp_path):
    """A process as it would be without prosa._qlinear: the import fails, no cached build, nothing said yet."""
    monkeypatch.setattr(extension, "_ext", None)
    monkeypatch.setattr(extension, "_ext_error", None)
    monkeypatch.setattr(extension, "_said", False)
    monkeypatch.setattr(extension, "_missing", False)
    monkeypatch.delattr(prosa, "_qlinear", raising=False)
    monkeypatch.setitem(sys.modules, "prosa._qlinear", None)   # `from .. import _qlinear` raises ImportError
    monkeypatch.setenv("PROSA_KERNEL_DIR", str(tmp_path))       # an empty build cache
    for name in ("PROSA_KERNELS", "PROSA_BUILD_KERNELS"):
        monkeypatch.delenv(name, raising=False)


def test_missing_kernels_are_said_once(without_kernels):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert quant.kernels() is None
        layer = QuantizedLinear.from_float(torch.randn(32, 64), None, 4, 32)   # auto: asks for the kernels again
        assert layer.backend != "prosa"
        assert quant.kernels() is None
    said = [w for w in caught if issubclass(w.category, KernelsUnavailableWarning)]
    assert len(said) == 1, [str(w.message) for w in caught]
    message = str(said[0].message)
    assert "prosa._qlinear: ModuleNotFoundError" in message                  # what failed
    assert extension.FALLBACK_COST in message and "make setup" in message  # what it costs, how to fix it


def test_missing_kernels_are_searched_for_once(without_kernels, monkeypatch):
    """Every layer asks for the kernels on every call: after one search found nothing, later asks (without
    ``build``) neither hash the sources nor look on disk again; asking to build still searches."""
    searches = []
    real = extension._build_dir
    monkeypatch.setattr(extension, "_build_dir", lambda: searches.append(1) or real())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert quant.kernels() is None
        assert quant.kernels() is None and quant.kernels(build=False) is None
        assert len(searches) == 1
        import torch.utils.cpp_extension as cpp

        def no_compiler(**kw):
            raise OSError("no compiler here")
        monkeypatch.setattr(cpp, "load", no_compiler)    # the build attempt fails at once
        assert quant.kernels(build=True) is None
    assert len(searches) >= 2


def test_kernels_off_on_purpose_are_silent(without_kernels, monkeypatch):
    monkeypatch.setenv("PROSA_KERNELS", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert quant.kernels() is None
        assert QuantizedLinear.from_float(torch.randn(32, 64), None, 4, 32).backend != "prosa"
    assert not [w for w in caught if issubclass(w.category, KernelsUnavailableWarning)]
    with pytest.raises(RuntimeError, match="PROSA_KERNELS=0"):
        quant.build_kernels()


@pytest.mark.parametrize("bits,asym", [(8, False), (4, True)])
@pytest.mark.parametrize("backend", ["torch", pytest.param("prosa", marks=needs_ext)])
def test_layers_packed_from_row_chunks_equal_whole_ones(bits, asym, backend):
    """A fused projection read a chunk of rows at a time (parts of 40, 24 and 8 rows: not whole tiles of 16) is the
    layer ``from_int`` makes from the joined integers (what the GGUF loader does without holding a layer whole)."""
    from prosa.weights.assemble import _joined

    lin = linear(72, 96, bias=False)
    q, d, m = QuantizedLinear.from_linear(lin, bits, 32, backend="torch", symmetric=not asym).to_int()
    whole = QuantizedLinear.from_int(q, d, m, None, backend, bits=bits)
    parts, r0 = [], 0
    for rows, step in ((40, 24), (24, 16), (8, 8)):       # each part in its own chunks, numbered from 0 as a file is
        cut = [slice(r0 + c, r0 + min(c + step, rows)) for c in range(0, rows, step)]
        parts.append([(s.start - r0, q[s], d[s], None if m is None else m[s]) for s in cut])
        r0 += rows
    chunked = QuantizedLinear.from_int_chunks(72, 96, 32, bits, asym, _joined(parts), backend=backend)
    assert chunked.backend == whole.backend
    for a, b in zip(chunked.to_int(), whole.to_int()):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ValueError):      # chunks must come in order, in whole tiles
        QuantizedLinear.from_int_chunks(72, 96, 32, bits, asym, [(8, q[8:], d[8:], None if m is None else m[8:])],
                                        backend="prosa")


@needs_ext
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_repacked_in_cpp_equal_the_python_path(kind):
    """``from_gguf_rows`` (C++, straight from the file's bytes) makes the layer ``from_int`` makes from
    ``gguf_to_int``'s integers: parts of 40, 8 and 24 rows (tiles straddle parts), one with its rows reordered."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    rng = np.random.default_rng(1)
    parts, ints = [], []
    for rows, reorder in ((40, False), (8, True), (24, False)):
        w = (rng.standard_normal((rows, 96)) * 0.05).astype(np.float32)
        raw = torch.from_numpy(quants.quantize(w, T[kind]).reshape(rows, -1))
        order = torch.from_numpy(rng.permutation(rows)) if reorder else None
        parts.append((raw, order))
        _, q, d, m = quant.gguf_to_int(raw.numpy(), kind, (rows, 96))
        ints.append((q, d, m) if order is None else (q[order], d[order], None if m is None else m[order]))
    fast = QuantizedLinear.from_gguf_rows(kind, parts, 72, 96)
    q, d = torch.cat([i[0] for i in ints]), torch.cat([i[1] for i in ints])
    m = None if kind == "Q8_0" else torch.cat([i[2] for i in ints])
    slow = QuantizedLinear.from_int(q, d, m, None, "prosa", bits=8 if kind == "Q8_0" else 4)
    assert fast is not None and fast.backend == "prosa" and set(fast._buffers) == set(slow._buffers)
    assert ("mins" in fast._buffers) == (kind == "Q4_1")      # Q4_0 is symmetric: its mins are -8 d, not stored
    for name, t in slow._buffers.items():
        assert t is None or torch.equal(fast._buffers[name], t), name
    assert QuantizedLinear.from_gguf_rows("Q4_K", parts, 72, 96) is None       # not this path: the caller's fallback
    with pytest.raises(RuntimeError, match="not a contiguous uint8"):
        QuantizedLinear.from_gguf_rows(kind, [(parts[0][0][:, :-1], None)], 40, 96)


@needs_ext
def test_symmetric_int4_reads_no_mins_and_computes_the_same():
    """int4 whose mins are all -8 d (GGUF Q4_0) keeps no mins: every kernel (float and int8 activations, AVX-512
    and scalar) derives them, bit for bit the result of the same layer with them stored."""
    from prosa.quant.layout import _pack_scales

    torch.manual_seed(0)
    n, k = 40, 96
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    d = (torch.rand(n, k // 32) * 0.01 + 0.001).half()
    sym = QuantizedLinear.from_int(q, d, d * -8, torch.randn(n), "prosa")
    assert "mins" not in sym._buffers
    q1, d1, m1 = sym.to_int()
    assert torch.equal(q1, q) and torch.equal(d1, d) and torch.equal(m1, d * -8)
    packed = {name: t for name, t in sym.named_buffers() if name != "bias"}
    stored = QuantizedLinear(k, n, 4, 32, "prosa", {**packed, "mins": _pack_scales(d * -8)}, sym.bias)
    with torch.inference_mode():
        for m in (1, 5):
            x = torch.randn(m, k)
            for scalar in (False, True):
                EXT.force_scalar(scalar)
                try:
                    for act in ("float", "int8"):
                        sym.activations = stored.activations = act
                        assert torch.equal(sym(x), stored(x)), (m, scalar, act)
                finally:
                    EXT.force_scalar(False)
            sym.activations = "float"
            torch.testing.assert_close(sym(x), sym.forward_reference(x), rtol=1e-5, atol=1e-5)
    # a Q4_1 layer whose mins happen not to be -8 d keeps them
    assert "mins" in QuantizedLinear.from_int(q, d, d * -7, None, "prosa")._buffers


@needs_ext
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("acts", ["float", "int8"])
def test_threads_share_tiles_without_changing_a_number(bits, acts):
    """The kernels hand out chunks of 16-row tiles to whichever thread is free: a layer's output is bit-identical
    whatever the thread count (1, 2, 3) and whichever thread took which chunk."""
    lin = QuantizedLinear.from_linear(linear(16 * 41 + 5, 512, seed=3), bits, 32, backend="prosa")
    quant.set_activations(lin, acts)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        outs = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs[n] = [lin(x[:1]), lin(x)]     # one row (decode) and several
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3):
        assert torch.equal(outs[n][0], outs[1][0]) and torch.equal(outs[n][1], outs[1][1])
    assert torch.equal(outs[1][1][:1], outs[1][0])   # a row's numbers do not depend on the other rows either
