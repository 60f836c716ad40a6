"""Copy the component schemas llmhub's OpenAI-compatible endpoints document out of OpenAI's spec.

OpenAI's published OpenAPI document is ~3 MB and not deployed with llmhub, so the few schemas our
``/v1/*`` paths reference (and everything they ``$ref``, transitively) are extracted once into
``llmhub/openai_schemas.json``, which is committed and read by ``llmhub.schema`` at schema time.

Run it again after updating the spec:

    .venv/bin/python scripts/extract_openai_schemas.py [--spec PATH] [--out PATH] [--check]

``--check`` writes nothing and exits 1 when the committed file differs from a fresh extraction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "llmhub" / "openai_schemas.json"
ROOTS = (
    "CreateChatCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ListModelsResponse",
    "CreateEmbeddingRequest",
    "CreateEmbeddingResponse",
    "ErrorResponse",
    # /v1/responses: the answer and every stream event (``ResponseStreamEvent`` names them all).
    "Response",
    "ResponseStreamEvent",
    # Its stored responses' input items (GET /v1/responses/{id}/input_items).
    "ResponseItemList",
    # /v1/completions (legacy text completions and fill-in-the-middle): a stream's chunks are the same object.
    "CreateCompletionRequest",
    "CreateCompletionResponse",
)
_REF_PREFIX = "#/components/schemas/"
# Documentation examples for OpenAI's own site: a large share of the file and of no use to our docs.
_DROPPED_KEYS = frozenset({"x-oaiMeta"})


def default_spec_path() -> Path:
    return Path(os.environ.get("LLMHUB_OPENAI_SPEC") or REPO.parent / "shared" / "specs" / "openai-openapi.yaml")


def _refs(node: Any) -> set[str]:
    if isinstance(node, list):
        return set().union(*map(_refs, node))
    if not isinstance(node, dict):
        return set()
    ref = node.get("$ref")
    if ref is not None and not str(ref).startswith(_REF_PREFIX):
        raise ValueError(f"cannot follow $ref {ref!r}: only {_REF_PREFIX}* is copied")
    own = {ref.removeprefix(_REF_PREFIX)} if ref is not None else set()
    return own.union(*map(_refs, node.values()))


def _clean(node: Any) -> Any:
    """Drop doc-only keys and turn 3.0-style ``nullable: true`` (which the 3.1 dialect ignores) into
    ``anyOf [..., null]``, so that a 3.1 validator or code generator reads ``null`` as allowed."""
    if isinstance(node, list):
        return [_clean(item) for item in node]
    if not isinstance(node, dict):
        return node
    cleaned = {key: _clean(value) for key, value in node.items() if key not in _DROPPED_KEYS and key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [cleaned, {"type": "null"}]}
    return cleaned


def extract(spec: dict[str, Any], roots: tuple[str, ...] = ROOTS) -> dict[str, Any]:
    available = spec.get("components", {}).get("schemas", {})
    wanted: dict[str, Any] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in wanted:
            continue
        if name not in available:
            raise KeyError(f"schema {name!r} is referenced but not defined in the spec")
        wanted[name] = _clean(available[name])
        pending.extend(sorted(_refs(wanted[name]) - wanted.keys()))
    return {
        "source": {"title": spec["info"]["title"], "version": spec["info"]["version"], "roots": list(roots)},
        "schemas": dict(sorted(wanted.items())),
    }


def render(spec_path: Path) -> str:
    with spec_path.open(encoding="utf-8") as handle:
        spec = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - a SafeLoader
    return json.dumps(extract(spec), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=default_spec_path(), help="OpenAI's openapi.yaml")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="fail if --out is not up to date; write nothing")
    args = parser.parse_args(argv)

    text = render(args.spec)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run scripts/extract_openai_schemas.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(json.loads(text)['schemas'])} schemas to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
