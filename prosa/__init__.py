"""prosa: local text generation with GPT-style models.

    >>> import prosa
    >>> lm = prosa.load()                      # the bundled SmolLM2-135M-Instruct, or a folder / Hub id / .gguf
    >>> print(lm.generate("A story about a man and a dog", max_new_tokens=40, seed=0).text)
"""
from .errors import CorruptModelError, ModelNotFoundError, ProsaError, UnsupportedModelError
from .chat import Chat
from .language_model import Chunk, GenerationResult, LanguageModel, TokenLogprob
from .loader import load
from .pipeline import pipeline


def finetune(data, out, model=None, **settings):
    """Fine-tune ``model`` on ``data`` into ``out``; see ``prosa.training.finetune`` (imported on first use)."""
    from .training import finetune as run

    return run(data, out, model, **settings)


__version__ = "0.1.0"
__all__ = ["load", "pipeline", "finetune", "Chat", "LanguageModel", "GenerationResult", "Chunk", "TokenLogprob", "ProsaError", "ModelNotFoundError",
           "UnsupportedModelError", "CorruptModelError"]
