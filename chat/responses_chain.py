"""Stored responses of ``/v1/responses`` as items: what is kept of a request's input, and how a request's
``previous_response_id`` continues a stored one.

Pure functions, no database: ``chat.services_responses`` writes and ``chat.selectors`` reads. The input is kept as
the spec's ``ItemResource``s (each with an ``id`` and, where the spec wants one, a ``status``), which is what
``GET /v1/responses/{id}/input_items`` lists and what ``chat.translate_responses`` reads back when a later request
chains on it: a stored response's input items, then its output items, come before the new ``input`` (its
``instructions`` are not carried over, as OpenAI does). A response is kept with only the items its request gave,
and a reference to the one it continued (``StoredResponse.previous``): the chain is read back whole by
``chat.selectors.stored_response_input``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "local_shell_call": "lsh",
    "reasoning": "rs",
}


def _item_id(kind: str) -> str:
    return f"{_PREFIXES.get(kind, 'item')}_{uuid.uuid4().hex}"


def _parts(content: Any, kind: str) -> Any:
    """A message's content as a list of parts (a string is one ``input_text`` or ``output_text``)."""
    if isinstance(content, str):
        content = [{"type": kind, "text": content}]
    parts = []
    for part in content:
        part = dict(part)
        if part.get("type") == "output_text":
            part.setdefault("annotations", [])
            part.setdefault("logprobs", [])
        elif part.get("type") == "input_image":
            part.setdefault("detail", "auto")
        parts.append(part)
    return parts


def input_item_resource(item: dict[str, Any]) -> dict[str, Any]:
    """One input item (a valid one: the request was translated) as the spec's ``ItemResource``. An item that has
    its ``id`` keeps it, so a chain's items keep theirs from one response to the next."""
    item = dict(item)
    kind = item.setdefault("type", "message")
    if kind == "local_shell_call_output":
        item.setdefault("call_id", item["id"])  # the spec names the call by its `id`, and requires `call_id` too
    if item.get("id") is None:  # none given, or a null (a client's model dumped whole)
        item["id"] = _item_id(kind)
    if kind == "message":
        assistant = item.get("role") == "assistant"
        item["content"] = _parts(item.get("content"), "output_text" if assistant else "input_text")
        item.setdefault("status", "completed")
    elif kind == "reasoning":
        item.setdefault("summary", [])
    else:
        item.setdefault("status", "completed")
    return item


def input_items(value: Any) -> list[dict[str, Any]]:
    """A request's ``input`` (a string or items) as the items it is kept as."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    return [input_item_resource(item) for item in value]


@dataclass(frozen=True, slots=True)
class Chain:
    """A request continuing a stored response: ``body`` with the stored items before its ``input``."""

    body: dict[str, Any]
    history: int  # how many of ``body["input"]`` are the stored response's
    previous: int | None = None  # the stored response's primary key, which the new one refers to when kept
    length: int = 0  # how many responses the stored one's chain by reference holds, itself included

    @property
    def given(self) -> list[dict[str, Any]]:
        """The items the client sent (after the stored ones): what the new response keeps of its own."""
        return self.body["input"][self.history :]

    def field_named(self, given: str) -> str:
        """A field of the chained ``input`` (``input[3].content``) as the client knows it: a stored item is the
        ``previous_response_id``'s, the client's own keep their place in the ``input`` it sent."""
        if not given.startswith("input["):
            return given
        index, rest = given[len("input[") :].split("]", 1)
        if int(index) < self.history:
            return "previous_response_id"
        return f"input[{int(index) - self.history}]{rest}"

    def fields_named(self, fields: dict[str, str]) -> dict[str, str]:
        """The client's names of the translated request's fields (``chat.translate_responses``)."""
        return {field: self.field_named(given) for field, given in fields.items()}


def chain(
    body: dict[str, Any],
    *,
    input_items: list[dict[str, Any]],
    output_items: list[dict[str, Any]],
    previous: int | None = None,
    length: int = 0,
) -> Chain:
    """``body`` continuing a stored response whose (whole) input and output items are these; ``previous`` its
    primary key and ``length`` how many responses its chain by reference holds. An ``input`` that is missing or
    malformed is left as it is, for the translation to refuse it by its name."""
    given = body.get("input")
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        return Chain(body=body, history=0, previous=previous, length=length)
    history = [*input_items, *output_items]
    return Chain(body={**body, "input": [*history, *given]}, history=len(history), previous=previous, length=length)
