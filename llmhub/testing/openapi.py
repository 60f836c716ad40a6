"""Validate JSON documents against schemas from OpenAI's published OpenAPI spec.

The spec is OpenAPI 3.1, whose schema dialect is JSON Schema 2020-12, but it still carries some
OpenAPI 3.0-style ``nullable: true`` annotations that a 2020-12 validator would silently ignore
(making ``null`` fail a ``type: object`` check). Those are rewritten to ``anyOf: [..., {"type": "null"}]``
once, when the spec is loaded.

The spec is located at ``<repo parent>/shared/specs/openai-openapi.yaml`` unless the environment
variable ``LLMHUB_OPENAI_SPEC`` points elsewhere; without either, the schemas extracted from it into
``llmhub/openai_schemas.json`` are used. Loading takes a moment (the file is ~3 MB), so the
parsed spec and each compiled validator are cached per process.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = ["ValidationError", "spec_path", "validate_openai_schema"]

_SPEC_URI = "urn:llmhub:openai-openapi"


# The schemas /v1 needs, extracted from the same spec by scripts/extract_openai_schemas.py (a test
# keeps them in step with it): used where the shared folder is not beside the checkout.
COMMITTED_SCHEMAS = Path(__file__).resolve().parents[1] / "openai_schemas.json"


def spec_path() -> Path:
    override = os.environ.get("LLMHUB_OPENAI_SPEC")
    if override:
        return Path(override)
    shared = Path(__file__).resolve().parents[2].parent / "shared/specs/openai-openapi.yaml"
    return shared if shared.exists() else COMMITTED_SCHEMAS


def _translate_nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_translate_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    translated = {key: _translate_nullable(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        # Wrapping (instead of adding "null" to `type`) also covers `$ref` and `enum` siblings.
        return {"anyOf": [translated, {"type": "null"}]}
    return translated


@functools.lru_cache(maxsize=4)
def _registry(path: str) -> tuple[Registry, frozenset[str]]:
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as handle:
            spec = {"components": {"schemas": json.load(handle)["schemas"]}}
    else:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        with open(path, encoding="utf-8") as handle:
            spec = yaml.load(handle, Loader=loader)  # noqa: S506 - a SafeLoader, C-accelerated when available
    # Only the components tree is kept: it is all that `#/components/...` references need, and the
    # `paths` tree has non-string keys (status codes) that JSON pointers cannot address anyway.
    components = _translate_nullable(spec.get("components", {}))
    resource = Resource.from_contents({"components": components}, default_specification=DRAFT202012)
    registry = Registry().with_resource(_SPEC_URI, resource)
    return registry, frozenset(components.get("schemas", {}))


@functools.cache
def _validator(path: str, schema_name: str) -> Draft202012Validator:
    registry, names = _registry(path)
    if schema_name not in names:
        raise KeyError(f"schema {schema_name!r} not found in {path}")
    return Draft202012Validator({"$ref": f"{_SPEC_URI}#/components/schemas/{schema_name}"}, registry=registry)


def validate_openai_schema(instance: dict[str, Any], schema_name: str) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``instance`` matches ``components.schemas[schema_name]``."""
    validator = _validator(str(spec_path()), schema_name)
    error = best_match(validator.iter_errors(instance))
    if error is not None:
        raise error
