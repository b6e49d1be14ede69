"""The engine: one decode loop per model that requests join and leave at any step (see ``engine.py``).

Public pieces: ``Engine`` and its ``Handle``s, the ``Request`` a caller submits and the ``Event``s it gets back.
"""
from .engine import Engine, Handle
from .sequence import CONTEXT, OVERFLOW_MODES, Event, Request, StopMatcher

__all__ = ["CONTEXT", "Engine", "Event", "Handle", "OVERFLOW_MODES", "Request", "StopMatcher"]
