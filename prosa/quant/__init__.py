"""Weight-only quantized linear layers: int8 (per-channel or group-wise) and int4 (group-wise, scale + min).

Submodules, imports pointing down this list:

- ``model``: ``quantize_model`` swaps a model's ``nn.Linear`` layers for ``QuantizedLinear`` ones.
- ``linear``: ``QuantizedLinear`` (a drop-in for ``nn.Linear``; backends prosa / aten / torch, "auto" picks per
  layer), ``set_activations`` (float or int8 activations for the prosa kernels).
- ``bf16``: ``Bf16Linear`` (an ``nn.Linear`` with a bfloat16 weight whose decode-sized calls run prosa's bf16
  kernel), ``use_bf16_kernel`` (the swap ``prosa.load`` makes for ``quantize="bf16"`` on a CPU).
- ``extension``: loads (or builds) the C++ kernels ``prosa._qlinear`` (``kernels``, ``build_kernels``), registers
  them as torch ops, and says once (``KernelsUnavailableWarning``) when everything falls back to PyTorch.
- ``layout``: the prosa and aten packings of the weights, and their inverses.
- ``gguf_blocks``: GGUF Q8_0 / Q4_0 / Q4_1 / Q4_K blocks -> the plain format (``gguf_to_int``).
- ``formats``: the plain format: integers plus float16 scales (and mins) per group (``quantize_int8``,
  ``quantize_uint8``, ``quantize_int4``, ``dequantize_int``).

``linear`` imports ``extension``, ``layout`` and ``formats``, ``bf16`` imports ``extension``; those three and ``gguf_blocks`` import nothing of
prosa (``extension`` loads ``prosa._qlinear``).
"""
from .extension import KernelsUnavailableWarning, build_kernels, kernels
from .formats import dequantize_int, quantize_int4, quantize_int8, quantize_uint8
from .gguf_blocks import gguf_to_int
from .linear import QuantizedLinear, set_activations
from .model import quantize_model

__all__ = ["QuantizedLinear", "quantize_model", "set_activations", "quantize_int8", "quantize_uint8", "quantize_int4",
           "dequantize_int", "gguf_to_int", "kernels", "build_kernels", "KernelsUnavailableWarning"]
