"""Reading Hugging Face weight files: safetensors (single or sharded) and, as a fallback, pytorch_model.bin
through ``torch.load(weights_only=True)`` only, so a pickle can never run code."""
from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CorruptModelError, ModelNotFoundError


def _shards(folder: Path, index_name: str) -> list[Path]:
    index = folder / index_name
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptModelError(f"{index} is not a valid weight index ({e}); re-download the model") from None
    files = [folder / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CorruptModelError(f"{folder} is missing weight shards listed in {index_name}: "
                                f"{', '.join(missing)}; re-download the model")
    return files


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder, safetensors preferred.

    Raises:
        ModelNotFoundError: the folder holds no weights.
    """
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / "model.safetensors.index.json").is_file():
        return _shards(folder, "model.safetensors.index.json")
    other = sorted(folder.glob("*.safetensors"))
    if other:
        return other
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    if (folder / "pytorch_model.bin.index.json").is_file():
        return _shards(folder, "pytorch_model.bin.index.json")
    raise ModelNotFoundError(f"{folder} has a config.json but no weights (model.safetensors, sharded "
                             "safetensors or pytorch_model.bin); download the weights into that folder")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_PAGE = mmap.PAGESIZE


def _header(path: Path) -> tuple[dict, int, int]:
    """A safetensors file's header (name -> dtype/shape/offsets), its size, and where the data starts."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise _corrupt(path, "shorter than its header")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise _corrupt(path, f"header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise _corrupt(path, f"bad header: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    return header, size, 8 + n


def _corrupt(path: Path, why: str) -> CorruptModelError:
    return CorruptModelError(f"{path} is truncated or corrupt ({why}); re-download it")


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """Checkpoint name -> shape for every tensor of the folder's safetensors weights, from the headers only;
    None for pytorch_model.bin checkpoints (their names are known only once loaded)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            return None
        for name, info in _header(path)[0].items():
            try:
                shapes[name] = tuple(int(d) for d in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise _corrupt(path, f"unreadable entry for {name!r}") from None
    return shapes


def _iter_safetensors(path: Path, dtype: torch.dtype | None = None,
                      skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of one safetensors file, each copied once out of a memory map (converted to ``dtype`` on
    the way when it is floating point), after which the file's pages for it are released: reading a model costs
    the weights in the target dtype plus one tensor, not a second copy of the file. Names in ``skip`` are not read."""
    def corrupt(why: str) -> CorruptModelError:
        return _corrupt(path, why)

    header, size, base = _header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > base else None
    try:
        for name, info in header.items():
            if name in skip:
                continue
            try:
                st_dtype, shape, (begin, end) = _ST_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise corrupt(f"unreadable entry for {name!r}") from None
            count = 1
            for d in shape:
                count *= d
            if base + end > size or end - begin != count * st_dtype.itemsize or begin < 0:
                raise corrupt(f"tensor {name!r} lies outside the file")
            if count == 0:
                yield name, torch.empty(shape, dtype=st_dtype)
                continue
            view = torch.frombuffer(mm, dtype=st_dtype, count=count, offset=base + begin).view(shape)
            target = dtype if dtype is not None and st_dtype.is_floating_point else st_dtype
            tensor = view.to(target, copy=True)
            del view
            # Drop the file pages just read (clean copy-on-write pages: they would be read again if needed).
            lo, hi = (base + begin) // _PAGE * _PAGE, min(-(-(base + end) // _PAGE) * _PAGE, size)
            if hasattr(mm, "madvise") and hi > lo:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            yield name, tensor
    finally:
        if mm is not None:
            try:
                mm.close()
            except BufferError:   # a tensor view still alive (caller kept it): the map closes with it
                pass


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise CorruptModelError(
            f"{path} contains pickled objects other than tensors, which prosa refuses to load because "
            "unpickling can run arbitrary code; use the model's safetensors weights instead "
            f"({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CorruptModelError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]}); re-download it") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptModelError(f"{path} does not hold a dict of tensors; it is not a model checkpoint")
    return state


def iter_tensors(folder: Path, dtype: torch.dtype | None = None,
                 skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, tensor) for every tensor of the folder's weights but those in ``skip``, one file at
    a time; floating-point tensors converted to ``dtype`` when given."""
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            yield from _iter_safetensors(path, dtype, skip)
        else:
            state = _load_bin(path)
            while state:
                name, tensor = state.popitem()
                if name in skip:
                    continue
                yield name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
