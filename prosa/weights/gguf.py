"""GGUF checkpoints (llama.cpp's format) -> the config, tensors and tokenizer a Hugging Face folder would hold.

A GGUF file carries config and tokenizer as metadata and its weights under llama.cpp's names, often quantized.
``load_gguf`` returns a HF ``config.json``-style dict, a ``prosa.tokenizer.Tokenizer`` and a generator of tensors
under HF names and layouts, dequantized one at a time so peak memory stays near one tensor.

The reader's parts, each importing only those above it:

- ``gguf_format``: the header (metadata, tensor table) parsed with ``struct`` over an ``mmap``, bounds-checked.
- ``gguf_dequant``: block types -> torch tensors, one tensor read out of the map, llama.cpp's Q/K rows undone.
- ``gguf_config``: llama.cpp -> HF tensor names per architecture (``ARCHS``), ``{arch}.*`` keys -> HF config.
- ``gguf_tokenizer``: ``tokenizer.ggml.*`` -> a ``prosa.tokenizer.Tokenizer``.
- this module: ``load_gguf``, ``GGUFCheckpoint`` (the tensors on demand), ``is_gguf``, ``find_gguf``.
"""
from __future__ import annotations

import mmap
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from prosa.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError

from .ggml_types import GGMLType as Q
from .gguf_config import ARCHS, _Arch, _config, _hf_name
from .gguf_dequant import (_FLOAT, _NUMPY_QUANTS, _TORCH_QUANTS, _read, _release, _unpermute, _unsupported_type,
                           dequantize, one_thread, read_tensor, row_chunks)
from .gguf_format import MAGIC, _TensorInfo, _corrupt, _parse
from .gguf_tokenizer import _tokenizer

if TYPE_CHECKING:
    from prosa.tokenizer import Tokenizer

__all__ = ["GGUFCheckpoint", "load_gguf", "is_gguf", "find_gguf", "dequantize", "one_thread", "ARCHS", "MAGIC"]


@dataclass
class GGUFCheckpoint:
    """A parsed GGUF file: HF-style config, generation config and tokenizer; tensors are read on demand."""

    path: Path
    config: dict
    generation_config: dict
    tokenizer: Tokenizer
    metadata: dict = field(repr=False)  # raw GGUF key/values (general.name, general.file_type, ...)
    _mm: mmap.mmap = field(repr=False)
    _arch: _Arch = field(repr=False)
    _entries: list[tuple[_TensorInfo, str, str]] = field(repr=False)  # (tensor, HF name, GGUF part)

    def tensors(self, dtype: torch.dtype = torch.float32,
                skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(HF name, tensor)`` in HF layout, one at a time, as ``dtype``; names in ``skip`` are not read.

        Quantized tensors are dequantized in float32 and then cast (as transformers does); float ones are cast
        from their stored type. GPT-2's Conv1D weights come as transposed views.
        """
        for info, hf_name, part in self._entries:
            if hf_name in skip:
                continue
            with one_thread():
                w = read_tensor(self._mm, info, dtype, self._order(info, part))
            yield hf_name, w.t() if part in self._arch.transposed and w.dim() == 2 else w

    def _heads(self, part: str) -> int:
        return self.config["num_attention_heads" if part == "attn_q" else "num_key_value_heads"]

    def _order(self, info: _TensorInfo, part: str) -> torch.Tensor | None:
        """Which file row each row of the tensor comes from, (rows,) int64: llama.cpp's Q/K row order undone;
        None when the rows are in order."""
        if not (self._arch.permute_qk and part in ("attn_q", "attn_k")):
            return None
        return _unpermute(torch.arange(info.shape[0])[:, None], self._heads(part))[:, 0]

    def tensor_types(self) -> dict[str, str]:
        """HF name -> GGUF storage type name ("Q4_1", "F32", ...)."""
        return {hf_name: Q(info.ggml_type).name for info, hf_name, _ in self._entries}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape as ``tensors()`` yields it."""
        return {hf_name: info.shape[::-1] if part in self._arch.transposed and len(info.shape) == 2 else info.shape
                for info, hf_name, part in self._entries}

    def stored_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape as stored, torch order (GPT-2's Conv1D weights: ``nn.Linear``'s (out, in), not HF's)."""
        return {hf_name: info.shape for info, hf_name, _ in self._entries}

    def int_weight(self, hf_name: str):
        """A Q8_0 / Q4_0 / Q4_1 weight as integers, exactly, or a Q4_K one with float16 scales:
        ``(bits, q, d, m)`` (see ``prosa.quant.gguf_to_int``), in ``nn.Linear`` orientation (out, in) with
        llama.cpp's Q/K row order undone; None for other types."""
        chunks = self.int_chunks(hf_name)
        if chunks is None:
            return None
        parts = list(chunks)
        q, d = torch.cat([c[1] for c in parts]), torch.cat([c[2] for c in parts])
        return (8 if q.dtype == torch.int8 else 4), q, d, None if parts[0][3] is None else torch.cat(
            [c[3] for c in parts])

    def raw_rows(self, hf_name: str) -> tuple[str, torch.Tensor, torch.Tensor | None]:
        """A 2-D weight's bytes as stored, without a copy: ``(type name, bytes, order)``. bytes: uint8 (rows, row
        bytes), a view of the read-only map (never to be written); order: int64 (rows,), output row r is file row
        ``order[r]`` (llama.cpp's Q/K row order undone), or None. ``release`` drops its pages from RSS after use."""
        for info, name, part in self._entries:
            if name == hf_name:
                if len(info.shape) != 2:
                    raise ValueError(f"{hf_name} is not a 2-D weight")
                with warnings.catch_warnings():      # read-only memory: torch warns that it could be written
                    warnings.simplefilter("ignore")
                    raw = torch.from_numpy(np.frombuffer(self._mm, np.uint8, info.nbytes, info.start))
                return Q(info.ggml_type).name, raw.view(info.shape[0], -1), self._order(info, part)
        raise KeyError(hf_name)

    def release(self, hf_name: str) -> None:
        """Unmap the file pages of a tensor read through ``raw_rows`` (they stay in the page cache)."""
        for info, name, _ in self._entries:
            if name == hf_name:
                _release(self._mm, info)

    def int_chunks(self, hf_name: str, multiple: int = 16
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] | None:
        """``int_weight``'s integers a chunk of rows at a time (whole multiples of ``multiple`` rows but the
        last): ``(first row, q, d, m)``, each chunk converted from the file's blocks as it is read, so that the
        caller can pack it in place (``QuantizedLinear.from_int_chunks``); None for other types."""
        from ..quant import gguf_to_int

        for info, name, part in self._entries:
            if name != hf_name:
                continue
            if Q(info.ggml_type).name not in ("Q8_0", "Q4_0", "Q4_1", "Q4_K") or len(info.shape) != 2:
                return None
            k = info.shape[1]
            return ((r0, *gguf_to_int(raw, info.ggml_type, (raw.shape[0], k))[1:])
                    for r0, raw in row_chunks(self._mm, info, self._order(info, part), multiple))
        raise KeyError(hf_name)


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:  # missing, a folder, unreadable
        return False


def find_gguf(folder: str | Path) -> Path | None:
    """The one ``.gguf`` file in ``folder``, or None. Several (e.g. two quantizations) raise ModelNotFoundError."""
    found = sorted(p for p in Path(folder).glob("*.gguf") if p.is_file()) if Path(folder).is_dir() else []
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelNotFoundError(f"{folder} holds several GGUF files ({names}); pass the path of the one to use.")
    return found[0] if found else None


def load_gguf(path: str | Path) -> GGUFCheckpoint:
    """Parse a GGUF file (or the one in a folder): config, tokenizer and tensor table. No tensor data is read.

    Raises:
        ModelNotFoundError: ``path`` does not exist.
        CorruptModelError: not a GGUF file, or truncated / malformed.
        UnsupportedModelError: an architecture, tensor type, rope scaling or tokenizer prosa cannot run.
    """
    path = Path(path)
    if path.is_dir() and (found := find_gguf(path)) is not None:
        path = found
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist or is not a GGUF file.")
    with open(path, "rb") as f:
        head = f.read(24)
        if head[:4] != MAGIC:
            raise CorruptModelError(f"{path} is not a GGUF file (it does not start with b'GGUF'). Re-download it.")
        if len(head) < 24:
            raise _corrupt(path, f"it is only {len(head)} bytes long")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after the file is closed
    try:
        metadata, infos = _parse(path, mm)
    except struct.error as err:
        raise _corrupt(path, "its header ends before its last field") from err
    except (UnicodeDecodeError, ValueError, OverflowError, MemoryError) as err:
        raise _corrupt(path, f"its header cannot be parsed ({type(err).__name__}: {err})") from err

    arch_name = metadata.get("general.architecture")
    if arch_name not in ARCHS:
        raise UnsupportedModelError(f"{path} is a GGUF of architecture {arch_name!r}; prosa runs GGUF files of "
                                    f"architecture {', '.join(sorted(ARCHS))}.")
    if metadata.get("split.count", 1) > 1:
        raise UnsupportedModelError(f"{path} is one part of a split GGUF; merge the parts first "
                                    "(llama-gguf-split --merge) and load the merged file.")
    arch, entries, rope_freqs = ARCHS[arch_name], [], None
    for info in infos:
        if info.ggml_type not in set(_FLOAT) | _TORCH_QUANTS | _NUMPY_QUANTS:
            raise _unsupported_type(info.ggml_type)
        if info.name == "rope_freqs.weight" and arch.permute_qk:  # Llama 3 rope scaling: config, not a weight
            rope_freqs = _read(mm, info).float()
            continue
        if (mapped := _hf_name(arch, info.name)) is None:
            raise UnsupportedModelError(f"{path} holds tensor {info.name!r}, which prosa's {arch_name} model has "
                                        "no place for (a variant of the architecture prosa does not run).")
        entries.append((info, *mapped))
    config = _config(path, metadata, arch_name, {t.name: t for t in infos}, rope_freqs)
    # end-of-turn / end-of-message ids (Llama 3 chat) stop generation as eos does
    eos_ids = list(dict.fromkeys(i for k in ("eos", "eot", "eom")
                                 if (i := metadata.get(f"tokenizer.ggml.{k}_token_id")) is not None))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos_ids,
                  "pad_token_id": config.get("pad_token_id")}
    generation = {k: v for k, v in generation.items() if v not in (None, [])}
    tokenizer = _tokenizer(path, metadata, eos_ids)
    return GGUFCheckpoint(path, config, generation, tokenizer, metadata, mm, arch, entries)
