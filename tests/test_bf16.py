"""prosa's bf16 kernel (prosa/csrc/bf16.cpp) and ``Bf16Linear``: the same numbers as PyTorch's bf16 matmul up to
summation order, on the vector and the portable path, whatever the threads; ``quantize="bf16"`` uses it on a CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prosa
from prosa.quant import kernels
from prosa.quant.bf16 import MAX_ROWS, Bf16Linear

ext = kernels()
pytestmark = pytest.mark.skipif(ext is None or not hasattr(ext, "linear_bf16"), reason="prosa kernels not built")


@pytest.fixture(params=[False, True], ids=["vector", "scalar"])
def path(request):
    ext.bf16_force_scalar(request.param)
    yield request.param
    ext.bf16_force_scalar(False)


@pytest.mark.parametrize("n, k", [(7, 40), (64, 96), (130, 576), (3, 31)])
@pytest.mark.parametrize("m", [1, 3, 5, 17])
def test_kernel_is_the_float32_sum_of_exact_products(path, n, k, m):
    g = torch.Generator().manual_seed(n * k + m)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    # every bf16 x float32 product is rounded once in float32 at most; the sums differ from a float64 reference
    # only by float32 rounding of K terms
    ref = (x.double() @ w.double().T) + bias.double()
    got = ext.linear_bf16(x, w, bias)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * k ** 0.5)
    # bf16 activations: products of two bf16 numbers are exact; the output is rounded to bf16 once, as oneDNN does
    xb = x.bfloat16()
    got = ext.linear_bf16(xb, w, None)
    ref = (xb.double() @ w.double().T)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), ref, rtol=2 ** -8, atol=1e-5 * k ** 0.5)
    torch.testing.assert_close(got, F.linear(xb, w), rtol=2 ** -7, atol=1e-3 * k ** 0.5)


def test_threads_do_not_change_a_number():
    w = torch.randn(1000, 512).bfloat16()
    x = torch.randn(5, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.linear_bf16(x, w)
        torch.set_num_threads(max(2, before))
        assert torch.equal(ext.linear_bf16(x, w), one)
    finally:
        torch.set_num_threads(before)


def test_vector_and_scalar_paths_agree():
    w = torch.randn(37, 200).bfloat16()
    x = torch.randn(6, 200)
    vec = ext.linear_bf16(x, w)
    ext.bf16_force_scalar(True)
    try:
        scalar = ext.linear_bf16(x, w)
    finally:
        ext.bf16_force_scalar(False)
    torch.testing.assert_close(vec, scalar, rtol=1e-5, atol=1e-5)


def test_layer_is_an_nn_linear_with_the_same_parameters():
    lin = nn.Linear(64, 48).bfloat16()
    layer = Bf16Linear.from_linear(lin)
    assert isinstance(layer, nn.Linear) and layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.state_dict().keys() == lin.state_dict().keys()
    with torch.no_grad():
        for rows in (1, MAX_ROWS, MAX_ROWS + 1):         # the kernel up to MAX_ROWS, F.linear beyond
            x = torch.randn(rows, 64).bfloat16()
            torch.testing.assert_close(layer(x[None])[0], lin(x), rtol=2 ** -7, atol=1e-2)
    # training: gradients flow (F.linear), and the layer refuses a float weight
    x = torch.randn(2, 64).bfloat16().requires_grad_()
    layer(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    with pytest.raises(ValueError, match="bfloat16"):
        Bf16Linear.from_linear(nn.Linear(4, 4))


def test_quantize_bf16_runs_the_kernel_and_matches_the_torch_model(tiny_checkpoint):
    lm = prosa.load(tiny_checkpoint("llama"), quantize="bf16")
    layers = [m for m in lm.model.modules() if isinstance(m, nn.Linear)]
    assert layers and all(type(m) is Bf16Linear for m in layers)
    assert "bf16 kernel" in lm.weights
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        got = lm.model(ids)[0, -1].float()
        for name, mod in list(lm.model.named_modules()):     # back to plain nn.Linear: PyTorch's bf16 matmul
            if type(mod) is Bf16Linear:
                parent, _, leaf = name.rpartition(".")
                plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
                plain.weight, plain.bias = mod.weight, mod.bias
                setattr(lm.model.get_submodule(parent) if parent else lm.model, leaf, plain)
        want = lm.model(ids)[0, -1].float()
    # bf16 activations: each layer rounds its output to bf16, so summation order shows at that precision
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())
