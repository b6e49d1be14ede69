"""GGUF loading: config, tensors and tokenizer against transformers (the oracle), dequantization against gguf-py,
name mapping / Q-K permutation round trips on tiny hand-written files, and clean errors for broken files."""
from __future__ import annotations

import json
import math
import mmap
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants  # noqa: E402

from prosa.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError  # noqa: E402
from prosa.weights.gguf import dequantize, find_gguf, is_gguf, load_gguf  # noqa: E402
from prosa.weights.gguf_format import _parse  # noqa: E402

TEXTS = [
    "Hello world! This is a test.",
    "Ação, coração, pão e feijão. Olá, como você está? Pôr-do-sol às 18h30.",
    "日本語のテキストと中文的文本。한국어도.",
    "emoji 🙂 👍🏽 👨‍👩‍👧 family 🇧🇷",
    "def main():\n    print('hello world')  # 42\n\treturn x**2 + 3.14159\n",
    "  leading spaces,   several   spaces\n\n\nand newlines\r\n and 12345 67 8 numbers 1,000,000.",
    "<|im_start|>user\nOlá!<|im_end|>\n<|im_start|>assistant\n",
    "",
]


# ------------------------------------------------------------------------------------------------ bundled model
# `bundled_gguf` (path) and `bundled_hf` (transformers model, tokenizer; built once per session) are in conftest.py
@pytest.fixture(scope="module")
def ours(bundled_gguf):
    return load_gguf(bundled_gguf)


@pytest.fixture(scope="module")
def hf_model(bundled_hf):
    return bundled_hf[0]


@pytest.fixture(scope="module")
def hf_tokenizer(bundled_hf):
    return bundled_hf[1]


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(cfg, "rope_theta", None))


@pytest.mark.slow
def test_the_type_table_is_the_gguf_packages(bundled_gguf):
    """prosa's own copy of the GGML types (the reader does not import gguf: ~0.1-0.2 s of every load) matches the
    installed gguf's, and loading the bundled model leaves the package unimported."""
    import subprocess
    import sys

    from prosa.weights.ggml_types import QUANT_SIZES, GGMLType

    assert {t.name: int(t) for t in GGMLType} == {t.name: int(t) for t in Q}
    assert {t.name: v for t, v in QUANT_SIZES.items()} == {t.name: v for t, v in GGML_QUANT_SIZES.items()}
    code = ("import sys, prosa; lm = prosa.load(sys.argv[1]); lm.generate('Hi', max_new_tokens=2); "
            "print(sorted(m for m in sys.modules if m == 'gguf' or m.startswith(('gguf.', 'yaml'))))")
    out = subprocess.run([sys.executable, "-c", code, str(bundled_gguf)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:] + out.stdout


def test_config_matches_transformers(ours, hf_model):
    hf = hf_model.config
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert ours.config[key] == getattr(hf, key), key
    assert ours.config["rope_theta"] == _rope_theta(hf)
    assert ours.config["rope_scaling"] is None and ours.config["hidden_act"] == hf.hidden_act == "silu"
    assert ours.config["architectures"] == ["LlamaForCausalLM"] and ours.config["torch_dtype"] == "float32"
    assert ours.generation_config["eos_token_id"] == [2] and ours.generation_config["bos_token_id"] == 1


@pytest.mark.slow
def test_tensors_match_transformers(ours, hf_model):
    expected = hf_model.state_dict()
    if ours.config["tie_word_embeddings"]:
        expected.pop("lm_head.weight")  # tied: a HF checkpoint does not store it either
    seen = []
    for name, tensor in ours.tensors():
        seen.append(name)
        assert tensor.dtype == torch.float32 and tensor.shape == expected[name].shape, name
        if not torch.equal(tensor, expected[name]):
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    assert sorted(seen) == sorted(expected)
    types = ours.tensor_types()
    assert sorted(types) == sorted(seen) and set(types.values()) == {"Q4_1", "Q8_0", "F32"}
    assert types["model.embed_tokens.weight"] == "Q8_0" and types["model.norm.weight"] == "F32"


def test_tensors_in_half_precision(ours):
    threads = torch.get_num_threads()
    name, tensor = next(ours.tensors(torch.bfloat16))
    assert name == "model.embed_tokens.weight" and tensor.dtype == torch.bfloat16
    assert torch.get_num_threads() == threads  # dequantization runs on one thread, then restores the setting


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(ours, hf_tokenizer, text):
    tok = ours.tokenizer
    for special in (True, False):
        ids = tok.encode(text, add_special_tokens=special)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=special)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.slow
def test_tokenizer_specials_and_template(ours, hf_tokenizer):
    tok = ours.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == 1
    assert 2 in tok.eos_token_ids
    assert tok.chat_template == hf_tokenizer.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.vocab_size == len(hf_tokenizer) == 49152


# --------------------------------------------------------------------------------------------- dequantization
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_dequantize_matches_gguf_py(qtype):
    x = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32) * 0.1
    x[3, :32] = 0.0  # an all-zero block (scale 0)
    packed = quants.quantize(x, qtype)
    ours = dequantize(torch.from_numpy(packed.copy()).reshape(-1), qtype, x.shape)
    assert torch.equal(ours, torch.from_numpy(quants.dequantize(packed, qtype)))


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_dequantize_k_quants(qtype):
    """No Python quantizer for K-quants: random bytes in valid block layout (fp16 scales kept finite)."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(1).integers(0, 256, (4, 512 // block * nbytes), dtype=np.uint8)
    # each super-block starts or ends with its fp16 scale(s) (d, and dmin for Q2/Q4/Q5_K): make them small
    blocks = raw.reshape(-1, nbytes)
    for at in {Q.Q2_K: [nbytes - 4, nbytes - 2], Q.Q3_K: [nbytes - 2], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2],
               Q.Q6_K: [nbytes - 2]}[qtype]:
        blocks[:, at:at + 2] = np.full((len(blocks), 1), 0.01, np.float16).view(np.uint8)
    expected = torch.from_numpy(quants.dequantize(raw, qtype)).reshape(4, 512)
    assert torch.isfinite(expected).all()
    assert torch.equal(dequantize(torch.from_numpy(raw.copy()).reshape(-1), qtype, (4, 512)), expected)


@pytest.mark.parametrize("qtype, dtype", [(Q.F32, torch.float32), (Q.F16, torch.float16), (Q.BF16, torch.bfloat16)])
def test_float_types(qtype, dtype):
    x = torch.randn(6, 32).to(dtype)
    raw = x.reshape(-1).view(torch.uint8).clone()
    assert torch.equal(dequantize(raw, qtype, (6, 32)), x)


def test_unsupported_tensor_type():
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), Q.IQ2_XXS, (256,))


# ------------------------------------------------------------------------------------------------- tiny files
CORPUS = [
    "A story about a man and a dog. The dog ran to the park and the man followed him.",
    "Ação, coração, pão e feijão. Olá, como você está? Eu estou bem, obrigado.",
    "日本語のテキストと中文的文本。 🙂 👍🏽 emoji family.",
    "def main():\n    print('hello world')\n    return 0\n",
    "Once upon a time there were 12 little models and 345 laptops.",
] * 20
HIDDEN, HEADS, KV_HEADS, FF, LAYERS = 64, 4, 2, 128, 2
HEAD_DIM = HIDDEN // HEADS
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to llama q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def bpe_vocab() -> tuple[list[str], list[str], list[int]]:
    """A small byte-level BPE (tokens, merges, token types) with chat specials and one user-defined token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])] + ["<think>"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges, [3 if t.startswith("<|") else 4 if t == "<think>" else 1 for t in tokens]


@pytest.fixture(scope="module")
def spm_vocab(tmp_path_factory) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece BPE vocabulary with byte fallback (tokens, scores, types), as in Llama 2 / TinyLlama."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "m"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                   user_defined_symbols=["<tool>"])
    sp = spm.SentencePieceProcessor(model_file=str(folder / "m.model"))
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
             4 if tokens[i] == "<tool>" else 1 for i in range(len(tokens))]
    return tokens, [sp.get_score(i) for i in range(len(tokens))], types


def write_gguf(path: Path, arch: str, tensors: dict, meta: dict, tokenizer: dict | None = None) -> Path:
    """Write a GGUF. ``tensors``: name -> float32 array (numpy = torch order) or (array, quant type)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {**meta, **(tokenizer or {})}.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, value in tensors.items():
        array, qtype = value if isinstance(value, tuple) else (value, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(name, array.astype(np.float32))
        else:
            w.add_tensor(name, quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def bpe_metadata(bpe_vocab, pre: str) -> dict:
    tokens, merges, types = bpe_vocab
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT}


def llama_file(path: Path, tokenizer: dict, vocab: int, arch: str = "llama", tied: bool = False,
               quantized: bool = False, extra: dict | None = None, extra_tensors: dict | None = None,
               embed_qtype=Q.Q8_0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 2-layer llama (or qwen2) GGUF; returns it and the HF-layout weights it was made from."""
    rng = np.random.default_rng(0)
    hf: dict[str, np.ndarray] = {}
    tensors: dict = {}

    def add(gguf_name: str, hf_name: str, shape: tuple, stored=None, qtype=Q.F32):
        hf[hf_name] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        array = stored(hf[hf_name]) if stored else hf[hf_name]
        tensors[gguf_name] = (array, qtype) if quantized else array

    add("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN), qtype=embed_qtype)
    for i in range(LAYERS):
        blk, layer = f"blk.{i}", f"model.layers.{i}"
        q_heads = None if arch == "qwen2" else HEADS  # qwen2 files are not permuted
        add(f"{blk}.attn_norm.weight", f"{layer}.input_layernorm.weight", (HIDDEN,))
        add(f"{blk}.attn_q.weight", f"{layer}.self_attn.q_proj.weight", (HIDDEN, HIDDEN),
            q_heads and (lambda w: llama_cpp_permute(w, HEADS)), Q.Q4_0)
        add(f"{blk}.attn_k.weight", f"{layer}.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN),
            q_heads and (lambda w: llama_cpp_permute(w, KV_HEADS)), Q.Q5_0)
        add(f"{blk}.attn_v.weight", f"{layer}.self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), qtype=Q.Q5_1)
        if arch == "qwen2":
            add(f"{blk}.attn_q.bias", f"{layer}.self_attn.q_proj.bias", (HIDDEN,))
            add(f"{blk}.attn_k.bias", f"{layer}.self_attn.k_proj.bias", (KV_HEADS * HEAD_DIM,))
            add(f"{blk}.attn_v.bias", f"{layer}.self_attn.v_proj.bias", (KV_HEADS * HEAD_DIM,))
        add(f"{blk}.attn_output.weight", f"{layer}.self_attn.o_proj.weight", (HIDDEN, HIDDEN), qtype=Q.Q4_1)
        add(f"{blk}.ffn_norm.weight", f"{layer}.post_attention_layernorm.weight", (HIDDEN,))
        add(f"{blk}.ffn_gate.weight", f"{layer}.mlp.gate_proj.weight", (FF, HIDDEN), qtype=Q.Q8_0)
        add(f"{blk}.ffn_up.weight", f"{layer}.mlp.up_proj.weight", (FF, HIDDEN), qtype=Q.Q4_0)
        add(f"{blk}.ffn_down.weight", f"{layer}.mlp.down_proj.weight", (HIDDEN, FF), qtype=Q.Q4_1)
    add("output_norm.weight", "model.norm.weight", (HIDDEN,))
    if not tied:
        add("output.weight", "lm_head.weight", (vocab, HIDDEN), qtype=Q.Q8_0)
    meta = {f"{arch}.context_length": 256, f"{arch}.embedding_length": HIDDEN, f"{arch}.block_count": LAYERS,
            f"{arch}.feed_forward_length": FF, f"{arch}.attention.head_count": HEADS,
            f"{arch}.attention.head_count_kv": KV_HEADS, f"{arch}.rope.freq_base": 50000.0,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.rope.dimension_count": HEAD_DIM,
            f"{arch}.vocab_size": vocab, "general.name": "tiny", **(extra or {})}
    write_gguf(path, arch, {**tensors, **(extra_tensors or {})}, meta, tokenizer)
    return path, {k: torch.from_numpy(v) for k, v in hf.items()}


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def assert_same_tensors(ck, expected: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    got = dict(ck.tensors())
    assert sorted(got) == sorted(expected)
    for name, tensor in got.items():
        if not torch.equal(tensor, expected[name]):
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_float_round_trip(tmp_path, bpe_vocab, arch):
    """F32 weights come back exactly, under HF names, with llama.cpp's Q/K permutation undone (llama only)."""
    path, original = llama_file(tmp_path / "m.gguf", bpe_metadata(bpe_vocab, "qwen2"), len(bpe_vocab[0]), arch)
    ck = load_gguf(path)
    assert_same_tensors(ck, original)
    assert ck.config["model_type"] == arch and ck.config["tie_word_embeddings"] is False
    assert ck.config["attention_bias"] is (arch == "qwen2")
    assert ck.config["num_key_value_heads"] == KV_HEADS and ck.config["head_dim"] == HEAD_DIM
    assert ck.config["rope_theta"] == 50000.0 and ck.config["max_position_embeddings"] == 256


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_quantized_matches_transformers(tmp_path, bpe_vocab, arch):
    path, _ = llama_file(tmp_path / "m.gguf", bpe_metadata(bpe_vocab, "qwen2"), len(bpe_vocab[0]), arch,
                         tied=True, quantized=True)
    ck = load_gguf(path)
    assert ck.config["tie_word_embeddings"] is True
    assert ck.tensor_types()["model.layers.0.self_attn.q_proj.weight"] == "Q4_0"
    assert_same_tensors(ck, hf_state(path), atol=1e-6)
    hf_config = pytest.importorskip("transformers").AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert ck.config[key] == getattr(hf_config, key), key
    assert ck.config["rope_theta"] == _rope_theta(hf_config)


def gpt2_file(path: Path, tokenizer: dict, vocab: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 2-layer GPT-2 GGUF (weights stored (out, in) as llama.cpp does); returns it and the HF Conv1D weights."""
    rng = np.random.default_rng(1)
    hf, tensors = {}, {}
    context = 1024  # transformers sizes wpe from n_positions (default 1024), not from the file

    def add(gguf_name: str, hf_name: str, shape: tuple, conv1d: bool = False):
        hf[hf_name] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        tensors[gguf_name] = hf[hf_name].T.copy() if conv1d else hf[hf_name]

    add("token_embd.weight", "transformer.wte.weight", (vocab, HIDDEN))
    add("position_embd.weight", "transformer.wpe.weight", (context, HIDDEN))
    for i in range(LAYERS):
        blk, layer = f"blk.{i}", f"transformer.h.{i}"
        for gguf_part, hf_part, shape in (("attn_norm", "ln_1", (HIDDEN,)), ("ffn_norm", "ln_2", (HIDDEN,))):
            add(f"{blk}.{gguf_part}.weight", f"{layer}.{hf_part}.weight", shape)
            add(f"{blk}.{gguf_part}.bias", f"{layer}.{hf_part}.bias", shape)
        for gguf_part, hf_part, n_in, n_out in (("attn_qkv", "attn.c_attn", HIDDEN, 3 * HIDDEN),
                                                ("attn_output", "attn.c_proj", HIDDEN, HIDDEN),
                                                ("ffn_up", "mlp.c_fc", HIDDEN, 4 * HIDDEN),
                                                ("ffn_down", "mlp.c_proj", 4 * HIDDEN, HIDDEN)):
            add(f"{blk}.{gguf_part}.weight", f"{layer}.{hf_part}.weight", (n_in, n_out), conv1d=True)
            add(f"{blk}.{gguf_part}.bias", f"{layer}.{hf_part}.bias", (n_out,))
    add("output_norm.weight", "transformer.ln_f.weight", (HIDDEN,))
    add("output_norm.bias", "transformer.ln_f.bias", (HIDDEN,))
    meta = {"gpt2.context_length": context, "gpt2.embedding_length": HIDDEN, "gpt2.block_count": LAYERS,
            "gpt2.feed_forward_length": 4 * HIDDEN, "gpt2.attention.head_count": HEADS,
            "gpt2.attention.layer_norm_epsilon": 1e-5}
    write_gguf(path, "gpt2", tensors, meta, tokenizer)
    return path, {k: torch.from_numpy(v) for k, v in hf.items()}


def test_tiny_gpt2(tmp_path, bpe_vocab):
    tokenizer = {**bpe_metadata(bpe_vocab, "gpt-2"), "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0}
    path, original = gpt2_file(tmp_path / "g.gguf", tokenizer, len(bpe_vocab[0]))
    ck = load_gguf(path)
    assert_same_tensors(ck, original)  # Conv1D layout: (in, out)
    assert_same_tensors(ck, hf_state(path))
    assert ck.config["model_type"] == "gpt2" and ck.config["n_layer"] == LAYERS and ck.config["n_embd"] == HIDDEN
    assert ck.config["n_head"] == HEADS and ck.config["n_positions"] == 1024 and ck.config["n_inner"] == 4 * HIDDEN
    assert ck.config["tie_word_embeddings"] is True and ck.config["layer_norm_epsilon"] == pytest.approx(1e-5)
    assert ck.config["bos_token_id"] == ck.config["eos_token_id"] == 0


@pytest.mark.parametrize("kind", ["bpe-qwen2", "bpe-smollm", "bpe-llama-bpe", "spm"])
def test_tiny_tokenizers_match_transformers(tmp_path, bpe_vocab, spm_vocab, kind):
    transformers = pytest.importorskip("transformers")
    if kind == "spm":
        tokens, scores, types = spm_vocab
        tokenizer = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                     "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
                     "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                     "tokenizer.ggml.unknown_token_id": 0}
    else:
        tokenizer = bpe_metadata(bpe_vocab, kind.removeprefix("bpe-"))
    path, _ = llama_file(tmp_path / "t.gguf", tokenizer, len(tokenizer["tokenizer.ggml.tokens"]), tied=True)
    ours = load_gguf(path).tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS + ["<think>x</think> <tool> call", " a", "x  \n y\t\tz "]:
        if kind == "bpe-smollm" and any(c.isdigit() for c in text):
            continue  # deliberate difference, checked below
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), (text, special)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    if kind == "spm":  # llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise
        assert ours.encode("hi")[0] == 1 and ours.bos_token == "<s>" and ours.unk_token == "<unk>"
        assert ours.decode(ours.encode("Olá <0x41>", add_special_tokens=False)) == "Olá <0x41>"
    else:
        assert ours.chat_template == CHAT and ours.pad_token == "<|endoftext|>"
    if kind == "bpe-smollm":
        # llama.cpp and SmolLM's own tokenizer.json split digits one by one (transformers' GGUF loader does not;
        # with SmolLM's real vocabulary, which has no multi-digit tokens, both agree)
        assert [ours.decode([i]) for i in ours.encode("x 2024")] == ["x", " ", "2", "0", "2", "4"]


def test_llama3_rope_freqs(tmp_path, bpe_vocab):
    """Llama 3.1+ files carry rope scaling as a rope_freqs tensor; it becomes HF's llama3 rope_scaling."""
    factor, theta, old_context = 32.0, 500000.0, 8192
    freqs = 1.0 / theta ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM)
    factors = []
    for freq in freqs:  # as llama.cpp's converter computes them
        wavelen = 2 * math.pi / freq
        smooth = (old_context / wavelen - 1.0) / (4.0 - 1.0)
        factors.append(1.0 if wavelen < old_context / 4 else factor if wavelen > old_context
                       else 1 / ((1 - smooth) / factor + smooth))
    factors = np.array(factors, dtype=np.float32)
    smoothed = np.flatnonzero((factors > 1) & (factors < factor))
    assert len(smoothed) == 1  # the tiny head size still has one frequency in the smooth band
    tokenizer, vocab = bpe_metadata(bpe_vocab, "llama-bpe"), len(bpe_vocab[0])
    path, original = llama_file(tmp_path / "r.gguf", tokenizer, vocab, extra={"llama.rope.freq_base": theta},
                                extra_tensors={"rope_freqs.weight": factors})
    ck = load_gguf(path)
    assert ck.config["rope_scaling"] == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert_same_tensors(ck, original)  # rope_freqs is config, not a weight
    factors[smoothed] *= 1.1
    path, _ = llama_file(tmp_path / "bad.gguf", tokenizer, vocab, extra_tensors={"rope_freqs.weight": factors})
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        load_gguf(path)


def test_linear_and_yarn_rope_scaling(tmp_path, bpe_vocab):
    tokenizer, vocab = bpe_metadata(bpe_vocab, "llama-bpe"), len(bpe_vocab[0])
    path, _ = llama_file(tmp_path / "l.gguf", tokenizer, vocab, extra={"llama.rope.scaling.type": "linear",
                                                                       "llama.rope.scaling.factor": 2.0})
    assert load_gguf(path).config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    path, _ = llama_file(tmp_path / "y.gguf", tokenizer, vocab, extra={
        "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 64})
    assert load_gguf(path).config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 64}


def test_header_matches_gguf_reader(tmp_path, bpe_vocab):
    """Our struct parser reads every metadata value type and the tensor table as gguf-py's reader does."""
    path, _ = llama_file(tmp_path / "m.gguf", bpe_metadata(bpe_vocab, "smollm"), len(bpe_vocab[0]), quantized=True)
    w = gguf.GGUFWriter(str(tmp_path / "kv.gguf"), "llama")
    for i, (kind, value) in enumerate([("uint8", 200), ("int8", -100), ("uint16", 60000), ("int16", -30000),
                                       ("uint32", 4_000_000_000), ("int32", -2_000_000_000), ("float32", 0.1),
                                       ("uint64", 2**63), ("int64", -(2**62)), ("float64", 0.1), ("bool", True),
                                       ("string", "Olá 🙂"), ("array", [1, 2, 3]), ("array", [0.5, 1.5]),
                                       ("array", ["a", "ção"]), ("array", [True, False])]):
        getattr(w, f"add_{kind}")(f"test.{i}", value)
    w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for file in (path, tmp_path / "kv.gguf"):
        reader = gguf.GGUFReader(file)
        with open(file, "rb") as f:
            md, infos = _parse(file, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        assert md == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert [(t.name, t.start, t.nbytes, t.ggml_type) for t in infos] == \
            [(t.name, t.data_offset, t.n_bytes, t.tensor_type) for t in reader.tensors]


# ---------------------------------------------------------------------------------------------------- errors
def test_truncated_bundled_file(tmp_path, bundled_gguf):
    cut = tmp_path / "half.gguf"
    with open(bundled_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(bundled_gguf.stat().st_size // 2))
    with pytest.raises(CorruptModelError, match=r"truncated or corrupt.*Re-download"):
        load_gguf(cut)


def test_truncated_and_garbage_files(tmp_path, bpe_vocab):
    path, _ = llama_file(tmp_path / "m.gguf", bpe_metadata(bpe_vocab, "smollm"), len(bpe_vocab[0]))
    data = path.read_bytes()
    rng = np.random.default_rng(3)
    cases = {
        "header_cut": data[:100], "vocab_cut": data[:len(data) // 8], "data_cut": data[:-100],
        "magic_only": b"GGUF", "garbage": b"GGUF" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "huge_counts": b"GGUF" + (3).to_bytes(4, "little") + (2**40).to_bytes(8, "little") * 2 + data[24:200],
        "bad_key": data[:40] + b"\xff" * 64,
    }
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(blob)
        with pytest.raises(CorruptModelError, match="truncated or corrupt") as err:
            load_gguf(bad)
        assert str(bad) in str(err.value) and str(err.value).endswith("Re-download it."), name   # file and fix
    (tmp_path / "zip.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CorruptModelError, match="not a GGUF file"):
        load_gguf(tmp_path / "zip.gguf")
    with pytest.raises(ModelNotFoundError):
        load_gguf(tmp_path / "missing.gguf")


def test_unsupported_files(tmp_path, bpe_vocab):
    tokenizer = bpe_metadata(bpe_vocab, "smollm")
    path = write_gguf(tmp_path / "mamba.gguf", "mamba", {"token_embd.weight": np.zeros((4, 32), np.float32)},
                      {"mamba.block_count": 1}, tokenizer)
    with pytest.raises(UnsupportedModelError, match=r"'mamba'.*gpt2, llama, qwen2"):
        load_gguf(path)
    path, _ = llama_file(tmp_path / "moe.gguf", tokenizer, len(bpe_vocab[0]),
                         extra_tensors={"blk.0.ffn_gate_exps.weight": np.zeros((2, 4, 32), np.float32)})
    with pytest.raises(UnsupportedModelError, match="ffn_gate_exps"):
        load_gguf(path)
    path, _ = llama_file(tmp_path / "sp.gguf", {**tokenizer, "tokenizer.ggml.model": "t5"}, len(bpe_vocab[0]))
    with pytest.raises(UnsupportedModelError, match="'t5'"):
        load_gguf(path)


def test_malformed_tokenizer_metadata(tmp_path, bpe_vocab):
    tokenizer = bpe_metadata(bpe_vocab, "smollm")
    path, _ = llama_file(tmp_path / "merges.gguf", {**tokenizer, "tokenizer.ggml.merges": ["nospace"]},
                         len(bpe_vocab[0]))
    with pytest.raises(CorruptModelError, match="cannot be built into a tokenizer"):
        load_gguf(path)


def test_is_gguf_and_find_gguf(tmp_path, bpe_vocab):
    assert find_gguf(tmp_path) is None and not is_gguf(tmp_path) and not is_gguf(tmp_path / "nope.gguf")
    path, _ = llama_file(tmp_path / "a.gguf", bpe_metadata(bpe_vocab, "smollm"), len(bpe_vocab[0]))
    (tmp_path / "notes.txt").write_text("GGU")
    assert is_gguf(path) and not is_gguf(tmp_path / "notes.txt")
    assert find_gguf(tmp_path) == path and load_gguf(tmp_path).path == path
    shutil.copy(path, tmp_path / "b.gguf")
    with pytest.raises(ModelNotFoundError, match="a.gguf, b.gguf"):
        find_gguf(tmp_path)
