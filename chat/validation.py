"""Validation of OpenAI chat-completion requests, with OpenAI's wording and the offending ``param``.

Only what we can judge without the provider is checked here: structure, types and documented
ranges. Fields we do not know pass through untouched (the provider may know them).
"""

from __future__ import annotations

import json
import math
from typing import Any

from core.exceptions import ApplicationError
from core.text import has_lone_surrogate, text_quoted

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
CONTENT_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file", "refusal"})
# The content parts each role's message takes, as OpenAI's spec types them (ChatCompletionRequestUserMessageContentPart,
# ...SystemMessageContentPart, ...DeveloperMessage's text parts, ...ToolMessageContentPart,
# ...AssistantMessageContentPart) and OpenAI answers another with its 400: a ``refusal`` is the assistant's alone, an
# attachment the user's. One exception, llmhub's: a tool message's image (a screenshot tool's result), which Claude's
# tool_result takes and the translations that cannot take it refuse naming it (Gemini's, Cohere's:
# ``common.text_parts_only``). The legacy function message's content is a string in the spec: text parts, which were
# taken before, still are, and no other part.
ROLE_CONTENT_PARTS: dict[str, tuple[str, ...]] = {
    "user": ("text", "image_url", "input_audio", "file"),
    "assistant": ("text", "refusal"),
    "system": ("text",),
    "developer": ("text",),
    "tool": ("text", "image_url"),
    "function": ("text",),
}
MAX_MESSAGES = 4096
# Deeper than any real request (a JSON schema in ``response_format`` or a tool's parameters included),
# and far enough below Python's recursion limit that what we accept can still be encoded and forwarded.
MAX_JSON_DEPTH = 64
# Token counts are 32-bit in every provider's API; a bound also keeps the budget's Decimal math finite.
MAX_TOKENS_LIMIT = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TOOL_CHOICE_MODES = frozenset({"none", "auto", "required"})
# The modes of an ``allowed_tools`` choice (chat completions' and the Responses API's alike).
ALLOWED_TOOLS_MODES = frozenset({"auto", "required"})
# Fields sent upstream as they come, each with the JSON type OpenAI requires of it: checked here, since a
# provider refuses one of the wrong type only after the call, or takes it wrongly.
FIELD_TYPES: dict[str, tuple[type, str]] = {
    "stream": (bool, "a boolean"),
    "logprobs": (bool, "a boolean"),
    "parallel_tool_calls": (bool, "a boolean"),
    "user": (str, "a string"),
    "prompt_cache_key": (str, "a string"),
    "prompt_cache_retention": (str, "a string"),
    "safety_identifier": (str, "a string"),
    "service_tier": (str, "a string"),
    "reasoning_effort": (str, "a string"),
    "verbosity": (str, "a string"),
}
# The service tier's values are not listed: OpenAI-compatible servers name their own (Groq's "on_demand"), which the
# server itself refuses or takes; only the type is llmhub's to check. The prompt cache's retention is OpenAI's alone
# (the spec's enum; a provider without one is not sent it).
FIELD_VALUES: dict[str, tuple[str, ...]] = {"prompt_cache_retention": ("in_memory", "24h")}
# A value older clients spell otherwise, as the spec spells it now (``check_field_types`` writes it so): the openai SDKs
# before the rename sent ``in-memory``.
FIELD_RESPELT: dict[str, dict[str, str]] = {"prompt_cache_retention": {"in-memory": "in_memory"}}
# ``prompt_cache_options``' fields and the values the spec lists for each (``PromptCacheOptionsParam``).
PROMPT_CACHE_OPTIONS: dict[str, tuple[str, ...]] = {"ttl": ("30m",), "mode": ("implicit", "explicit")}
INVALID_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
    "HTTP library correctly. This API expects a JSON payload.)"
)


class InvalidRequestError(ApplicationError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class RequestTooLargeError(InvalidRequestError):
    status_code = 413
    code = "request_too_large"


# The content parts that attach a file, an image or a sound (OpenAI's chat completions and Responses API, Anthropic's
# Messages API), by their type, and the field holding its bytes (base64, a data URL) or its address: no text a model
# reads, nor moderation. Only a part of a message's content is one: the same shape inside a tool's schema is text.
_ATTACHMENT_PAYLOADS = {
    "image_url": "image_url",
    "input_audio": "input_audio",
    "file": "file",
    "input_image": "image_url",
    "input_file": "file_data",
    "image": "source",
    "document": "source",
}
# An Anthropic document's source that is text (a plain-text document, or content blocks): read as any text is.
_TEXT_SOURCES = frozenset({"text", "content"})
# The parts whose own ``content`` is a list of parts, attachments among them (a tool's result with an image).
_NESTING_PARTS = frozenset({"tool_result", "mcp_tool_result", "search_result"})


class TextTooLongError(InvalidRequestError):
    """More text than ``LLMHUB_MAX_REQUEST_TEXT_CHARS``: OpenAI's answer to an input longer than a model takes."""

    code = "context_length_exceeded"


def request_text_chars(body: Any) -> int:
    """The characters of text in a request body: every string, keys included, but the bytes or address of an
    attachment in a message's content (``_ATTACHMENT_PAYLOADS``: an image's base64 is no text to read). A sum of
    ``len``s over one walk of the parsed body, without recursion: nothing is copied or read a character at a time."""
    total = 0
    values: list[Any] = []  # counted whole: every string in them
    contents: list[list[Any]] = []  # a message's content parts, where attachments are
    if type(body) is dict:
        for name, value in body.items():
            total += len(name)
            if name not in ("messages", "input") or type(value) is not list:
                values.append(value)
                continue
            for message in value:
                if type(message) is not dict:
                    values.append(message)
                    continue
                for key, item in message.items():
                    total += len(key)
                    (contents if key == "content" and type(item) is list else values).append(item)
    else:
        values.append(body)
    while contents:
        for part in contents.pop():
            if type(part) is not dict:
                values.append(part)
                continue
            kind = part.get("type")
            payload = _ATTACHMENT_PAYLOADS.get(kind) if type(kind) is str else None
            source = part.get("source")
            if payload == "source" and type(source) is dict and source.get("type") in _TEXT_SOURCES:
                payload = None
            for key, item in part.items():
                if key == payload:
                    continue
                total += len(key)
                nested = key == "content" and kind in _NESTING_PARTS and type(item) is list
                (contents if nested else values).append(item)
    while values:
        node = values.pop()
        if type(node) is str:
            total += len(node)
        elif type(node) is list:
            values.extend(node)
        elif type(node) is dict:
            for key, item in node.items():
                total += len(key) if type(key) is str else 0
                values.append(item)
    return total


def check_text_length(body: Any, limit: int) -> None:
    """Refuse a body carrying more than ``limit`` characters of text (``request_text_chars``), before anything reads
    the text (moderation, the token estimate): a 400 ``context_length_exceeded``, as OpenAI answers an input longer
    than the model takes, which clients know to shorten and SDKs do not retry."""
    count = request_text_chars(body)
    if count > limit:
        raise TextTooLongError(
            f"This server accepts requests of at most {limit:,} characters of text (attachments not counted); your "
            f"request has {count:,}. Please reduce the length of the messages.",
            param=None,
        )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_text(raw: bytes) -> str:
    """``raw`` decoded as ``json.loads`` decodes bytes (UTF-8, or UTF-16 or -32 by their first bytes), so that a
    caller can let the bytes go before the JSON is parsed; bytes that do not decode are malformed JSON."""
    try:
        return raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError:
        raise InvalidRequestError(INVALID_JSON_MESSAGE, param=None, code="invalid_json") from None


def json_parse(raw: bytes | str) -> Any:
    """``json.loads`` that fails only with ``InvalidRequestError``: besides malformed JSON, Python's parser
    raises ``RecursionError`` on deep nesting and ``ValueError`` on an integer of more than 4300 digits,
    and it accepts ``NaN`` and ``Infinity``, which JSON does not have."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidRequestError(
            f"Invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels.", param=None, code="invalid_json"
        ) from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError and the integer-digits limit among them
        raise InvalidRequestError(INVALID_JSON_MESSAGE, param=None, code="invalid_json") from None


def _fail(message: str, param: str | None, code: str = "invalid_value") -> None:
    raise InvalidRequestError(message, param=param, code=code)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_scalar(value: Any, param: str) -> None:
    if type(value) is str:
        if has_lone_surrogate(value):
            _fail(f"Invalid '{param}': the text contains a lone UTF-16 surrogate (not valid Unicode).", param)
    elif value is None or type(value) is bool:
        return
    elif type(value) is int:
        if not INT64_MIN <= value <= INT64_MAX:
            _fail(f"Invalid '{param}': an integer outside the 64-bit range.", param)
    elif type(value) is float:
        if not math.isfinite(value):
            _fail(f"Invalid '{param}': numbers must be finite.", param)
    else:
        _fail(f"Invalid type for '{param}': not a JSON value.", param, "invalid_type")


def _check_json_values(body: dict[str, Any]) -> None:
    """Every value, down to the leaves: nesting at most ``MAX_JSON_DEPTH`` deep, strings UTF-8 can encode,
    integers within 64 bits and finite numbers, so that what we accept can be forwarded and recorded.
    One pass over the parsed body, without recursion, that stacks containers only (this runs on every
    request: a few microseconds for a four-message chat); the error names the top-level field."""
    for name, value in body.items():
        if type(name) is not str or has_lone_surrogate(name):
            _fail("Invalid parameter name: it contains a lone UTF-16 surrogate.", "")
        if type(value) is not dict and type(value) is not list:
            _check_scalar(value, name)
            continue
        stack: list[tuple[Any, int]] = [(value, 1)]
        while stack:
            node, depth = stack.pop()
            if depth > MAX_JSON_DEPTH:
                _fail(f"Invalid '{name}': nested deeper than {MAX_JSON_DEPTH} levels.", name)
            if type(node) is dict:
                for key in node:
                    if type(key) is not str or has_lone_surrogate(key):
                        _fail(f"Invalid '{name}': a key contains a lone UTF-16 surrogate.", name)
                items = node.values()
            else:
                items = node
            for item in items:
                if type(item) is dict or type(item) is list:
                    stack.append((item, depth + 1))
                elif type(item) is not str or not item.isascii():
                    _check_scalar(item, name)


def _check_range(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value):
        _fail(f"Invalid type for '{name}': expected a number.", name, "invalid_type")
    if not low <= value <= high:
        _fail(f"Invalid '{name}': {value} is not between {low:g} and {high:g}.", name)


def check_logit_bias(body: dict[str, Any]) -> None:
    """``logit_bias`` as OpenAI checks it (chat and text completions alike): an object mapping token ids (decimal
    strings) to a bias from -100 to 100. Sent upstream as it comes, a wrong one was OpenAI's 400 after the call, or a
    bias a compatible server took wrongly."""
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        _fail("Invalid type for 'logit_bias': expected an object of token ids to biases.", "logit_bias", "invalid_type")
    for token, value in bias.items():
        if not token.isdecimal() or not token.isascii():
            _fail(f"Invalid key in 'logit_bias': {token!r} is not a token id.", "logit_bias")
        if not _is_number(value):
            _fail(f"Invalid type for 'logit_bias' of token {token}: expected a number.", "logit_bias", "invalid_type")
        if not -100 <= value <= 100:
            _fail(
                f"Invalid value for 'logit_bias' of token {token}: {value} is not between -100 and 100.", "logit_bias"
            )


def check_field_types(body: dict[str, Any], names: Any = FIELD_TYPES) -> None:
    """The fields of ``FIELD_TYPES`` among ``names`` that ``body`` gives (not null): of their type, and of their
    values where ``FIELD_VALUES`` lists them (``invalid_type``, ``invalid_value``); a value of ``FIELD_RESPELT`` is
    written in ``body`` as the spec spells it."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        kind, spelled = FIELD_TYPES[name]
        if not isinstance(value, kind):
            _fail(f"Invalid type for '{name}': expected {spelled}.", name, "invalid_type")
        if value in FIELD_RESPELT.get(name, {}):
            value = body[name] = FIELD_RESPELT[name][value]
        allowed = FIELD_VALUES.get(name)
        if allowed is not None and value not in allowed:
            _fail(f"Invalid value for '{name}': expected one of {', '.join(map(repr, allowed))}.", name)


def check_prompt_cache_options(body: dict[str, Any]) -> None:
    """``prompt_cache_options``, when given (not null), as the spec types it: an object of ``PROMPT_CACHE_OPTIONS``'
    fields, each a string of its values (a 400 naming ``prompt_cache_options.<field>``)."""
    options = body.get("prompt_cache_options")
    if options is None:
        return
    if not isinstance(options, dict):
        _fail("Invalid type for 'prompt_cache_options': expected an object.", "prompt_cache_options", "invalid_type")
    for name, value in options.items():
        where = f"prompt_cache_options.{text_quoted(name)}"
        allowed = PROMPT_CACHE_OPTIONS.get(name)
        if allowed is None:
            _fail(f"Unknown parameter: '{where}'.", where, "unknown_parameter")
        if value is None:
            continue
        if not isinstance(value, str):
            _fail(f"Invalid type for '{where}': expected a string.", where, "invalid_type")
        if value not in allowed:
            _fail(f"Invalid value for '{where}': expected one of {', '.join(map(repr, allowed))}.", where)


def check_cache_breakpoint(part: dict[str, Any], where: str) -> None:
    """A content part's ``prompt_cache_breakpoint``, when given (not null), as the spec types it
    (``PromptCacheBreakpointParam``): ``{"mode": "explicit"}``, else a 400 naming ``<where>.prompt_cache_breakpoint``
    (``.mode``, ``.<field>`` for another field)."""
    marked = part.get("prompt_cache_breakpoint")
    if marked is None:
        return
    param = f"{where}.prompt_cache_breakpoint"
    if not isinstance(marked, dict):
        _fail(f"Invalid type for '{param}': expected an object.", param, "invalid_type")
    for name in marked:
        if name != "mode":
            _fail(
                f"Unknown parameter: '{param}.{text_quoted(name)}'.",
                f"{param}.{text_quoted(name)}",
                "unknown_parameter",
            )
    if "mode" not in marked:
        _fail(f"Missing required parameter: '{param}.mode'.", f"{param}.mode", "missing_required_parameter")
    if marked["mode"] != "explicit":
        _fail(f"Invalid value for '{param}.mode': expected 'explicit'.", f"{param}.mode")


def _check_content(content: Any, index: int, role: str, message: dict[str, Any]) -> None:
    param = f"messages[{index}].content"
    if content is None:
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            return
        _fail(f"Invalid value for '{param}': expected a string or an array of content parts.", param)
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not content:
        _fail(
            f"Invalid type for '{param}': expected a string or a non-empty array of content parts.",
            param,
            "invalid_type",
        )
    taken = ROLE_CONTENT_PARTS[role]
    for part_index, part in enumerate(content):
        part_param = f"{param}[{part_index}]"
        part_type = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part_type, str) or part_type not in CONTENT_PART_TYPES:
            _fail(f"Invalid content part at '{part_param}': expected an object with a known 'type'.", part_param)
        if part_type not in taken:
            _fail(
                f"Invalid value for '{part_param}.type': a message of role '{role}' takes content parts of type "
                f"{', '.join(map(repr, taken))} only, not {part_type!r}.",
                f"{part_param}.type",
            )
        check_cache_breakpoint(part, part_param)
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            _fail(
                f"Missing required parameter: '{part_param}.text'.", f"{part_param}.text", "missing_required_parameter"
            )
        if part["type"] == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str) or not url:
                _fail(
                    f"Missing required parameter: '{part_param}.image_url.url'.",
                    f"{part_param}.image_url.url",
                    "missing_required_parameter",
                )


def _check_messages(messages: Any) -> None:
    if messages is None:
        _fail("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        _fail("Invalid type for 'messages': expected an array of objects.", "messages", "invalid_type")
    if not messages:
        _fail("Invalid 'messages': empty array. Expected an array with minimum length 1.", "messages", "empty_array")
    if len(messages) > MAX_MESSAGES:
        _fail(f"Invalid 'messages': at most {MAX_MESSAGES} messages are accepted.", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            _fail(f"Invalid type for 'messages[{index}]': expected an object.", f"messages[{index}]", "invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            _fail(
                f"Invalid value for 'messages[{index}].role': expected one of {', '.join(sorted(ROLES))}.",
                f"messages[{index}].role",
            )
        _check_content(message.get("content"), index, role, message)
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            _fail(
                f"Missing required parameter: 'messages[{index}].tool_call_id'.",
                f"messages[{index}].tool_call_id",
                "missing_required_parameter",
            )
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant" or not isinstance(tool_calls, list):
                _fail(f"Invalid 'messages[{index}].tool_calls'.", f"messages[{index}].tool_calls")
            for call_index, call in enumerate(tool_calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(call, dict) or not isinstance(call.get("id"), str) or not isinstance(function, dict):
                    _fail(
                        f"Invalid 'messages[{index}].tool_calls[{call_index}]'.",
                        f"messages[{index}].tool_calls[{call_index}]",
                    )


def _check_tools(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        _fail("Invalid type for 'tools': expected an array of objects.", "tools", "invalid_type")
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") not in ("function", "custom"):
            _fail(f"Invalid value for 'tools[{index}].type': expected 'function' or 'custom'.", f"tools[{index}].type")
        if tool["type"] == "function":
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
                _fail(
                    f"Missing required parameter: 'tools[{index}].function.name'.",
                    f"tools[{index}].function.name",
                    "missing_required_parameter",
                )
            if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
                _fail(
                    f"Invalid type for 'tools[{index}].function.parameters': expected a JSON schema object.",
                    f"tools[{index}].function.parameters",
                    "invalid_type",
                )


def _check_functions(body: dict[str, Any]) -> None:
    """The legacy ``functions``: each an object with a name and, when given, a JSON schema object as parameters."""
    functions = body.get("functions")
    if functions is None:
        return
    if not isinstance(functions, list):
        _fail("Invalid type for 'functions': expected an array of objects.", "functions", "invalid_type")
    for index, function in enumerate(functions):
        where = f"functions[{index}]"
        if not isinstance(function, dict):
            _fail(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
        name = function.get("name")
        if name is None:
            _fail(f"Missing required parameter: '{where}.name'.", f"{where}.name", "missing_required_parameter")
        if not isinstance(name, str) or not name:
            _fail(f"Invalid type for '{where}.name': expected a non-empty string.", f"{where}.name", "invalid_type")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            _fail(
                f"Invalid type for '{where}.parameters': expected a JSON schema object.",
                f"{where}.parameters",
                "invalid_type",
            )


def _check_tool_choice(body: dict[str, Any]) -> None:
    """OpenAI refuses a ``tool_choice`` that asks for tools when there are none; ``"none"`` asks for
    nothing, so it is accepted either way (it is the default without tools)."""
    choice = body.get("tool_choice")
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in TOOL_CHOICE_MODES:
            _fail("Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or an object.", "tool_choice")
        if choice == "none":
            return
    elif isinstance(choice, dict):
        kind = choice.get("type")
        named = choice.get(kind) if isinstance(kind, str) and kind in ("function", "custom") else None
        if kind == "allowed_tools":
            if not isinstance(choice.get("allowed_tools"), dict):
                _fail("Invalid 'tool_choice.allowed_tools': expected an object.", "tool_choice")
        elif not isinstance(named, dict) or not isinstance(named.get("name"), str) or not named["name"]:
            expected = _CHOICE_SHAPES.get(kind) or (
                f"'none', 'auto', 'required', {_CHOICE_SHAPES['function']}, {_CHOICE_SHAPES['custom']} or "
                '{"type": "allowed_tools", "allowed_tools": {...}}'
            )
            _fail(f"Invalid value for 'tool_choice': expected {expected}.", "tool_choice")
    else:
        _fail("Invalid type for 'tool_choice': expected a string or an object.", "tool_choice", "invalid_type")
    if not body.get("tools"):
        _fail(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.", "tool_choice"
        )
    if isinstance(choice, dict) and kind in ("function", "custom"):
        _check_tool_named(body, kind, named["name"], "tool_choice")
    if isinstance(choice, dict) and kind == "allowed_tools":
        _check_allowed_tools(body, choice["allowed_tools"])


def _check_allowed_tools(body: dict[str, Any], allowed: dict[str, Any]) -> None:
    """``tool_choice: {"type": "allowed_tools", "allowed_tools": {"mode", "tools"}}``: a mode of ``auto`` or
    ``required``, and tools each naming a function or custom tool among ``tools`` (as OpenAI's tool choice names
    one). Checked here because most upstreams cannot take it, and the adapters send those only the tools it allows
    (``providers.adapters.common.allowed_tools_narrowed``), which needs each one to be there."""
    where = "tool_choice.allowed_tools"
    if not isinstance(allowed.get("mode"), str) or allowed["mode"] not in ALLOWED_TOOLS_MODES:
        _fail(f"Invalid value for '{where}.mode': expected 'auto' or 'required'.", f"{where}.mode")
    listed = allowed.get("tools")
    if not isinstance(listed, list) or not listed:
        _fail(
            f"Invalid value for '{where}.tools': expected a non-empty array of the tools the model may call.",
            f"{where}.tools",
        )
    for index, entry in enumerate(listed):
        param = f"{where}.tools[{index}]"
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind not in ("function", "custom"):
            _fail(
                f"Invalid value for '{param}': expected "
                '{"type": "function", "function": {"name": ...}} or {"type": "custom", "custom": {"name": ...}}.',
                param,
            )
        named = entry.get(kind)
        name = named.get("name") if isinstance(named, dict) else None
        if not isinstance(name, str) or not name:
            _fail(
                f"Missing required parameter: '{param}.{kind}.name'.",
                f"{param}.{kind}.name",
                "missing_required_parameter",
            )
        _check_tool_named(body, kind, name, param)


# How a tool choice (or an allowed tool) names a tool of each kind, as OpenAI's spec has it.
_CHOICE_SHAPES = {
    "function": '{"type": "function", "function": {"name": ...}}',
    "custom": '{"type": "custom", "custom": {"name": ...}}',
}
_KIND_WORDS = {"function": "function", "custom": "custom tool"}


def _check_tool_named(body: dict[str, Any], kind: str, name: str, param: str) -> None:
    """``param`` names a tool of ``kind`` among ``tools``; one of the other kind of that name is named to the client
    with the choice that takes it, as a custom tool chosen as a function (or the reverse) is the likelier mistake."""
    if name in _tool_names(body, kind):
        return
    other = "custom" if kind == "function" else "function"
    if name in _tool_names(body, other):
        chosen = json.dumps({"type": other, other: {"name": name}})
        _fail(
            f"Invalid value for '{param}': {name!r} is a {_KIND_WORDS[other]} among 'tools': choose it with {chosen}.",
            param,
        )
    _fail(f"Invalid value for '{param}': no {_KIND_WORDS[kind]} named {name!r} is among 'tools'.", param)


def _tool_names(body: dict[str, Any], kind: str) -> set[str]:
    """The names of the request's tools of ``kind`` (``function`` or ``custom``), each under its own key."""
    return {
        tool[kind]["name"]
        for tool in body["tools"]
        if isinstance(tool, dict) and tool.get("type") == kind and isinstance(tool.get(kind), dict)
    }


def check_body_and_model(body: Any) -> None:
    """What every OpenAI-shaped request body is checked for first (chat completions, embeddings): a JSON
    object naming a usable model, whose values are all ones llmhub can store and forward."""
    if not isinstance(body, dict):
        _fail("The request body must be a JSON object.", None, "invalid_type")
    model = body.get("model")
    if model is None:
        _fail("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model.strip():
        _fail("Invalid type for 'model': expected a non-empty string.", "model", "invalid_type")
    if "\x00" in model or has_lone_surrogate(model):
        _fail("Invalid 'model': not a model name.", "model")
    _check_json_values(body)


def validate_chat_request(body: Any) -> None:
    """Raise ``InvalidRequestError`` (400) naming the first offending parameter."""
    check_body_and_model(body)
    _check_messages(body.get("messages"))
    _check_range(body, "temperature", 0, 2)
    _check_range(body, "top_p", 0, 1)
    _check_range(body, "presence_penalty", -2, 2)
    _check_range(body, "frequency_penalty", -2, 2)
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (not _is_int(value) or not 1 <= value <= MAX_TOKENS_LIMIT):
            _fail(f"Invalid '{name}': expected an integer between 1 and {MAX_TOKENS_LIMIT}.", name)
    n = body.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= 128):
        _fail("Invalid 'n': expected an integer between 1 and 128.", "n")
    check_field_types(body)
    check_prompt_cache_options(body)
    stream = body.get("stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            _fail("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
        if not isinstance(options, dict):
            _fail("Invalid type for 'stream_options': expected an object.", "stream_options", "invalid_type")
        if options.get("include_usage") is not None and not isinstance(options["include_usage"], bool):
            _fail(
                "Invalid type for 'stream_options.include_usage': expected a boolean.",
                "stream_options.include_usage",
                "invalid_type",
            )
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop))
    ):
        _fail("Invalid 'stop': expected a string or an array of at most 4 strings.", "stop")
    logprobs = body.get("logprobs")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None:
        if not _is_int(top_logprobs) or not 0 <= top_logprobs <= 20:
            _fail("Invalid 'top_logprobs': expected an integer between 0 and 20.", "top_logprobs")
        if not logprobs:
            _fail("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        _fail("Invalid type for 'seed': expected an integer.", "seed", "invalid_type")
    check_logit_bias(body)
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict)
        or response_format.get("type") not in ("text", "json_object", "json_schema")
    ):
        _fail("Invalid 'response_format': expected type 'text', 'json_object' or 'json_schema'.", "response_format")
    _check_tools(body)
    _check_functions(body)
    _check_tool_choice(body)
