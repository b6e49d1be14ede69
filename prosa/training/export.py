"""What a fine-tuning run leaves behind, in formats other tools load.

- ``save_model_folder``: a merged Hugging Face folder (config.json, model.safetensors under the checkpoint's own
  names and layouts, tokenizer files, generation_config.json) that prosa and ``transformers`` load alike.
- ``save_adapter``: the LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors, Hugging
  Face module names; fused q/k/v and gate/up split back: B by rows, A copied).
- ``read_adapter`` / ``AdaptedCheckpoint``: apply a PEFT adapter to a checkpoint while it loads (``--adapter``).

Every file is written to a temporary name in its folder and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import CorruptModelError, ProsaError
from .lora import LoRALinear, lora_layers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
PEFT_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------------ atomic writes
def write_atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)`` for a temporary file next to ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())      # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file, atomically; shared storage (tied weights) is written once per name, contiguous."""
    from safetensors.torch import save_file

    owned = {k: v.detach().contiguous().clone() if v.data_ptr() in _shared(tensors, k) else v.detach().contiguous()
             for k, v in tensors.items()}
    write_atomic(path, lambda p: save_file(owned, str(p), metadata=metadata or {"format": "pt"}))


def _shared(tensors: dict[str, torch.Tensor], name: str) -> set[int]:
    """data_ptrs of ``name``'s storage that another entry shares (safetensors refuses shared storage)."""
    ptr = tensors[name].data_ptr()
    return {ptr} if sum(t.data_ptr() == ptr for t in tensors.values()) > 1 else set()


# --------------------------------------------------------------------------------------------- merged folders
def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A fully fine-tuned model's weights under the checkpoint's names and layouts (float32), as
    ``model.unsanitize`` gives them."""
    state = {name: t.detach().float() if t.is_floating_point() else t for name, t in model.state_dict().items()}
    return model.unsanitize(state)


def merged_with_adapters(ck, model: nn.Module) -> dict[str, torch.Tensor]:
    """The source checkpoint's tensors (float32, dequantized) plus the weight changes of ``model``'s adapters:
    exactly what PEFT's ``merge_and_unload`` of the exported adapter on that base gives."""
    tensors, _, fan_in_fan_out = adapter_tensors(model)
    scale = next(iter(lora_layers(model).values())).scale
    deltas = peft_deltas(tensors, {"r": 1, "lora_alpha": scale, "fan_in_fan_out": fan_in_fan_out}, "the adapters")
    return dict(add_deltas(ck.tensors(torch.float32), {_key(m): d for m, d in deltas.items()}, ck.path, "training"))


def model_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json for a float32 export of a model whose (HF-style) config is ``config``."""
    out = {k: v for k, v in config.items() if k not in ("dtype", "quantization_config")}
    out["torch_dtype"] = "float32"
    return out


def copy_tokenizer(ck, dest: Path) -> None:
    """The source's tokenizer files into ``dest``; for a GGUF source, tokenizer.json + tokenizer_config.json made
    from its vocabulary (what transformers and prosa read)."""
    if ck.gguf is None:
        for name in TOKENIZER_FILES:
            if (ck.path / name).is_file():
                write_atomic(dest / name, lambda p, n=name: shutil.copyfile(ck.path / n, p))
        return
    tok = ck.tokenizer()
    write_atomic(dest / "tokenizer.json", lambda p: tok.backend.save(str(p)))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": ck.config.get("max_position_embeddings") or ck.config.get("n_positions")}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if getattr(tok, key, None):
            cfg[key] = getattr(tok, key)
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    write_json(dest / "tokenizer_config.json", cfg)


def save_model_folder(dest: Path, model: nn.Module, ck, generation_config: dict[str, Any] | None = None) -> None:
    """Write a loadable Hugging Face folder of ``model`` into ``dest``: with adapters, the source's weights plus
    their changes; else the model's own (fully trained) weights.

    Args:
        ck: the ``prosa.loader.Checkpoint`` the model came from (config, weights, tokenizer files).
    """
    dest.mkdir(parents=True, exist_ok=True)
    state = merged_with_adapters(ck, model) if lora_layers(model) else trained_state(model)
    save_tensors(dest / "model.safetensors", state)
    write_json(dest / "config.json", model_config(ck.config))
    gen = dict(generation_config if generation_config is not None else ck.generation_config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key not in gen and ck.config.get(key) is not None:
            gen[key] = ck.config[key]
    write_json(dest / "generation_config.json", gen)
    copy_tokenizer(ck, dest)


# ------------------------------------------------------------------------------------------------ PEFT adapters
def _transposed(model: nn.Module, module: str) -> bool:
    """Whether the checkpoint stores ``module``'s weight (in, out) (GPT-2's Conv1D): PEFT's fan_in_fan_out."""
    return f"{module}.weight".endswith(tuple(getattr(model, "TRANSPOSED", ())))


def adapter_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], bool]:
    """PEFT tensors for every ``LoRALinear`` of ``model``.

    Returns:
        (tensors under ``base_model.model.<HF module>.lora_{A,B}.weight``, the HF module names, fan_in_fan_out).
    """
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    fan_in_fan_out = False
    for name, mod in lora_layers(model).items():
        # split B like the fused weight it adapts (same rows), A goes to every part
        parts = model.unsanitize({f"{name}.weight": mod.lora_B.detach().float()}, layout=False)
        fan_in_fan_out |= _transposed(model, name)
        for part_name, b in parts.items():
            module = part_name.removesuffix(".weight")
            modules.append(module)
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = mod.lora_A.detach().float().contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    return tensors, modules, fan_in_fan_out


def save_adapter(dest: Path, model: nn.Module, base: str, rank: int, alpha: float, dropout: float) -> None:
    """PEFT's adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) into ``dest``."""
    tensors, modules, fan_in_fan_out = adapter_tensors(model)
    leaf_names = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
              "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": leaf_names, "bias": "none",
              "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
              "revision": None, "rank_pattern": {}, "alpha_pattern": {}}
    dest.mkdir(parents=True, exist_ok=True)
    save_tensors(dest / "adapter_model.safetensors", tensors)
    write_json(dest / "adapter_config.json", config)


# -------------------------------------------------------------------------------------------- applying adapters
class AdapterError(ProsaError):
    """An adapter folder that cannot be applied to the model."""


def read_adapter(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weight changes of a PEFT LoRA adapter, per Hugging Face module name: ``scale * B @ A`` (out, in),
    transposed for fan_in_fan_out (Conv1D) modules so that each adds to the checkpoint tensor as stored.

    Raises:
        AdapterError: missing files, not LoRA, or tensors that do not pair up.
    """
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"{folder} is not a PEFT adapter folder (no adapter_config.json); pass the adapter/ "
                           "folder prosa finetune wrote, or a PEFT save_pretrained folder")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path} is not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise AdapterError(f"{folder} is a {cfg.get('peft_type')}{' (DoRA)' if cfg.get('use_dora') else ''} "
                           "adapter; prosa applies plain LoRA adapters only")
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "adapter_model.safetensors"))
    elif (folder / "adapter_model.bin").is_file():
        tensors = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise AdapterError(f"{folder} has no adapter_model.safetensors")
    return peft_deltas(tensors, cfg, str(folder))


def peft_deltas(tensors: dict[str, torch.Tensor], cfg: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """HF module name -> ``scale * B @ A`` for PEFT-named LoRA tensors with adapter config ``cfg``."""
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    scale = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
    deltas: dict[str, torch.Tensor] = {}
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0].removeprefix(PEFT_PREFIX)
        b = tensors.get(name.replace(".lora_A.", ".lora_B."))
        if b is None or b.shape[1] != a.shape[0]:
            raise AdapterError(f"{where}: {name} has no matching lora_B tensor; the adapter file is damaged")
        d = (b.float() @ a.float()) * scale
        deltas[module] = d.t().contiguous() if cfg.get("fan_in_fan_out") else d
    if not deltas:
        raise AdapterError(f"{where}: adapter_model holds no lora_A/lora_B tensors")
    return deltas


_PREFIXES = ("transformer.", "gpt_neox.")     # base-model checkpoints of these families may lack them


def _key(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


class AdaptedCheckpoint:
    """A ``prosa.loader.Checkpoint`` whose tensors come out with an adapter's changes added: the loader then
    builds, quantizes (or not) and runs the adapted model as if it were the checkpoint.

    Raises (on iteration end): AdapterError when an adapted module is not in the checkpoint.
    """

    def __init__(self, ck, adapter: str | Path):
        self.inner, self.adapter = ck, Path(adapter)
        self.deltas = {_key(m): d for m, d in read_adapter(adapter).items()}
        self.source, self.path, self.config = ck.source, ck.path, ck.config
        self.generation_config, self.fmt = ck.generation_config, ck.fmt
        self.gguf = None    # integer blocks cannot be reused: the adapted weights are new

    def tensor_shapes(self):
        return self.inner.tensor_shapes()

    def tokenizer(self):
        return self.inner.tokenizer()

    def tensors(self, dtype: torch.dtype | None = None, skip: frozenset[str] = frozenset()
                ) -> Iterator[tuple[str, torch.Tensor]]:
        return add_deltas(self.inner.tensors(dtype, skip), self.deltas, self.path, str(self.adapter))


def add_deltas(tensors: Iterator[tuple[str, torch.Tensor]], deltas: dict[str, torch.Tensor], path,
               adapter: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` (checkpoint name, tensor) with ``deltas`` (module key, change) added to the matching weights.

    Raises (at the end): AdapterError when an adapted module is not among the tensors, or shapes differ.
    """
    used = set()
    for name, t in tensors:
        key = _key(name.removesuffix(".weight"))
        if name.endswith(".weight") and key in deltas:
            d = deltas[key]
            if d.shape != t.shape:
                raise AdapterError(f"{adapter}: the change for {name} is {tuple(d.shape)} but the model's weight is "
                                   f"{tuple(t.shape)}; the adapter was trained on another model")
            t = (t.float() + d).to(t.dtype)
            used.add(key)
        yield name, t
    missing = sorted(set(deltas) - used)
    if missing:
        raise AdapterError(f"{adapter} adapts {', '.join(missing[:3])}, which {path} does not have; the adapter "
                           "was trained on another model")


def check_adapter_folder(folder: str | Path) -> None:
    """Cheap check before loading (``--adapter``): the folder exists and looks like a PEFT adapter."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"--adapter {folder}: no adapter_config.json there; pass the adapter/ folder prosa "
                           "finetune wrote (OUT/adapter) or a PEFT save_pretrained folder")
    if not any((folder / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise CorruptModelError(f"--adapter {folder}: adapter_model.safetensors is missing")
