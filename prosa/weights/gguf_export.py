"""``export_gguf``: a checkpoint prosa reads -> a GGUF file that llama.cpp (and so Ollama) runs.

The exact inverse of the reader, ``prosa.weights.gguf``: its name tables read backwards, llama's Q/K rows permuted
for ggml's rope, GPT-2's Conv1D weights transposed to (out, in), the config as ``{arch}.*`` keys, a byte-level BPE
as ``tokenizer.ggml.*`` (a GGUF source's tokenizer and ``general.*`` keys are copied). Types:

- ``f16``: 2-D weights float16; norms, biases and GPT-2's position embeddings float32, as llama.cpp's converter.
- ``q8_0`` / ``q4_1``: linear layers as prosa's own group-32 blocks (``prosa.quant.quantize_int8`` / ``quantize_int4``),
  Q8_0 / Q4_1 bit for bit, so ``prosa.load(OUT)`` runs exactly the integers llama.cpp runs. The embedding (a tied
  output layer) and the output layer are Q8_0 (prosa's int4 keeps the output layer at 8 bits). A GGUF source's
  blocks that already are the target format are copied as integers (Q4_0 / Q4_K become Q4_1 exactly, Q4_K's scales
  rounded to fp16 as prosa's int4 does). GGUF has no asymmetric 8-bit type: where prosa's int8 (``quantize_uint8``,
  scale and min) would quantize a float weight, the file holds symmetric Q8_0. Partial 32-blocks stay float16.

Written under a temporary name next to OUT, read back with prosa's reader (the model settings and the tokenizer must
come back unchanged), then renamed over OUT.

The writer's parts, each importing only the reader (``gguf``, ``gguf_config``, ``gguf_tokenizer``) and ``prosa.quant``:
``gguf_export_config`` (architecture check, ``{arch}.*`` keys, ``rope_freqs``), ``gguf_export_tokenizer``
(``tokenizer.*`` keys), ``gguf_export_tensors`` (the tensor plan and block encoding); this module writes the file.
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, LlamaFileType

from ..errors import CorruptModelError, UnsupportedModelError
from .gguf import load_gguf
from .gguf_export_config import EXPORTABLE, _architecture, _config_metadata, _rope_freqs
from .gguf_export_tensors import _BYTES, _encode, _plan
from .gguf_export_tokenizer import _same_tokenizer, _tokenizer_metadata

__all__ = ["export_gguf", "check_output", "ExportResult", "TYPES", "EXPORTABLE"]

TYPES = {"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_1": LlamaFileType.MOSTLY_Q4_1}


@dataclass
class ExportResult:
    """What ``export_gguf`` wrote: the file, its type, tensors per GGUF type, integer blocks copied from the source."""

    path: Path
    type: str
    tensors: Counter
    copied: int
    nbytes: int
    seconds: float

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {t}" for t, n in self.tensors.most_common())
        copied = f"; {self.copied} copied as integers from the source" if self.copied else ""
        return f"wrote {self.path} ({self.type}, {self.nbytes / 1e6:.1f} MB, {kinds}{copied}) in {self.seconds:.1f} s"


def check_output(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate the output path before anything is loaded.

    Args:
        out: the ``.gguf`` file to write; overwrite: replace an existing one.
    Returns:
        the path.
    Raises:
        ValueError: not a .gguf name, a folder, an existing file without ``overwrite``, a missing or read-only folder.
    """
    path, folder = Path(out), Path(out).parent
    for bad, why in ((path.suffix.lower() != ".gguf", f"the output file must end in .gguf, got {str(out)!r}"),
                     (path.is_dir(), f"{path} is a folder; name the .gguf file to write"),
                     (path.exists() and not overwrite, f"{path} already exists; pass --overwrite to replace it"),
                     (not folder.is_dir(), f"folder {folder} does not exist"),
                     (not os.access(folder, os.W_OK | os.X_OK), f"folder {folder} is not writable")):
        if bad:
            raise ValueError(why)
    return path


def export_gguf(source: str | os.PathLike | None, out: str | os.PathLike, qtype: str = "f16", *,
                revision: str | None = None, overwrite: bool = False) -> ExportResult:
    """Write ``source`` (a model folder, Hub id or GGUF file; None: the default model) as a GGUF file.

    Args:
        source: what ``prosa.loader.open_checkpoint`` accepts; revision: its Hub branch, tag or commit.
        out: the ``.gguf`` file (written atomically); overwrite: replace an existing one.
        qtype: "f16", "q8_0" or "q4_1" (see the module docstring).
    Returns:
        an ``ExportResult``.
    Raises:
        ValueError: a bad ``qtype`` or ``out``.
        UnsupportedModelError: an architecture, setting or tokenizer that GGUF, as llama.cpp and prosa read it,
            cannot carry.
    """
    from ..loader import open_checkpoint

    if qtype not in TYPES:
        raise ValueError(f"the GGUF type must be one of {', '.join(TYPES)}; got {qtype!r}")
    out = check_output(out, overwrite)
    start = time.perf_counter()
    ck = open_checkpoint(source, revision)
    arch, args = _architecture(ck.config)
    tok = ck.tokenizer()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        counts, copied = _write(tmp, ck, arch, args, tok, qtype)
        _verify(tmp, args, tok)
        with open(tmp, "rb+") as f:   # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, qtype, counts, copied, out.stat().st_size, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------- writing
def _put(w: GGUFWriter, key: str, value: Any) -> None:
    """One key with the type llama.cpp reads it as (ids uint32, flags bool, arrays typed by their items)."""
    if isinstance(value, (bool, float, str, list)):
        {bool: w.add_bool, float: w.add_float32, str: w.add_string, list: w.add_array}[type(value)](key, value)
    else:
        w.add_uint32(key, value) if 0 <= value < 2**32 else w.add_int64(key, value)


def _write(tmp: Path, ck, arch: str, args, tok, mode: str) -> tuple[Counter, int]:
    """Write the whole file to ``tmp``; tensors are converted and written one at a time (peak memory ~ one
    tensor) when the checkpoint lists its shapes up front (safetensors, GGUF), else read whole first."""
    shapes, loaded = ck.tensor_shapes(), None
    if shapes is None:   # pytorch_model.bin: names and shapes are known only once loaded
        loaded = dict(ck.tensors(torch.float32))
        shapes = {n: tuple(t.shape) for n, t in loaded.items()}
    items, dropped = _plan(ck, arch, args, mode, shapes)
    w = GGUFWriter(str(tmp), arch)
    if ck.gguf is not None:   # name, licence ... and the tokenizer exactly as the source file has them
        own = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")
        md = {k: v for k, v in ck.gguf.metadata.items() if k.startswith(("tokenizer.", "general.")) and k not in own}
    else:
        md = {"general.name": Path(str(ck.source)).name, **_tokenizer_metadata(tok, args.vocab_size, ck.config)}
    for key, value in md.items():
        _put(w, key, value)
    _config_metadata(w, arch, args)
    w.add_file_type(int(TYPES[mode]))
    if mode != "f16":
        w.add_quantization_version(2)
    freqs = _rope_freqs(args) if arch == "llama" else None
    if freqs is not None:
        w.add_tensor_info("rope_freqs.weight", freqs.shape, np.dtype(np.float32), freqs.nbytes, raw_dtype=Q.F32)
    for it in items:
        w.add_tensor_info(it.name, it.shape, np.dtype(np.float32), int(math.prod(it.shape) * _BYTES[it.qtype]),
                          raw_dtype=it.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    skip = frozenset(dropped | {it.hf for it in items if it.exact})
    stream = iter(loaded.items()) if loaded is not None else ck.tensors(torch.float32, skip)
    pending: dict[str, torch.Tensor] = {}

    def take(hf: str) -> torch.Tensor:
        while hf not in pending:   # in checkpoint order this reads exactly the next tensor
            name, tensor = next(stream, (None, None))
            if name is None:
                raise CorruptModelError(f"{ck.path}: tensor {hf} is listed but cannot be read")
            pending[name] = tensor
        return pending.pop(hf)

    try:
        if freqs is not None:
            w.write_tensor_data(freqs)
        for it in items:
            w.write_tensor_data(_encode(it, ck, take))
    finally:
        w.close()
    counts = Counter(it.qtype.name for it in items) + Counter({"F32": int(freqs is not None)})
    return +counts, sum(it.exact for it in items)


# --------------------------------------------------------------------------------------------------- read back
def _verify(path: Path, args, tok) -> None:
    """Read the file back with prosa's reader: the model settings and the tokenizer must be the source's."""
    back = load_gguf(path)
    before, after = _comparable(args), _comparable(back.config)
    if diff := sorted(k for k in before if before[k] != after.get(k)):
        raise UnsupportedModelError("the GGUF file would not carry this model's " + ", ".join(
            f"{k} ({before[k]!r}, read back as {after.get(k)!r})" for k in diff))
    if not _same_tokenizer(tok, back.tokenizer):
        raise UnsupportedModelError("the GGUF file's tokenizer would not encode text as the model's own does")


def _comparable(args) -> dict[str, Any]:
    """``ModelArgs`` (or a config) as the settings a GGUF file carries: floats at float32 precision, rope scaling
    normalised, what GGUF drops by design left out (the family name mistral -> llama, windows already refused)."""
    if isinstance(args, dict):
        from ..models import get_module
        args = get_module(args["model_type"]).ModelArgs.from_dict(args)

    def norm(v: Any) -> Any:
        if isinstance(v, float):
            return float(np.float32(v))
        if isinstance(v, dict):
            v = {("rope_type" if k == "type" else k): norm(x) for k, x in v.items()}
            return None if v.get("rope_type", "default") == "default" else v
        return v

    d = {k: norm(v) for k, v in asdict(args).items() if k not in (  # ties follow the tensors written
        "model_type", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
        "tie_word_embeddings")}
    if "n_inner" in d:
        d["n_inner"] = d["n_inner"] or 4 * d["n_embd"]
    return d
