"""Errors a user can cause. The CLI prints their message (no traceback) and exits non-zero."""


class ProsaError(Exception):
    """Base class: a problem the user can fix; ``str(err)`` names the problem and the fix."""


class ModelNotFoundError(ProsaError):
    """The path or Hub id does not lead to a model."""


class UnsupportedModelError(ProsaError):
    """The checkpoint's architecture (``model_type``) is not one prosa can run."""


class CorruptModelError(ProsaError):
    """A weights, config or tokenizer file is truncated, malformed or unsafe."""
