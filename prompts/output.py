"""What a template's reply is checked against: its JSON found (``output_parse``), held to the version's JSON
schema (Draft 2020-12, ``jsonschema``), and each text field measured against its character limit and the
brand's words to avoid (``output_check``); ``repair_prompt`` is the message that asks the model to try again.

Lengths are counted in Unicode code points (``len``), which is what most platforms count; X weighs some
characters (CJK, most emoji) double and every link as 23, so a post near X's limit is best checked there too."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from .exceptions import OutputParseError

if TYPE_CHECKING:
    from .models import BrandProfile, PromptVersion

# A fenced block: ``` or ```json (any info string), up to the closing fence.
_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\r?\n?(.*?)```", re.DOTALL)
# How many opening brackets in prose are tried before giving up (a long reply of prose is not scanned forever).
_MAX_STARTS = 2000

_decoder = json.JSONDecoder()


def _first_error(text: str) -> json.JSONDecodeError | None:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc
    return None


def output_parse(text: str) -> Any:
    """The JSON of a model's reply: the whole reply, else the first fenced block (```json … ```) that parses,
    else the first balanced object or array embedded in prose that parses. None of them: ``OutputParseError``
    saying what was wrong."""
    if not isinstance(text, str) or not text.strip():
        raise OutputParseError("The reply is empty: expected JSON.")
    stripped = text.strip()
    whole_error = _first_error(stripped)
    if whole_error is None:
        return json.loads(stripped)
    fence_error: json.JSONDecodeError | None = None
    for match in _FENCE.finditer(text):
        block = match.group(1).strip()
        error = _first_error(block)
        if error is None:
            return json.loads(block)
        fence_error = fence_error or error
    starts = [m.start() for m in re.finditer(r"[\[{]", text)][:_MAX_STARTS]
    embedded_error: json.JSONDecodeError | None = None
    for start in starts:
        try:
            value, _ = _decoder.raw_decode(text, start)
        except json.JSONDecodeError as exc:
            embedded_error = embedded_error or exc
            continue
        if isinstance(value, dict | list):
            return value
    if not starts:
        raise OutputParseError("The reply holds no JSON: it is prose only, with no object or array in it.")
    error = fence_error or embedded_error or whole_error
    raise OutputParseError(
        f"The reply's JSON does not parse: {error.msg} at line {error.lineno} column {error.colno}"
        f"{' of its code block' if fence_error else ''}."
    )


@dataclass(frozen=True, slots=True)
class FieldCheck:
    """One text field of the output: its dotted path (``headlines[2]``, ``features[0].title``), its length in
    characters, its limit (None: none applies), and what is wrong with it."""

    field: str
    length: int
    limit: int | None
    ok: bool
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class OutputReport:
    """``valid``: the output satisfies the version's JSON schema (``errors`` says where not). ``checks``: every
    text field measured; ``ok`` is valid with no field over its limit and no word the brand avoids."""

    valid: bool
    errors: list[str] = field(default_factory=list)
    checks: list[FieldCheck] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [f"{check.field}: {problem}" for check in self.checks for problem in check.problems]

    @property
    def ok(self) -> bool:
        return self.valid and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "ok": self.ok,
            "errors": list(self.errors),
            "checks": [asdict(check) for check in self.checks],
        }


# LIMITS


def schema_limits(schema: Any, prefix: str = "") -> dict[str, int]:
    """``{path: maxLength}`` for every string the schema bounds: object properties joined with ``.``, array
    items with ``[]`` (``features[].title``); ``$ref`` and combinators are not followed."""
    limits: dict[str, int] = {}
    if not isinstance(schema, dict):
        return limits
    max_length = schema.get("maxLength")
    if isinstance(max_length, int) and not isinstance(max_length, bool) and prefix:
        limits[prefix] = max_length
    for name, sub in (schema.get("properties") or {}).items() if isinstance(schema.get("properties"), dict) else []:
        limits.update(schema_limits(sub, f"{prefix}.{name}" if prefix else name))
    items = schema.get("items")
    if isinstance(items, dict):
        limits.update(schema_limits(items, f"{prefix}[]"))
    return limits


def limits_for(version: PromptVersion) -> dict[str, int]:
    """The version's character limits: its ``field_limits`` and its schema's ``maxLength``, the stricter
    where both name a field."""
    limits = schema_limits(version.output_schema)
    for path, limit in (version.field_limits or {}).items():
        limits[path] = min(limit, limits[path]) if path in limits else limit
    return limits


def _strings(data: Any, path: str = "", pattern: str = "") -> Iterator[tuple[str, str, str]]:
    """(concrete path, pattern, text) for every string in the output."""
    if isinstance(data, str):
        yield path or "$", pattern or "$", data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _strings(
                value, f"{path}.{key}" if path else str(key), f"{pattern}.{key}" if pattern else str(key)
            )
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _strings(value, f"{path}[{index}]", f"{pattern}[]")


def _limit(limits: dict[str, int], pattern: str) -> int | None:
    if pattern in limits:
        return limits[pattern]
    # A limit on a list of strings applies to each of them ("headlines": 30 is "headlines[]": 30).
    if pattern.endswith("[]") and pattern[:-2] in limits:
        return limits[pattern[:-2]]
    return None


@lru_cache(maxsize=512)
def _word_pattern(word: str) -> re.Pattern[str]:
    # Word boundaries that also hold next to punctuation and for phrases ("best-in-class", "game changer").
    return re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", re.IGNORECASE)


def words_avoided(text: str, words: list[str]) -> list[str]:
    """The brand's words to avoid that ``text`` uses (case-insensitive, whole words or phrases only)."""
    return [
        word.strip() for word in words if isinstance(word, str) and word.strip() and _word_pattern(word).search(text)
    ]


# CHECKS


def schema_errors(schema: dict[str, Any] | None, data: Any) -> list[str]:
    """The schema's complaints about ``data``, each with the JSON path it concerns (``$.headlines[2]: ...``)."""
    if not schema:
        return []
    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [f"{error.json_path}: {_short(error.message)}" for error in errors]


def _short(text: str) -> str:
    return text if len(text) <= 300 else text[:297] + "..."


def schema_problem(schema: Any) -> str | None:
    """Why ``schema`` is not a valid Draft 2020-12 JSON schema, or None."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return f"{exc.json_path}: {_short(exc.message)}"
    return None


def output_check(version: PromptVersion, data: Any, *, brand: BrandProfile | None) -> OutputReport:
    """The parsed output held to ``version``: schema errors, and per text field its length against its limit
    and the brand's words to avoid."""
    errors = schema_errors(version.output_schema, data)
    limits = limits_for(version)
    avoid = list(brand.words_to_avoid or []) if brand is not None else []
    checks: list[FieldCheck] = []
    for path, pattern, text in _strings(data):
        length = len(text)
        limit = _limit(limits, pattern)
        problems: list[str] = []
        if limit is not None and length > limit:
            problems.append(f"over its limit of {limit} characters by {length - limit}")
        problems.extend(f"uses '{word}', which the brand avoids" for word in words_avoided(text, avoid))
        checks.append(FieldCheck(field=path, length=length, limit=limit, ok=not problems, problems=problems))
    return OutputReport(valid=not errors, errors=errors, checks=checks)


def repair_prompt(report_or_error: OutputReport | OutputParseError) -> str:
    """The user message that asks the model to answer again: what was wrong, quoted, and JSON only."""
    if isinstance(report_or_error, OutputParseError):
        lines = [f"Your reply could not be read as JSON. {report_or_error.message}"]
    else:
        found = [*report_or_error.errors, *report_or_error.problems]
        lines = ["Your reply does not satisfy the required output. These problems were found:"]
        lines.extend(f"- {problem}" for problem in found)
    lines.append(
        "Answer again with the corrected JSON only: no explanation, no code fences, nothing before or after it. "
        "Keep every field within its character limit and keep everything that was already right."
    )
    return "\n".join(lines)
