"""Checkpoints of a fine-tuning run: ``OUT/checkpoints/step-N/`` (and ``best/``).

Each is a loadable model folder (the same layout as OUT: merged weights, tokenizer, ``adapter/`` for LoRA) plus
what resuming needs: ``trainable.safetensors`` (the exact trained tensors, by prosa name), ``state.pt`` (optimizer,
scheduler, every RNG; read back with ``torch.load(weights_only=True)``) and ``meta.json`` (step, best validation
loss, settings, data hash). A checkpoint is written into a hidden temporary folder and renamed into place, so a
run killed at any moment leaves only whole checkpoints.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .export import _umask, save_adapter, save_model_folder, save_tensors, write_json

STEP_DIR = re.compile(r"step-(\d+)")
# settings that must not change between a run and its resumption (the data and the model's shape depend on them)
FIXED = ("method", "batch_size", "seq_len", "seed", "lora_rank", "lora_alpha", "quantize", "val_split", "packing",
         "split_on_blank_lines", "train_on_prompt")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name (tied parameters once)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(value: Any) -> Any:
    """random.getstate() as lists, which ``weights_only`` loading accepts."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(dest: Path, run, meta: dict[str, Any], with_state: bool = True) -> None:
    """Write checkpoint ``dest`` atomically: everything goes into a temporary sibling, renamed at the end.

    Args:
        run: the ``prosa.training.run.Run`` (model, checkpoint source, settings, optimizer, scheduler).
        meta: step, losses and the like for meta.json.
        with_state: include optimizer/scheduler/RNG state (``best/`` needs none).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        write_model(tmp, run)
        if run.settings.method != "full":
            save_tensors(tmp / "trainable.safetensors", trainable_state(run.model))
        if with_state:
            state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                     "rng": rng_state()}
            torch.save(state, tmp / "state.pt")
        write_json(tmp / "meta.json", meta)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model(dest: Path, run) -> None:
    """The loadable model (merged folder, and the PEFT adapter for LoRA) into ``dest``."""
    s = run.settings
    save_model_folder(dest, run.model, run.ck)
    if s.method != "full":
        save_adapter(dest / "adapter", run.model, run.ck.source, s.lora_rank, s.alpha, s.lora_dropout)


def steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under ``root`` (OUT/checkpoints), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and (p / "meta.json").is_file()]
    return sorted(found)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (``best/`` stays), and the temporary folders of saves
    that a killed run left unfinished."""
    for _, path in steps(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "meta.json").read_text(encoding="utf-8"))


def load_trainable(folder: Path, model: nn.Module) -> None:
    """Put a checkpoint's trained tensors back into ``model`` (exactly, in place)."""
    from safetensors.torch import load_file

    if (folder / "trainable.safetensors").is_file():
        saved = load_file(str(folder / "trainable.safetensors"))
    else:   # full fine-tuning: the model folder is the trained state
        from ..loader import open_checkpoint
        from ..weights.safetensors import iter_tensors

        ck = open_checkpoint(folder)
        saved = model.sanitize(dict(iter_tensors(ck.path, torch.float32)))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in saved.items():
            if name in params and params[name].requires_grad:
                params[name].copy_(t)


def load_state(folder: Path, run) -> None:
    """Optimizer, scheduler and RNG state of checkpoint ``folder`` into ``run``."""
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
