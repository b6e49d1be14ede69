"""Fine-tuning (``prosa.finetune(data, out, model)`` / ``prosa finetune DATA -o OUT``); the package is named
``training`` so that ``prosa.finetune`` can be the function.

Modules: ``config`` (settings), ``data`` (records, tokens, packing), ``attention`` (per-document attention of
packed rows), ``lora`` (adapters), ``trainer`` (loss, data stream, processes), ``run`` (the run), ``checkpoint``,
``progress`` (bar, log, plot), ``export`` (merged folders, PEFT adapters, ``--adapter``).
"""
from .config import Settings, SettingsError
from .data import DataError
from .run import Result, finetune
from .trainer import TrainingInterrupted

__all__ = ["finetune", "Settings", "Result", "DataError", "SettingsError", "TrainingInterrupted"]
