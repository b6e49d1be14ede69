"""The ``pipeline()`` factory (``transformers.pipeline``): loading arguments -> a ``TextGenerationPipeline``."""
from __future__ import annotations

import dataclasses
import logging
import os
from contextlib import contextmanager
from typing import Any, Mapping

import torch

from ..errors import ProsaError
from .text_generation import TextGenerationPipeline

logger = logging.getLogger(__name__)

SUPPORTED_TASKS = ("text-generation",)


class UnsupportedTaskError(ProsaError, ValueError, KeyError):
    """``pipeline()`` was asked for a task other than text generation (a ``ValueError``; also a ``KeyError``,
    which is what transformers raises for an unknown task)."""

    def __str__(self) -> str:        # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _device(device: Any) -> Any:
    """transformers' ``device`` argument (int: -1 = CPU, i >= 0 = the i-th accelerator) -> prosa's."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, bool):
        raise ValueError(f"device must be an int, a string or a torch.device, got {device!r}")
    if isinstance(device, int):
        if device < 0 or not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{device}"
    return str(device)


def pipeline(task: str | None = None, model: Any = None, config: Any = None, tokenizer: Any = None,
             feature_extractor: Any = None, image_processor: Any = None, video_processor: Any = None,
             processor: Any = None, revision: str | None = None, use_fast: bool = True, token: str | bool | None = None,
             device: int | str | torch.device | None = None, device_map: Any = None,
             dtype: str | torch.dtype | None = "auto", trust_remote_code: bool | None = None,
             model_kwargs: dict[str, Any] | None = None, pipeline_class: type | None = None,
             **kwargs: Any) -> TextGenerationPipeline:
    """``transformers.pipeline`` for ``"text-generation"``, on prosa's engine.

    Args:
        task: ``"text-generation"`` (or None, the only task prosa has); anything else raises
            ``UnsupportedTaskError`` (a ValueError).
        model: a Hub id (``"gpt2"``), a local folder or ``.gguf`` file (loaded with ``prosa.load``), a
            ``prosa.LanguageModel``, or None for prosa's default model (``$PROSA_MODEL`` or the bundled
            SmolLM2-135M-Instruct).
        tokenizer: None (the model's), a ``prosa.tokenizer.Tokenizer``, or a folder / Hub id to load one from.
        revision: Hub branch, tag or commit. token: a Hub token (else ``HF_TOKEN``).
        device: -1 / "cpu", an accelerator index, "cuda", a ``torch.device``, or None (CUDA when available).
        device_map: a device string is used as ``device``; a dict is not supported.
        dtype / torch_dtype: "auto", "float32", "bfloat16", "float16" or a torch dtype.
        model_kwargs: ``dtype``/``torch_dtype``/``revision``/``device_map`` are used; other loading options of
            transformers do not apply to prosa and are ignored.
        trust_remote_code: prosa never runs code from the Hub; True is ignored with a warning.
        pipeline_class: a ``TextGenerationPipeline`` subclass to build.
        batch_size, num_workers, generation parameters, pipeline parameters: defaults for every call (see
            ``TextGenerationPipeline.__call__``).
        quantize: (prosa) the weight format, as for ``prosa.load``: "auto" (default), "none", "bf16", "int8", "int4".
        use_task_specific_params: (prosa) apply ``task_specific_params["text-generation"]`` of ``config.json``
            over the model's generation config, as transformers 4.x did (5.x ignores them).
    Returns:
        a ``TextGenerationPipeline``.
    """
    if task is None:
        if model is None:
            raise RuntimeError("Impossible to instantiate a pipeline without either a task or a model being "
                               "specified. Please provide a task class or a model")
        task = "text-generation"
    if task not in SUPPORTED_TASKS:
        raise UnsupportedTaskError(f"Unknown task {task}: prosa's pipeline supports {', '.join(SUPPORTED_TASKS)} "
                                   "only (use transformers for other tasks)")
    if model is None and tokenizer is not None:
        raise RuntimeError("Impossible to instantiate a pipeline with tokenizer specified but not the model as the "
                           "provided tokenizer may not be compatible with the default model. Please provide a "
                           "PreTrainedModel class or a path/identifier to a pretrained model when providing "
                           "tokenizer.")
    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise NotImplementedError("prosa's pipeline reads the config from the model; pass config=None")
    if trust_remote_code:
        logger.warning("prosa never runs code from the Hub; trust_remote_code=True is ignored")
    model_kwargs = dict(model_kwargs or {})
    torch_dtype = kwargs.pop("torch_dtype", None)
    if torch_dtype is not None:
        dtype = torch_dtype if dtype == "auto" else dtype
    if "torch_dtype" in model_kwargs or "dtype" in model_kwargs:
        if dtype not in ("auto", None):
            raise ValueError('You cannot use both `pipeline(... dtype=..., model_kwargs={"dtype":...})` as those'
                             " arguments might conflict, use only one.)")
        dtype = model_kwargs.pop("dtype", None) or model_kwargs.pop("torch_dtype", None)
    if dtype is None:
        dtype = "auto"
    if isinstance(dtype, str) and dtype.startswith("torch."):
        dtype = dtype[len("torch."):]
    revision = revision or model_kwargs.pop("revision", None)
    device_map = device_map if device_map is not None else model_kwargs.pop("device_map", None)
    if device_map is not None:
        if isinstance(device_map, Mapping):
            raise NotImplementedError("prosa runs a model on one device; pass device=... instead of a device_map dict")
        if device is None and device_map != "auto":
            device = device_map
    for name in ("local_files_only", "code_revision", "_commit_hash"):
        kwargs.pop(name, None)
    quantize = kwargs.pop("quantize", None) or model_kwargs.pop("quantize", "auto")
    dev = _device(device)

    from ..language_model import LanguageModel
    from ..loader import load

    if model is None or isinstance(model, (str, os.PathLike)):
        with _env("HF_TOKEN", token if isinstance(token, str) else None):
            lm = load(None if model is None else str(model), dtype=dtype, revision=revision, device=dev,
                      quantize=quantize)
    elif isinstance(model, LanguageModel):
        lm = model
        if dev is not None and torch.device(dev) != lm.device:
            lm.model.to(torch.device(dev))
    else:
        raise TypeError(f"model must be a name, a path or a prosa LanguageModel, got {type(model).__name__} "
                        "(prosa runs its own engine, not transformers models)")

    tok = None
    if tokenizer is not None:
        from ..tokenizer import Tokenizer

        if isinstance(tokenizer, Tokenizer):
            tok = tokenizer
        elif isinstance(tokenizer, (str, os.PathLike)):
            if isinstance(model, (str, os.PathLike)) and str(tokenizer) == str(model):
                tok = None
            else:
                from ..weights import hub

                with _env("HF_TOKEN", token if isinstance(token, str) else None):
                    tok = Tokenizer.from_folder(hub.resolve(str(tokenizer), revision))
        else:
            raise TypeError(f"tokenizer must be a prosa Tokenizer, a folder or a Hub id, got "
                            f"{type(tokenizer).__name__}")
        if tok is not None:
            lm = dataclasses.replace(lm, tokenizer=tok)
    cls = pipeline_class or TextGenerationPipeline
    return cls(lm, task=task, **kwargs)
