"""Perplexity by sliding windows: equal to transformers' loss over the same windows (the Hugging Face guide's
recipe), the window bookkeeping, parameter errors, the reference text, `prosa perplexity` on the command line,
and the bundled model on the reference text."""
from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import time

import pytest
import torch

import prosa
import tiny
from prosa.cli import main
from prosa.perplexity import perplexity, reference_text, windows

CLI = [sys.executable, "-m", "prosa.cli", "perplexity"]
TEXT = "\n".join(tiny.CORPUS[:6]) * 3          # ~710 tokens for the tiny tokenizer: 5+ windows of 128
CASES = [(128, 128), (128, 64), (128, 37), (100, 100), (64, 16)]   # (window, stride)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tiny_checkpoint):
    """(prosa model, transformers model) of one tiny checkpoint, both float32."""
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint(request.param)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return prosa.load(folder, dtype="float32"), hf


@pytest.fixture(scope="module")
def gpt2(tiny_checkpoint):
    return prosa.load(tiny_checkpoint("gpt2"), dtype="float32")


def hf_perplexity(hf, ids: list[int], window: int, stride: int) -> tuple[float, int, int]:
    """The Hugging Face guide's loop: labels -100 on the overlap, transformers' own (shifted) loss per window.
    Each window's mean loss is weighted by the labels it really averages over (those at index >= 1 that are
    not -100); the guide's ``num_valid_tokens - batch_size`` undercounts overlapping windows by one."""
    seq = torch.tensor([ids])
    nll_sum, n_tokens, n_windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, seq.size(1), stride):
        end = min(begin + window, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target).loss
        k = int((target[:, 1:] != -100).sum())
        nll_sum += loss.item() * k
        n_tokens += k
        n_windows += 1
        prev_end = end
        if end == seq.size(1):
            break
    return math.exp(nll_sum / n_tokens), n_tokens, n_windows


@pytest.mark.parametrize("window,stride", CASES)
def test_equals_transformers_loss(pair, window, stride):
    lm, hf = pair
    ids = lm.tokenizer.encode(TEXT)
    assert len(ids) > 5 * window
    expected, n_tokens, n_windows = hf_perplexity(hf, ids, window, stride)
    res = perplexity(lm, TEXT, window=window, stride=stride)
    assert res.perplexity == pytest.approx(expected, rel=1e-4)
    assert res.nll == pytest.approx(math.log(expected), rel=1e-4)
    assert (res.tokens, res.windows, res.window, res.stride) == (n_tokens, n_windows, window, stride)
    # every token but the first is scored once with overlap; without, every window's first token is context
    assert res.tokens == len(ids) - (res.windows if stride == window else 1)


def test_defaults_batches_and_progress(pair, capsys):
    lm, hf = pair
    res = perplexity(lm, TEXT)        # window = context length (128), stride = 64
    assert (res.window, res.stride) == (lm.context_length, lm.context_length // 2) == (128, 64)
    assert res.perplexity == pytest.approx(hf_perplexity(hf, lm.tokenizer.encode(TEXT), 128, 64)[0], rel=1e-4)
    batched = perplexity(lm, TEXT, batch_size=3, progress=True)   # last group holds the short last window
    assert batched.perplexity == pytest.approx(res.perplexity, rel=1e-5)
    assert (batched.tokens, batched.windows) == (res.tokens, res.windows)
    assert "window" in capsys.readouterr().err                    # the tqdm bar
    short = perplexity(lm, "A story about a man and a dog.")     # shorter than one window: one call
    assert short.windows == 1 and short.tokens == len(lm.tokenizer.encode("A story about a man and a dog.")) - 1
    assert math.isfinite(short.perplexity) and short.perplexity > 1


def test_windows_bookkeeping():
    assert windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert windows(3, 8, 4) == [(0, 3, 1)]
    for n, w, s in [(1000, 128, 37), (129, 128, 128), (257, 64, 1), (2, 2, 1)]:
        spans = windows(n, w, s)
        assert spans[0][0] == 0 and spans[-1][1] == n
        scored = [t for _, end, first in spans for t in range(first, end)]
        assert len(scored) == len(set(scored))                    # no token scored twice
        assert all(end - begin <= w and first > begin for begin, end, first in spans)
        if s < w:
            assert scored == list(range(1, n))


@pytest.mark.parametrize("kwargs,word", [
    (dict(window=64, stride=100), "stride"), (dict(stride=0), "stride"), (dict(window=1), "window"),
    (dict(window=129), "context length"), (dict(batch_size=0), "batch_size"), (dict(window=2.5), "window"),
])
def test_bad_parameters(gpt2, kwargs, word):
    with pytest.raises(ValueError, match=word):
        perplexity(gpt2, TEXT, **kwargs)


def test_text_too_short(gpt2):
    for text in ("", "A"):
        assert len(gpt2.tokenizer.encode(text)) < 2
        with pytest.raises(ValueError, match="at least 2 tokens"):
            perplexity(gpt2, text)


def test_reference_text():
    text = reference_text()
    assert len(text) == 16000 and text.startswith('The "assert" statement')
    assert reference_text() == text and reference_text(500) == text[:500]
    with pytest.raises(ValueError, match="n_chars"):
        reference_text(0)


# -- command line ----------------------------------------------------------------------------------------------
def test_cli_prints_the_same_number(tiny_checkpoint, gpt2, tmp_path):
    folder = tiny_checkpoint("gpt2")
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    expected = perplexity(gpt2, TEXT, window=128, stride=48)
    proc = subprocess.run(CLI + [str(path), "-m", str(folder), "--window", "128", "--stride", "48",
                                 "--dtype", "float32"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    assert float(lines["perplexity"]) == pytest.approx(expected.perplexity, rel=1e-4)
    assert lines["tokens"] == f"{expected.tokens} scored"
    assert lines["windows"].startswith(f"{expected.windows} (window 128, stride 48)")
    assert re.fullmatch(r"\d+\.\d\d", lines["seconds"]), lines["seconds"]      # a duration, to the hundredth


def test_cli_stdin_json(tiny_checkpoint, gpt2, monkeypatch, capsys):
    folder = tiny_checkpoint("gpt2")
    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXT))
    assert main(["perplexity", "-", "-m", str(folder), "--json", "--dtype", "float32"]) == 0
    rec = json.loads(capsys.readouterr().out)
    default = perplexity(gpt2, TEXT)
    assert rec["perplexity"] == pytest.approx(default.perplexity, rel=1e-5)
    assert (rec["tokens"], rec["windows"], rec["window"], rec["stride"], rec["file"]) == (
        default.tokens, default.windows, 128, 64, "-")


def test_cli_bad_stride_is_a_usage_error(tiny_checkpoint, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    proc = subprocess.run(CLI + [str(path), "-m", str(tiny_checkpoint("gpt2")), "--window", "64", "--stride", "100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: prosa perplexity")
    assert proc.stderr.splitlines()[-1] == (
        "prosa perplexity: error: stride must be at most the window (64 tokens), got 100")


@pytest.mark.parametrize("flags,word", [(["--stride", "500"], "stride"),      # against the default window
                                        (["--window", "1"], "window"), (["--window", "4096"], "context length"),
                                        (["--reference"], "exactly one of")])
def test_cli_bad_parameters_in_process(tiny_checkpoint, tmp_path, capsys, flags, word):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert main(["perplexity", str(path), "-m", str(tiny_checkpoint("gpt2"))] + flags) == 2
    err = capsys.readouterr().err
    if err.startswith("prosa: weights:"):   # what --quantize auto chose: said once the model is loaded
        err = err.split("\n", 1)[1]
    assert err.startswith("usage: prosa perplexity") and word in err.splitlines()[-1]


def test_cli_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    proc = subprocess.run(CLI + [str(missing)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2          # a file named on the command line: a usage error (issue #12)
    assert proc.stderr.splitlines() == [f"prosa: error: cannot read {missing}: No such file or directory"]
    assert proc.stdout == ""


# -- the bundled model -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_model_on_reference_text(bundled_gguf, bundled_hf):
    """The bundled SmolLM2, loaded as `prosa perplexity` loads it (auto: its own Q4_1 blocks), scores the reference
    text as transformers does over the same two windows (measured: within 3e-7; the float load too)."""
    lm = prosa.load(bundled_gguf, dtype="float32")
    text = reference_text()
    start = time.perf_counter()
    res = perplexity(lm, text, window=2048, stride=2048)     # 2 calls; the default (stride 1024) takes 3
    seconds = time.perf_counter() - start
    print(f"bundled SmolLM2-135M, reference text: perplexity {res.perplexity:.4f} over {res.tokens} tokens, "
          f"{res.windows} windows, {seconds:.1f} s")
    # (not a range such as 4 < ppl < 40, which a model broken in many ways still meets)
    expected, n_tokens, n_windows = hf_perplexity(bundled_hf[0], lm.tokenizer.encode(text), 2048, 2048)
    assert (res.tokens, res.windows) == (n_tokens, n_windows) and res.windows == 2
    assert res.perplexity == pytest.approx(expected, rel=1e-3)
