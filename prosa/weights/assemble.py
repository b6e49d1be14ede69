"""Fill a meta-device model with a checkpoint's weights, in the format chosen at load time.

The checkpoint is read one layer at a time: tensors are grouped by their layer number (``...layers.7...`` or
``...h.7...``; everything else is one more group), and a group is handed to ``model.sanitize`` as soon as its last
tensor has been read. In the int8/int4 formats the group's linear weights are then quantized and the float copies
dropped, so loading a model costs its weights in the running format plus about one layer in float: GPT-J 6B
loads in int4 without ever holding its 24 GB of float32.

GGUF Q8_0 / Q4_0 / Q4_1 blocks that already are the requested format (Q8_0 for int8; Q4_x for int4, where the
output layer is int8 and may come from a Q8_0 embedding) are repacked as integers, exactly, and never pass through
float; Q4_K blocks too in int4 mode, their 6-bit sub-block scales times the super-block scale rounded to float16. The fused projections of the Llama family (``Model.FUSED``) concatenate their parts' integer rows, which is
exact too since groups run along the input dimension.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import heap
from ..errors import CorruptModelError
from ..quant import QuantizedLinear
from . import gguf_embedding as embedding
from .gguf import one_thread

_LAYER = re.compile(r"\.(?:h|layers)\.(\d+)\.")
GROUP_SIZE = 32


@dataclass
class Report:
    """What the loader did: modules per format ("float32", "int4 (GGUF Q4_1, exact)", ...) and weight bytes."""

    formats: Counter = field(default_factory=Counter)
    weight_bytes: int = 0

    def summary(self) -> str:
        return ", ".join(f"{n} x {fmt}" for fmt, n in self.formats.most_common())


def _embedding_name(names: Any) -> str | None:
    """The token embedding among a checkpoint's tensor names (``embed_tokens`` / ``wte`` / ``embed_in``), or None."""
    return next((n for n in names if n.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight"))), None)


def _output_names(model: nn.Module) -> set[str]:
    """The output layer: the last ``nn.Linear`` registered (``lm_head`` / ``embed_out``)."""
    linears = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    return {linears[-1]} if linears else set()


def _bits_for(name: str, mode: str, outputs: set[str]) -> int:
    """int8 everywhere in int8 mode; int4 in int4 mode but for the output layer, which stays int8 (the vocabulary
    projection is the most sensitive layer to quantize, and llama.cpp's Q4 files keep it at 6-8 bits too) unless
    a GGUF file already stores it in 4 bits (``_gguf_exact``)."""
    return 8 if mode == "int8" or name in outputs else 4


def _quantized(weight: torch.Tensor, bias: torch.Tensor | None, bits: int,
               symmetric: bool = False) -> tuple[QuantizedLinear, str]:
    k = weight.shape[1]
    if k % GROUP_SIZE == 0:
        layer = QuantizedLinear.from_float(weight, bias, bits, GROUP_SIZE, symmetric=symmetric)
        return layer, f"int{bits} g{GROUP_SIZE}" + (" symmetric" if symmetric and bits == 8 else "")
    # rows that are not whole groups (rare: tiny test models): per-channel int8
    return QuantizedLinear.from_float(weight, bias, 8, None), "int8 per-channel"


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _gguf_exact(model: nn.Module, ck: Any, mode: str, dtype: torch.dtype, device: torch.device,
                report: Report) -> set[str]:
    """Repack GGUF integer blocks straight into the model's linears where they already are the format the mode
    asks for. Returns the checkpoint names consumed (not to be read as float)."""
    gg = ck.gguf
    types = gg.tensor_types()
    fused = getattr(model, "FUSED", {})
    outputs = _output_names(model)
    tied = ck.config.get("tie_word_embeddings", True)
    embed = _embedding_name(types)
    want = {8: ("Q8_0",), 4: ("Q4_0", "Q4_1", "Q4_K")}
    stored = gg.stored_shapes()
    consumed: set[str] = set()
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        parts = [name]
        for target, pieces in fused.items():
            if name.endswith("." + target):
                parts = [name[:-len(target)] + p for p in pieces]
        sources = [p + ".weight" for p in parts]
        if name in outputs and sources[0] not in types and embed is not None and tied:
            sources = [embed]   # tied output layer: quantized copy of the embedding's blocks
        bits = _bits_for(name, mode, outputs)
        kinds = {types.get(s) for s in sources}
        if bits == 8 and mode == "int4" and kinds <= set(want[4]):
            bits = 4    # an output layer the file stores in 4 bits is taken as it is: int8 of its dequantized
            #             values would read twice the bytes per token for no more information
        if len(kinds) != 1 or next(iter(kinds)) not in want[bits]:
            continue
        shapes = [stored[s] for s in sources]
        shape = (sum(s[0] for s in shapes), shapes[0][1])
        if any(s[1] != shape[1] for s in shapes) or shape != tuple(mod.weight.shape):
            raise CorruptModelError(f"{ck.path}: {name} is {' + '.join(str(tuple(s)) for s in shapes)} in the "
                                    f"file but the config makes it {tuple(mod.weight.shape)}")
        kind = next(iter(kinds))
        # the file's blocks go to the kernels' layout in one pass over the weight, with no whole-layer temporaries
        # (in C++, else a chunk of rows at a time while it is in cache)
        layer = QuantizedLinear.from_gguf_rows(kind, [gg.raw_rows(s)[1:] for s in sources], *shape)
        if layer is None:       # no C++ repacking for this type or shape: the integers, a chunk at a time
            layer = QuantizedLinear.from_int_chunks(*shape, GROUP_SIZE, bits, kind != "Q8_0",
                                                    _joined([gg.int_chunks(s) for s in sources]))
        for s in sources:
            gg.release(s)
        layer = layer.to(device)
        _swap(model, name, layer)
        report.formats[f"int{bits} (GGUF {kind}, {'scales to fp16' if kind == 'Q4_K' else 'exact'})"] += 1
        consumed.update(s for s in sources if s != embed)   # the embedding: below
    if embed is not None and _keep_embedding(model, ck, embed, types[embed], tied, outputs, dtype, device):
        consumed.add(embed)
        report.formats[f"embedding (GGUF {types[embed]}, kept in its blocks)"] += 1
    return consumed


def _keep_embedding(model: nn.Module, ck: Any, embed: str, kind: str, tied: bool, outputs: set[str],
                    dtype: torch.dtype, device: torch.device) -> bool:
    """Swap the token embedding for a ``QuantizedEmbedding`` over a copy of the file's blocks where their type
    allows it and no float layer is still to be made from it (a tied output layer not repacked above). Returns
    whether it did (the checkpoint tensor is then consumed)."""
    path = embed.removesuffix(".weight")
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return False
    head = next(iter(outputs), None)
    head_mod = model.get_submodule(head) if head else None
    needed = head is not None and not isinstance(head_mod, QuantizedLinear) and \
        (tied or head + ".weight" not in ck.gguf.tensor_types())
    if type(mod) is not nn.Embedding or kind not in embedding.TYPES or needed:
        return False
    gg = ck.gguf
    _, raw, _ = gg.raw_rows(embed)
    if (raw.shape[0], mod.embedding_dim) != tuple(gg.stored_shapes()[embed]) or raw.shape[0] != mod.num_embeddings:
        raise CorruptModelError(f"{ck.path}: {embed} is {tuple(gg.stored_shapes()[embed])} in the file but the "
                                f"config makes it {(mod.num_embeddings, mod.embedding_dim)}")
    layer = embedding.QuantizedEmbedding(raw.clone(), kind, mod.embedding_dim, dtype)
    gg.release(embed)
    _swap(model, path, layer.to(device))
    return True


def _joined(parts: list[Any], tile: int = 16) -> Any:
    """The row chunks ``(first row, q, d, m)`` of several weights stacked row-wise (a fused projection's parts),
    renumbered, and regrouped where a part's rows are not whole tiles so that every chunk but the last is."""
    start, held = 0, []             # held: rows of the stack not yet given out, (q, d, m) pieces
    for part in parts:
        for _, q, d, m in part:
            if not held and q.shape[0] % tile == 0:
                yield start, q, d, m
                start += q.shape[0]
                continue
            held.append((q, d, m))
            q, d = torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])
            m = None if m is None else torch.cat([h[2] for h in held])
            whole = q.shape[0] // tile * tile
            held = [(q[whole:], d[whole:], None if m is None else m[whole:])] if whole < q.shape[0] else []
            if whole:
                yield start, q[:whole], d[:whole], None if m is None else m[:whole]
                start += whole
    if held:
        (q, d, m), = held
        yield start, q, d, m


def load_weights(model: nn.Module, ck: Any, dtype: torch.dtype, device: torch.device, mode: str = "none") -> Report:
    """Fill ``model`` (built on the meta device) from checkpoint ``ck`` (a ``prosa.loader.Checkpoint``).

    Args:
        dtype: the float dtype of every tensor kept in float (all of them in mode "none").
        mode: "none" (float), "int8" or "int4" (weight-only, group-wise; see ``prosa.quant``).
    Returns:
        a ``Report`` of the formats used.
    Raises:
        CorruptModelError: the checkpoint's tensors do not match the architecture its config describes.

    Runs on one thread: loading is a series of cheap memory-bound passes, and with intra-op threads each is a
    parallel region whose barrier waits for every core; on a busy 2-core machine that made loading the bundled
    model 3x slower (11 s instead of 3.6 s; 1.6 s idle).
    """
    with one_thread():
        report = _load_weights(model, ck, dtype, device, mode)
    heap.trim()
    return report


# GGML types whose values are d * q per block, with no minimum: an output layer requantized from one is int8
# symmetric (as Q8_0 loads), no less exact than int8 with a minimum and its kernel is faster (GPT-2's Q6_K output:
# 1.1-1.2 ms per token against 1.3-1.6, 2 EPYC cores)
_SYMMETRIC_TYPES = frozenset({"Q8_0", "Q6_K", "Q5_0", "Q4_0", "Q3_K"})


def _symmetric_source(ck: Any, outputs: set[str]) -> bool:
    """Whether the output layer comes from a GGUF tensor of a symmetric type (its own, or the tied embedding)."""
    if ck.gguf is None or not outputs:
        return False
    types = ck.gguf.tensor_types()
    head = next(iter(outputs)) + ".weight"
    embed = _embedding_name(types)
    return types.get(head, types.get(embed or "")) in _SYMMETRIC_TYPES


_TRIM_BYTES = 4 << 20      # a quantized group whose float copies took this much gives the memory back at once


def _load_weights(model: nn.Module, ck: Any, dtype: torch.dtype, device: torch.device, mode: str) -> Report:
    report = Report()
    quantize = mode in ("int8", "int4")
    skip = _gguf_exact(model, ck, mode, dtype, device, report) if quantize and ck.gguf is not None else set()
    shapes = ck.tensor_shapes()
    remaining: Counter | None = None
    if shapes is not None:
        remaining = Counter(_group(n) for n in shapes if n not in skip)
    outputs = _output_names(model)
    symmetric_output = _symmetric_source(ck, outputs)
    pending: dict[Any, dict[str, torch.Tensor]] = defaultdict(dict)
    unexpected: list[str] = []

    def flush(state: dict[str, torch.Tensor]) -> None:
        state = model.sanitize(state)
        for key in list(state):
            if key not in state:    # a bias taken along with its weight
                continue
            path, _, leaf = key.rpartition(".")
            try:
                mod = model.get_submodule(path) if path else model
            except AttributeError:
                continue            # reported as unexpected by _assign below
            if isinstance(mod, QuantizedLinear):
                t = state.pop(key)
                if leaf == "bias":  # a repacked GGUF layer's bias (its weight came as integers)
                    mod.bias = t.detach().float().contiguous().to(device)
                continue            # the float weight of a layer already quantized (a tied alias)
            if quantize and isinstance(mod, nn.Linear) and leaf == "weight":
                if state[key].shape != mod.weight.shape:
                    raise CorruptModelError(f"{ck.path}: {key} is {tuple(state[key].shape)} in the checkpoint but "
                                            f"its config.json makes it {tuple(mod.weight.shape)}")
                bits = _bits_for(path, mode, outputs)
                bias = state.pop(path + ".bias", None)
                # int4 mode's int8 output layer is symmetric: its error is small beside the int4 blocks', and the
                # symmetric kernel is the faster one (int8 mode keeps minimums: there precision is the point)
                layer, fmt = _quantized(state.pop(key).float(), None if bias is None else bias.float(), bits,
                                        symmetric=(symmetric_output or mode == "int4") and path in outputs)
                _swap(model, path, layer.to(device))
                report.formats[fmt] += 1
        if state:
            unexpected.extend(_assign(model, state, ck.path))

    for name, tensor in ck.tensors(dtype, frozenset(skip)):
        # Integer/bool buffers (old GPT-2 attention masks) keep their dtype; sanitize drops them.
        tensor = tensor.to(device) if tensor.is_floating_point() else tensor
        if remaining is None:
            pending[None][name] = tensor
            continue
        g = _group(name)
        pending[g][name] = tensor
        remaining[g] -= 1
        if remaining[g] == 0:
            floats = sum(t.numel() * t.element_size() for t in pending[g].values()) if quantize else 0
            flush(pending.pop(g))      # no other reference: sanitize's fusions free the parts as they go
            if floats >= _TRIM_BYTES:
                heap.trim()    # the layer's float copies: freed, but glibc keeps them unless asked (+40 MB/16 layers)
    for state in pending.values():
        flush(state)

    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing or unexpected:
        def show(names):
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        raise CorruptModelError(
            f"{ck.path}: weights do not match the {ck.config.get('model_type')} architecture its config "
            f"describes (missing: {show(missing) or 'none'}; unexpected: {show(unexpected) or 'none'}); "
            "the checkpoint is incomplete or its config.json belongs to another model")
    n_float = sum(isinstance(m, nn.Linear) for m in model.modules())
    if n_float:
        report.formats[str(dtype).replace("torch.", "")] += n_float
    # the tensors held (not state_dict's: a QuantizedEmbedding gives its table there in float)
    held = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    report.weight_bytes = sum(t.numel() * t.element_size() for t in held.values())
    return report


def _assign(model: nn.Module, state: dict[str, torch.Tensor], path: Any) -> list[str]:
    """``model.load_state_dict(state, strict=False, assign=True)`` for one group's tensors, without walking every
    module of the model per group (31 groups x 276 modules took 0.1 s of the bundled model's 0.5 s load).

    Returns:
        the keys the model has no parameter or (persistent) buffer for.
    Raises:
        CorruptModelError: a tensor whose shape is not the one the config gives its parameter.
    """
    unexpected = []
    for key, t in state.items():
        prefix, _, leaf = key.rpartition(".")
        try:
            mod = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            unexpected.append(key)
            continue
        old = mod._parameters.get(leaf)
        if old is None and leaf not in mod._non_persistent_buffers_set:
            old = mod._buffers.get(leaf)
        if old is None:
            unexpected.append(key)
            continue
        if old.shape != t.shape:
            raise CorruptModelError(f"{path}: {key} is {tuple(t.shape)} in the checkpoint but its config.json makes "
                                    f"it {tuple(old.shape)}; the config belongs to another model")
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad)
        else:
            mod._buffers[leaf] = t
    return unexpected


def _group(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m[1]) if m else None
