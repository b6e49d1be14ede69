"""bench/regimes.py's pure parts (bench/regimes_report.py, bench/regimes_build.py): PASS/MISS rows and tables, the
bandwidth arithmetic, and its GGUF writer on a tiny Llama shape read back by prosa (the measuring itself is
`make bench`, not a test)."""
from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import regimes  # noqa: E402
import regimes_build as build  # noqa: E402
import regimes_report as rep  # noqa: E402

TINY = {"layers": 2, "hidden": 64, "ffn": 128, "heads": 4, "kv_heads": 2, "vocab": 400, "context": 128}


def test_status_and_target_rows() -> None:
    assert rep.ratio_status(1.2, 1.1) == "PASS"
    assert rep.ratio_status(1.1, 1.1) == "PASS"
    assert rep.ratio_status(1.0, 1.0, strict=True) == "MISS"
    assert rep.ratio_status(0.9, 1.1) == "MISS"
    assert rep.ratio_status(2.0, None) == "info"
    assert rep.ratio_status(None, 1.0) == "—" and rep.ratio_status(float("nan"), 1.0) == "—"
    assert rep.target_row("a / b", 4.5, 4.0, [0.0, 0.1]) == "| a / b | 4.50x | ≥ 4x | PASS |"
    assert rep.target_row("a / b", 3.0, 4.0, [0.5]) == "| a / b | 3.00x | ≥ 4x | MISS (noisy: other load 0.5 cores) |"
    assert rep.target_row("bw", 0.83, 0.8, unit="%") == "| bw | 83% | ≥ 80% | PASS |"
    assert rep.target_row("bf16", 0.9, 1.0, strict=True) == "| bf16 | 0.90x | > 1x | MISS |"
    assert rep.target_row("x", None, 1.1, why="failed: boom") == "| x | failed: boom | ≥ 1.1x | — |"
    assert rep.target_row("info", 2.0, None, [3.0]) == "| info | 2.00x | — | info |"


def test_bandwidth_arithmetic() -> None:
    # 600 MB per token at 12 GB/s: at most 20 tok/s; 16 tok/s is 80% of it
    assert rep.bandwidth_limit(600e6, 12e9) == pytest.approx(20.0)
    assert rep.fraction_of_limit(16.0, 600e6, 12e9) == pytest.approx(0.8)
    untied = {"token_embd.weight": 100, "output.weight": 100, "blk.0.attn_q.weight": 10, "output_norm.weight": 1}
    assert rep.gguf_read_bytes(untied) == 111            # the embedding: one row read, not counted
    tied = {"token_embd.weight": 100, "blk.0.attn_q.weight": 10, "position_embd.weight": 5}
    assert rep.gguf_read_bytes(tied) == 115              # the embedding is the output layer: read whole


def test_spm_vocab() -> None:
    tokens, scores, types = build.spm_vocab(32000)
    assert len(tokens) == len(scores) == len(types) == 32000 == len(set(tokens))
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 10] == "<0x0A>" and types[:4] == [2, 3, 3, 6]
    assert scores[259] > scores[260] > scores[-1]
    with pytest.raises(ValueError):
        build.spm_vocab(100)


def _row(regime, system, model, fmt, seqs=1, source="", dtype="", tok_s=None, load=0.0, **extra):
    r = rep.Row(regime, system, model, fmt, seqs, dtype=dtype, source=source)
    if tok_s is None:
        r.errors.append("exit status 1: boom")
    for v in ([tok_s] if not isinstance(tok_s, list) else tok_s) if tok_s is not None else []:
        r.results.append({"decode_tok_s": v, "prefill_tok_s": v, "ttft_s": 1000 / v, "ttft_first_s": 1.0,
                          "peak_rss_mb": 500.0, "other_load": load, **extra})
    return r


def test_family_and_prefill_tables() -> None:
    rows = [_row("family", "prosa", "gpt2", "int8", source="HF folder", tok_s=[90.0, 110.0], fused=True),
            _row("family", "prosa", "gpt2", "int4", source="HF folder", tok_s=90.0, fused=True),
            _row("family", "transformers", "gpt2", "float32", source="HF folder", tok_s=20.0),
            _row("family", "prosa", "gpt2", "int8", source="GGUF Q8_0", tok_s=None),
            _row("family", "llama.cpp", "gpt2", "Q8_0", source="GGUF Q8_0", tok_s=80.0, load=0.6),
            _row("prefill", "prosa", "smollm2", "default", 1, tok_s=1200.0, how="events"),
            _row("prefill", "llama.cpp", "smollm2", "Q4_1", 1, tok_s=1000.0, how="one batch")]
    text = "\n".join(rep.family_section(rows))
    assert "| GPT-2-124M shape | prosa | HF folder | int8 | 100.0 [90.0–110.0] | 10.10 [9.09–11.11] | 500 | yes | " \
           "0.0 [0.0–0.0] |" in text
    assert "| GPT-2-124M shape | prosa | GGUF Q8_0 | int8 | failed: exit status 1: boom |" in text
    assert "| GPT-2-124M shape: prosa int8 / transformers fp32 | 5.00x | ≥ 4x | PASS |" in text
    assert "| GPT-2-124M shape: prosa int4 / transformers fp32 | 4.50x | ≥ 5x | MISS |" in text
    # the GGUF row failed, so the llama.cpp comparison falls back to the HF folder, says so, and is noisy
    assert "| GPT-2: prosa int8 (the HF folder (prosa could not run the GGUF)) / llama.cpp Q8_0 | 1.25x | ≥ 1.1x | " \
           "PASS (noisy: other load 0.6 cores) |" in text
    assert "GPT-Neo-125M shape: prosa int8 / transformers fp32 | not measured (peer not installed" in text
    text = "\n".join(rep.prefill_section(rows))
    assert "| prefill tok/s, 1 prompt(s): prosa / llama.cpp | 1.20x | ≥ 1x | PASS |" in text
    assert "| time to first token, 1 prompt(s): llama.cpp / prosa | 1.20x | ≥ 1x | PASS |" in text
    assert "| prosa | 1 x 512 | 1200.0 | 0.833 | 1.000 | 500 | 0.0 |" in text


def test_scale_and_bf16_tables() -> None:
    bw = rep.Row("scale", "machine", "", "read bandwidth")
    # three rounds: the limit uses the median round's sustained rate (10 GB/s), not the best pass (12.5 GB/s)
    for peak, sustained in ((12.5e9, 9e9), (11e9, 10e9), (10.5e9, 10.2e9)):
        bw.results.append({"bandwidth": peak, "torch_bytes_s": peak, "numpy_bytes_s": 8e9, "other_load": 0.0,
                           "sustained": sustained})
    rows = [bw, _row("scale", "prosa", "tinyllama", "int4", tok_s=16.0, read_bytes=500e6, weights="int4"),
            _row("scale", "llama.cpp", "tinyllama", "Q4_0", tok_s=12.0, read_bytes=560e6, weights="GGUF"),
            _row("scale", "prosa", "tinyllama", "int4+a8", tok_s=18.0, read_bytes=500e6, weights="int4")]
    text = "\n".join(rep.scale_section(rows, {"types": "9 x Q4_0", "mb": 600.0, "read_bytes": 560e6}))
    assert "Read bandwidth: 10.0 GB/s (3 rounds x 8 passes" in text
    assert "all passes of a round together 10.0 [9.0–10.2] GB/s, best single pass 12.5 GB/s" in text
    assert "| prosa's fraction against the best single bandwidth pass (a moment's peak) | 64% | — | info |" in text
    old = rep.Row("scale", "machine", "", "read bandwidth")   # a result written before "sustained" existed
    old.results.append({"bandwidth": 12.5e9, "torch_bytes_s": 12.5e9, "numpy_bytes_s": 8e9, "other_load": 0.0})
    assert "Read bandwidth: 12.5 GB/s" in "\n".join(rep.scale_section([old, *rows[1:]], {}))
    assert "| prosa | int4 (int4) | 16.0 | 62.50 | 500 | 20.0 | 80% | 500 | 0.0 |" in text
    assert "| TinyLlama-1.1B shape Q4_0: prosa (default: float activations) / llama.cpp decode | 1.33x | ≥ 1.1x " \
           "| PASS |" in text
    assert "prosa int4+a8 (int8 activations, llama.cpp's arithmetic) / llama.cpp decode | 1.50x | ≥ 1.1x | PASS |" \
           in text
    assert "| prosa's fraction of the bandwidth limit (its own bytes read per token) | 80% | ≥ 80% | PASS |" in text
    assert "against the file's limit (the GGUF's bytes read per token) | 90% | — | info |" in text
    rows = [_row("bf16", "prosa", "smollm2-bf16", "none", 1, dtype="float32", tok_s=20.0, dtype_resolved=None),
            _row("bf16", "prosa", "smollm2-bf16", "bf16", 1, tok_s=25.0, matmul="oneDNN matmul:brg x10"),
            _row("bf16", "prosa", "smollm2-bf16", "none", 1, dtype="auto", tok_s=19.0)]
    for r, d in zip(rows, ("float32", "bfloat16", "float32")):
        for res in r.results:
            res["dtype"] = d
    native = "has avx512f, avx512_bf16; lacks amx_bf16"
    text = "\n".join(rep.bf16_section(rows, native))
    assert "| quantize=bf16 (bfloat16) / float32, 1 sequence(s) | 1.25x | > 1x | PASS |" in text
    # dtype=auto kept float32 (bf16 is slower on this CPU): float32 against itself, for information
    assert "| dtype=auto (float32) / float32, 1 sequence(s) | 0.95x | — | info |" in text
    rows[2].results[0]["dtype"] = "bfloat16"
    text = "\n".join(rep.bf16_section(rows, native))
    assert "| dtype=auto (bfloat16) / float32, 1 sequence(s) | 0.95x | > 1x | MISS |" in text
    assert "oneDNN matmul:brg x10" in text
    text = "\n".join(rep.bf16_section(rows, "has avx512f; lacks avx512_bf16, amx_bf16"))
    assert "| quantize=bf16 (bfloat16) / float32, 1 sequence(s) | 1.25x | — | info |" in text


def test_report_is_one_issue_13_section(monkeypatch) -> None:
    monkeypatch.setattr(rep, "machine", lambda: {"cpu": "CPU", "flags": "has avx2; lacks amx_bf16", "ram": "1 GiB"})
    args = Namespace(only=["prefill"], repeat=2, threads=2, file_info={})
    text = rep.report([_row("prefill", "prosa", "smollm2", "default", 1, tok_s=1000.0)], args, 60.0, ["a note"])
    assert text.startswith("## ") and text.splitlines()[0].endswith("(issue #13)")
    assert text.count("\n## ") == 0 and "### Prompt processing" in text and "- a note" in text
    assert "--repeat 2` --only prefill" in text
    assert text.splitlines()[2] == rep.HEADLINE == regimes.__doc__.strip().splitlines()[0]


def test_llama_gguf_writer_read_back_by_prosa(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    import torch

    import prosa
    from prosa.weights.gguf import load_gguf

    path = tmp_path / "tiny.gguf"
    sizes = build.write_llama_gguf(path, **TINY)
    reader = gguf.GGUFReader(str(path))
    assert {t.name: int(t.n_bytes) for t in reader.tensors} == sizes
    assert sizes["blk.0.ffn_down.weight"] == 64 * 128 // 32 * 18          # Q4_0: 18 bytes per 32 weights
    ck = load_gguf(path)
    cfg = ck.config
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"],
            cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == \
           ("llama", 2, 64, 128, 4, 2, 400)
    # prosa reads the weights the writer drew (ffn_down: no Q/K row reordering)
    want = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    want = torch.from_numpy(gguf.quants.dequantize(want.data, want.tensor_type).reshape(64, 128).copy())
    got = dict(ck.tensors())["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(got.float(), want.float())
    assert 0.01 < float(want.std()) < 0.04
    lm = prosa.load(path, quantize="int4", threads=1)
    assert "Q4_0, exact" in lm.weights
    # the file's 4-bit output layer is taken as it is (not requantized to int8 from its dequantized values)
    head = lm.model.lm_head
    assert head.bits == 4 and "int8" not in lm.weights, lm.weights
    blocks = next(t for t in reader.tensors if t.name == "output.weight")
    want = torch.from_numpy(gguf.quants.dequantize(blocks.data, blocks.tensor_type).reshape(400, 64).copy())
    assert torch.equal(head.dequantize().float(), want)
    out = lm.generate("A story", max_new_tokens=4, temperature=0, ignore_eos=True)
    assert len(out.tokens) == 4


def test_read_bytes_leaves_out_embedding_tables_held_in_blocks() -> None:
    """A token embedding read one row per step is not counted, float (``nn.Embedding``) or kept in GGUF blocks
    (``QuantizedEmbedding``); the other layers' tensors are, each storage once."""
    import torch
    from torch import nn

    import regimes_work as work
    from prosa.weights.gguf_embedding import QuantizedEmbedding

    model = nn.Sequential(QuantizedEmbedding(torch.zeros(10, 34, dtype=torch.uint8), "Q8_0", 32, torch.float32),
                          nn.Embedding(5, 32), nn.Linear(32, 8, bias=False))
    assert work.read_bytes(model) == 8 * 32 * 4
