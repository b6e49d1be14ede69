"""The transformers text-generation snippet, run by prosa. Only the import line differs from the transformers version.

    python tests/scripts/story.py [MODEL]      # MODEL: argv[1], else $PIPELINE_MODEL, else "gpt2"

The last line printed (``STRUCTURE [...]``) gives the types and nesting of every result, which must equal what the
transformers version prints for the same model.
"""
import json
import os
import sys

from prosa import pipeline

model = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PIPELINE_MODEL", "gpt2")


def structure(value):
    """The types and nesting of a pipeline result, without its text."""
    if isinstance(value, list):
        return [structure(v) for v in value]
    if isinstance(value, dict):
        return {k: structure(v) for k, v in value.items()}
    return type(value).__name__


generator = pipeline('text-generation', model=model)
generated = generator("A story about a man and a dog", max_length=100, num_return_sequences=1)
results = [generated]
generated = generator("A story about a man and a dog", max_length=100, num_return_sequences=1,
                      temperature=0.9, top_k=50, top_p=0.9, do_sample=True)
results.append(generated)
for sequence in generated:
    print(sequence['generated_text'])

print("STRUCTURE " + json.dumps([structure(r) for r in results]))
