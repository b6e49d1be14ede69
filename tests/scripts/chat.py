"""A chat (a list of messages) continued by the text-generation pipeline, which applies the model's chat template.
Only the import line differs from the transformers version.

    python tests/scripts/chat.py [MODEL]       # MODEL: argv[1], else $PIPELINE_MODEL, else "gpt2"

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


messages = [{"role": "user", "content": "hello!, how are you?"}]
generator = pipeline('text-generation', model=model)

chat = generator(messages, max_new_tokens=8, do_sample=False)
reply = chat[0]['generated_text'][-1]
print("GREEDY " + repr((reply['role'], reply['content'])))

messages = chat[0]['generated_text'] + [{"role": "user", "content": "Pizza?"}]
chat = generator(messages, max_new_tokens=8, do_sample=False)
print("GREEDY " + repr(chat[0]['generated_text'][-1]['content']))

new_text = generator(messages, max_new_tokens=8, do_sample=False, return_full_text=False)
print("GREEDY " + repr(new_text[0]['generated_text']))

print("STRUCTURE " + json.dumps([structure(r) for r in (chat, new_text)]))
