"""``prosa serve``: an OpenAI-compatible HTTP server on a model's engine, with a web chat page (``app.py``)."""
from .app import ServerState, create_app

__all__ = ["ServerState", "create_app"]
