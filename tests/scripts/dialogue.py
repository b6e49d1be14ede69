"""A dialogue continued by the text-generation pipeline. Only the import line differs from the transformers version.

    python tests/scripts/dialogue.py [MODEL]   # MODEL: argv[1], else $PIPELINE_MODEL, else "gpt2"

``GREEDY`` lines are deterministic (equal to transformers' for the same model); ``STRUCTURE`` gives the types and
nesting of every result.
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


dialogue = "You: hello!, how are you?\nHe: I am fine, thanks.\nYou: Do you like pizza?\nHe:"
generator = pipeline('text-generation', model=model)

greedy = generator(dialogue, max_new_tokens=20, do_sample=False, return_full_text=False)
print("GREEDY " + repr(greedy[0]['generated_text']))

replies = generator(dialogue, max_new_tokens=20, num_return_sequences=2, do_sample=True, temperature=0.8,
                    top_p=0.95, return_full_text=False)
for reply in replies:
    print("REPLY " + repr(reply['generated_text'].split("\n")[0].strip()))

both = generator([dialogue, "You: Do you like dogs?\nHe:"], max_new_tokens=10, do_sample=False)
for outputs in both:
    print("GREEDY " + repr(outputs[0]['generated_text']))

print("STRUCTURE " + json.dumps([structure(r) for r in (greedy, replies, both)]))
