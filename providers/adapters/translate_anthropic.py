"""OpenAI chat completions ⇄ Anthropic Messages API, as pure functions on wire-format dicts.

Two uses, one home for the mapping tables: outbound, an OpenAI-shaped request for an Anthropic-protocol
model (``anthropic_request``, ``completion_from_message``, ``StreamTranslator``, described below); inbound,
a ``/v1/messages`` request for an OpenAI-protocol model (``chat_request``, ``message_from_completion``,
``EventTranslator``, described at the end of the module).

Request (OpenAI → Anthropic):

- ``system`` and ``developer`` messages, wherever they are, become the ``system`` prompt (their texts
  joined by blank lines); ``user`` and ``assistant`` messages become turns; text parts, ``image_url``
  parts (``data:`` URLs of a type Claude reads, ``CLAUDE_IMAGE_TYPES``, as base64 sources, http(s) URLs as url
  sources), assistant ``tool_calls``
  (``tool_use`` blocks) and ``tool`` messages (``tool_result`` blocks; consecutive results share one
  user turn, as Anthropic expects them) are translated.
- ``tools`` (functions) and ``tool_choice``; ``parallel_tool_calls: false`` becomes
  ``disable_parallel_tool_use``; ``max_completion_tokens``/``max_tokens`` → ``max_tokens`` (required
  by Anthropic: :data:`DEFAULT_MAX_TOKENS` when absent, up to the model's ``max_output_tokens``,
  ``within_output_limit``); ``temperature``, ``top_p``; ``stop`` →
  ``stop_sequences``; ``user`` (or ``safety_identifier``) → ``metadata.user_id``;
  ``response_format`` of type ``json_schema`` → ``output_config.format``. Anthropic's own ``top_k``
  and ``thinking`` pass through for clients that know they talk to Claude; without ``thinking``,
  ``reasoning_effort`` becomes a thinking budget (``THINKING_BUDGETS``, ``_reasoning_effort``).
  An assistant message's ``thinking_blocks`` (as the replies give them) go back first in its turn.
- A content part's ``cache_control`` (Anthropic's own, for clients that know they talk to Claude) goes on its
  block; OpenAI's ``prompt_cache_breakpoint`` becomes ``cache_control: {"type": "ephemeral", "ttl": "1h"}``
  there (``prompt_cache_options.ttl``'s 30 minutes is a minimum lifetime: Anthropic's 5-minute default would not
  keep it; the 1-hour writes are billed at ``cache_write_1h_per_mtok`` from ``cache_creation``). Anthropic takes at
  most four such blocks: the latest breakpoints that fit beside the client's own are kept, as OpenAI writes the
  latest four, and earlier ones dropped. Anthropic refuses a 1-hour one after a 5-minute one: a breakpoint after
  the client's own 5-minute ``cache_control`` is of the 5-minute TTL, the client's choice standing
  (``_breakpoints_capped``). A marked system part makes ``system`` a list of text blocks.
  ``prompt_cache_options`` itself is not sent (``mode: explicit`` without breakpoints: Claude caches nothing
  unasked anyway).
- Everything else is dropped, since the Messages API rejects fields it does not know: among them
  ``frequency_penalty``, ``presence_penalty``, an empty ``logit_bias``, ``seed``,
  ``response_format`` ``json_object``/``text``, ``store``, ``metadata``, ``service_tier``,
  ``prediction``, ``prompt_cache_key``, ``prompt_cache_retention``, ``prompt_cache_options``,
  ``web_search_options``, ``verbosity``, ``stream_options`` (usage is always reported) and an empty
  legacy ``functions`` (with its ``function_call``). ``n`` other than 1 cannot be honoured and is refused;
  so, by the adapter's ``unhonoured_refused`` before this translation, are audio output (``modalities`` with
  ``"audio"``), ``logprobs: true`` (Claude returns none; ``false`` is left out), a ``logit_bias`` that bans or
  favours a token (Claude has none) and a list of legacy ``functions`` (Claude takes tools only).

Response (Anthropic → OpenAI): a ``message`` becomes a ``chat.completion``; a stream of Messages
events becomes ``chat.completion.chunk`` objects through :class:`StreamTranslator`, ending with a
usage chunk (``choices: []``) like OpenAI's ``stream_options.include_usage``. The ``thinking`` blocks of a
reply are its ``reasoning_content`` (blocks joined by a line break; streamed: ``delta.reasoning_content`` from
each ``thinking_delta``), and its ``thinking_blocks``, signed, for the client to send back (streamed: each thinking
block whole once its signature arrives; a ``redacted_thinking`` block as it starts), as LiteLLM spells them.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any, TypeVar

from ..exceptions import ProviderBadRequestError, ProviderError
from .common import CHAT_FIELD_PATH, image_media_type

DEFAULT_MAX_TOKENS = 4096
# Anthropic's cap on the blocks with a ``cache_control`` in one request.
MAX_CACHE_CONTROLS = 4
# The breakpoint an OpenAI ``prompt_cache_breakpoint`` becomes: ``prompt_cache_options.ttl``'s 30 minutes is a minimum
# lifetime, which Anthropic's default 5 minutes would not keep, so its 1-hour cache (billed at the deployment's
# ``cache_write_1h_per_mtok``). Compared by identity until ``_breakpoints_capped`` copies it.
_ONE_HOUR: dict[str, str] = {"type": "ephemeral", "ttl": "1h"}
# The breakpoint after a client's own 5-minute ``cache_control``, where Anthropic refuses a 1-hour one: its default
# TTL (``_breakpoints_capped``).
_FIVE_MINUTES: dict[str, str] = {"type": "ephemeral"}

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_DATA_URL = re.compile(r"data:(?P<media_type>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)", re.DOTALL)
# The image types Claude reads (Anthropic's base64 image source: its media_type is one of these four): an image part's
# data URL of another type (text/html, HEIC, an executable) is refused naming it before any call (``_image_source``),
# where Anthropic answered its own 400 after one.
CLAUDE_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
_PASSTHROUGH = ("temperature", "top_p", "top_k", "thinking")
# OpenAI's reasoning_effort → Claude's extended-thinking budget in tokens: LiteLLM's budgets (low 1024, medium 2048,
# high 4096), with ``minimal`` at Anthropic's least budget, 1024 (LiteLLM's 128 is below what Claude takes);
# ``none`` leaves thinking off.
THINKING_BUDGETS = {"none": 0, "minimal": 1024, "low": 1024, "medium": 2048, "high": 4096}
_LEAST_THINKING_BUDGET = 1024


def thinking_budget(
    effort: str,
    provider: str,
    error: type[ProviderBadRequestError],
    budgets: Mapping[str, int] = THINKING_BUDGETS,
) -> int:
    """The thinking budget in tokens of a ``reasoning_effort`` (0 for ``none``), for the translation of each provider
    that thinks within a budget: ``budgets`` is the provider's table, Claude's ``THINKING_BUDGETS`` unless it has its
    own (Claude's and Cohere's ``thinking`` take Claude's; Gemini's ``thinking_config``, Google's own,
    ``translate_gemini.GEMINI_THINKING_BUDGETS``). An effort without one (``xhigh``) is refused with ``error``, a 400
    naming ``reasoning_effort`` and the table's levels, in the words of ``provider`` (its name, as the client knows
    it), not dropped."""
    if effort not in budgets:
        raise error(
            f"{provider} has no thinking budget for reasoning_effort {effort!r}: use one of "
            + ", ".join(repr(name) for name in budgets)
            + ".",
            param="reasoning_effort",
            code="unsupported_value",
        )
    return budgets[effort]


# Anthropic's thinking settings that turn it on, and the Messages API's tool choices that force a call, which
# Anthropic refuses together.
THINKING_ON = frozenset({"enabled", "adaptive"})
FORCED_TOOL_CHOICES = frozenset({"any", "tool"})
# The room a reply keeps under a client's output limit when ``reasoning_effort`` sets the thinking budget: thinking
# counts in the limit, and a budget of all but one token of it left the reply about one token.
ANSWER_FLOOR = 1024


def _invalid(message: str, param: str, code: str = "invalid_value") -> ProviderBadRequestError:
    """The client sent something this translation cannot express: a 400 before any upstream call."""
    return ProviderBadRequestError(message, param=param, code=code)


# Request -------------------------------------------------------------------------------------------


def anthropic_request(body: dict[str, Any]) -> dict[str, Any]:
    """The Messages API body for an OpenAI chat-completions body (``stream`` is left to the caller)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("`messages` must be a non-empty array.", "messages")
    n = body.get("n")
    if n not in (None, 1):
        raise _invalid("This model returns one choice per request: `n` must be 1.", "n", "unsupported_value")
    system, turns = _translate_messages(messages)

    request: dict[str, Any] = {"model": body.get("model"), "messages": turns, "max_tokens": _max_tokens(body)}
    if system:
        request["system"] = system
    _breakpoints_capped(request)
    for name in _PASSTHROUGH:
        if body.get(name) is not None:
            request[name] = body[name]
    if body.get("thinking") is None:
        _reasoning_effort(body, request)
    stop = body.get("stop")
    if isinstance(stop, str):
        request["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        request["stop_sequences"] = stop
    user = body.get("user") or body.get("safety_identifier")
    if user:
        request["metadata"] = {"user_id": user}
    output_format = _output_format(body.get("response_format"))
    if output_format is not None:
        request["output_config"] = {"format": output_format}
    tools = body.get("tools")
    if tools:
        request["tools"] = _translate_tools(tools)
        tool_choice = _translate_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if tool_choice is not None:
            _check_thinking_tool_choice(request.get("thinking"), tool_choice)
            request["tool_choice"] = tool_choice
    return request


def _check_thinking_tool_choice(thinking: Any, tool_choice: dict[str, Any]) -> None:
    """Claude thinks with ``tool_choice`` auto or none only (Anthropic refuses one that forces a call): our 400,
    before any upstream call, rather than Anthropic's after one."""
    if (
        isinstance(thinking, dict)
        and thinking.get("type") in THINKING_ON
        and tool_choice.get("type") in FORCED_TOOL_CHOICES
    ):
        raise _invalid(
            'Claude thinks only with `tool_choice` "auto" or "none": with `reasoning_effort` (or `thinking`), set'
            ' `tool_choice` to "auto" or "none" (or leave it out), or ask without reasoning.',
            "tool_choice",
            "unsupported_value",
        )


def _max_tokens(body: dict[str, Any]) -> Any:
    name = _max_tokens_name(body)
    return body[name] if name is not None else DEFAULT_MAX_TOKENS


def _max_tokens_name(body: dict[str, Any]) -> str | None:
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            return name
    return None


def within_output_limit(body: dict[str, Any], max_output_tokens: int | None) -> dict[str, Any]:
    """``body`` with the output limit llmhub picks when the client sets none (``DEFAULT_MAX_TOKENS`` for the
    reply, after the thinking budget of a ``reasoning_effort``) fitted under what the model writes at most (the
    catalog's ``max_output_tokens``; Anthropic refuses a limit past it). The catalog's limit then bounds the
    thinking and the reply as a client's does (``_reasoning_effort``): the budget gives way so that the reply keeps
    ``ANSWER_FLOOR`` tokens; a model that cannot fit Anthropic's least budget and that floor refuses
    ``reasoning_effort`` (a 400)."""
    if not max_output_tokens or _max_tokens_name(body) is not None:
        return body
    effort = body.get("reasoning_effort")
    budget = THINKING_BUDGETS.get(effort, 0) if body.get("thinking") is None and isinstance(effort, str) else 0
    if budget + DEFAULT_MAX_TOKENS <= max_output_tokens:
        return body
    if budget and max_output_tokens < _LEAST_THINKING_BUDGET + ANSWER_FLOOR:
        raise _invalid(
            f"This model writes at most {max_output_tokens} tokens, too few for Claude to think (at least"
            f" {_LEAST_THINKING_BUDGET} tokens) and answer ({ANSWER_FLOOR}): ask it without `reasoning_effort`.",
            "reasoning_effort",
            "unsupported_value",
        )
    return {**body, "max_tokens": max_output_tokens}


def thinking_requested(body: dict[str, Any]) -> bool:
    """Whether Claude thinks when asked with ``body`` (a chat completion, as ``anthropic_request`` translates it, or
    a Messages request): its own ``thinking`` enabled or adaptive, else a ``reasoning_effort`` with a budget. Then
    Anthropic refuses a final assistant message (a prefill) that does not begin with the thinking."""
    thinking = body.get("thinking")
    if thinking is not None:
        return isinstance(thinking, dict) and thinking.get("type") in THINKING_ON
    effort = body.get("reasoning_effort")
    return isinstance(effort, str) and bool(THINKING_BUDGETS.get(effort))


def _reasoning_effort(body: dict[str, Any], request: dict[str, Any]) -> None:
    """``reasoning_effort`` as Claude's extended thinking (``THINKING_BUDGETS``). As on OpenAI's reasoning models,
    the output limit bounds the thinking and the reply together, and it is a cost ceiling (the client's, or the
    one llmhub picked for a budget): it is never raised. The budget gives way so that the reply keeps
    ``ANSWER_FLOOR`` tokens of the limit, down to Anthropic's least budget (then the reply has the rest); a limit
    too small for that least budget is a 400. Without a limit, the default room for the reply is added to the budget.
    Claude thinks only at temperature 1 and ``top_p`` of 0.95 or more, with no ``top_k``: other values are refused
    (as OpenAI's reasoning models refuse a temperature), not dropped, since they would silently not apply."""
    effort = body.get("reasoning_effort")
    if effort is None:
        return
    budget = thinking_budget(effort, "Claude", ProviderBadRequestError)
    if not budget:
        return
    if body.get("temperature") is not None and body["temperature"] != 1:
        raise _invalid(
            "Claude thinks at temperature 1 only: with `reasoning_effort`, leave `temperature` out or set it to 1.",
            "temperature",
            "unsupported_value",
        )
    if body.get("top_p") is not None and body["top_p"] < 0.95:
        raise _invalid(
            "Claude thinks with `top_p` of 0.95 or more only: with `reasoning_effort`, leave `top_p` out or raise it.",
            "top_p",
            "unsupported_value",
        )
    if body.get("top_k") is not None:
        raise _invalid(
            "Claude takes no `top_k` while it thinks: with `reasoning_effort`, leave `top_k` out.",
            "top_k",
            "unsupported_value",
        )
    limit_name = _max_tokens_name(body)
    if limit_name is None:
        request["max_tokens"] = budget + DEFAULT_MAX_TOKENS
    else:
        limit = request["max_tokens"]
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= _LEAST_THINKING_BUDGET:
            raise _invalid(
                f"Claude thinks with at least {_LEAST_THINKING_BUDGET} tokens, counted in `{limit_name}`: with"
                f" `reasoning_effort`, set `{limit_name}` above {_LEAST_THINKING_BUDGET} (or leave it out).",
                limit_name,
            )
        budget = max(_LEAST_THINKING_BUDGET, min(budget, limit - ANSWER_FLOOR))
    request["thinking"] = {"type": "enabled", "budget_tokens": budget}


def _translate_messages(messages: list[Any]) -> tuple[str | list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    tool_turn: dict[str, Any] | None = None  # the user turn holding the latest run of tool results
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid("Each message must be an object.", where)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.extend(_system_blocks(content, f"{where}.content"))
        elif role == "user":
            blocks = _content_blocks(content, f"{where}.content")
            if blocks:
                turns.append({"role": "user", "content": blocks})
        elif role == "assistant":
            blocks = _thinking_blocks(message.get("thinking_blocks"), f"{where}.thinking_blocks")
            blocks.extend(_content_blocks(content, f"{where}.content") if content is not None else [])
            blocks.extend(_tool_use_blocks(message.get("tool_calls"), f"{where}.tool_calls"))
            if blocks:
                turns.append({"role": "assistant", "content": blocks})
        elif role == "tool":
            result = _tool_result_block(message, where)
            if tool_turn is not None and turns[-1] is tool_turn:
                tool_turn["content"].append(result)
            else:
                tool_turn = {"role": "user", "content": [result]}
                turns.append(tool_turn)
        else:
            raise _invalid(f"Unsupported message role {role!r} for this model.", f"{where}.role", "unsupported_value")
    if any("cache_control" in block for block in system):
        # A marked end of a reusable prefix is on its block: the system prompt as Anthropic's text blocks.
        return [block for block in system if block["text"]], turns
    return "\n\n".join(block["text"] for block in system if block["text"]), turns


def _system_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _invalid("A system message's content must be a string or an array of text parts.", where)
    blocks = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _invalid("A system message takes text parts only.", f"{where}[{j}]")
        blocks.append(_cache_marked({"type": "text", "text": part["text"]}, part))
    return blocks


def _cache_marked(block: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """``block`` with the ``cache_control`` its chat ``part`` asks for: its own (Anthropic's, as a client that knows
    it talks to Claude writes it), or OpenAI's ``prompt_cache_breakpoint`` as Anthropic's 1-hour breakpoint
    (``_ONE_HOUR``; ``_breakpoints_capped`` keeps the last four)."""
    if isinstance(part.get("cache_control"), dict):
        block["cache_control"] = part["cache_control"]
    elif part.get("prompt_cache_breakpoint") is not None:
        block["cache_control"] = _ONE_HOUR
    return block


def _marked_blocks(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The blocks of ``request`` with a ``cache_control``, in the order Anthropic reads them: the system blocks, then
    the turns' blocks, a tool result's own blocks after it (its tools carry none: OpenAI's tools have no mark)."""
    system = request.get("system")
    blocks = [block for block in system if isinstance(block, dict)] if isinstance(system, list) else []
    for turn in request["messages"]:
        for block in turn["content"]:
            blocks.append(block)
            if block.get("type") == "tool_result" and isinstance(block.get("content"), list):
                blocks.extend(block["content"])
    return [block for block in blocks if isinstance(block, dict) and "cache_control" in block]


def _breakpoints_capped(request: dict[str, Any]) -> None:
    """At most ``MAX_CACHE_CONTROLS`` blocks of ``request`` keep a ``cache_control``, as Anthropic refuses more: a
    client's own are all kept (more is Anthropic's 400 to it), and of the ones OpenAI's breakpoints became the latest
    that fit, as OpenAI writes the latest four (a tool result's own blocks counted, as Anthropic counts them).

    Each kept one is then a copy of ``_ONE_HOUR``, unless it comes after a client's own ``cache_control`` of the
    5-minute TTL (``ttl`` "5m" or none): Anthropic refuses a 1-hour entry after a 5-minute one (longer-lived entries
    first, in the order ``_marked_blocks`` reads them; its 400 to the whole request), so such a breakpoint is
    ``_FIVE_MINUTES``. The client's own choice stands and ours yields: its ``cache_control`` is Anthropic's own
    instruction, written for Claude, and its TTL is the price it chose (a 1-hour write costs twice the input, a
    5-minute one 1.25 times), which raising it would change unasked; ours is llmhub's reading of a hint that names no
    Anthropic TTL. It keeps a cache at the marked end of the prefix, for the longest Anthropic allows there, rather
    than none."""
    blocks = _marked_blocks(request)
    ours = [block for block in blocks if block["cache_control"] is _ONE_HOUR]
    if not ours:
        return
    kept = max(0, MAX_CACHE_CONTROLS - (len(blocks) - len(ours)))
    dropped = {id(block) for block in ours[: len(ours) - kept]}
    after_five_minutes = False
    for block in blocks:
        mark = block["cache_control"]
        if mark is not _ONE_HOUR:
            after_five_minutes = after_five_minutes or (isinstance(mark, dict) and mark.get("ttl", "5m") == "5m")
        elif id(block) in dropped:
            del block["cache_control"]
        else:
            block["cache_control"] = dict(_FIVE_MINUTES if after_five_minutes else _ONE_HOUR)


def _content_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise _invalid("Message content must be a string or an array of content parts.", where)
    blocks = []
    for j, part in enumerate(content):
        block = _content_block(part, f"{where}[{j}]")
        if block is not None:
            blocks.append(block)
    return blocks


def _content_block(part: Any, where: str) -> dict[str, Any] | None:
    if not isinstance(part, dict):
        raise _invalid("Each content part must be an object.", where)
    kind = part.get("type")
    if kind in ("text", "refusal"):
        text = part.get(kind)
        if not isinstance(text, str):
            raise _invalid(f"A {kind} part needs a string `{kind}`.", where)
        if not text:
            return None  # Anthropic refuses empty text blocks; an empty part says nothing anyway.
        return _cache_marked({"type": "text", "text": text}, part)
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        return _cache_marked({"type": "image", "source": _image_source(url, f"{where}.image_url.url")}, part)
    raise _invalid(
        f"Content parts of type {kind!r} are not supported by this model.", f"{where}.type", "unsupported_value"
    )


def _image_source(url: Any, where: str) -> dict[str, Any]:
    if not isinstance(url, str) or not url:
        raise _invalid("An image part needs a URL.", where)
    if url.startswith("data:"):
        match = _DATA_URL.fullmatch(url)
        if match is None:
            raise _invalid("A data URL image must look like data:<media type>;base64,<data>.", where)
        media_type = image_media_type(match["media_type"])  # image/jpg as image/jpeg, in lower case
        if media_type not in CLAUDE_IMAGE_TYPES:
            raise _invalid(
                f"Claude takes images of type {', '.join(CLAUDE_IMAGE_TYPES)} only, and this data URL's is "
                f"{media_type}.",
                where,
                "invalid_image_format",
            )
        return {"type": "base64", "media_type": media_type, "data": match["data"]}
    if url.startswith(("https://", "http://")):
        return {"type": "url", "url": url}
    raise _invalid("An image URL must be an http(s) URL or a base64 data URL.", where)


def _thinking_blocks(blocks: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``thinking_blocks`` (as this gateway and LiteLLM answer them), sent back as they came:
    Claude checks each block's signature, and wants the thinking before a tool call again in the round that answers
    it. The message's ``reasoning_content`` alone cannot be: it has no signature."""
    if blocks is None:
        return []
    if not isinstance(blocks, list):
        raise _invalid("`thinking_blocks` must be an array.", where)
    translated = []
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "thinking" and isinstance(block.get("thinking"), str) and isinstance(block.get("signature"), str):
            translated.append({"type": "thinking", "thinking": block["thinking"], "signature": block["signature"]})
        elif kind == "redacted_thinking" and isinstance(block.get("data"), str):
            translated.append({"type": "redacted_thinking", "data": block["data"]})
        else:
            raise _invalid(
                "Each thinking block must be a `thinking` block with its `thinking` and `signature`, or a"
                " `redacted_thinking` block with its `data`, as the reply gave them.",
                f"{where}[{j}]",
            )
    return translated


def _tool_use_blocks(tool_calls: Any, where: str) -> list[dict[str, Any]]:
    if not tool_calls:
        return []
    if not isinstance(tool_calls, list):
        raise _invalid("`tool_calls` must be an array.", where)
    blocks = []
    for j, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not call.get("id") or not function.get("name"):
            raise _invalid("Each tool call needs an `id` and a `function` with a `name`.", f"{where}[{j}]")
        arguments = function.get("arguments") or "{}"
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise _invalid("Tool call arguments must be a JSON object.", f"{where}[{j}].function.arguments")
        blocks.append({"type": "tool_use", "id": call["id"], "name": function["name"], "input": parsed})
    return blocks


def _tool_result_block(message: dict[str, Any], where: str) -> dict[str, Any]:
    tool_call_id = message.get("tool_call_id")
    if not isinstance(tool_call_id, str) or not tool_call_id:
        raise _invalid("A tool message needs the `tool_call_id` it answers.", f"{where}.tool_call_id")
    content = message.get("content")
    result: Any = content if isinstance(content, str) else _content_blocks(content, f"{where}.content")
    return {"type": "tool_result", "tool_use_id": tool_call_id, "content": result}


def _translate_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _invalid("`tools` must be an array.", "tools")
    translated = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise _invalid("This model takes function tools only.", f"tools[{i}]", "unsupported_value")
        if not function.get("name"):
            raise _invalid("A function tool needs a `name`.", f"tools[{i}].function.name")
        spec: dict[str, Any] = {
            "name": function["name"],
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if function.get("description"):
            spec["description"] = function["description"]
        translated.append(spec)
    return translated


def _translate_tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        translated: dict[str, Any] | None = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        translated = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}
    elif choice == "required":
        translated = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) and choice["function"].get("name"):
        translated = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise _invalid('`tool_choice` must be "auto", "none", "required" or a function.', "tool_choice")
    if translated is not None and parallel is False:
        translated["disable_parallel_tool_use"] = True
    return translated


def _output_format(response_format: Any) -> dict[str, Any] | None:
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise _invalid("A json_schema response format needs a `schema` object.", "response_format.json_schema.schema")
    return {"type": "json_schema", "schema": schema}


# Response ------------------------------------------------------------------------------------------


def finish_reason(stop_reason: str | None) -> str:
    return _FINISH_REASONS.get(stop_reason or "", "stop")


def openai_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's usage counts cached prompt tokens inside ``prompt_tokens``; Anthropic's ``input_tokens`` does not.
    The writes to the 1-hour cache (``cache_creation.ephemeral_1h_input_tokens``, part of
    ``cache_creation_input_tokens``), which Anthropic bills dearer than the 5-minute cache's, are
    ``cache_write_1h_tokens`` when there are any. The web searches Anthropic billed
    (``server_tool_use.web_search_requests``, priced per 1,000 apart from the tokens) are ``web_search_requests``
    when there are any: not an OpenAI field, read by the settle step (``billing.services.settlement``)."""
    cache_read = usage.get("cache_read_input_tokens") or 0
    cache_write = usage.get("cache_creation_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + cache_read + cache_write
    completion = usage.get("output_tokens") or 0
    details = {"cached_tokens": cache_read, "cache_write_tokens": cache_write}
    creation = usage.get("cache_creation")
    written_1h = creation.get("ephemeral_1h_input_tokens") if isinstance(creation, dict) else None
    if isinstance(written_1h, int) and not isinstance(written_1h, bool) and written_1h > 0:
        details["cache_write_1h_tokens"] = min(written_1h, cache_write)
    reported = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
    }
    server_tools = usage.get("server_tool_use")
    searches = server_tools.get("web_search_requests") if isinstance(server_tools, dict) else None
    if isinstance(searches, int) and not isinstance(searches, bool) and searches > 0:
        reported["web_search_requests"] = searches
    return reported


def completion_from_message(message: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` for an Anthropic ``message``."""
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    thoughts: list[str] = []
    thinking_blocks: list[dict[str, Any]] = []
    for block in message.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "thinking":
            thoughts.append(block.get("thinking") or "")
            thinking_blocks.append(
                {"type": "thinking", "thinking": block.get("thinking") or "", "signature": block.get("signature") or ""}
            )
        elif kind == "redacted_thinking":
            thinking_blocks.append({"type": "redacted_thinking", "data": block.get("data") or ""})
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})},
                }
            )
    reply: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not tool_calls else None,
        "refusal": None,
    }
    if tool_calls:
        reply["tool_calls"] = tool_calls
    if thinking_blocks:
        # The thinking as reasoning servers spell it, and its blocks whole for the client to send back.
        reply["reasoning_content"] = "\n".join(thoughts)
        reply["thinking_blocks"] = thinking_blocks
    return {
        "id": message.get("id") or "",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": message.get("model") or "",
        "choices": [
            {"index": 0, "message": reply, "logprobs": None, "finish_reason": finish_reason(message.get("stop_reason"))}
        ],
        "usage": openai_usage(message.get("usage") or {}),
    }


class StreamTranslator:
    """Turns the events of one Anthropic message stream into OpenAI chunks, one event at a time.

    ``feed`` returns the chunk an event becomes, or None for events a client need not see (ping,
    block starts and stops). ``complete`` tells whether ``message_stop`` arrived: a stream that ends
    without it was cut short.
    """

    __slots__ = ("_created", "_id", "_model", "_thinking", "_tool_index", "_usage", "complete")

    def __init__(self) -> None:
        self._id = ""
        self._model = ""
        self._created = int(time.time())
        self._usage: dict[str, Any] = {}
        self._tool_index: dict[int, int] = {}  # Anthropic content block index -> OpenAI tool call index
        self._thinking: dict[int, list[str]] = {}  # Anthropic content block index -> its thinking so far
        self.complete = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def feed(self, event: dict[str, Any]) -> dict[str, Any] | None:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            delta_kind = delta.get("type")
            if delta_kind == "text_delta":
                return self._chunk({"content": delta.get("text") or ""})
            if delta_kind == "thinking_delta" and delta.get("thinking"):
                self._thinking.setdefault(event.get("index", -1), []).append(delta["thinking"])
                return self._chunk({"reasoning_content": delta["thinking"]})
            if delta_kind == "signature_delta":
                # The block's thinking is whole once it is signed: the client gets it with its signature, to send
                # back in a tool-use round (the reasoning text was streamed already, and was checked as it came).
                thinking = "".join(self._thinking.pop(event.get("index", -1), ()))
                block = {"type": "thinking", "thinking": thinking, "signature": delta.get("signature") or ""}
                return self._chunk({"thinking_blocks": [block]})
            if delta_kind == "input_json_delta" and delta.get("partial_json"):
                index = self._tool_index.get(event.get("index", -1))
                if index is not None:
                    return self._chunk(
                        {"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]}
                    )
            return None
        if kind == "message_start":
            message = event.get("message") or {}
            self._id = message.get("id") or ""
            self._model = message.get("model") or ""
            self._usage = dict(message.get("usage") or {})
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            return self._block_start(event.get("index", -1), event.get("content_block") or {})
        if kind == "message_delta":
            for name, value in (event.get("usage") or {}).items():
                if isinstance(value, int):
                    self._usage[name] = value
            stop_reason = (event.get("delta") or {}).get("stop_reason")
            return self._chunk({}, finish_reason(stop_reason)) if stop_reason else None
        if kind == "message_stop":
            self.complete = True
            return {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [],
                "usage": openai_usage(self._usage),
            }
        return None

    def _block_start(self, index: int, block: dict[str, Any]) -> dict[str, Any] | None:
        kind = block.get("type")
        if kind == "tool_use":
            tool_index = self._tool_index[index] = len(self._tool_index)
            call = {
                "index": tool_index,
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            return self._chunk({"tool_calls": [call]})
        if kind == "text" and block.get("text"):
            return self._chunk({"content": block["text"]})
        if kind == "redacted_thinking":
            return self._chunk({"thinking_blocks": [{"type": "redacted_thinking", "data": block.get("data") or ""}]})
        return None


# Inbound: Anthropic Messages → OpenAI chat completions, and the answer back ----------------------------------
#
# For clients of ``/v1/messages`` whose model speaks the OpenAI protocol. The request keeps ``system``,
# text, images (base64 → data URL, url → URL), ``tool_use`` blocks (assistant ``tool_calls``) and
# ``tool_result`` blocks (``tool`` messages, text blocks joined by blank lines, placed before the rest of their
# user turn, as OpenAI wants them right after the call; their images, which a tool message cannot hold, open that
# user turn), ``tools`` (and a tool's ``strict``)/``tool_choice``, ``stop_sequences``, ``temperature``, ``top_p``,
# ``max_tokens`` (OpenAI's own API is sent it as ``max_completion_tokens``: ``OpenAIPlatformAdapter``) and
# ``metadata.user_id`` (the end user, OpenAI's ``user``: ``chat_request``'s
# ``end_user_field``); ``output_config.effort``, else
# ``thinking``, becomes ``reasoning_effort`` (``_effort``, ``reasoning_effort_for``), and the model's reasoning
# (``reasoning_content`` or ``reasoning``) comes back as ``thinking`` blocks with an empty ``signature``: no
# provider signed it, and a client that sends it back to this protocol has it dropped (``_assistant_message``);
# structured outputs (``output_config.format``) become a strict ``json_schema`` ``response_format``
# (``_response_format``).
# OpenAI's ``url_citation`` annotations (its search models' sources) are ``web_search_result_location`` citations on
# the text block, the closest of Anthropic's shapes, as its own web search cites a page (``_citations``): ``url`` and
# ``title`` as they came, ``cited_text`` the part of the reply the annotation spans (no source text came with it), and
# an empty ``encrypted_index`` (nothing of Anthropic's to point to, as the empty signature of a translated thinking
# block); streamed, a ``citations_delta`` on the text block while it is open, when the annotation arrives; one that
# arrives once the block has ended (a tool call's or thinking block followed it) is not streamed, as every delta of a
# block comes before its stop, nor one with no text block (as the whole reply has none).
# A refusal (OpenAI's ``refusal``) is the reply's text, ending ``stop_reason: "refusal"``, whole and streamed; a
# reply that calls a tool ends ``tool_use`` even when its server said ``stop`` (``_stop_reason``).
# A reply stopped at a stop string says which when its server does (vLLM's ``stop_reason``:
# ``stop_sequence_matched``), else it ends ``end_turn``.
# ``service_tier`` is Anthropic's choice of its capacity: ``auto`` (its Priority Tier when the account has it, else
# standard) and none are sent as no tier, which OpenAI serves at the project's default (priority or flex, if its owner
# set one: the reply says which, and it is charged so); ``standard_only`` is sent as the tier that asks for standard
# processing where the provider has one (``standard_tier``: OpenAI's ``default``, ``OpenAIPlatformAdapter``), and as
# none elsewhere (Mistral refuses the field, an OpenAI-compatible server's tiers are its own: Groq's ``on_demand``).
# Until 7 December 2026 it was sent as none to OpenAI too, so a project whose default is priority was served priority
# and charged the standard prices (``billing.pricing.billed_tier``), and one whose default is flex served flex.
# ``speed: "fast"`` (a faster mode of Claude) has no equivalent and is dropped, the reply comes at the model's own pace.
# ``inference_geo`` (the region Anthropic runs the model in: data residency) naming a region is refused: where the model
# runs is its deployment's provider's, and a client asking for its data to stay in a region is not served elsewhere
# silently. ``"global"``, Anthropic's default (any region), asks for no residency and is dropped, as a client that
# always sends it is served anywhere (``_NO_RESIDENCY``).
# ``metadata``'s other fields, ``top_k`` and ``cache_control`` have no OpenAI equivalent and are dropped; a block
# type with no equivalent (``document``, server tools, also inside a ``tool_result``) is refused, and so are
# Anthropic's own features (``mcp_servers``, ``container``, ``context_management``: ``_ANTHROPIC_ONLY``).

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_MESSAGES_OPTIONAL = ("temperature", "top_p")
# Anthropic's ``service_tier`` that asks for its standard processing only (``chat_request``'s ``standard_tier``).
STANDARD_ONLY = "standard_only"
# The Messages API's features that Anthropic runs itself and no OpenAI-protocol model has: dropped, the model would
# answer as if they had not been asked for, so a request that sets one is refused (``chat_request``).
_ANTHROPIC_ONLY = {
    "mcp_servers": "MCP servers (whose tools Anthropic calls)",
    "container": "Code-execution containers",
    "context_management": "Context edits",
}
# The ``inference_geo`` that asks for no region in particular (Anthropic's default): nothing for a translated model to
# honour.
_NO_RESIDENCY = "global"
# Text blocks that become one text (the system prompt's, a tool_result's) are joined by a blank line, as separate
# blocks read; not run together.
_BLOCKS_JOINED_BY = "\n\n"


def stop_reason(finish: str | None) -> str:
    """Anthropic's ``stop_reason`` for an OpenAI ``finish_reason`` (the inverse of ``finish_reason``)."""
    return _STOP_REASONS.get(finish or "", "end_turn")


def _stop_reason(finish: str | None, sequence: str | None, *, refused: bool = False, called: bool = False) -> str:
    """A translated reply's ``stop_reason``: ``refusal`` when the model refused (OpenAI's ``refusal``, which ends
    ``stop``); ``tool_use`` when it called a tool and ended ``stop`` (OpenAI's finish for a call the request forced,
    vLLM's too: a Messages client runs its tools while the reply ends ``tool_use``); ``stop_sequence`` when it
    stopped at one it names; else its ``finish_reason``'s, but never ``tool_use`` without a call (a server's
    ``tool_calls`` or ``function_call`` finish beside none: a client would look for a tool_use block to run)."""
    if refused and finish in (None, "stop"):
        return "refusal"
    if called and finish in (None, "stop"):
        return "tool_use"
    if sequence:
        return "stop_sequence"
    reason = stop_reason(finish)
    return "end_turn" if reason == "tool_use" and not called else reason


def stop_sequence_matched(choice: dict[str, Any]) -> str | None:
    """The stop sequence a chat completion's choice (or a streamed finish) stopped at, when its server says: vLLM's
    ``stop_reason``, the stop string matched (a stop token's id is a number). OpenAI's ``finish_reason`` is ``stop``
    for a stop string and for the model's own end alike: from a server that says no more, none (``end_turn``)."""
    matched = choice.get("stop_reason")
    return matched if choice.get("finish_reason") == "stop" and isinstance(matched, str) and matched else None


def chat_request(
    request: dict[str, Any],
    *,
    end_user_field: str | None = "user",
    efforts: tuple[str, ...] | None = None,
    stop_max: int | None = None,
    standard_tier: str | None = None,
) -> dict[str, Any]:
    """The chat-completions body for a Messages API body (``stream`` is left to the caller). ``end_user_field``: the
    field the end user (``metadata.user_id``) goes in, OpenAI's ``user``; None for a provider that has none and
    refuses it (Mistral's 422), where it is left out. ``efforts``: the levels of ``output_config.effort`` the
    provider has a ``reasoning_effort`` for (None: all); another is refused naming the client's field, not the
    ``reasoning_effort`` it would have become. ``stop_max``: the most stop strings the provider takes (OpenAI's 4;
    None: no limit known); more are refused naming ``stop_sequences``, not the ``stop`` they would have become.
    ``standard_tier``: the ``service_tier`` that asks the provider for its standard processing, sent for Anthropic's
    ``standard_only`` (OpenAI's ``default``); None: the provider has none, and no tier is sent."""
    for name, feature in _ANTHROPIC_ONLY.items():
        if request.get(name) not in (None, []):
            raise _refused(
                f"{feature} are Anthropic's own, and this model is not reached through Anthropic's API: leave"
                f" `{name}` out, or ask a Claude model",
                name,
                "unsupported_parameter",
            )
    if request.get("inference_geo") not in (None, _NO_RESIDENCY):
        raise _refused(
            "Where this model runs is its provider's, not a region chosen per request: leave `inference_geo` out (or"
            ' `"global"`), or ask a Claude model',
            "inference_geo",
            "unsupported_parameter",
        )
    body: dict[str, Any] = {"model": request.get("model"), "messages": _translated_messages(request)}
    if request.get("max_tokens") is not None:
        body["max_tokens"] = request["max_tokens"]
    if request.get("service_tier") == STANDARD_ONLY and standard_tier is not None:
        body["service_tier"] = standard_tier
    for name in _MESSAGES_OPTIONAL:
        if request.get(name) is not None:
            body[name] = request[name]
    stops = request.get("stop_sequences")
    if stops:
        if stop_max is not None and len(stops) > stop_max:
            raise _refused(
                f"List should have at most {stop_max} items after validation, not {len(stops)} (this model takes at"
                f" most {stop_max} stop sequences)",
                "stop_sequences",
                "unsupported_value",
            )
        body["stop"] = stops
    user_id = (request.get("metadata") or {}).get("user_id")
    if user_id and end_user_field is not None:
        body[end_user_field] = user_id
    effort = _effort(request, efforts)
    if effort is not None:
        body["reasoning_effort"] = effort
    response_format = _response_format(request)
    if response_format is not None:
        body["response_format"] = response_format
    tools = request.get("tools")
    if tools:
        body["tools"] = [_chat_tool(tool, f"tools.{i}") for i, tool in enumerate(tools)]
    choice = request.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "tool":
            body["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind in ("auto", "any", "none"):
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
        if choice.get("disable_parallel_tool_use") and tools:
            body["parallel_tool_calls"] = False
    if not tools:
        body.pop("tool_choice", None)
    return body


def _translated_messages(request: dict[str, Any], origins: list[_Origins] | None = None) -> list[dict[str, Any]]:
    """A Messages request's ``system`` and ``messages`` as chat completions' messages. ``origins``, when given, gets
    for each chat message where its fields came from in the client's request (``_Origins``): ``messages_field``'s
    record of this same walk, so that a refusal of the chat completion names what the client sent."""
    messages: list[dict[str, Any]] = []
    system = request.get("system")
    if system:
        text = system if isinstance(system, str) else _BLOCKS_JOINED_BY.join(_block_texts(system, "system"))
        messages.append({"role": "system", "content": text})
        if origins is not None:
            origins.append({"": "system", "content": "system"})
    for i, turn in enumerate(request.get("messages") or ()):
        messages.extend(_chat_messages(turn, f"messages.{i}", origins))
    return messages


# A chat message's origins (``_translated_messages``): for each of its fields a refusal can name (``""`` the message
# itself, ``content``, ``content[M]``, ``tool_calls[K]``, ``tool_call_id``, ``content[M].image_url.url``), the field of
# the Messages request it was made of (``messages.2.content.1``, ``system``, ...). A field it has none for is named by
# the nearest one it has, the message's own.
_Origins = dict[str, str]
# A provider's error renamed in place and given back (``messages_refusal_named``): a refusal, or an in-band error.
ProviderErrorT = TypeVar("ProviderErrorT", bound=ProviderError)
# Inside a tool call or a content part, the chat completion's field and the Messages block's it was made of.
_CALL_FIELDS = {".function.arguments": ".input", ".function.name": ".name", ".function": "", ".id": ".id"}
_PART_FIELDS = {".type": ".type", ".text": ".text"}
# Inside a tool, the chat completion's function field and the Messages tool's it was made of (``_chat_tool``); any
# other is named by the tool.
_TOOL_FIELDS = {
    ".function.parameters": ".input_schema",
    ".function.name": ".name",
    ".function.description": ".description",
    ".function.strict": ".strict",
}
# The chat completion's top-level fields a translation wrote for a Messages field of another name (the others, such
# as ``temperature`` or ``tool_choice``, are named alike in both).
_REQUEST_FIELDS = {
    "max_completion_tokens": "max_tokens",
    "stop": "stop_sequences",
    "user": "metadata.user_id",
    "safety_identifier": "metadata.user_id",
    "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
}
# An image refusal of its type (``invalid_image_format``) names the source's ``media_type``, which the data URL's type
# was made of; any other, the ``data`` (or a url source's ``url``).
_IMAGE_TYPE_REFUSED = "invalid_image_format"


def messages_field(request: dict[str, Any], param: str | None, code: str | None = None) -> str | None:
    """``param``, a field of the chat completion a Messages ``request`` was translated into (``chat_request``) that
    a provider's adapter or the provider refused, as the client named it in ``request``: ``messages[3].content[1].
    image_url.url`` is ``messages.2.content.1.source.data`` when a system prompt came first (``source.media_type``
    for a refusal of the image's type, ``code`` ``invalid_image_format``; ``source.url`` for a url source), a tool
    message's ``content`` its ``tool_result`` block's, ``stop`` ``stop_sequences``. A field the client wrote
    otherwise or not at all is named by the nearest one it sent (a part's unknown field by its block, a message's by
    its turn); a field that is no chat completion's path is returned as it is."""
    if not param:
        return param
    match = CHAT_FIELD_PATH.fullmatch(param)
    if match is None:
        return _request_field(request, param)
    index, rest = int(match["index"]), re.sub(r"\.\[", "[", match["rest"])
    if match["list"] == "tools":
        field = next((named for chat, named in _TOOL_FIELDS.items() if rest.startswith(chat)), "")
        return f"tools.{index}{field}"
    origins: list[_Origins] = []
    _translated_messages(request, origins)
    if index >= len(origins):
        return "messages"
    origin, key = origins[index], rest.removeprefix(".")
    if key in origin:
        named = origin[key]
        if code == _IMAGE_TYPE_REFUSED and named.endswith(".source.data"):
            return named.removesuffix(".data") + ".media_type"
        return named
    inner = re.match(r"(?P<name>content|tool_calls)\[(?P<at>\d+)\](?P<tail>.*)", key)
    if inner is not None and f"{inner['name']}[{inner['at']}]" in origin:
        fields = _CALL_FIELDS if inner["name"] == "tool_calls" else _PART_FIELDS
        return origin[f"{inner['name']}[{inner['at']}]"] + fields.get(inner["tail"], "")
    return origin.get(re.split(r"[.\[]", key, maxsplit=1)[0], origin[""])


def _request_field(request: dict[str, Any], param: str) -> str:
    """A top-level field of the chat completion as the Messages request named it (``messages_field``)."""
    head, _, rest = param.partition(".")
    if head == "reasoning_effort":
        # From the effort the client gave, else from its thinking budget (``_effort``).
        config = request.get("output_config")
        given = isinstance(config, dict) and config.get("effort") is not None
        return "output_config.effort" if given else "thinking.budget_tokens"
    if head == "response_format":
        return "output_format" if request.get("output_format") is not None else "output_config.format"
    if head == "tool_choice":
        # A named tool's choice, ``{"type": "tool", "name": ...}``, was sent as ``{"function": {"name": ...}}``.
        return "tool_choice.name" if rest.startswith("function.name") else "tool_choice"
    return _REQUEST_FIELDS.get(head, head) + (f".{rest}" if rest and head not in _REQUEST_FIELDS else "")


def messages_refusal_named(request: dict[str, Any], exc: ProviderErrorT) -> ProviderErrorT:
    """``exc``, a refusal of the chat completion a Messages ``request`` was translated into (or an error the provider
    reported in-band after its stream began, quoting the chat completion's paths), naming the client's own
    fields (``messages_field``): its ``param``, and each chat completion's path its message quotes (Anthropic's
    errors carry no ``param``: the message is all a client reads, so one that does not quote the field it refuses,
    as OpenAI's refusal of a tool's schema, begins with it, as the adapters' own do: ``tools.1.input_schema``)."""
    exc.message = CHAT_FIELD_PATH.sub(
        lambda found: messages_field(request, found[0], exc.code) or found[0], exc.message
    )
    if exc.param is not None:
        exc.param = messages_field(request, exc.param, exc.code)
        if exc.param and exc.param not in exc.message:
            exc.message = f"`{exc.param}`: {exc.message}"
    exc.args = (exc.message,)
    return exc


def _response_format(request: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` for the Messages API's structured outputs: ``output_config.format`` (or the
    beta's top-level ``output_format``), a JSON schema the reply follows. Strict, since Claude's reply is held to
    the schema; named ``output``, since OpenAI requires a name and Anthropic's format has none (the inverse of
    ``_output_format``)."""
    config = request.get("output_config")
    where = "output_config.format"
    output_format = config.get("format") if isinstance(config, dict) else None
    if output_format is None and request.get("output_format") is not None:
        where, output_format = "output_format", request["output_format"]
    if output_format is None:
        return None
    if not isinstance(output_format, dict) or output_format.get("type") != "json_schema":
        raise _invalid(f"{where}.type: Input should be 'json_schema'", f"{where}.type")
    schema = output_format.get("schema")
    if not isinstance(schema, dict):
        raise _invalid(f"{where}.schema: Field required (a JSON schema object)", f"{where}.schema")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}


# Anthropic's ``output_config.effort`` levels, which OpenAI's ``reasoning_effort`` has under the same names.
EFFORTS = ("low", "medium", "high", "xhigh", "max")


def _effort(request: dict[str, Any], efforts: tuple[str, ...] | None = None) -> str | None:
    """The ``reasoning_effort`` a Messages request asks for: its ``output_config.effort`` (how much effort the model
    puts in; with adaptive thinking, how much it thinks), else its thinking budget's (``reasoning_effort_for``).
    Thinking ``disabled`` asks for none, whatever the effort: the client said the model does not reason. An effort
    not among ``efforts`` (those the provider has) is refused naming ``output_config.effort``, and a budget whose
    effort is not, naming ``thinking.budget_tokens``."""
    thinking = request.get("thinking")
    from_thinking = reasoning_effort_for(thinking)
    limit = request.get("max_tokens")
    if from_thinking is not None and isinstance(limit, int) and thinking["budget_tokens"] >= limit:
        # Anthropic's own refusal: a budget that leaves the reply no room, refused on every model alike.
        raise _invalid("`max_tokens` must be greater than `thinking.budget_tokens`", "max_tokens")
    config = request.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    if effort is None:
        if from_thinking is not None and efforts is not None and from_thinking not in efforts:
            # A budget whose level the provider has not (Mistral's ``high`` alone): refused naming the client's field,
            # with the least budget that reaches a level it has, rather than sent to meet a refusal of another name.
            reached = [name for name in efforts if name in THINKING_BUDGETS]
            remedy = (
                f"give one of {min(THINKING_BUDGETS[name] for name in reached)} or more (effort "
                + " or ".join(repr(name) for name in reached)
                + ")"
                if reached
                else "this model takes no thinking budget"
            )
            raise _refused(
                f"this model has no effort level {from_thinking!r}, which a budget of {thinking['budget_tokens']} "
                f"reaches: {remedy}",
                "thinking.budget_tokens",
                "unsupported_value",
            )
        return from_thinking
    if effort not in EFFORTS:
        raise _refused(
            "Input should be " + ", ".join(repr(name) for name in EFFORTS[:-1]) + f" or {EFFORTS[-1]!r}",
            "output_config.effort",
        )
    if isinstance(thinking, dict) and thinking.get("type") == "disabled":
        return None
    if efforts is not None and effort not in efforts:
        levels = ", ".join(repr(name) for name in efforts[:-1])
        raise _refused(
            f"this model has no effort level {effort!r}: use "
            + (f"{levels} or {efforts[-1]!r}" if levels else repr(efforts[-1])),
            "output_config.effort",
            "unsupported_value",
        )
    return effort


def reasoning_effort_for(thinking: Any) -> str | None:
    """The ``reasoning_effort`` for a Messages request's ``thinking``: an enabled budget's effort is the highest of
    ``THINKING_BUDGETS`` it reaches (under 2048 ``low``, under 4096 ``medium``, else ``high``), the inverse of the
    budgets ``reasoning_effort`` gets on Claude; ``disabled`` and ``adaptive`` (the model decides) ask for none."""
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < _LEAST_THINKING_BUDGET:
        raise _invalid(
            f"thinking.budget_tokens: Input should be an integer greater than or equal to {_LEAST_THINKING_BUDGET}",
            "thinking.budget_tokens",
        )
    reached = [effort for effort in ("low", "medium", "high") if THINKING_BUDGETS[effort] <= budget]
    return reached[-1]


# Blocks only an assistant message holds: sent in a user message, the block is misplaced, not one the model lacks.
_ASSISTANT_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use", "thinking", "redacted_thinking"})


def _refused(problem: str, where: str, code: str = "invalid_value") -> ProviderBadRequestError:
    """A 400 of the inbound translation in the Messages API's words, ``field: problem`` (``messages.0.content.1.type:
    …``): Anthropic's errors carry no ``param``, so the message names the field."""
    return _invalid(f"{where}: {problem}", where, code)


def _block_texts(blocks: Any, where: str) -> list[str]:
    if isinstance(blocks, str):
        return [blocks]
    if not isinstance(blocks, list):
        raise _refused("Input should be a string or a list of text blocks", where)
    texts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _refused("Only text blocks can be sent to this model here", f"{where}.{j}")
        texts.append(block["text"])
    return texts


def _chat_messages(turn: Any, where: str, origins: list[_Origins] | None = None) -> list[dict[str, Any]]:
    """The chat messages of a Messages turn at ``where``; ``origins`` (``_translated_messages``) gets theirs."""
    role = turn.get("role") if isinstance(turn, dict) else None
    content = turn.get("content") if isinstance(turn, dict) else None
    if role not in ("user", "assistant"):
        raise _refused("Input should be 'user' or 'assistant'", f"{where}.role")
    if isinstance(content, str):
        if origins is not None:
            origins.append(_turn_origin(where))
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _refused("Input should be a string or a list of content blocks", f"{where}.content")
    if role == "assistant":
        message = _assistant_message(content, where)
        if origins is not None:
            calls = [
                j for j, block in enumerate(content) if isinstance(block, dict) and block.get("type") == "tool_use"
            ]
            origins.append(
                _turn_origin(where)
                | {"tool_calls": f"{where}.content"}
                | {f"tool_calls[{k}]": f"{where}.content.{j}" for k, j in enumerate(calls)}
            )
        return [message]
    results: list[dict[str, Any]] = []
    tool_images: list[dict[str, Any]] = []  # a tool message holds text only: its images open the user turn
    parts: list[dict[str, Any]] = []
    # Where each of the user message's parts came from, when ``origins`` is asked for: the tool results' images, then
    # the turn's own blocks, as the message lists them.
    image_origins: list[tuple[str, dict[str, Any]]] | None = [] if origins is not None else None
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            results.append(_tool_message(block, f"{where}.content.{j}", tool_images, image_origins))
            if origins is not None:
                at = f"{where}.content.{j}"
                origins.append(
                    {"": at, "role": f"{at}.type", "content": f"{at}.content", "tool_call_id": f"{at}.tool_use_id"}
                )
        elif kind == "text":
            parts.append({"type": "text", "text": block.get("text") or ""})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, f"{where}.content.{j}")}})
        elif kind in _ASSISTANT_BLOCKS:
            raise _refused(
                f"A {kind} block belongs in an assistant message, not a user message",
                f"{where}.content.{j}.type",
            )
        else:
            raise _refused(
                f"Content blocks of type {kind!r} are not supported by this model",
                f"{where}.content.{j}.type",
                "unsupported_value",
            )
    if tool_images or parts:
        results.append({"role": "user", "content": [*tool_images, *parts]})
        if origins is not None and image_origins is not None:
            own = [
                (f"{where}.content.{j}", block) for j, block in enumerate(content) if block["type"] in ("text", "image")
            ]
            origins.append(_turn_origin(where) | _part_origins([*image_origins, *own]))
    return results


def _turn_origin(where: str) -> _Origins:
    return {"": where, "role": f"{where}.role", "content": f"{where}.content"}


def _part_origins(blocks: list[tuple[str, dict[str, Any]]]) -> _Origins:
    """A translated user message's ``content[M]`` origins, the Messages blocks (each with its path) it was made of in
    order; an image part's url is its source's ``data`` or ``url``."""
    origins: _Origins = {}
    for position, (at, block) in enumerate(blocks):
        origins[f"content[{position}]"] = at
        if block.get("type") == "image":
            field = "url" if block["source"].get("type") == "url" else "data"
            origins[f"content[{position}].image_url.url"] = f"{at}.source.{field}"
    return origins


def _assistant_message(content: list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # the model's own reasoning: another provider cannot verify or use it
        elif kind in ("tool_result", "image"):
            raise _refused(
                f"A {kind} block belongs in a user message, not an assistant message", f"{where}.content.{j}.type"
            )
        else:
            raise _refused(
                f"Content blocks of type {kind!r} are not supported by this model",
                f"{where}.content.{j}.type",
                "unsupported_value",
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_message(
    block: dict[str, Any],
    where: str,
    images: list[dict[str, Any]],
    image_origins: list[tuple[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The ``tool`` message of a ``tool_result`` block: its text; its images are added to ``images`` (and each with
    its path to ``image_origins``, when given)."""
    content = block.get("content")
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(part.get("text") or "")
            elif kind == "image":
                images.append({"type": "image_url", "image_url": {"url": _image_url(part, f"{where}.content.{k}")}})
                if image_origins is not None:
                    image_origins.append((f"{where}.content.{k}", part))
            else:
                raise _refused(
                    f"Content blocks of type {kind!r} in a tool_result are not supported by this model",
                    f"{where}.content.{k}.type",
                    "unsupported_value",
                )
        text = _BLOCKS_JOINED_BY.join(texts)
    else:
        text = content if isinstance(content, str) else ""
    if block.get("is_error"):
        text = f"Error: {text}" if text else "Error"
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise _refused("Field required: the id of the tool_use block this result answers", f"{where}.tool_use_id")
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}


def _image_url(block: dict[str, Any], where: str) -> str:
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") == "base64" and source.get("media_type") and source.get("data"):
        return f"data:{source['media_type']};base64,{source['data']}"
    if source.get("type") == "url" and source.get("url"):
        return source["url"]
    raise _refused("This model takes images from a base64 or url source only", f"{where}.source")


def _chat_tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type", "custom") != "custom" or not tool.get("name"):
        raise _refused("This model takes client tools (with a `name` and an `input_schema`) only", where)
    function: dict[str, Any] = {
        "name": tool["name"],
        "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
    }
    if tool.get("description"):
        function["description"] = tool["description"]
    if isinstance(tool.get("strict"), bool):
        function["strict"] = tool["strict"]  # calls held to the schema: OpenAI's function takes the same flag
    return {"type": "function", "function": function}


# The service tier an OpenAI reply says it was served at (``service_tier``), in Anthropic's usage's words (its
# ``service_tier``: standard, priority, batch; its SDK's ``types.Usage``), which billing reads back to charge it
# (``billing.pricing.message_tier``). Flex has no word of its own there and is said ``batch``: OpenAI prices Flex
# processing at its Batch API's rates, half the standard ones, for slower answers, as Anthropic's batch tier is its
# Message Batches' half price; ``standard`` would tell the client it paid twice what it is charged. Said nothing,
# the reply was charged the tier asked, the standard prices; said ``flex``, OpenAI's word, a client holding to
# Anthropic's types met a value they do not have. Scale and others: none.
_MESSAGES_TIERS = {"default": "standard", "priority": "priority", "flex": "batch"}


def messages_tier(service_tier: Any) -> dict[str, str]:
    """``{"service_tier": ...}`` for an Anthropic usage of a reply OpenAI served at ``service_tier``; empty when it
    has no Anthropic word."""
    tier = _MESSAGES_TIERS.get(service_tier) if isinstance(service_tier, str) else None
    return {"service_tier": tier} if tier else {}


def messages_usage(usage: dict[str, Any] | None, service_tier: Any = None) -> dict[str, Any]:
    """Anthropic's usage for OpenAI's: ``input_tokens`` excludes the tokens read from the cache; the output tokens
    spent reasoning (``completion_tokens_details.reasoning_tokens``), when there are any, are its
    ``output_tokens_details.thinking_tokens``; ``service_tier``, the reply's, is its ``service_tier``
    (``messages_tier``)."""
    usage = usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    translated: dict[str, Any] = {
        "input_tokens": max(0, (usage.get("prompt_tokens") or 0) - cached),
        "output_tokens": usage.get("completion_tokens") or 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }
    details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    if type(reasoning) is int and reasoning > 0:
        translated["output_tokens_details"] = {"thinking_tokens": reasoning}
    translated.update(messages_tier(service_tier))
    return translated


def message_id(completion_id: Any) -> str:
    return (
        completion_id
        if isinstance(completion_id, str) and completion_id.startswith("msg_")
        else "msg_" + (str(completion_id or "") or uuid.uuid4().hex)
    )


def reasoning_text(part: dict[str, Any]) -> str:
    """The model's reasoning in a chat completion's message or delta, as OpenAI-compatible servers of reasoning
    models send it: ``reasoning_content`` (DeepSeek, vLLM) or ``reasoning`` (OpenRouter, Ollama); the first that
    has text (a server that sends both means one text, not two)."""
    reasoning = part.get("reasoning_content") or part.get("reasoning")
    return reasoning if isinstance(reasoning, str) else ""


# The position a legacy ``function_call`` is read at among a reply's tool calls (theirs are numbered from 0).
LEGACY_CALL = -1


def tool_calls_of(part: dict[str, Any]) -> list[Any]:
    """The tool calls of a chat completion's message or delta: its ``tool_calls``, or, from a server that answers
    with the legacy ``function_call`` (``finish_reason: "function_call"``), that call as one tool call without an id,
    at ``LEGACY_CALL`` (a call of the functions a translation asks with ``tools``, which a Messages or Responses client
    reads as such)."""
    calls = part.get("tool_calls")
    if calls:
        return calls if isinstance(calls, list) else []
    function = part.get("function_call")
    return [{"index": LEGACY_CALL, "function": function}] if isinstance(function, dict) else []


def message_from_completion(completion: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic ``message`` for a ``chat.completion``."""
    choice = (completion.get("choices") or [{}])[0]
    reply = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if reasoning := reasoning_text(reply):
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    refused = False
    if reply.get("content"):
        block: dict[str, Any] = {"type": "text", "text": reply["content"]}
        if citations := _citations(reply.get("annotations"), reply["content"]):
            block["citations"] = citations
        content.append(block)
    elif reply.get("refusal"):
        content.append({"type": "text", "text": reply["refusal"]})
        refused = True
    for call in tool_calls_of(reply):
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or "toolu_" + uuid.uuid4().hex,
                "name": function.get("name") or "",
                "input": _arguments(function.get("arguments")),
            }
        )
    sequence = stop_sequence_matched(choice)
    return {
        "id": message_id(completion.get("id")),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model") or "",
        "content": content,
        "stop_reason": _stop_reason(
            choice.get("finish_reason"),
            sequence,
            refused=refused,
            called=any(block["type"] == "tool_use" for block in content),
        ),
        "stop_sequence": sequence,
        "usage": messages_usage(completion.get("usage"), completion.get("service_tier")),
    }


def _citations(annotations: Any, text: str, seen: set[tuple[Any, ...]] | None = None) -> list[dict[str, Any]]:
    """Anthropic's ``web_search_result_location`` citations for a reply's OpenAI ``url_citation`` annotations (others
    have no Anthropic equivalent), ``cited_text`` the part of ``text`` each spans. ``seen``: the annotations already
    cited, left out (a stream may repeat them), and added to."""
    citations: list[dict[str, Any]] = []
    for annotation in annotations if isinstance(annotations, list) else ():
        cited = annotation.get("url_citation") if isinstance(annotation, dict) else None
        if not isinstance(cited, dict) or annotation.get("type") != "url_citation":
            continue
        url, title, start, end = (cited.get(name) for name in ("url", "title", "start_index", "end_index"))
        if not isinstance(url, str) or not url:
            continue
        if seen is not None:
            if (key := (url, start, end)) in seen:
                continue
            seen.add(key)
        spans = all(type(index) is int for index in (start, end)) and 0 <= start <= end
        citations.append(
            {
                "type": "web_search_result_location",
                "url": url,
                "title": title if isinstance(title, str) else None,
                "cited_text": text[start:end] if spans else "",
                "encrypted_index": "",
            }
        )
    return citations


def _arguments(arguments: Any) -> dict[str, Any]:
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) and arguments else arguments
    except ValueError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {}


class EventTranslator:
    """Turns the OpenAI chunks of one stream into Anthropic Messages events, in Anthropic's order:
    ``message_start``, ``ping``, then per content block ``content_block_start``, its deltas and
    ``content_block_stop``, and at the end (``finish``) ``message_delta`` with the stop reason and usage,
    and ``message_stop``.

    OpenAI reports usage only at the end of a stream, so ``message_start`` carries ``input_tokens_estimate``
    and ``message_delta`` the real counts (input tokens included, as Anthropic's own ``message_delta`` may)."""

    def __init__(self, *, input_tokens_estimate: int = 0) -> None:
        self._estimate = input_tokens_estimate
        self._started = False
        self._index = -1
        self._block: tuple[str, int | None] | None = None  # (kind, OpenAI tool call index)
        self._tool_blocks: dict[int, int] = {}
        self._finish: str | None = None
        self._stop_sequence: str | None = None
        self._refused = False  # the model refused (OpenAI's ``refusal``), its text relayed as the reply's
        self._usage: dict[str, Any] | None = None
        self._text: list[str] = []  # the reply's text so far, which its annotations' indices point into
        self._cited: set[tuple[Any, ...]] = set()

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if not self._started:
            self._started = True
            message = {
                "id": message_id(chunk.get("id")),
                "type": "message",
                "role": "assistant",
                "model": chunk.get("model") or "",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": self._estimate,
                    "output_tokens": 0,
                    **messages_tier(chunk.get("service_tier")),
                },
            }
            events.append({"type": "message_start", "message": message})
            events.append({"type": "ping"})
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if reasoning := reasoning_text(delta):
                self._open("thinking", None, {"type": "thinking", "thinking": "", "signature": ""}, events)
                events.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
            if delta.get("content"):
                self._open("text", None, {"type": "text", "text": ""}, events)
                events.append(self._delta({"type": "text_delta", "text": delta["content"]}))
                self._text.append(delta["content"])
            elif isinstance(delta.get("refusal"), str) and delta["refusal"]:
                self._refused = True
                self._open("text", None, {"type": "text", "text": ""}, events)
                events.append(self._delta({"type": "text_delta", "text": delta["refusal"]}))
            citations = _citations(delta.get("annotations"), "".join(self._text), self._cited)
            if citations and self._block == ("text", None):
                # On the text block still open. Once it has ended (a tool call's block followed it), or with none,
                # dropped: every delta of a block comes before its ``content_block_stop`` (a client finishes the block
                # there, the TypeScript SDK's ``citation`` event reads the last block), and a block opened for them
                # would be an empty text block, which Anthropic refuses sent back. The whole reply keeps them.
                events.extend(self._delta({"type": "citations_delta", "citation": c}) for c in citations)
            for call in tool_calls_of(delta):
                self._tool_delta(call, events)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                self._stop_sequence = stop_sequence_matched(choice)
        return events

    def finish(self) -> list[dict[str, Any]]:
        """The closing events, once the upstream stream has ended with its finish."""
        events: list[dict[str, Any]] = []
        self._close(events)
        usage = messages_usage(self._usage) if self._usage else {"output_tokens": 0}
        events.append(
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": _stop_reason(
                        self._finish, self._stop_sequence, refused=self._refused, called=bool(self._tool_blocks)
                    ),
                    "stop_sequence": self._stop_sequence,
                },
                "usage": usage,
            }
        )
        events.append({"type": "message_stop"})
        return events

    def _tool_delta(self, call: dict[str, Any], events: list[dict[str, Any]]) -> None:
        position = call.get("index", 0)
        function = call.get("function") or {}
        if position not in self._tool_blocks:
            block = {
                "type": "tool_use",
                "id": call.get("id") or "toolu_" + uuid.uuid4().hex,
                "name": function.get("name") or "",
                "input": {},
            }
            self._open("tool_use", position, block, events, new=True)
            self._tool_blocks[position] = self._index
        elif self._block != ("tool_use", position):
            return  # arguments of a call whose block was closed: Anthropic cannot interleave blocks
        arguments = function.get("arguments")
        if arguments:
            events.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))

    def _open(
        self, kind: str, position: int | None, block: dict[str, Any], events: list[dict[str, Any]], new: bool = False
    ) -> None:
        if self._block == (kind, position) and not new:
            return
        self._close(events)
        self._index += 1
        self._block = (kind, position)
        events.append({"type": "content_block_start", "index": self._index, "content_block": block})

    def _close(self, events: list[dict[str, Any]]) -> None:
        if self._block is None:
            return
        if self._block[0] == "thinking":
            events.append(self._delta({"type": "signature_delta", "signature": ""}))
        events.append({"type": "content_block_stop", "index": self._index})
        self._block = None

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self._index, "delta": delta}
