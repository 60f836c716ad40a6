"""Validation of Anthropic Messages requests (``/v1/messages``), in Anthropic's wording (``field: problem``).

As for chat completions (``chat.validation``), only what can be judged without the provider is checked:
structure, types, documented ranges and Anthropic's rules on empty content (a message without content, but a
final assistant prefill, and a message's empty text block, a tool_result's too, are refused, whatever protocol the
model speaks; so are a system block that is not text or is empty, and the tool rules below); unknown fields and a
message's block types pass (an Anthropic-protocol provider may know them, and the translation for other providers
refuses what it cannot express).
"""

from __future__ import annotations

from typing import Any

from core.text import has_lone_surrogate
from providers.adapters.translate_anthropic import FORCED_TOOL_CHOICES, STANDARD_ONLY, THINKING_ON

from .validation import MAX_MESSAGES, MAX_TOKENS_LIMIT, InvalidRequestError, _check_json_values, _is_int, _is_number

ROLES = ("user", "assistant")
TOOL_CHOICE_TYPES = ("auto", "any", "tool", "none")
# Anthropic's service tiers (its 400 for another value): judged for any model, as a translated one had another
# dropped without a word and served at its project's default tier.
SERVICE_TIERS = ("auto", STANDARD_ONLY)


def _fail(message: str, param: str | None, code: str = "invalid_value") -> None:
    raise InvalidRequestError(f"{param}: {message}" if param else message, param=param or None, code=code)


def _check_blocks(content: Any, param: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        _fail("Input should be a valid string or a list of content blocks", param, "invalid_type")
    for index, block in enumerate(content):
        where = f"{param}.{index}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            _fail("Input should be an object with a `type`", where, "invalid_type")
        kind = block["type"]
        if kind == "text" and not isinstance(block.get("text"), str):
            _fail("Field required", f"{where}.text", "missing_required_parameter")
        elif kind == "image":
            _check_source(block.get("source"), f"{where}.source")
        elif kind == "tool_use":
            if not (isinstance(block.get("id"), str) and isinstance(block.get("name"), str)):
                _fail("A tool_use block needs an `id` and a `name`", where)
            if "input" not in block:
                _fail("Field required", f"{where}.input", "missing_required_parameter")
            if not isinstance(block["input"], dict):
                # The call's arguments: a translated model would be sent arguments that are no object.
                _fail("Input should be a valid dictionary", f"{where}.input", "invalid_type")
        elif kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                _fail("Field required", f"{where}.tool_use_id", "missing_required_parameter")
            if block.get("is_error") is not None and not isinstance(block["is_error"], bool):
                # A translated model would read any truthy value (even "false") as a failed call.
                _fail("Input should be a valid boolean", f"{where}.is_error", "invalid_type")
            if block.get("content") is not None:
                _check_blocks(block["content"], f"{where}.content")


# The fields each documented image source needs; other source types (``file``) pass to the provider.
_SOURCE_FIELDS = {"base64": ("media_type", "data"), "url": ("url",)}


def _check_source(source: Any, param: str) -> None:
    if not isinstance(source, dict):
        _fail("Field required", param, "missing_required_parameter")
    for name in _SOURCE_FIELDS.get(source.get("type"), ()):
        if not isinstance(source.get(name), str) or not source[name]:
            _fail("Field required", f"{param}.{name}", "missing_required_parameter")


def validate_messages_request(body: Any) -> None:
    """Raise ``InvalidRequestError`` (400) naming the first offending field."""
    if not isinstance(body, dict):
        _fail("The request body must be a JSON object.", None, "invalid_type")
    model = body.get("model")
    if model is None:
        _fail("Field required", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model.strip() or "\x00" in model or has_lone_surrogate(model):
        _fail("Input should be a non-empty model name", "model", "invalid_type")
    _check_json_values(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        _fail("Field required", "max_tokens", "missing_required_parameter")
    if not _is_int(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        _fail(f"Input should be an integer between 1 and {MAX_TOKENS_LIMIT}", "max_tokens")
    messages = body.get("messages")
    if messages is None:
        _fail("Field required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        _fail("Input should be a non-empty list", "messages", "invalid_type")
    if len(messages) > MAX_MESSAGES:
        _fail(f"At most {MAX_MESSAGES} messages are accepted", "messages")
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            _fail("Input should be an object", where, "invalid_type")
        if message.get("role") not in ROLES:
            _fail("Input should be 'user' or 'assistant'", f"{where}.role")
        if "content" not in message:
            _fail("Field required", f"{where}.content", "missing_required_parameter")
        content = message["content"]
        _check_blocks(content, f"{where}.content")
        if content in ("", []) and not (index == len(messages) - 1 and message["role"] == "assistant"):
            _fail("all messages must have non-empty content except for the optional final assistant message", where)
        for position, block in enumerate(content if isinstance(content, list) else ()):
            if block["type"] == "text" and not block["text"]:
                _fail("text content blocks must be non-empty", f"{where}.content.{position}.text")
            if block["type"] == "tool_result" and isinstance(block.get("content"), list):
                # A tool's answer is held to the same rule (a translated model was sent its empty text).
                for inner, part in enumerate(block["content"]):
                    if part["type"] == "text" and not part["text"]:
                        _fail(
                            "text content blocks must be non-empty",
                            f"{where}.content.{position}.content.{inner}.text",
                        )
    system = body.get("system")
    if system is not None:
        _check_blocks(system, "system")
        for index, block in enumerate(system if isinstance(system, list) else ()):
            # Anthropic's rules, for any model: the system prompt is text, and a block of it is not empty.
            if block["type"] != "text":
                _fail("Input should be 'text'", f"system.{index}.type")
            if not block["text"]:
                _fail("text content blocks must be non-empty", f"system.{index}.text")
    for name, high in (("temperature", 1), ("top_p", 1)):
        value = body.get(name)
        if value is not None and (not _is_number(value) or not 0 <= value <= high):
            _fail(f"Input should be a number between 0 and {high}", name)
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        _fail("Input should be a non-negative integer", "top_k")
    stop = body.get("stop_sequences")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(item, str) for item in stop)):
        _fail("Input should be a list of strings", "stop_sequences", "invalid_type")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        _fail("Input should be a valid boolean", "stream", "invalid_type")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            _fail("Input should be a valid list", "tools", "invalid_type")
        names: set[str] = set()
        for index, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
                _fail("Field required", f"tools.{index}.name", "missing_required_parameter")
            if "input_schema" in tool and not isinstance(tool["input_schema"], dict):
                _fail("Input should be a valid dictionary", f"tools.{index}.input_schema", "invalid_type")
            if tool["name"] in names:
                # Anthropic's rule, for any model: a call names its tool, and could mean either.
                _fail(f"Tool names must be unique ({tool['name']} is given twice)", "tools")
            names.add(tool["name"])
    if body.get("service_tier") is not None and body["service_tier"] not in SERVICE_TIERS:
        _fail("Input should be 'auto' or 'standard_only'", "service_tier")
    for name in ("metadata", "thinking"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            _fail("Input should be a valid dictionary", name, "invalid_type")
    user_id = (body.get("metadata") or {}).get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        _fail("Input should be a valid string", "metadata.user_id", "invalid_type")
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in TOOL_CHOICE_TYPES:
            _fail("Input should be an object whose type is 'auto', 'any', 'tool' or 'none'", "tool_choice")
        if choice["type"] == "tool" and not isinstance(choice.get("name"), str):
            _fail("Field required", "tool_choice.name", "missing_required_parameter")
        if choice["type"] in FORCED_TOOL_CHOICES and body.get("mcp_servers") is None:
            # Anthropic's rules, for any model: a forced call needs a tool to call, and a named one must be given
            # (an MCP server's tools are not in `tools`: left to the provider).
            if not tools:
                _fail(f"A tool_choice of type '{choice['type']}' requires tools", "tool_choice")
            if choice["type"] == "tool" and choice["name"] not in {tool["name"] for tool in tools}:
                _fail(f"Tool '{choice['name']}' not found in provided tools", "tool_choice.name")
        thinking = body.get("thinking")
        if choice["type"] in FORCED_TOOL_CHOICES and thinking is not None and thinking.get("type") in THINKING_ON:
            # Anthropic's own rule, judged for any model so that the Messages API means one thing.
            _fail(
                "Thinking may not be enabled when tool_choice forces tool use: with `thinking`, use a tool_choice"
                " of type 'auto' or 'none'",
                "tool_choice",
                "unsupported_value",
            )
    _check_sampling_while_thinking(body)


# The least ``top_p`` Claude thinks with (Anthropic's extended thinking takes 0.95 to 1).
_THINKING_TOP_P = 0.95


def _check_sampling_while_thinking(body: dict[str, Any]) -> None:
    """Anthropic's own rule, judged for any model so that the Messages API means one thing: while Claude thinks
    (thinking enabled or adaptive) ``temperature`` is 1, ``top_p`` 0.95 or more and ``top_k`` unset; in its words."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") not in THINKING_ON:
        return
    if body.get("temperature") is not None and body["temperature"] != 1:
        _fail(
            "`temperature` may only be set to 1 when thinking is enabled or in adaptive mode",
            "temperature",
            "unsupported_value",
        )
    if body.get("top_p") is not None and body["top_p"] < _THINKING_TOP_P:
        _fail(
            f"`top_p` must be greater than or equal to {_THINKING_TOP_P} or unset when thinking is enabled",
            "top_p",
            "unsupported_value",
        )
    if body.get("top_k") is not None:
        _fail("`top_k` must be unset when thinking is enabled", "top_k", "unsupported_value")


def validate_count_tokens_request(body: Any) -> None:
    """``count_tokens`` takes a Messages body without ``max_tokens``."""
    if isinstance(body, dict) and body.get("max_tokens") is None:
        body = {**body, "max_tokens": 1}
    validate_messages_request(body)
