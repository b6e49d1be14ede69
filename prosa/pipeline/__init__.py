"""``pipeline("text-generation", model=...)``: transformers' text-generation pipeline, run by prosa's engine.

Code written for ``transformers.pipeline`` runs unchanged except the import::

    from prosa import pipeline

    generator = pipeline('text-generation', model='gpt2')
    generated = generator("A story about a man and a dog", max_length=100, num_return_sequences=1)

What it reproduces of transformers and where it deliberately differs: see ``prosa.pipeline.text_generation``.

Submodules (at run time each imports only those below it; those taking the pipeline import ``text_generation``
back for type hints only):

* ``factory``: ``pipeline()`` (loading arguments) and ``UnsupportedTaskError``.
* ``text_generation``: ``TextGenerationPipeline`` (routes a call's arguments and inputs to the modules below).
* ``streaming``: ``stream=True``, text pieces that join to the records' ``generated_text``.
* ``generation``: engine requests and events for a chunk, and transformers' result records.
* ``inputs``: ``Chat`` inputs, batching into chunks, preprocessing (prefix, chat template, truncation, ``hole``).
* ``planning``: ``ReturnType``, ``Plan`` and ``plan_call`` (a call's keywords -> one ``Plan``: generation settings,
  pipeline parameters, prosa's extras).
* ``genconfig``: the generation-config tables and ``resolve_generation_settings`` (a model's generation config +
  a caller's generation keywords -> effective config and prosa sampling settings).
"""
from .factory import SUPPORTED_TASKS, UnsupportedTaskError, pipeline
from .planning import ReturnType
from .text_generation import TextGenerationPipeline

__all__ = ["pipeline", "TextGenerationPipeline", "ReturnType", "SUPPORTED_TASKS", "UnsupportedTaskError"]
