"""Reading Hugging Face weight files: safetensors (single or sharded) and, as a fallback, pytorch_model.bin
through ``torch.load(weights_only=True)`` only, so a pickle can never run code."""
from __future__ import annotations

import json
import pickle
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


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CorruptModelError(f"{path} is truncated or corrupt ({e}); re-download it") from None


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


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, tensor) for every tensor of the folder's weights, one file at a time."""
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            yield from _iter_safetensors(path)
        else:
            state = _load_bin(path)
            while state:
                yield state.popitem()
