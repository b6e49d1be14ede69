"""Every setting of a fine-tuning run, in one place for ``prosa finetune`` and ``prosa.finetune()``.

Settings resolve in this order: the defaults below, then a ``--config run.yaml`` file (keys spelled like the
long options, with ``-`` or ``_``), then what the caller passed. ``check`` rejects anything out of range before
a model or the data is read.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..errors import ProsaError

METHODS = ("lora", "full", "qlora")
DTYPES = ("auto", "float32", "bfloat16")
COMPILE = ("auto", "on", "off")


class SettingsError(ProsaError):
    """A fine-tuning setting out of range, or a config file that cannot be used."""


@dataclass
class Settings:
    """A fine-tuning run. ``data`` and ``out`` are required; everything else has a default.

    Attributes (the CLI flags have the same names with dashes):
        data: a .txt/.md/.jsonl/.csv file or a folder of them.
        model: the base model (folder, .gguf, Hub id; None = the default model).
        out: the output folder.
        method: "lora" (default), "full" or "qlora" (frozen base in int4/int8, see ``quantize``).
        max_steps / epochs: how long (optimizer steps, or passes over the training rows; default 1 epoch).
        batch_size: sequences per optimizer step, over every process and accumulation step.
        grad_accum: micro-batches per optimizer step (per process).
        seq_len: tokens per row (default min(512, the model's context)).
        lr: peak learning rate (default 2e-4 for LoRA, 5e-5 for full), reached after ``warmup`` steps, then a
            cosine decay to 10% of it.
    """

    data: str = ""
    out: str = ""
    model: str | None = None
    revision: str | None = None
    method: str = "lora"
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int | None = None
    lr: float | None = None
    warmup: int | None = None              # steps; default 5% of the run (at least 1)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int | None = None          # steps; default: every 10% of the run, at most every 25 steps
    eval_every: int | None = None          # steps; default: 10 evaluations over the run
    val_split: float = 0.1
    patience: int = 5                      # evaluations without a better validation loss before stopping; 0 = never
    samples: int = 2                       # sample generations printed at each evaluation
    sample_tokens: int = 40
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False
    lora_rank: int = 16
    lora_alpha: float | None = None        # default 2 x rank
    lora_dropout: float = 0.0
    quantize: str = "int4"                 # qlora's base format
    grad_checkpoint: bool = False
    split_on_blank_lines: bool = False
    train_on_prompt: bool = False
    packing: bool = True
    compile: str = "auto"                  # torch.compile of the training step: auto (runs of a minute or more), on, off
    dtype: str = "auto"                    # bfloat16 autocast where the hardware has native bf16, else float32
    threads: int | None = None
    device: str | None = None
    keep_checkpoints: int = 2
    progress: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_sources(cls, config_file: str | Path | None = None, **given: Any) -> "Settings":
        """Defaults, then ``config_file`` (YAML), then ``given`` (keys whose value is None are not given)."""
        values: dict[str, Any] = {}
        if config_file is not None:
            values.update(read_config(config_file))
        values.update({k: v for k, v in given.items() if v is not None})
        names = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        s = cls(**values)
        s.check()
        return s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    # ---------------------------------------------------------------------------------------------- checking
    def check(self) -> None:
        """Raise ``SettingsError`` naming the first setting out of range."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SettingsError(msg)

        def integer(name: str, low: int, allow_none: bool = True) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            need(isinstance(v, int) and not isinstance(v, bool) and v >= low,
                 f"--{name.replace('_', '-')} must be an integer >= {low}; got {v!r}")

        def number(name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
            v = getattr(self, name)
            if v is None:
                return
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= high
            ok = ok and (v > low if low_open else v >= low)
            need(ok, f"--{name.replace('_', '-')} must be {'>' if low_open else '>='} {low}"
                     + (f" and <= {high}" if high != math.inf else "") + f"; got {v!r}")

        need(bool(self.data), "training data is required (a file or a folder of texts)")
        need(bool(self.out), "an output folder is required (-o OUT)")
        need(self.method in METHODS, f"--method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if isinstance(self.compile, bool):        # a YAML ``compile: true``
            self.compile = "on" if self.compile else "off"
        need(self.compile in COMPILE, f"--compile must be one of {', '.join(COMPILE)}; got {self.compile!r}")
        need(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        need(self.quantize in ("int4", "int8"), f"--quantize (qlora's base) must be int4 or int8; got {self.quantize!r}")
        need(self.max_steps is None or self.epochs is None, "give --max-steps or --epochs, not both")
        for name in ("max_steps", "batch_size", "grad_accum", "lora_rank", "save_every", "eval_every",
                     "sample_tokens", "threads", "keep_checkpoints"):
            integer(name, 1)
        for name in ("seed", "patience", "samples", "warmup"):
            integer(name, 0)
        integer("seq_len", 8)
        number("epochs", 0, low_open=True)
        number("lr", 0, 1, low_open=True)
        number("val_split", 0, 0.5)
        number("weight_decay", 0, 1)
        number("max_grad_norm", 0, low_open=True)
        number("lora_alpha", 0, low_open=True)
        number("lora_dropout", 0, 0.9)
        need(not (self.resume and self.overwrite), "--resume continues the run in OUT; --overwrite starts it over: "
                                                   "pass one of them")

    def check_world(self, world: int) -> int:
        """Rows per micro-batch on each of ``world`` processes.

        Raises:
            SettingsError: ``batch_size`` is not a multiple of processes x ``grad_accum``.
        """
        per = self.batch_size // (world * self.grad_accum)
        if per * world * self.grad_accum != self.batch_size:
            raise SettingsError(
                f"--batch-size {self.batch_size} is not a multiple of processes ({world}) x --grad-accum "
                f"({self.grad_accum}); each micro-batch must hold the same number of sequences")
        return per

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (5e-5 if self.method == "full" else 2e-4)


def read_config(path: str | Path) -> dict[str, Any]:
    """The settings in a YAML (or JSON) file, keys normalised to ``snake_case``.

    Raises:
        SettingsError: unreadable file, not a mapping.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SettingsError(f"cannot read config file {path}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SettingsError(f"{path} must hold a mapping of settings (key: value), got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
