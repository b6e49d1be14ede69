"""Chat settings: the generation flags a conversation keeps, checked (``check_settings``) and parsed from
``/set NAME VALUE`` (``parse_setting``). Imports nothing else of ``prosa.chat``."""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Mapping

from ..sampling import SamplingParams

#: Sampling controls (``prosa.sampling.SamplingParams`` fields).
SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))
#: Settings a chat keeps (``/set`` changes the scalar ones; None = the model's default).
SETTING_NAMES = ("max_new_tokens", "seed", "stop", "bad_words") + SAMPLING_FIELDS
#: Scalar settings ``/set NAME VALUE`` accepts, with their value types.
SETTABLE: dict[str, type] = {"max_new_tokens": int, "seed": int,
                             **{f.name: (int if f.type in ("int", int) else float) for f in fields(SamplingParams)
                                if f.name not in ("logit_bias", "bad_words_ids")}}


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Validate chat settings (generation flags); returns a clean copy with None values dropped.

    Raises:
        ValueError: an unknown name or a bad value (the message names the parameter).
    """
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTING_NAMES)}")
    out = {k: v for k, v in settings.items() if v is not None}
    mnt = out.get("max_new_tokens")
    if mnt is not None and (isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {mnt!r}")
    seed = out.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    for key in ("stop", "bad_words"):
        if key in out:
            value = [out[key]] if isinstance(out[key], str) else out[key]
            if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
                raise ValueError(f"{key} must be a string or a list of strings, got {out[key]!r}")
            out[key] = [s for s in value if s]
    SamplingParams(**{k: v for k, v in out.items() if k in SAMPLING_FIELDS})   # raises ValueError naming it
    return out


def parse_setting(name: str, value: str) -> tuple[str, Any]:
    """``/set NAME VALUE`` -> (setting name, typed value); ``none``/``default`` gives None (the model's default).

    Raises:
        ValueError: an unknown name or a value of the wrong type (validation of the range is ``check_settings``).
    """
    key = name.strip().lower().replace("-", "_")
    if key not in SETTABLE:
        raise ValueError(f"unknown setting {name!r}; settable: {', '.join(SETTABLE)}")
    value = value.strip()
    if value.lower() in ("none", "default", ""):
        return key, None
    kind = SETTABLE[key]
    try:
        if kind is int:
            return key, int(value)
        number = float(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{key} must be {what}, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return key, number
