"""``prosa finetune --compile``: the compiled training step trains the same weights as the eager one, ``auto``
decides as documented, and a compile that fails is said once and the run goes on eagerly with the same result."""
from __future__ import annotations

import json

import pytest
import torch

import prosa
from prosa.training import compiled

from test_finetune import QUICK, assert_same_weights, losses, stories  # noqa: F401  (stories: a fixture)


def test_auto_compiles_only_long_runs_on_cpu_or_cuda_with_a_compiler(monkeypatch):
    cpu = torch.device("cpu")
    assert compiled.decide("off", cpu, "lora", 1e6)[0] is False
    assert compiled.decide("auto", cpu, "lora", 10.0) == (False, compiled.decide("auto", cpu, "full", 10.0)[1])
    assert compiled.decide("auto", cpu, "lora", 600.0)[0] is True
    assert compiled.decide("auto", cpu, "full", 600.0)[0] is True
    assert compiled.decide("auto", cpu, "qlora", 600.0)[0] is False     # opaque int4/int8 kernels
    assert compiled.decide("on", cpu, "qlora", 1.0)[0] is True
    assert compiled.decide("on", torch.device("meta"), "lora", 600.0)[0] is False
    monkeypatch.setattr(compiled, "_cxx", lambda: None)
    on, why = compiled.decide("on", cpu, "lora", 600.0)
    assert on is False and "C++ compiler" in why


@pytest.mark.parametrize("method", ["lora", "full"])
def test_compiled_step_trains_the_same_weights_as_eager(method, tiny_checkpoint, stories, tmp_path, capsys):
    base = str(tiny_checkpoint("llama"))
    settings = dict(QUICK, method=method, max_steps=3, lr=3e-3, grad_checkpoint=method == "full")
    eager = prosa.finetune(stories, tmp_path / "eager", base, compile="off", **settings)
    assert "compiling" not in capsys.readouterr().err
    fast = prosa.finetune(stories, tmp_path / "compiled", base, compile="on", **settings)
    printed = capsys.readouterr()
    assert "compile: on" in printed.out and "compiling the training step" in printed.err
    assert "torch.compile failed" not in printed.err          # it really ran compiled
    assert json.loads((tmp_path / "compiled" / "run.json").read_text())["compiled"] is True
    assert json.loads((tmp_path / "eager" / "run.json").read_text())["compiled"] is False
    assert eager.steps == fast.steps == 3
    # float32 on both sides: only the order of fused sums differs
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-4)
    # Adam moves every weight by ~lr whatever the size of its gradient, so the rounding of a near-zero gradient can
    # show as a small fraction of lr (3e-3): 10% of it, while the weights themselves move by up to 3 x lr
    assert_same_weights(tmp_path / "compiled", tmp_path / "eager", atol=3e-4)


def test_a_failing_compile_is_said_once_and_the_run_goes_on_eagerly(tiny_checkpoint, stories, tmp_path, capsys,
                                                                    monkeypatch):
    base = str(tiny_checkpoint("gpt2"))
    settings = dict(QUICK, max_steps=2, lr=3e-3)
    prosa.finetune(stories, tmp_path / "eager", base, compile="off", **settings)
    capsys.readouterr()

    def broken(fn, **kwargs):
        def fails(*args, **kw):
            raise RuntimeError("CppCompileError: no such compiler\nlong log follows")
        return fails
    monkeypatch.setattr(compiled.torch, "compile", broken)
    prosa.finetune(stories, tmp_path / "fallback", base, compile="on", **settings)
    err = capsys.readouterr().err
    assert err.count("torch.compile failed (RuntimeError: CppCompileError: no such compiler)") == 1, err
    assert "long log follows" not in err
    assert json.loads((tmp_path / "fallback" / "run.json").read_text())["compiled"] is False
    assert losses(tmp_path / "fallback") == losses(tmp_path / "eager")
    assert_same_weights(tmp_path / "fallback", tmp_path / "eager", atol=0)


def test_cli_compile_flag_is_checked_before_loading(tmp_path):
    from test_finetune import prosa_cli

    (tmp_path / "a.txt").write_text("hello there")
    p = prosa_cli("finetune", str(tmp_path / "a.txt"), "-o", str(tmp_path / "out"), "--compile", "fast")
    assert p.returncode == 2 and "--compile" in p.stderr and "Traceback" not in p.stderr
    with pytest.raises(prosa.ProsaError, match="--compile must be one of auto, on, off"):
        prosa.finetune(tmp_path / "a.txt", tmp_path / "out", compile="sometimes")


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_explicit_attention_equals_sdpa_values_and_gradients(window, heads, monkeypatch):
    """The written-out attention of a compiled step computes what SDPA does: documents, padding, window, GQA."""
    from prosa.training.attention import PackedAttention

    h, hk = heads
    torch.manual_seed(0)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1, -1],
                             [0] * 12])                         # a packed row with padding; a one-document row
    q = torch.randn(2, h, 12, 8, requires_grad=True)
    k = torch.randn(2, hk, 12, 8, requires_grad=True)
    v = torch.randn(2, hk, 12, 8, requires_grad=True)
    g = torch.randn(2, h, 12, 8)
    outs, grads = [], []
    for explicit in (False, True):
        out = PackedAttention(segments, explicit=explicit).attend(0, q, k, v, window=window, scale=0.3)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out, (q, k, v), g))
    assert torch.allclose(outs[1], outs[0], atol=1e-6)
    for a, b in zip(grads[1], grads[0], strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # and it really is the other path
    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    PackedAttention(segments, explicit=True).attend(0, q, k, v, window=window, scale=0.3)
    with pytest.raises(AssertionError, match="SDPA called"):
        PackedAttention(segments, explicit=False).attend(0, q, k, v, window=window, scale=0.3)
