"""Validate JSON against OpenAI's own API description (``tests/data/openai-openapi/openapi.json``, trimmed to the
routes a local server implements): ``validate(obj, "CreateChatCompletionResponse")`` raises on any mismatch."""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

SPEC = Path(__file__).resolve().parent / "data" / "openai-openapi" / "openapi.json"   # a copy (MIT, see LICENSE)


def available() -> bool:
    return SPEC.is_file()


def _fix_nullable(node):
    """OpenAPI 3.0's ``nullable: true`` (still used in places) as JSON Schema's null type."""
    if isinstance(node, dict):
        node = {k: _fix_nullable(v) for k, v in node.items()}
        if node.pop("nullable", False):
            node = {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_fix_nullable(v) for v in node]
    return node


@lru_cache(maxsize=1)
def spec() -> dict:
    return _fix_nullable(json.loads(SPEC.read_text()))


def validate(obj, schema_name: str) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``obj`` matches ``#/components/schemas/<schema_name>``."""
    import jsonschema

    root = copy.deepcopy(spec())
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": root["components"]}
    jsonschema.Draft202012Validator(schema).validate(obj)
