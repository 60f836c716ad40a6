"""OpenAI's Responses API (``POST /v1/responses``) over the chat-completions pipeline, both ways.

The translation is stateless: a request is translated into the chat completion it means
(``responses_request_to_chat``), which the one pipeline runs on any provider, and the chat completion (or its
chunks) is translated back into a ``Response`` object (``response_from_completion``) or its typed stream events
(``ResponseEvents``). The tools a client runs itself (Codex's free-form ``custom`` tools, ``local_shell``) become
functions upstream, and the model's calls of them their own output items again. A ``previous_response_id`` is
resolved before (``chat.pipeline``, ``chat.responses_chain``): the stored items come first in ``input``. What needs
OpenAI's own servers or state llmhub does not keep is refused with a 400 naming the parameter: ``conversation``,
``background``, a stored ``prompt``, built-in tools (``web_search``, ``file_search``, …), input items that refer to
stored ones, and input parts this translation has no chat-completions form for; so is a parameter the API does not
have (a chat completion's ``max_tokens``, a misspelt name), which would not reach the model.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import uuid
from typing import Any

from core.text import text_quoted
from providers.adapters.common import LOGPROBS, allowed_tools_narrowed
from providers.adapters.translate_anthropic import reasoning_text, tool_calls_of

from .validation import (
    ALLOWED_TOOLS_MODES,
    MAX_MESSAGES,
    MAX_TOKENS_LIMIT,
    TOOL_CHOICE_MODES,
    InvalidRequestError,
    check_body_and_model,
    check_cache_breakpoint,
    check_field_types,
    check_prompt_cache_options,
)

logger = logging.getLogger(__name__)

# Parameters that need state or a feature llmhub does not have: refused when set to anything but their
# default (``None``, or the value beside them).
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "conversation": (None, "llmhub does not store conversations; send the whole conversation in `input`."),
    "background": (False, "background responses need stored state, which llmhub does not keep."),
    "prompt": (None, "stored prompts are not supported; send the text in `instructions` and `input`."),
    "context_management": (None, "server-side context management is not supported."),
    "moderation": (
        None,
        "llmhub moderates by its own policies (set by an admin for the model and the plan), not by a request's.",
    ),
}
# The parameters of a Responses request (the spec's ``CreateResponse``). Any other is refused, naming it, as OpenAI
# answers, rather than dropped: nothing else reaches the model, so a chat completion's ``max_tokens`` or
# ``response_format`` brought along (or a misspelt name) would silently not apply.
_PARAMETERS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "previous_response_id",
        "store",
        "stream",
        "stream_options",
        "include",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_tool_calls",
        "text",
        "reasoning",
        "max_output_tokens",
        "temperature",
        "top_p",
        "top_logprobs",
        "truncation",
        "metadata",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "service_tier",
        "background",
        "conversation",
        "prompt",
        "context_management",
        "moderation",
    }
)
# A chat completion's parameters that the Responses API has under another name.
_MOVED = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
    "verbosity": "text.verbosity",
}
# A reasoning item's text is in the clear, in its ``content``; its ``encrypted_content`` (Claude's signed thinking
# blocks, ``thinking_content``) is given only when asked for, as OpenAI does.
ENCRYPTED_CONTENT = "reasoning.encrypted_content"
# The log probabilities of the reply's tokens on its ``output_text`` (chat completions' ``logprobs``, with
# ``top_logprobs`` alternatives a token), given only when asked for, as OpenAI gives them.
OUTPUT_LOGPROBS = "message.output_text.logprobs"
_INCLUDABLE = frozenset({ENCRYPTED_CONTENT, OUTPUT_LOGPROBS})
# A provider's refusal of a chat completion field the translation wrote for another the client sent, in the
# client's words (its ``param`` renamed by the translation's field names, ``client_field``): chat completions'
# ``logprobs``, which ``include`` asked for. Chat completions' own message names ``logprobs``, which its client sent.
_REFUSALS_WORDED = {
    (LOGPROBS.param, LOGPROBS.message): "This model does not return log probabilities: `include` cannot ask for "
    f"`{OUTPUT_LOGPROBS}` with it.",
}


def refusal_worded(param: str | None, message: str) -> str:
    """The message of a refusal of ``param`` in the translated chat completion, as a ``/v1/responses`` client
    reads it: naming what it sent rather than a chat completion's field it never wrote; any other as it is."""
    return _REFUSALS_WORDED.get((param, message), message)


# OpenAI's bounds of ``top_logprobs`` (the Responses API's and chat completions' alike).
TOP_LOGPROBS_MAX = 20
_ROLES = frozenset({"user", "system", "developer", "assistant"})
# A reasoning summary, asked for by its name or by the deprecated one older clients still send.
_SUMMARY_NAMES = ("summary", "generate_summary")
# The fields of ``reasoning`` (the spec's ``Reasoning``); any other is refused, naming it, rather than dropped.
_REASONING_FIELDS = frozenset({"effort", "mode", "context", *_SUMMARY_NAMES})
# ``reasoning.context``: which turns' reasoning the model is shown. ``auto`` leaves it to the model (its provider);
# ``current_turn`` is kept by sending only this turn's; ``all_turns`` by sending every turn's given back, as llmhub
# does anyway (what of an earlier turn's a model then reads is its own: Claude before Opus 4.5 strips it, as OpenAI's
# models before gpt-5.6 do, whose default ``current_turn`` is).
_REASONING_CONTEXTS = frozenset({"auto", "current_turn", "all_turns"})
# Finish reasons that leave a response incomplete, with the reason the Responses API gives.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
# The tools a client runs itself beside its functions, as Codex and the Agents SDK send them: each becomes a function
# tool of chat completions, and the model's calls of it its own output item again (``tool_kinds``).
CUSTOM, LOCAL_SHELL = "custom", "local_shell"
# A custom tool's free-form input, as the one string argument of its function.
_CUSTOM_PARAMETERS = {
    "type": "object",
    "properties": {"input": {"type": "string", "description": "The tool's whole input, as free-form text."}},
    "required": ["input"],
    "additionalProperties": False,
}
# The local shell's call: the spec's ``LocalShellExecAction`` without its constant ``type``.
_LOCAL_SHELL_FUNCTION = {
    "name": LOCAL_SHELL,
    "description": "Run a command on the user's machine, in a local shell, and get what it printed.",
    "parameters": {
        "type": "object",
        "properties": {
            "command": {"type": "array", "items": {"type": "string"}, "description": "The command and its arguments."},
            "timeout_ms": {"type": "integer", "description": "How long the command may run, in milliseconds."},
            "working_directory": {"type": "string", "description": "The directory to run it in."},
            "env": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "Environment variables to set for it.",
            },
            "user": {"type": "string", "description": "The user to run it as."},
        },
        "required": ["command"],
    },
}
_GRAMMAR_SYNTAXES = frozenset({"lark", "regex"})


# OpenAI's bounds of ``metadata`` (its ``Metadata`` schema), kept with a stored response and echoed in it.
METADATA_PAIRS_MAX, METADATA_KEY_MAX, METADATA_VALUE_MAX = 16, 64, 512


def _fail(message: str, param: str | None, code: str = "invalid_value") -> None:
    raise InvalidRequestError(message, param=param, code=code)


def _named(value: Any, names: frozenset[str]) -> bool:
    """Whether ``value`` is one of ``names``; a list or an object (which a set cannot look up) is not."""
    return isinstance(value, str) and value in names


def _text_of(content: Any, param: str, kinds: frozenset[str]) -> list[dict[str, Any]] | str:
    """A message's content as chat completions takes it: a string stays one; parts become ``text`` (and
    ``image_url``) parts. A part of another type has no translation here: refused, naming it."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        _fail(f"Invalid type for '{param}': expected a string or an array of content parts.", param, "invalid_type")
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not _named(kind, kinds):
            _fail(
                f"Invalid '{where}.type': {kind!r} content is not supported by llmhub's /v1/responses "
                f"(supported here: {', '.join(sorted(kinds))}).",
                f"{where}.type",
                "unsupported_value",
            )
        check_cache_breakpoint(part, where)
        # The end of a reusable prefix, on the chat part the input part becomes (``prompt_cache_breakpoint``).
        marked = (
            {"prompt_cache_breakpoint": part["prompt_cache_breakpoint"]} if part.get("prompt_cache_breakpoint") else {}
        )
        if kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                _fail(
                    f"Invalid '{where}': only an image given by `image_url` is supported (not `file_id`).",
                    f"{where}.image_url",
                    "unsupported_value",
                )
            image = {"url": url}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image, **marked})
            continue
        field = "refusal" if kind == "refusal" else "text"
        if not isinstance(part.get(field), str):
            _fail(f"Missing required parameter: '{where}.{field}'.", f"{where}.{field}", "missing_required_parameter")
        parts.append({"type": "text", "text": part[field], **marked})
    return parts


def _joined(content: list[dict[str, Any]] | str) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def _joined_unless_marked(content: list[dict[str, Any]] | str) -> list[dict[str, Any]] | str:
    """A system or developer message's parts, or a tool output's, joined, as ``_joined``; kept as parts when one
    marks the end of a reusable prefix (``prompt_cache_breakpoint``), which a joined string would lose."""
    if isinstance(content, list) and any("prompt_cache_breakpoint" in part for part in content):
        return content
    return _joined(content)


_CALLS = frozenset({"function_call", "custom_tool_call", "local_shell_call"})
_CALL_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output", "local_shell_call_output"})


def _call_of(item: dict[str, Any], kind: str, where: str) -> tuple[str, str]:
    """The function name and the arguments a tool call item given back was, as the model wrote them (``tool_kinds``):
    a custom tool's input is the ``input`` argument, the local shell's action the arguments."""
    fields = {"function_call": ("name", "arguments"), "custom_tool_call": ("name", "input"), "local_shell_call": ()}
    for field in ("call_id", *fields[kind]):
        if not isinstance(item.get(field), str):
            _fail(f"Missing required parameter: '{where}.{field}'.", f"{where}.{field}", "missing_required_parameter")
    if kind == "function_call":
        return item["name"], item["arguments"]
    if kind == "custom_tool_call":
        return item["name"], json.dumps({"input": item["input"]})
    action = item.get("action")
    if not isinstance(action, dict) or not isinstance(action.get("command"), list):
        _fail(f"Invalid '{where}.action': expected an object with a `command` array.", f"{where}.action")
    return LOCAL_SHELL, json.dumps({name: value for name, value in action.items() if name != "type"})


def _messages_from_input(value: Any) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The chat messages ``input`` means, and for each the names its fields had in ``input`` (``content`` ->
    ``input[3].content``, ``tool_calls[0].function`` -> ``input[4]``)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}], [{"": "input", "content": "input"}]
    if not isinstance(value, list) or not value:
        _fail("Invalid 'input': expected a string or a non-empty array of input items.", "input", "invalid_type")
    messages: list[dict[str, Any]] = []
    origins: list[dict[str, str]] = []
    # Reasoning items given back, (text, where, signed thinking blocks), for the next assistant turn.
    thoughts: list[tuple[str, str, list[dict[str, Any]]]] = []
    calls: dict[str, str] = {}  # the tool calls given back, by their id, each with its kind, awaiting their output
    answered: set[str] = set()
    ids: set[str] = set()  # the items' own ids (a local shell call's output names its call by `id`: not its own)
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            _fail(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
        kind = item.get("type", "message")
        if item.get("id") is not None and kind != "local_shell_call_output":
            if not isinstance(item["id"], str):
                _fail(f"Invalid type for '{where}.id': expected a string.", f"{where}.id", "invalid_type")
            if item["id"] in ids:
                # As OpenAI answers: the model would get the item twice, and a stored list's `after` names one.
                _fail(
                    f"Duplicate item found with id {text_quoted(item['id'])}. Remove duplicate items from your input "
                    "and try again.",
                    "input",
                )
            ids.add(item["id"])
        if kind != "reasoning" and (kind != "message" or item.get("role") != "assistant") and not _named(kind, _CALLS):
            thoughts = []  # reasoning that no assistant turn follows belongs to none
        if kind == "message":
            role = item.get("role")
            if not _named(role, _ROLES):
                _fail(
                    f"Invalid value for '{where}.role': expected one of {', '.join(sorted(_ROLES))}.", f"{where}.role"
                )
            if role == "assistant":
                text = _joined(_text_of(item.get("content"), f"{where}.content", frozenset({"output_text", "refusal"})))
                messages.append({"role": "assistant", "content": text})
            else:
                kinds = frozenset({"input_text", "input_image"} if role == "user" else {"input_text"})
                content = _text_of(item.get("content"), f"{where}.content", kinds)
                if role == "user" and not content and isinstance(content, list):
                    _fail(f"Invalid '{where}.content': empty array; give at least one part.", f"{where}.content")
                messages.append(
                    {"role": role, "content": content if role == "user" else _joined_unless_marked(content)}
                )
            origins.append({"": where, "content": f"{where}.content"})
            if role == "assistant":
                _reasoning_given_back(messages[-1], origins[-1], thoughts)
        elif _named(kind, _CALLS):
            name, arguments = _call_of(item, kind, where)
            calls.setdefault(item["call_id"], kind)
            call = {"id": item["call_id"], "type": "function", "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                # One assistant turn: its text and every call it made, as chat completions writes it.
                last.setdefault("tool_calls", []).append(call)
                if not last["content"]:
                    last["content"] = None
                origins[-1][f"tool_calls[{len(last['tool_calls']) - 1}].function"] = where
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                origins.append({"": where, "tool_calls[0].function": where})
            _reasoning_given_back(messages[-1], origins[-1], thoughts)
        elif _named(kind, _CALL_OUTPUTS):
            # The spec names a local shell call's output by the call's id in `id`; the others in `call_id`.
            key = "id" if kind == "local_shell_call_output" else "call_id"
            if not isinstance(item.get(key), str):
                _fail(f"Missing required parameter: '{where}.{key}'.", f"{where}.{key}", "missing_required_parameter")
            output = _text_of(item.get("output"), f"{where}.output", frozenset({"input_text"}))
            answered.add(item[key])
            # A marked part stays the tool message's text part (the chat tool message's parts take a breakpoint).
            messages.append({"role": "tool", "tool_call_id": item[key], "content": _joined_unless_marked(output)})
            origins.append({"": where, "content": f"{where}.output"})
        elif kind == "reasoning":
            # A model's earlier reasoning: its text (``reasoning_text`` parts, as llmhub returns it; a summary is
            # OpenAI's own) goes back with the turn it led to, and Claude's signed thinking blocks (our
            # ``encrypted_content``; OpenAI's own is for OpenAI's servers: not sent) with them.
            text = ""
            if item.get("content") is not None:
                text = _joined(_text_of(item["content"], f"{where}.content", frozenset({"reasoning_text"})))
            blocks = thinking_blocks_of(item.get("encrypted_content"))
            if text or blocks:
                thoughts.append((text, f"{where}.content" if text else f"{where}.encrypted_content", blocks))
        else:
            _fail(
                f"Invalid '{where}.type': {kind!r} input items are not supported by llmhub's /v1/responses "
                f"(supported: message, reasoning, {', '.join(sorted(_CALLS | _CALL_OUTPUTS))}; give the item itself, "
                "or chain with `previous_response_id`).",
                f"{where}.type",
                "unsupported_value",
            )
    for call_id, kind in calls.items():
        # As OpenAI answers: every provider refuses a tool call with no result (after a call, and its retries).
        if call_id not in answered:
            _fail(f"No tool output found for {kind.replace('_', ' ')} {text_quoted(call_id)}.", "input")
    return messages, origins


def _reasoning_given_back(
    message: dict[str, Any], origin: dict[str, str], thoughts: list[tuple[str, str, list[dict[str, Any]]]]
) -> None:
    """The reasoning items before an assistant turn, as its ``reasoning_content``: what reasoning models' servers
    take back (DeepSeek asks for it again in a tool-call round), as ``/v1/chat/completions`` passes it on; and
    Claude's signed blocks as its ``thinking_blocks`` (Anthropic wants them first in a tool-use turn answered)."""
    if not thoughts:
        return
    if texts := [text for text, _, _ in thoughts if text]:
        message["reasoning_content"] = "\n\n".join(
            [message["reasoning_content"], *texts] if "reasoning_content" in message else texts
        )
        origin["reasoning_content"] = [where for text, where, _ in thoughts if text][-1]
    for _, where, blocks in thoughts:
        # Each block by the item that held it: what a refusal of it (moderation, a malformed block) names.
        given = where.rsplit(".", 1)[0] + ".encrypted_content"
        for block in blocks:
            origin[f"thinking_blocks[{len(message.setdefault('thinking_blocks', []))}]"] = given
            message["thinking_blocks"].append(block)
        if blocks:
            origin["thinking_blocks"] = given
    thoughts.clear()


def _earlier_reasoning_dropped(messages: list[dict[str, Any]], origins: list[dict[str, str]]) -> None:
    """``reasoning.context: current_turn``: the reasoning given back with the assistant turns before the last user
    message (earlier turns) is not sent; this turn's (its tool rounds', which Claude wants back signed) is."""
    last_user = max((index for index, message in enumerate(messages) if message["role"] == "user"), default=0)
    for message, origin in zip(messages[:last_user], origins[:last_user], strict=True):
        if message["role"] != "assistant":
            continue
        message.pop("reasoning_content", None)
        message.pop("thinking_blocks", None)
        for name in [name for name in origin if name.startswith(("reasoning_content", "thinking_blocks"))]:
            del origin[name]


def thinking_content(blocks: list[dict[str, Any]]) -> str:
    """Claude's signed thinking blocks (a reply's ``thinking_blocks``) as a reasoning item's ``encrypted_content``:
    base64 of their JSON, opaque to the client, which gives it back as it came. Not sealed: Anthropic verifies each
    block's signature itself, so a block a client forged or changed is refused by Claude, not by us."""
    return base64.b64encode(json.dumps({"thinking_blocks": blocks}, separators=(",", ":")).encode()).decode()


def thinking_blocks_of(encrypted: Any) -> list[dict[str, Any]]:
    """The thinking blocks an ``encrypted_content`` given back holds (``thinking_content``); none for one that is
    not ours (OpenAI's own, for OpenAI's servers): it is not sent on, as before. The blocks themselves are checked
    where they are sent (Claude's adapter: a malformed one is a 400)."""
    if not isinstance(encrypted, str) or not encrypted:
        return []
    try:
        decoded = json.loads(base64.b64decode(encrypted, validate=True))
    except (binascii.Error, ValueError):
        return []
    blocks = decoded.get("thinking_blocks") if isinstance(decoded, dict) else None
    return blocks if isinstance(blocks, list) else []


def _logprobs_included(body: dict[str, Any]) -> bool:
    """Whether the Responses request ``body`` asks for its output text's log probabilities (``include``)."""
    include = body.get("include")
    return isinstance(include, list | tuple) and OUTPUT_LOGPROBS in include


def response_shown(value: dict[str, Any], include: Any) -> dict[str, Any]:
    """A ``Response`` or a stream event as the client gets it: the reasoning items' ``encrypted_content`` (kept with
    a stored response, for a chain) only when ``include`` asks for ``reasoning.encrypted_content``, and the output
    text's ``logprobs`` (kept with one made with them) only when it asks for ``message.output_text.logprobs``."""
    included = include if isinstance(include, list | tuple) else ()
    encrypted, logprobs = ENCRYPTED_CONTENT in included, OUTPUT_LOGPROBS in included
    if encrypted and logprobs:
        return value

    def bare(item: Any) -> Any:
        if not isinstance(item, dict):
            return item
        if not encrypted and "encrypted_content" in item:
            item = {name: field for name, field in item.items() if name != "encrypted_content"}
        if not logprobs and item.get("type") == "message" and isinstance(item.get("content"), list):
            parts = [
                {**part, "logprobs": []} if isinstance(part, dict) and part.get("logprobs") else part
                for part in item["content"]
            ]
            item = {**item, "content": parts}
        return item

    shown = dict(value)
    if isinstance(shown.get("item"), dict):
        shown["item"] = bare(shown["item"])
    target = shown if shown.get("object") == "response" else shown.get("response")
    if isinstance(target, dict) and isinstance(target.get("output"), list):
        target = {**target, "output": [bare(item) for item in target["output"]]}
        shown = target if shown.get("object") == "response" else {**shown, "response": target}
    return shown


def _custom_function(tool: dict[str, Any], where: str) -> dict[str, Any]:
    """A custom tool as a function of one string, ``input``: chat completions have no free-form tools, so its
    grammar (or its plain-text format) is told to the model in the description, which is all a model reads of it."""
    description = tool.get("description")
    if description is not None and not isinstance(description, str):
        _fail(f"Invalid type for '{where}.description': expected a string.", f"{where}.description", "invalid_type")
    lines = [description] if description else []
    fmt = tool.get("format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is not None and not _named(kind, frozenset({"text", "grammar"})):
        _fail(f"Invalid '{where}.format': expected type 'text' or 'grammar'.", f"{where}.format")
    if kind == "grammar":
        if not _named(fmt.get("syntax"), _GRAMMAR_SYNTAXES) or not isinstance(fmt.get("definition"), str):
            _fail(
                f"Invalid '{where}.format': a grammar needs `syntax` ('lark' or 'regex') and a `definition` string.",
                f"{where}.format",
            )
        lines.append(
            f"The `input` argument must match this {fmt['syntax']} grammar exactly:\n{fmt['definition']}"
            if fmt["syntax"] == "lark"
            else f"The `input` argument must match this regular expression exactly: {fmt['definition']}"
        )
    lines.append("Put the tool's whole input, as free-form text, in the `input` argument.")
    return {"name": tool["name"], "description": "\n\n".join(lines), "parameters": _CUSTOM_PARAMETERS}


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        _fail("Invalid type for 'tools': expected an array of objects.", "tools", "invalid_type")
    tools: list[dict[str, Any]] = []
    named: dict[str, int] = {}  # a function's name -> the tool that defines it
    for index, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        where = f"tools[{index}]"
        if not _named(kind, frozenset({"function", CUSTOM, LOCAL_SHELL})):
            _fail(
                f"Invalid value for '{where}.type': {kind!r} tools are not supported by llmhub's /v1/responses; "
                "only `function`, `custom` and `local_shell` tools are (built-in tools run on OpenAI's servers).",
                f"{where}.type",
                "unsupported_value",
            )
        if kind == LOCAL_SHELL:
            function: dict[str, Any] = dict(_LOCAL_SHELL_FUNCTION)
        else:
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                _fail(f"Missing required parameter: '{where}.name'.", f"{where}.name", "missing_required_parameter")
            if kind == CUSTOM:
                function = _custom_function(tool, where)
            else:
                function = {"name": tool["name"]}
                if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
                    _fail(
                        f"Invalid type for '{where}.parameters': expected a JSON schema object.",
                        f"{where}.parameters",
                        "invalid_type",
                    )
                for field in ("description", "parameters", "strict"):
                    if tool.get(field) is not None:
                        function[field] = tool[field]
        if function["name"] in named:
            # The model names the tool it calls: two of one name could not be told apart.
            _fail(
                f"Invalid '{where}': a tool named {function['name']!r} is already defined by "
                f"'tools[{named[function['name']]}]'; give each tool its own name (a `local_shell` tool is the "
                f"function {LOCAL_SHELL!r}).",
                f"{where}.name" if kind != LOCAL_SHELL else f"{where}.type",
            )
        named[function["name"]] = index
        tools.append({"type": "function", "function": function})
    return tools


def tool_kinds(body: dict[str, Any]) -> dict[str, str]:
    """The functions that stand for a custom or the local shell tool in the chat completion ``body`` (a valid
    Responses request) became: their name -> ``custom`` or ``local_shell``."""
    kinds: dict[str, str] = {}
    for tool in body.get("tools") or ():
        if tool.get("type") == CUSTOM:
            kinds[tool["name"]] = CUSTOM
        elif tool.get("type") == LOCAL_SHELL:
            kinds[LOCAL_SHELL] = LOCAL_SHELL
    return kinds


def _tool_choice(value: Any, tools: Any) -> Any:
    if _named(value, TOOL_CHOICE_MODES):
        return value
    if isinstance(value, dict) and _named(value.get("type"), frozenset({"function", CUSTOM})):
        if not isinstance(value.get("name"), str) or not value["name"]:
            _fail("Missing required parameter: 'tool_choice.name'.", "tool_choice.name", "missing_required_parameter")
        _chosen_tool_defined(value["type"], value["name"], tools)
        return {"type": "function", "function": {"name": value["name"]}}
    _fail(
        "Invalid value for 'tool_choice': expected 'none', 'auto', 'required', "
        '{"type": "function", "name": ...} or {"type": "custom", "name": ...} (built-in tools are not supported).',
        "tool_choice",
    )
    return None


def _chosen_tool_defined(kind: str, name: str, tools: Any) -> None:
    """A ``tool_choice`` of ``kind`` (``function`` or ``custom``) names a tool of that kind among ``tools`` (valid,
    ``_tools``), as OpenAI checks it: a custom tool and a function both become functions upstream, so the chat
    completion's own check would take one chosen as the other, and call a custom tool no tool has a function. Without
    tools the caller refuses (or drops) the choice for that; the ``local_shell`` tool may be chosen as its function."""
    kinds = {tool.get("name"): tool["type"] for tool in tools or () if tool["type"] in ("function", CUSTOM)}
    if not tools or (kind == "function" and name == LOCAL_SHELL and any(t["type"] == LOCAL_SHELL for t in tools)):
        return
    if name not in kinds:
        what = "function" if kind == "function" else "custom tool"
        _fail(
            f"Invalid value for 'tool_choice': no {what} named '{text_quoted(name)}' is among 'tools'.", "tool_choice"
        )
    if kinds[name] != kind:
        what = "function" if kinds[name] == "function" else "custom tool"
        _fail(
            f"Invalid value for 'tool_choice': '{text_quoted(name)}' is a {what} among 'tools': choose it with "
            f'{{"type": "{kinds[name]}", "name": {json.dumps(text_quoted(name))}}}.',
            "tool_choice",
        )


def _allowed_functions(choice: dict[str, Any], tools: Any) -> set[str]:
    """The functions upstream that an ``allowed_tools`` choice lets the model call: each of its ``tools`` must be one
    of the request's (a function or a custom tool by type and name, or the ``local_shell`` tool); a built-in tool runs
    on OpenAI's servers, as in ``tools``."""
    if not _named(choice.get("mode"), ALLOWED_TOOLS_MODES):
        _fail("Invalid value for 'tool_choice.mode': expected 'auto' or 'required'.", "tool_choice.mode")
    listed = choice.get("tools")
    if not isinstance(listed, list) or not listed:
        _fail(
            "Invalid 'tool_choice.tools': expected a non-empty array of the tools the model may call.",
            "tool_choice.tools",
        )
    defined = {
        (tool.get("type"), LOCAL_SHELL if tool.get("type") == LOCAL_SHELL else tool.get("name"))
        for tool in tools or ()
        if isinstance(tool, dict)
    }
    names: set[str] = set()
    for index, entry in enumerate(listed):
        where = f"tool_choice.tools[{index}]"
        if not isinstance(entry, dict):
            _fail(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
        kind = entry.get("type")
        if not _named(kind, frozenset({"function", CUSTOM, LOCAL_SHELL})):
            _fail(
                f"Invalid value for '{where}.type': only `function`, `custom` and `local_shell` tools are supported "
                "by llmhub's /v1/responses (built-in tools run on OpenAI's servers).",
                f"{where}.type",
                "unsupported_value",
            )
        if kind == LOCAL_SHELL:
            if (LOCAL_SHELL, LOCAL_SHELL) not in defined:
                _fail(f"Invalid value for '{where}.type': no `local_shell` tool is among 'tools'.", f"{where}.type")
            names.add(LOCAL_SHELL)
            continue
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            _fail(f"Missing required parameter: '{where}.name'.", f"{where}.name", "missing_required_parameter")
        if (kind, name) not in defined:
            _fail(
                f"Invalid value for '{where}.name': no {kind} tool named {text_quoted(name)} is among 'tools'.",
                f"{where}.name",
            )
        names.add(name)
    return names


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        _fail("Invalid type for 'text': expected an object.", "text", "invalid_type")
    for name in text:
        # The spec's ``ResponseTextParam``: another field (a misspelt format) would not apply, unsaid.
        if name not in ("format", "verbosity"):
            _fail(f"Unknown parameter: 'text.{text_quoted(name)}'.", f"text.{text_quoted(name)}", "unknown_parameter")
    fmt = text.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            _fail("Missing required parameter: 'text.format.name' or 'text.format.schema'.", "text.format")
        schema = {key: fmt[key] for key in ("name", "schema", "description", "strict") if fmt.get(key) is not None}
        return {"type": "json_schema", "json_schema": schema}
    _fail("Invalid 'text.format': expected type 'text', 'json_object' or 'json_schema'.", "text.format")
    return None


def _check_stream_options(options: Any) -> None:
    """``stream_options`` as the spec types it (``ResponseStreamOptions``): an object whose one field,
    ``include_obfuscation``, is a boolean. Not sent (llmhub's events have no obfuscation to turn off), but one of
    another shape, or chat completions' ``include_usage`` brought along, is refused as OpenAI refuses it."""
    if options is None:
        return
    if not isinstance(options, dict):
        _fail("Invalid type for 'stream_options': expected an object.", "stream_options", "invalid_type")
    for name, value in options.items():
        if name != "include_obfuscation":
            where = f"stream_options.{text_quoted(name)}"
            _fail(f"Unknown parameter: '{where}'.", where, "unknown_parameter")
        if value is not None and not isinstance(value, bool):
            _fail(
                "Invalid type for 'stream_options.include_obfuscation': expected a boolean.",
                "stream_options.include_obfuscation",
                "invalid_type",
            )


def responses_request_to_chat(body: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The chat-completions request a Responses API ``body`` means, for the pipeline to run, and the names its
    fields had in ``body`` (``messages[2].content`` -> ``input[1].content``: what a refusal of the input names);
    raises ``InvalidRequestError`` (400) naming the first parameter it cannot take."""
    check_body_and_model(body)
    for name in body:
        if name in _MOVED:
            _fail(
                f"Unsupported parameter: '{name}'. In the Responses API, this parameter has moved to '{_MOVED[name]}'.",
                name,
                "unsupported_parameter",
            )
        if name not in _PARAMETERS:
            _fail(f"Unknown parameter: '{text_quoted(name)}'.", text_quoted(name), "unknown_parameter")
    # Its own names for what it forwards: ``parallel_tool_calls`` is checked without tools too (it is echoed back).
    check_field_types(
        body,
        (
            "stream",
            "parallel_tool_calls",
            "user",
            "prompt_cache_key",
            "prompt_cache_retention",
            "safety_identifier",
            "service_tier",
        ),
    )
    check_prompt_cache_options(body)
    _check_stream_options(body.get("stream_options"))
    tool_calls = body.get("max_tool_calls")
    if tool_calls is not None and type(tool_calls) is not int:
        _fail("Invalid type for 'max_tool_calls': expected an integer.", "max_tool_calls", "invalid_type")
    for name, (default, why) in _UNSUPPORTED.items():
        if body.get(name, default) not in (None, default):
            _fail(f"Unsupported parameter: '{name}': {why}", name, "unsupported_parameter")
    if body.get("truncation") not in (None, "disabled"):
        _fail("Unsupported value: 'truncation' must be 'disabled' here: llmhub does not truncate input.", "truncation")
    include = body.get("include")
    if include is not None:
        if not isinstance(include, list) or any(not _named(item, _INCLUDABLE) for item in include):
            _fail(f"Unsupported value for 'include': only {' and '.join(sorted(_INCLUDABLE))} are accepted.", "include")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and (type(top_logprobs) is not int or not 0 <= top_logprobs <= TOP_LOGPROBS_MAX):
        _fail(f"Invalid 'top_logprobs': expected an integer between 0 and {TOP_LOGPROBS_MAX}.", "top_logprobs")
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        _fail("Invalid type for 'reasoning': expected an object.", "reasoning", "invalid_type")
    for name in reasoning if isinstance(reasoning, dict) else ():
        if name not in _REASONING_FIELDS:
            _fail(
                f"Unknown parameter: 'reasoning.{text_quoted(name)}'.",
                f"reasoning.{text_quoted(name)}",
                "unknown_parameter",
            )
    if isinstance(reasoning, dict) and reasoning.get("mode") not in (None, "standard"):
        # OpenAI's ``pro`` mode (more compute, at its price) has no chat-completions form on any provider.
        _fail(
            "Unsupported value for 'reasoning.mode': llmhub runs every model in its standard mode; only 'standard' "
            "is accepted.",
            "reasoning.mode",
            "unsupported_value",
        )
    if isinstance(reasoning, dict) and reasoning.get("context") is not None:
        if not _named(reasoning["context"], _REASONING_CONTEXTS):
            _fail(
                "Invalid value for 'reasoning.context': expected 'auto', 'current_turn' or 'all_turns'.",
                "reasoning.context",
                "unsupported_value",
            )
    for name in _SUMMARY_NAMES:
        if isinstance(reasoning, dict) and reasoning.get(name) not in (None, "auto"):
            # ``auto`` lets the model write none, which is what llmhub answers (``summary: null``).
            _fail(
                f"Unsupported value for 'reasoning.{name}': llmhub writes no reasoning summaries; only 'auto' is "
                "accepted, answered with none (`summary: null`).",
                f"reasoning.{name}",
                "unsupported_value",
            )
    if "input" not in body:
        _fail("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    messages, origins = _messages_from_input(body["input"])
    if isinstance(reasoning, dict) and reasoning.get("context") == "current_turn":
        _earlier_reasoning_dropped(messages, origins)
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            _fail("Invalid type for 'instructions': expected a string.", "instructions", "invalid_type")
        messages.insert(0, {"role": "system", "content": instructions})
        origins.insert(0, {"": "instructions", "content": "instructions"})
    if len(messages) > MAX_MESSAGES:
        # A chat completion holds at most that many: the input (with a previous response's items, the whole chain)
        # names what the client sent.
        _fail(
            f"Invalid 'input': the conversation makes {len(messages)} messages (the previous responses' items, if any,"
            f" with these and the instructions); at most {MAX_MESSAGES} are accepted.",
            "input",
        )
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values())
    ):
        _fail("Invalid 'metadata': expected an object of strings.", "metadata", "invalid_type")
    if metadata is not None and (
        len(metadata) > METADATA_PAIRS_MAX
        or any(len(key) > METADATA_KEY_MAX or len(value) > METADATA_VALUE_MAX for key, value in metadata.items())
    ):
        _fail(
            f"Invalid 'metadata': at most {METADATA_PAIRS_MAX} pairs, keys of at most {METADATA_KEY_MAX} characters "
            f"and values of at most {METADATA_VALUE_MAX}.",
            "metadata",
        )
    limit = body.get("max_output_tokens")
    if limit is not None and (type(limit) is not int or not 1 <= limit <= MAX_TOKENS_LIMIT):
        _fail(
            f"Invalid 'max_output_tokens': expected an integer between 1 and {MAX_TOKENS_LIMIT}.", "max_output_tokens"
        )
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    renamed = {"max_output_tokens": "max_completion_tokens"}
    for name in (
        "max_output_tokens",
        "temperature",
        "top_p",
        "user",
        "stream",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "safety_identifier",
    ):
        if body.get(name) is not None:
            chat[renamed.get(name, name)] = body[name]
    given: list[int] | None = None  # the client's index of each tool sent, in order, where allowed_tools sent fewer
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
        # Beside the tools only: the Responses API takes it without them, OpenAI's chat completions refuse it.
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    elif body.get("tools") is not None:
        _tools(body["tools"])
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        # The model may call only these: they alone are sent, with the mode as the choice, as few chat upstreams
        # (not Claude, Gemini, Mistral nor most OpenAI-compatible servers) take chat completions' own allowed_tools.
        # Narrowed as an adapter narrows chat completions' own choice (``allowed_tools_narrowed``), for every
        # provider: the client's tools are checked here, in the Responses API's words.
        names = _allowed_functions(choice, body.get("tools"))
        defined = chat["tools"]
        chat["tool_choice"] = {
            "type": "allowed_tools",
            "allowed_tools": {
                "mode": choice["mode"],
                "tools": [{"type": "function", "function": {"name": name}} for name in sorted(names)],
            },
        }
        chat = allowed_tools_narrowed(chat)
        kept = {id(tool) for tool in chat["tools"]}
        given = [index for index, tool in enumerate(defined) if id(tool) in kept]
    elif choice is not None:
        chat["tool_choice"] = _tool_choice(choice, body.get("tools"))
        if not chat.get("tools"):
            # Without tools, "none" and the default "auto" ask for nothing (the Responses API takes them; chat
            # completions refuse a tool_choice without tools); one that forces a call cannot be met.
            if chat["tool_choice"] not in ("none", "auto"):
                _fail(
                    "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                    "tool_choice",
                )
            del chat["tool_choice"]
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        if not isinstance(reasoning["effort"], str):
            _fail("Invalid type for 'reasoning.effort': expected a string.", "reasoning.effort", "invalid_type")
        chat["reasoning_effort"] = reasoning["effort"]
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    verbosity = body["text"].get("verbosity") if isinstance(body.get("text"), dict) else None
    if verbosity is not None:
        if not isinstance(verbosity, str):
            _fail("Invalid type for 'text.verbosity': expected a string.", "text.verbosity", "invalid_type")
        chat["verbosity"] = verbosity
    if _logprobs_included(body):
        # Asked for by ``include`` (``top_logprobs`` alone asks for none, as OpenAI answers it): chat completions'
        # ``logprobs``, which a provider that has none refuses (``common.LOGPROBS``), naming ``include``.
        chat["logprobs"] = True
        if top_logprobs is not None:
            chat["top_logprobs"] = top_logprobs
    if chat.get("stream") is True:
        chat["stream_options"] = {"include_usage": True}  # the usage that response.completed reports
    fields = {
        # "": the message itself, as the item (or the instructions) it was given as.
        f"messages[{index}].{name}" if name else f"messages[{index}]": given
        for index, names in enumerate(origins)
        for name, given in names.items()
    }
    fields["response_format"] = "text.format"
    fields["max_completion_tokens"] = "max_output_tokens"
    fields["reasoning_effort"] = "reasoning.effort"
    fields["verbosity"] = "text.verbosity"
    fields["messages"] = "input"
    fields["logprobs"] = "include"
    fields.update(_tool_fields(body, given))
    return chat, fields


# A function tool's fields in the chat completion (``tools[N].function.<name>``) and the Responses tool's it was
# made of: the Responses API's function tools are flat. A custom tool's ``parameters`` and the local shell tool's
# fields are llmhub's own (``_custom_function``, ``_LOCAL_SHELL_FUNCTION``): named by the tool.
_FUNCTION_FIELDS = {"function": "", "function.name": ".name", "function.description": ".description"}
_FUNCTION_FIELDS_OF = {
    "function": {**_FUNCTION_FIELDS, "function.parameters": ".parameters", "function.strict": ".strict"},
    CUSTOM: _FUNCTION_FIELDS,
    LOCAL_SHELL: {"function": ""},
}


def _tool_fields(body: dict[str, Any], given: list[int] | None) -> dict[str, str]:
    """The client's names of the chat completion's tool fields (``responses_request_to_chat``'s ``fields``): the
    tool sent as ``tools[N]`` is the client's ``tools[given[N]]`` (another index where ``allowed_tools`` sent fewer),
    its function's fields the flat tool's (``tools[N].function.parameters`` is ``tools[M].parameters``); and a
    ``tool_choice`` naming a function (``tool_choice.function.name``) is the Responses choice's ``tool_choice.name``."""
    fields: dict[str, str] = {}
    tools = body.get("tools") or ()
    for sent, index in enumerate(range(len(tools)) if given is None else given):
        where = f"tools[{index}]"
        kind = tools[index].get("type")
        fields[f"tools[{sent}]"] = where
        fields[f"tools[{sent}].type"] = f"{where}.type"
        for name, field in _FUNCTION_FIELDS_OF.get(kind, {}).items():
            fields[f"tools[{sent}].{name}"] = where + field
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("function", CUSTOM):
        fields["tool_choice.function"] = "tool_choice"
        fields["tool_choice.function.name"] = "tool_choice.name"
    return fields


def response_id(request_id: str) -> str:
    """The response's id, the request's own (``x-request-id``) in OpenAI's spelling, so that either finds the
    other in the ledger and the logs."""
    return "resp_" + request_id.removeprefix("req_")


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A chat completion's usage as the Responses API reports it."""
    if not usage:
        return None
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": int(prompt_details.get("cached_tokens") or 0),
            "cache_write_tokens": int(prompt_details.get("cache_write_tokens") or 0),
        },
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(completion_details.get("reasoning_tokens") or 0)},
        "total_tokens": int(usage.get("total_tokens") or prompt + completion),
    }


def response_skeleton(body: dict[str, Any], *, response_id: str, model: str, created_at: int) -> dict[str, Any]:
    """A ``Response`` with no output yet (``in_progress``): what the client asked for, echoed as OpenAI echoes it."""
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None
    response = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": None} if reasoning else None,
        # Stored unless asked not to, as OpenAI does (``chat.api_responses``: false again if keeping it failed).
        "store": body.get("store") is not False,
        "temperature": body.get("temperature"),
        # The verbosity it was made with, ``medium`` unless asked otherwise, as OpenAI echoes it.
        "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity") or "medium"},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": [_tool_echoed(tool) for tool in body.get("tools") or ()],
        "top_p": body.get("top_p"),
        "truncation": "disabled",
        "metadata": body.get("metadata") or {},
    }
    if isinstance(body.get("user"), str):
        response["user"] = body["user"]
    if body.get("top_logprobs") is not None:
        response["top_logprobs"] = body["top_logprobs"]
    return response


def _tool_echoed(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool as a ``Response`` lists it: a function's ``parameters`` and ``strict`` are always there (null: not
    given); a custom or the local shell tool as it was given."""
    if tool.get("type") != "function":
        return dict(tool)
    return {**tool, "parameters": tool.get("parameters"), "strict": tool.get("strict")}


def _finished(response: dict[str, Any], finish_reason: str | None, usage: dict[str, Any] | None) -> dict[str, Any]:
    reason = _INCOMPLETE.get(finish_reason or "")
    response["status"] = "incomplete" if reason else "completed"
    response["incomplete_details"] = {"reason": reason} if reason else None
    response["completed_at"] = None if reason else int(time.time())
    _usage_set(response, usage)
    return response


def _usage_set(response: dict[str, Any], usage: dict[str, Any] | None) -> None:
    """The response's ``usage``, left out while none is known (the spec has no ``null`` for it)."""
    reported = response_usage(usage)
    if reported is not None:
        response["usage"] = reported


def _message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": parts}


def _reasoning_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """The model's reasoning (a chat completion's ``reasoning_content`` or ``reasoning``) as the Responses API's
    ``reasoning`` item: the raw text, so in ``content`` as a ``reasoning_text`` part, where OpenAI's own open-weight
    models put theirs; ``summary`` is for a summary the model did not write (empty). ``None``: no part yet."""
    content = [] if text is None else [_reasoning_part(text)]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def _reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def _text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _token_logprob(entry: Any) -> dict[str, Any] | None:
    """A chat completion's token log probability (``token``, ``logprob``, ``bytes``) in the spec's shape for the
    Responses API (``TopLogProb``: ``bytes`` required, the token's UTF-8 where a server gave none); None for an entry
    without a token or a number."""
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        return None
    logprob = entry.get("logprob")
    if isinstance(logprob, bool) or not isinstance(logprob, int | float):
        return None
    given = entry.get("bytes")
    if isinstance(given, list) and all(type(byte) is int for byte in given):
        token_bytes = given
    else:
        token_bytes = list(entry["token"].encode("utf-8", "replace"))
    return {"token": entry["token"], "logprob": logprob, "bytes": token_bytes}


def _output_logprobs(logprobs: Any) -> list[dict[str, Any]]:
    """A choice's ``logprobs`` (chat completions': ``content``, a list of tokens each with its ``top_logprobs``) as an
    ``output_text`` part's (the spec's ``LogProb``); what is not a token's is left out."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    tokens: list[dict[str, Any]] = []
    for entry in content if isinstance(content, list) else ():
        token = _token_logprob(entry)
        if token is None:
            continue
        alternatives = entry.get("top_logprobs")
        token["top_logprobs"] = [
            alternative
            for alternative in map(_token_logprob, alternatives if isinstance(alternatives, list) else ())
            if alternative is not None
        ]
        tokens.append(token)
    return tokens


def _event_logprobs(tokens: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An ``output_text`` part's log probabilities as its stream events carry them (the spec's ``ResponseLogProb``:
    no ``bytes``)."""
    return [
        {
            "token": token["token"],
            "logprob": token["logprob"],
            "top_logprobs": [{"token": each["token"], "logprob": each["logprob"]} for each in token["top_logprobs"]],
        }
        for token in tokens
    ]


_CALL_ITEMS = {CUSTOM: ("ctc", "custom_tool_call"), LOCAL_SHELL: ("lsh", "local_shell_call")}


def _call_item(kind: str | None, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    """The output item of a model's call of the function ``name`` with ``arguments``: a ``function_call``, or for
    the function of a custom or the local shell tool (``kind``, from ``tool_kinds``) that tool's own item."""
    prefix, item_type = _CALL_ITEMS.get(kind or "", ("fc", "function_call"))
    item: dict[str, Any] = {"id": _item_id(prefix), "type": item_type, "status": status, "call_id": call_id}
    if item_type != "local_shell_call":
        item["name"] = name
    return _call_filled(item, arguments)


# The arguments of a call of a function of no parameters that the model (its server: some send none) gave none.
_NO_ARGUMENTS = "{}"


def _arguments_given(kind: str | None, arguments: str) -> str:
    """A function's call's ``arguments`` as its client parses them: JSON, ``{}`` for none (OpenAI's are never
    empty: an empty string failed a client's ``json.loads``, Codex's parse). A custom or the local shell tool's
    (``kind``) are read as they came (``_call_filled``)."""
    return _NO_ARGUMENTS if kind is None and not arguments else arguments


def _call_filled(item: dict[str, Any], arguments: str) -> dict[str, Any]:
    if item["type"] == "custom_tool_call":
        item["input"] = _custom_input(arguments)
    elif item["type"] == "local_shell_call":
        item["action"] = _shell_action(arguments)
    else:
        item["arguments"] = arguments
    return item


def _custom_input(arguments: str) -> str:
    """A custom tool's input: its function's ``input`` argument; arguments that are not that JSON are taken for
    the input itself (a model that wrote it bare), so nothing the model wrote is lost."""
    try:
        decoded = json.loads(arguments)
    except ValueError:
        return arguments
    return decoded["input"] if isinstance(decoded, dict) and isinstance(decoded.get("input"), str) else arguments


def _shell_action(arguments: str) -> dict[str, Any]:
    """The local shell's action (the spec's ``LocalShellExecAction``) from its function's arguments. Arguments with
    no command (not JSON, or no array of strings) give an empty command, which the client's shell refuses and the
    model sees refused, rather than an item the client cannot read."""
    action: dict[str, Any] = {"type": "exec", "command": [], "env": {}}
    try:
        decoded = json.loads(arguments)
    except ValueError:
        decoded = None
    command = decoded.get("command") if isinstance(decoded, dict) else None
    if not isinstance(command, list) or not all(isinstance(part, str) for part in command):
        if arguments:
            logger.warning("a local_shell call without a command array was answered with an empty command")
        return action
    action["command"] = command
    env = decoded.get("env")
    if isinstance(env, dict) and all(isinstance(value, str) for value in env.values()):
        action["env"] = env
    if type(decoded.get("timeout_ms")) is int:
        action["timeout_ms"] = decoded["timeout_ms"]
    for field in ("working_directory", "user"):
        if isinstance(decoded.get(field), str):
            action[field] = decoded[field]
    return action


def response_from_completion(
    body: dict[str, Any], completion: dict[str, Any], *, response_id: str, created_at: int
) -> dict[str, Any]:
    """The ``Response`` for a chat completion the pipeline answered ``body`` with (the first choice: a Responses
    request asks for one)."""
    response = response_skeleton(
        body, response_id=response_id, model=completion.get("model") or body["model"], created_at=created_at
    )
    choices = completion.get("choices") or [{}]
    message = choices[0].get("message") or {}
    status = "incomplete" if choices[0].get("finish_reason") in _INCOMPLETE else "completed"
    thought, blocks = reasoning_text(message), message.get("thinking_blocks")
    if thought or blocks:
        response["output"].append(_reasoning_item(_item_id("rs"), thought or None, status))
        if isinstance(blocks, list) and blocks:
            response["output"][-1]["encrypted_content"] = thinking_content(blocks)
    parts = []
    if message.get("content"):
        logprobs = _output_logprobs(choices[0].get("logprobs")) if _logprobs_included(body) else None
        parts.append(_text_part(message["content"], logprobs))
    if message.get("refusal"):
        parts.append({"type": "refusal", "refusal": message["refusal"]})
    if parts:
        response["output"].append(_message_item(_item_id("msg"), parts, status))
    kinds = tool_kinds(body)
    for call in tool_calls_of(message):
        function = call.get("function") or {}
        name = function.get("name") or ""
        call_id = call.get("id") or _item_id("call")
        arguments = _arguments_given(kinds.get(name), function.get("arguments") or "")
        response["output"].append(_call_item(kinds.get(name), call_id, name, arguments, status))
    _tier_served(response, completion)
    return _finished(response, choices[0].get("finish_reason"), completion.get("usage"))


def _tier_served(response: dict[str, Any], reply: dict[str, Any]) -> None:
    """The service tier the chat completion (or a chunk of it) says it was served at, which the ``Response`` says as
    OpenAI's does (``service_tier``): the tier the request is billed at, which for ``auto`` may be the project's
    default, priority."""
    tier = reply.get("service_tier")
    if isinstance(tier, str) and tier:
        response["service_tier"] = tier


class ResponseEvents:
    """The typed events of a streamed ``Response``, from the chat-completion chunks the pipeline relays: feed
    each chunk to ``chunk``, then end with ``completed`` (or ``failed`` when the stream broke). Every method
    returns the events to send, each with its ``sequence_number`` and a copy of what it shows (the items go on
    changing after an event is made)."""

    def __init__(self, body: dict[str, Any], *, response_id: str, model: str, created_at: int) -> None:
        self.response = response_skeleton(body, response_id=response_id, model=model, created_at=created_at)
        self._sequence = 0
        self._reasoning: dict[str, Any] | None = None  # the reasoning item being written
        self._signed: list[dict[str, Any]] = []  # its signed thinking blocks (Claude's), so far
        self._message: dict[str, Any] | None = None  # the message item being written
        self._part: dict[str, Any] | None = None  # its content part being written
        # Tool calls by their index in the chunks; those still open. A server may interleave the pieces of
        # parallel calls, so each stays open until the reply ends (or turns to text).
        self._calls: dict[int, dict[str, Any]] = {}
        self._open_calls: dict[int, dict[str, Any]] = {}
        self._positions: dict[str, int] = {}  # item id -> its output_index
        self._kinds = tool_kinds(body)
        self._logprobs = _logprobs_included(body)  # the output text's log probabilities, asked for
        self._arguments: dict[str, str] = {}  # a call item's id -> the arguments its function got so far
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    @staticmethod
    def _item_copy(item: dict[str, Any]) -> dict[str, Any]:
        copy = dict(item)
        if "content" in copy:
            copy["content"] = [dict(part) for part in copy["content"]]
        return copy

    def _snapshot(self) -> dict[str, Any]:
        return {**self.response, "output": [self._item_copy(item) for item in self.response["output"]]}

    def started(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self._snapshot()),
            self._event("response.in_progress", response=self._snapshot()),
        ]

    def _add_item(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self._positions[item["id"]] = len(self.response["output"])
        self.response["output"].append(item)
        return [
            self._event(
                "response.output_item.added", output_index=self._positions[item["id"]], item=self._item_copy(item)
            )
        ]

    def _item_done(self, item: dict[str, Any], status: str) -> dict[str, Any]:
        item["status"] = status
        return self._event(
            "response.output_item.done", output_index=self._positions[item["id"]], item=self._item_copy(item)
        )

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {
            "item_id": item["id"],
            "output_index": self._positions[item["id"]],
            "content_index": len(item["content"]) - 1,
        }

    def _close_part(self) -> list[dict[str, Any]]:
        item, part = self._message, self._part
        if item is None or part is None:
            return []
        where = self._where(item)
        if part["type"] == "output_text":
            done = self._event(
                "response.output_text.done", **where, text=part["text"], logprobs=_event_logprobs(part["logprobs"])
            )
        else:
            done = self._event("response.refusal.done", **where, refusal=part["refusal"])
        self._part = None
        return [done, self._event("response.content_part.done", **where, part=dict(part))]

    def _close_message(self, status: str = "completed") -> list[dict[str, Any]]:
        if self._message is None:
            return []
        events = [*self._close_part(), self._item_done(self._message, status)]
        self._message = None
        return events

    def _close_calls(self, status: str = "completed") -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for item in self._open_calls.values():
            where = {"item_id": item["id"], "output_index": self._positions[item["id"]]}
            if item["type"] == "function_call" and not item["arguments"]:
                # None came: ``{}`` streamed as its one piece, so that the pieces add up to the done event's.
                given = _arguments_given(None, "")
                events.append(self._event("response.function_call_arguments.delta", **where, delta=given))
                self._arguments[item["id"]] = item["arguments"] = given
            _call_filled(item, self._arguments[item["id"]])
            if item["type"] == "function_call":
                events.append(
                    self._event(
                        "response.function_call_arguments.done", **where, name=item["name"], arguments=item["arguments"]
                    )
                )
            elif item["type"] == "custom_tool_call":
                # The input is known once its function's arguments are whole JSON: it is given in one piece.
                if item["input"]:
                    events.append(self._event("response.custom_tool_call_input.delta", **where, delta=item["input"]))
                events.append(self._event("response.custom_tool_call_input.done", **where, input=item["input"]))
            events.append(self._item_done(item, status))
        self._open_calls = {}
        return events

    def _close_reasoning(self, status: str = "completed") -> list[dict[str, Any]]:
        item = self._reasoning
        if item is None:
            return []
        where = self._where(item)
        part = item["content"][-1]
        self._reasoning = None
        return [
            self._event("response.reasoning_text.done", **where, text=part["text"]),
            self._event("response.content_part.done", **where, part=dict(part)),
            self._item_done(item, status),
        ]

    def _think(self, piece: str) -> list[dict[str, Any]]:
        """A piece of the model's reasoning: its item (after what came before it, which it closes), one
        ``reasoning_text`` part written by ``response.reasoning_text.delta`` events."""
        events = self._open_reasoning()
        item = self._reasoning
        item["content"][-1]["text"] += piece
        events.append(self._event("response.reasoning_text.delta", **self._where(item), delta=piece))
        return events

    def _open_reasoning(self) -> list[dict[str, Any]]:
        """The reasoning item, opened (after what came before it, which it closes) unless it is."""
        if self._reasoning is not None:
            return []
        events = [*self._close_message(), *self._close_calls()]
        self._reasoning = _reasoning_item(_item_id("rs"), None, "in_progress")
        self._signed = []
        events.extend(self._add_item(self._reasoning))
        self._reasoning["content"].append(_reasoning_part(""))
        events.append(
            self._event("response.content_part.added", **self._where(self._reasoning), part=_reasoning_part(""))
        )
        return events

    def _sign(self, blocks: list[Any]) -> list[dict[str, Any]]:
        """Claude's signed thinking blocks, each whole (once signed; a redacted one as it starts): kept in the
        reasoning item's ``encrypted_content``, which its done event and the response carry."""
        events = self._open_reasoning()
        self._signed.extend(block for block in blocks if isinstance(block, dict))
        self._reasoning["encrypted_content"] = thinking_content(self._signed)
        return events

    def _close_all(self, status: str = "completed") -> list[dict[str, Any]]:
        """Close what is open, in the order of the output (reasoning, open only while nothing came after it, first)."""
        if self._reasoning is not None:
            return self._close_reasoning(status)
        if self._message is not None and any(
            self._positions[call["id"]] < self._positions[self._message["id"]] for call in self._open_calls.values()
        ):
            return [*self._close_calls(status), *self._close_message(status)]
        return [*self._close_message(status), *self._close_calls(status)]

    def _write(self, kind: str, piece: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """A piece of the reply's text (``output_text``, with its tokens' ``logprobs`` when asked for) or of its
        refusal (``refusal``)."""
        events = [*self._close_reasoning(), *self._close_calls()]
        if self._message is None:
            self._message = _message_item(_item_id("msg"), [], "in_progress")
            events.extend(self._add_item(self._message))
        item = self._message
        if self._part is None or self._part["type"] != kind:
            events.extend(self._close_part())
            self._part = _text_part("") if kind == "output_text" else {"type": "refusal", "refusal": ""}
            item["content"].append(self._part)
            events.append(self._event("response.content_part.added", **self._where(item), part=dict(self._part)))
        if kind == "output_text":
            self._part["text"] += piece
            tokens = logprobs or []
            # A new list, not the same one extended: the events made before hold the part as it was.
            self._part["logprobs"] = [*self._part["logprobs"], *tokens]
            events.append(
                self._event(
                    "response.output_text.delta", **self._where(item), delta=piece, logprobs=_event_logprobs(tokens)
                )
            )
        else:
            self._part["refusal"] += piece
            events.append(self._event("response.refusal.delta", **self._where(item), delta=piece))
        return events

    def _call(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        index = delta.get("index", 0)
        function = delta.get("function") or {}
        item = self._calls.get(index)
        if item is None:
            events.extend([*self._close_reasoning(), *self._close_message()])
            name = function.get("name") or ""
            item = _call_item(self._kinds.get(name), delta.get("id") or _item_id("call"), name, "", "in_progress")
            self._arguments[item["id"]] = ""
            self._calls[index] = self._open_calls[index] = item
            events.extend(self._add_item(item))
        elif index not in self._open_calls:
            # A piece of a call closed when text came after it: no model writes that, and its done event is gone.
            logger.warning("a tool call's piece after the call was closed was dropped")
            return events
        arguments = function.get("arguments")
        if arguments:
            self._arguments[item["id"]] += arguments
            if item["type"] != "function_call":
                return events  # a custom or the local shell tool's call: its item is written when it is whole
            item["arguments"] += arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self._positions[item["id"]],
                    delta=arguments,
                )
            )
        return events

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        _tier_served(self.response, chunk)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if thought := reasoning_text(delta):
                events.extend(self._think(thought))
            if isinstance(delta.get("thinking_blocks"), list) and delta["thinking_blocks"]:
                events.extend(self._sign(delta["thinking_blocks"]))
            if delta.get("content"):
                logprobs = _output_logprobs(choice.get("logprobs")) if self._logprobs else None
                events.extend(self._write("output_text", delta["content"], logprobs))
            if delta.get("refusal"):
                events.extend(self._write("refusal", delta["refusal"]))
            for call in tool_calls_of(delta):
                events.extend(self._call(call))
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def completed(self) -> list[dict[str, Any]]:
        """The end of a stream that ended well: what is open closed, then ``response.completed`` (or
        ``response.incomplete`` when the reply hit its token limit or a content filter)."""
        incomplete = self.finish_reason in _INCOMPLETE
        events = self._close_all("incomplete" if incomplete else "completed")
        _finished(self.response, self.finish_reason, self.usage)
        kind = "response.incomplete" if incomplete else "response.completed"
        return [*events, self._event(kind, response=self._snapshot())]

    def failed(self, code: str, message: str) -> list[dict[str, Any]]:
        """The end of a stream that broke after it began: ``response.failed``, with what was written so far, never
        a ``response.completed``."""
        for item in [self._reasoning, self._message, *self._open_calls.values()]:
            if item is not None:
                item["status"] = "incomplete"
        self.response["status"] = "failed"
        self.response["error"] = {"code": code, "message": message}
        _usage_set(self.response, self.usage)
        return [self._event("response.failed", response=self._snapshot())]
