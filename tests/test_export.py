"""``prosa export --gguf``: prosa reads its exports back (config, tokenizer, every weight) and runs them as it runs
the source with the same rounding; q8_0 / q4_1 hold exactly prosa's integer blocks; GGUF sources; CLI errors.

The reference for a type is the source checkpoint with its weights rounded as the type rounds them (float16, or
prosa's int8 / int4 group-32 blocks dequantized), written as a Hugging Face folder: prosa must read the export
back to exactly those weights and generate exactly the same greedy text. llama.cpp itself is checked by
bench/export_check.py (it needs a llama-server binary).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
import tiny
from gguf import quants

import prosa
from prosa.errors import UnsupportedModelError
from prosa.loader import open_checkpoint
from prosa.quant import QuantizedLinear, dequantize_int, quantize_int4, quantize_int8
from prosa.weights.gguf import load_gguf
from prosa.weights.gguf_export import check_output, export_gguf
from prosa.weights.gguf_export_tensors import _q4_1, _q8_0

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["gpt2", "llama_linear", "qwen2", "llama3"]   # llama3: untied, head_dim 32 != 64/4, biases, rope_freqs
TYPES = ["f16", "q8_0", "q4_1"]
TEXTS = ["Hello world! It's 2024.", "Ação, coração, pão e feijão. Olá!", "日本語と中文 🙂 👍🏽 👨‍👩‍👧",
         "def main():\n    print('hi')  # 42\n", "  spaces\n\n and <|endoftext|> inline", "x"]
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
OUTPUTS = ("embed_tokens.weight", "wte.weight", "lm_head.weight")


def make_llama3(path: Path) -> Path:
    """A Llama no tiny.SPECS entry covers: untied, head_dim != hidden / heads, q/k/v/o biases (permuted with the
    rows), Llama 3's own rope scaling (a rope_freqs tensor in GGUF)."""
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny.make_tokenizer_folder(path)
    eos = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(tiny.EOS)
    config = LlamaConfig(vocab_size=tiny.VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, intermediate_size=96, max_position_embeddings=128,
                         tie_word_embeddings=False, attention_bias=True, bos_token_id=eos, eos_token_id=eos,
                         initializer_range=0.1, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)   # transformers zeroes them: a wrong permutation would go unseen
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def source(tiny_checkpoint, tmp_path_factory):
    """arch -> tiny HF checkpoint folder."""
    def get(arch: str) -> Path:
        return make_llama3(tmp_path_factory.mktemp("llama3")) if arch == "llama3" else tiny_checkpoint(arch)
    cache: dict[str, Path] = {}
    return lambda arch: cache[arch] if arch in cache else cache.setdefault(arch, get(arch))


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """(arch, type) -> export of the tiny source."""
    folder, cache = tmp_path_factory.mktemp("exports"), {}

    def get(arch: str, kind: str) -> Path:
        if (arch, kind) not in cache:
            cache[arch, kind] = export_gguf(source(arch), folder / f"{arch}-{kind}.gguf", kind).path
        return cache[arch, kind]
    return get


def rounded(name: str, w: torch.Tensor, kind: str) -> torch.Tensor:
    """A source tensor as the export stores it, dequantized (what prosa must read back)."""
    if w.dim() != 2 or "wpe" in name:
        return w
    conv = name.endswith(CONV1D)
    lin = w.t() if conv else w
    if kind == "f16":
        out = lin.half().float()
    elif kind == "q8_0" or name.endswith(OUTPUTS):
        out = dequantize_int(*quantize_int8(lin, 32), None)
    else:
        out = dequantize_int(*quantize_int4(lin, 32))
    return out.t() if conv else out


def reference_folder(src: Path, kind: str, dest: Path) -> Path:
    """The source folder with its weights rounded as ``kind`` rounds them."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(src / "model.safetensors")
    save_file({n: rounded(n, w, kind).contiguous() for n, w in weights.items()}, dest / "model.safetensors",
              metadata={"format": "pt"})
    return dest


def int_layers(lm) -> dict[str, tuple]:
    return {n: m.to_int() for n, m in lm.model.named_modules() if isinstance(m, QuantizedLinear)}


def same_args(source: dict, back: dict) -> None:
    """The model settings prosa builds from both configs agree (GGUF floats are float32; GPT-2's n_inner is
    written out; mistral comes back as llama)."""
    from dataclasses import asdict

    from prosa.models import get_module

    left, right = (asdict(get_module(c["model_type"]).ModelArgs.from_dict(c)) for c in (source, back))
    for key in ("model_type", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types"):
        left.pop(key, None), right.pop(key, None)
    if "n_inner" in left:
        left["n_inner"] = left["n_inner"] or 4 * left["n_embd"]
    left.update(left.pop("rope_scaling", None) or {}), right.update(right.pop("rope_scaling", None) or {})
    assert sorted(left) == sorted(right)
    for key, value in left.items():
        assert right[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key


# ------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip(source, exported, tmp_path, arch, kind):
    """Config, tokenizer and every weight come back; prosa generates from the export exactly what it generates
    from the source rounded the same way."""
    src, out = source(arch), exported(arch, kind)
    ck, orig = open_checkpoint(out), open_checkpoint(src)
    same_args(orig.config, ck.config)
    assert ck.config["tie_word_embeddings"] is (arch != "llama3")
    tok, ref_tok = ck.tokenizer(), orig.tokenizer()
    for text in TEXTS:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert ids == ref_tok.encode(text, add_special_tokens=special)
            assert tok.decode(ids) == ref_tok.decode(ids)
    assert tok.eos_token_ids == ref_tok.eos_token_ids and tok.bos_token_id == ref_tok.bos_token_id
    ref = reference_folder(src, kind, tmp_path / "ref")
    expected = dict(open_checkpoint(ref).tensors())
    if ck.config["tie_word_embeddings"]:
        expected.pop("lm_head.weight", None)   # a tied output layer is the embedding: not written
    got = dict(ck.tensors())
    assert sorted(got) == sorted(expected)
    for name, w in got.items():
        assert torch.equal(w, expected[name]), name
    ours = prosa.load(out, quantize="none", dtype="float32")
    theirs = prosa.load(ref, quantize="none", dtype="float32")
    for prompt in TEXTS[:2]:
        a = ours.generate(prompt, max_new_tokens=12, temperature=0)
        assert a.tokens == theirs.generate(prompt, max_new_tokens=12, temperature=0).tokens
    if kind != "f16":   # the file's integers are prosa's blocks, and prosa runs them as they are
        for name, w in orig.tensors(torch.float32):
            if w.dim() == 2 and (name != "lm_head.weight" or not ck.config["tie_word_embeddings"]) \
                    and "wpe" not in name:
                lin = w.t() if name.endswith(CONV1D) else w
                q4 = kind == "q4_1" and not name.endswith(OUTPUTS)
                want = quantize_int4(lin, 32) if q4 else (*quantize_int8(lin, 32), None)
                for x, y in zip(ck.gguf.int_weight(name)[1:], want):
                    assert (x is None and y is None) or torch.equal(x, y), name


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_exports_run_prosas_blocks(source, exported, arch):
    """prosa.load(export) repacks every linear layer exactly: q4_1 holds prosa's own int4 layers bit for bit (the
    output layer, int8 in prosa, is symmetric Q8_0: GGUF has no asymmetric 8-bit type), q8_0 prosa's symmetric
    int8 ones."""
    src = source(arch)
    q4 = prosa.load(exported(arch, "q4_1"))
    assert q4.quantize == "int4" and "int8 g32" not in q4.weights and "int4 g32" not in q4.weights
    own = int_layers(prosa.load(src, quantize="int4"))
    floats = {n: m.weight for n, m in prosa.load(src, quantize="none", dtype="float32").model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    exp4 = int_layers(q4)
    assert sorted(exp4) == sorted(own)
    for name, (q, d, m) in exp4.items():
        if name == "lm_head":
            assert m is None and torch.equal(q, quantize_int8(floats[name], 32)[0])
        else:
            assert all(torch.equal(x, y) for x, y in zip((q, d, m), own[name])), name
    q8 = prosa.load(exported(arch, "q8_0"))
    assert q8.quantize == "int8"
    for name, (q, d, m) in int_layers(q8).items():
        want_q, want_d = quantize_int8(floats[name], 32)
        assert m is None and torch.equal(q, want_q) and torch.equal(d, want_d), name


def test_other_gpt2_layouts(source, exported, tmp_path):
    """A pytorch_model.bin checkpoint (shapes known only once loaded, any order) and a prefix-less base-model one
    export as the safetensors original does."""
    from safetensors.torch import load_file, save_file

    want = dict(load_gguf(exported("gpt2", "q8_0")).tensors())
    folder = tiny.make_checkpoint("gpt2", tmp_path / "bin", safe_serialization=False)
    got = dict(load_gguf(export_gguf(folder, tmp_path / "bin.gguf", "q8_0").path).tensors())
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    # a base-model checkpoint as openai-community/gpt2 ships: no "transformer." prefix, attention-mask buffers
    base = shutil.copytree(source("gpt2"), tmp_path / "base")
    weights = {n.removeprefix("transformer."): w for n, w in load_file(base / "model.safetensors").items()}
    weights["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    got = dict(load_gguf(export_gguf(base, tmp_path / "base.gguf", "q8_0").path).tensors())
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_block_packing_matches_gguf_py():
    w = torch.randn(8, 96) * 0.1
    w[1, :32] = 0   # a block with scale 0
    q, d = quantize_int8(w, 32)
    assert np.array_equal(quants.dequantize(_q8_0(q, d), gguf.GGMLQuantizationType.Q8_0),
                          dequantize_int(q, d, None).numpy())
    q, d, m = quantize_int4(w, 32)
    assert np.array_equal(quants.dequantize(_q4_1(q, d, m), gguf.GGMLQuantizationType.Q4_1),
                          dequantize_int(q, d, m).numpy())


# ---------------------------------------------------------------------------------------------- GGUF sources
def test_from_gguf_source(exported, tmp_path):
    """A GGUF re-exported: tokenizer and general.* keys copied, f16 -> q8_0 / q4_1 quantized from its values,
    q4_1 -> q4_1 copied block for block."""
    f16 = exported("llama3", "f16")
    base = load_gguf(f16)
    values = dict(base.tensors())
    for kind in ("q8_0", "q4_1"):
        res = export_gguf(f16, tmp_path / f"{kind}.gguf", kind)
        assert res.copied == 0
        ck = load_gguf(res.path)
        assert {k: v for k, v in ck.metadata.items() if k.startswith(("tokenizer.", "general.name"))} == \
            {k: v for k, v in base.metadata.items() if k.startswith(("tokenizer.", "general.name"))}
        for name, w in values.items():
            if w.dim() == 2:
                q4 = kind == "q4_1" and not name.endswith(OUTPUTS)
                want = quantize_int4(w, 32) if q4 else quantize_int8(w, 32)
                assert all(torch.equal(x, y) for x, y in zip(ck.int_weight(name)[1:], want)), name
    again = export_gguf(tmp_path / "q4_1.gguf", tmp_path / "again.gguf", "q4_1")
    assert again.copied == sum(w.dim() == 2 for w in values.values())
    assert same_bytes(tmp_path / "q4_1.gguf", again.path)


def same_bytes(a: Path, b: Path) -> bool:
    """Same metadata and the same bytes in every tensor."""
    ca, cb = load_gguf(a), load_gguf(b)
    if ca.metadata != cb.metadata or len(ca._entries) != len(cb._entries):
        return False
    data = {info.name: ca._mm[info.start:info.start + info.nbytes] for info, _, _ in ca._entries}
    return all(data[info.name] == cb._mm[info.start:info.start + info.nbytes] for info, _, _ in cb._entries)


def test_bundled_q4_1_is_copied_exactly(bundled_gguf, tmp_path):
    """The bundled SmolLM2 (Q4_1 with a Q8_0 embedding) exported as q4_1 is the same file, block for block."""
    res = export_gguf(bundled_gguf, tmp_path / "smol.gguf", "q4_1")
    assert res.copied == 211 and res.tensors == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert same_bytes(bundled_gguf, res.path)


def byte_level(regex: str | None = None, digits: bool = False, prefix: bool = False) -> dict:
    """A tokenizer.json pre_tokenizer: byte-level BPE after a Split regex or single digits (or neither)."""
    level = {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True, "use_regex": regex is None}
    first = ({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False} if regex
             else {"type": "Digits", "individual_digits": True} if digits else None)
    return {"type": "Sequence", "pretokenizers": [first, level]} if first else level


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", None])
def test_pre_tokenizer_is_found(source, tmp_path, pre):
    """The pre-tokenizer name llama.cpp needs is the one that splits text as the source's tokenizer.json does;
    a split none of them makes (GPT-2 with add_prefix_space) is refused."""
    from prosa.weights.gguf_tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT

    folder = shutil.copytree(source("gpt2"), tmp_path / "m")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"smollm": byte_level(digits=True), "llama-bpe": byte_level(_LLAMA3_SPLIT),
                             "qwen2": byte_level(_QWEN2_SPLIT), None: byte_level(prefix=True)}[pre]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    if pre is None:
        with pytest.raises(UnsupportedModelError, match="pre-tokenizer"):
            export_gguf(folder, tmp_path / "t.gguf")
        return
    ck = load_gguf(export_gguf(folder, tmp_path / "t.gguf").path)
    assert ck.metadata["tokenizer.ggml.pre"] == pre
    ours = open_checkpoint(folder).tokenizer()
    for text in TEXTS + ["x 2024 12345 I'LL"]:
        assert ck.tokenizer.encode(text) == ours.encode(text)


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("change, match", [
    ({"model_type": "gpt_neox"}, "exports gpt2, llama, mistral, qwen2"),
    ({"model_type": "mistral", "sliding_window": 8}, "sliding attention window"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}}, "8192"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling"),
])
def test_unsupported_models(source, tmp_path, change, match):
    folder = shutil.copytree(source("llama_linear"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UnsupportedModelError, match=match):
        export_gguf(folder, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


def test_mistral_without_window_is_llama(source, tmp_path):
    folder = shutil.copytree(source("llama_linear"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "sliding_window": None}))
    ck = load_gguf(export_gguf(folder, tmp_path / "out.gguf", "q8_0").path)
    assert ck.config["model_type"] == "llama"


def test_check_output(tmp_path, monkeypatch):
    (tmp_path / "there.gguf").write_bytes(b"x")
    for bad, match in [("x.bin", "end in .gguf"), (tmp_path / "there.gguf", "--overwrite"),
                       (tmp_path / "no" / "x.gguf", "does not exist")]:
        with pytest.raises(ValueError, match=match):
            check_output(bad)
    assert check_output(tmp_path / "there.gguf", overwrite=True) == tmp_path / "there.gguf"
    monkeypatch.setattr(os, "access", lambda *a: False)   # root may write anywhere: simulate a read-only folder
    with pytest.raises(ValueError, match="not writable"):
        check_output(tmp_path / "x.gguf")


# --------------------------------------------------------------------------------------------------------- CLI
def prosa_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prosa", "export", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli(source, tmp_path):
    """The real command: a happy path and every argument error, started together (each pays prosa's import);
    usage errors exit 2 with one error line, before any model is opened."""
    src = source("gpt2")
    (tmp_path / "there.gguf").write_bytes(b"x")
    runs = {
        "ok": (0, prosa_cli(src, "--gguf", tmp_path / "out.gguf", "--type", "Q4_1")),
        "type": (2, prosa_cli(tmp_path / "missing-model", "--gguf", tmp_path / "a.gguf", "--type", "q5_k")),
        "suffix": (2, prosa_cli(src, "--gguf", tmp_path / "a.bin")),
        "exists": (2, prosa_cli(src, "--gguf", tmp_path / "there.gguf")),
        "folder": (2, prosa_cli(src, "--gguf", tmp_path / "nope" / "a.gguf")),
        "model": (1, prosa_cli(tmp_path / "missing-model", "--gguf", tmp_path / "b.gguf")),
    }
    for what, (code, proc) in runs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == code, (what, err)
        assert "Traceback" not in err, what
        if code:
            assert len([line for line in err.splitlines() if "error:" in line]) == 1, (what, err)
        else:
            assert out.startswith("wrote ") and "q4_1" in out
    assert load_gguf(tmp_path / "out.gguf").tensor_types()["transformer.h.0.attn.c_attn.weight"] == "Q4_1"
    assert not list(tmp_path.glob("a.*")) and not list(tmp_path.glob(".*tmp"))
