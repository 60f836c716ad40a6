"""OpenAI chat completions ↔ Google Gemini ``generateContent``, as pure functions (both directions).

The request side builds the keyword arguments of google-genai's ``models.generate_content`` (plain dicts
in the SDK's snake_case spelling, which its pydantic types accept): system and developer messages become
``system_instruction``, one part per text part, each exact (text only, as Google takes it and OpenAI's spec allows:
chat validation refuses a part of another type before any translation); the turns become ``contents`` (roles
``user`` and ``model``; an assistant's tool calls ``function_call`` parts, a tool message a ``function_response``
part named after the call it answers); tools their ``function_declarations`` with the JSON schema as given
(``parameters_json_schema``: Gemini takes JSON schema there, so no lossy translation to its older
``Schema`` subset); ``tool_choice`` a ``function_calling_config``; ``logprobs`` and ``top_logprobs``
``response_logprobs`` and ``logprobs`` (a model that has none answers Google's own 400); ``reasoning_effort``
a ``thinking_config`` budget (``GEMINI_THINKING_BUDGETS``, Google's own, by Claude's rule ``thinking_budget``:
another value is a 400, not dropped) with
``include_thoughts``, so that the thought summaries come back as ``reasoning_content`` (``none``: no thinking, a 400
for a Pro model, which always thinks: ``always_thinks``, refused naming the public model, ``thinking_off_refused``).
Gemini has no logit bias, so a non-empty ``logit_bias`` is a 400 rather than a bias silently not applied (the
adapter's ``unhonoured_refused``, before this translation); and no way to ask for one tool call a turn, so
``parallel_tool_calls: false`` is kept on the answer: a choice carries its first call only (the model asks for the
next once it has the first's result). ``verbosity`` (a hint to GPT-5 models) has no Gemini counterpart and is not
sent; nor is OpenAI's explicit prompt caching (``prompt_cache_options``, a part's ``prompt_cache_breakpoint``): Gemini
caches implicitly (its explicit cache is a ``cachedContent`` made beforehand), and a hint that cannot be honoured
changes no answer. A data URL image of a type Gemini reads (``GEMINI_IMAGE_TYPES``) is sent inline, another refused
with a 400 naming it; an http(s) image URL is refused
with a 400 (Gemini's ``file_data`` takes only files it hosts, and the gateway does not fetch URLs for the
provider).

The response side turns a ``GenerateContentResponse`` (as a dict, ``model_dump``'d) into a
``chat.completion`` or a ``chat.completion.chunk`` (the ``thought`` parts the message's or the delta's
``reasoning_content``); a safety verdict, on the prompt
(``prompt_feedback.block_reason``) or on the answer, is ``finish_reason: content_filter``; a candidate's
``logprobs_result`` is the choice's ``logprobs``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from typing import Any

from ..exceptions import ProviderBadRequestError
from .common import TOOL_TEXT_REMEDY, image_media_type, message_text, text_parts_only
from .openai_shape import logprob_finite
from .translate_anthropic import thinking_budget

_FINISH: dict[str, str] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "LANGUAGE": "content_filter",
}
# OpenAI's reasoning_effort → Gemini's thinking budget in tokens: the values Google's own OpenAI compatibility
# gives Gemini 2.5 (low 1K, medium 8K, high 24K; ``none`` turns thinking off), not Claude's (``THINKING_BUDGETS``,
# whose medium and high are a quarter and a sixth of these), each within every 2.5 model's range (Pro 128 to 32768,
# Flash 0 to 24576, Flash-Lite 512 to 24576). Gemini 3 models take a budget too, for backwards compatibility. Looked
# up, and an effort without a budget refused, by Claude's rule (``thinking_budget``).
GEMINI_THINKING_BUDGETS = {"none": 0, "minimal": 1024, "low": 1024, "medium": 8192, "high": 24576}
# Gemini's Pro models since 2.5 always think: 2.5 Pro's budget is 128 to 32768 (Google's 400 for 0), and 3 Pro's
# thinking cannot be turned off. Told apart by the model's id as Google names it (``gemini-2.5-pro``,
# ``gemini-2.5-pro-preview-06-05``, ``gemini-3-pro-preview``); ``none`` is refused for them before any call
# (``thinking_off_refused``). Pro models before 2.5 did not think.
_PRO_MODEL = re.compile(r"(?:^|/)gemini-(?P<version>\d+(?:\.\d+)?)-pro(?:-|$)")
_ALWAYS_THINKS_SINCE = 2.5
# The ``reasoning_effort`` levels Gemini has a thinking budget for.
THINKING_EFFORTS = tuple(GEMINI_THINKING_BUDGETS)
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.DOTALL)
# The image types Gemini reads (Google's image understanding: PNG, JPEG, WEBP, HEIC, HEIF): an image part's data URL of
# another type (text/html, a GIF, an executable) is refused naming it before any call (``_image_part``), where Google
# answered its own 400 after one. A data URL naming no type is sent as PNG, as it always was.
GEMINI_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")


def _invalid(message: str, param: str, code: str = "invalid_value") -> ProviderBadRequestError:
    return ProviderBadRequestError(message, param=param, code=code)


# Request ------------------------------------------------------------------------------------------------------


def always_thinks(model: str) -> bool:
    """Whether Gemini's ``model`` (its id) cannot turn its thinking off: a Pro model of 2.5 or later."""
    found = _PRO_MODEL.search(model)
    return found is not None and float(found["version"]) >= _ALWAYS_THINKS_SINCE


def thinking_off_refused(body: dict[str, Any], name: str) -> None:
    """For ``reasoning_effort`` ``none`` (a budget of 0) asked of a model that always thinks (``body["model"]``, its
    upstream id: ``always_thinks``), a 400 naming ``reasoning_effort``, the levels the model takes and the model as
    ``name``, the public name the client asked for, not a budget of 0 sent for Google's 400 after the call. Not the
    upstream id: a deployment may serve ``smart`` on ``gemini-2.5-pro``, an id the client never sent and the admin
    may keep to itself. Checked where the public model is known (``GeminiAdapter.prepare_request``)."""
    effort = body.get("reasoning_effort")
    if not isinstance(effort, str) or GEMINI_THINKING_BUDGETS.get(effort) != 0:
        return
    if always_thinks(str(body.get("model") or "")):
        raise _invalid(
            f"{name} cannot turn its thinking off (effort {effort!r}): use one of "
            + ", ".join(repr(level) for level, tokens in GEMINI_THINKING_BUDGETS.items() if tokens)
            + ".",
            "reasoning_effort",
            "unsupported_value",
        )


def gemini_request(body: dict[str, Any]) -> dict[str, Any]:
    """``model``, ``contents`` and ``config`` for ``models.generate_content`` from an OpenAI chat body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("`messages` must be a non-empty array.", "messages")
    system, contents = _contents(messages)
    if not contents:
        raise _invalid("Gemini needs at least one user or assistant message besides the system prompt.", "messages")
    config: dict[str, Any] = {}
    if system:
        config["system_instruction"] = {"parts": system}
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("n", "candidate_count"),
        ("seed", "seed"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
    ):
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    effort = body.get("reasoning_effort")
    if effort is not None:
        budget = thinking_budget(effort, "Gemini", ProviderBadRequestError, GEMINI_THINKING_BUDGETS)
        # Asked to reason, the model's thought summaries come back too (``reasoning_content``), as reasoning does
        # from OpenAI-compatible servers; without ``include_thoughts`` Gemini bills its thinking and shows none.
        config["thinking_config"] = (
            {"thinking_budget": budget, "include_thoughts": True} if budget else {"thinking_budget": 0}
        )
    if body.get("logprobs") is True:
        config["response_logprobs"] = True
        if body.get("top_logprobs"):
            config["logprobs"] = body["top_logprobs"]  # Gemini's name for how many alternatives a step
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        config["max_output_tokens"] = max_tokens
    stop = body.get("stop")
    if stop:
        config["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        config["response_mime_type"] = "application/json"
        schema = (response_format.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            config["response_json_schema"] = schema
    tools = _tools(body.get("tools"))
    if tools:
        config["tools"] = tools
        # The SDK would otherwise call Python callables itself; a gateway only relays the calls.
        config["automatic_function_calling"] = {"disable": True}
    tool_config = _tool_config(body.get("tool_choice"))
    if tool_config is not None and tools:
        config["tool_config"] = tool_config
    return {"model": str(body.get("model") or ""), "contents": contents, "config": config}


def _contents(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _invalid(f"`{where}` must be an object.", where)
        role = message.get("role")
        if role in ("system", "developer"):
            # Gemini's ``system_instruction`` takes text only (Google: "only text should be used in parts"), as
            # OpenAI's spec does: chat validation refused any other part (``chat.validation.ROLE_CONTENT_PARTS``).
            content = message.get("content")
            # One part of the instruction per text part, each as the client wrote it: Gemini reads them in order, as
            # OpenAI concatenates a message's parts, and nothing is put between (a blank line was, until 7 December).
            # An empty part says nothing (and a lone empty system message was never sent).
            system.extend(part for part in _parts(content, where) if part["text"])
            continue
        if role == "user":
            parts = _parts(message.get("content"), where)
            gemini_role = "user"
        elif role == "assistant":
            parts = _parts(message.get("content"), where) if message.get("content") else []
            for call in message.get("tool_calls") or []:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not function.get("name"):
                    raise _invalid(f"`{where}.tool_calls` must name each function.", f"{where}.tool_calls")
                call_names[str(call.get("id") or "")] = function["name"]
                parts.append({"function_call": {"name": function["name"], "args": _arguments(function, where)}})
            gemini_role = "model"
        elif role in ("tool", "function"):
            name = message.get("name") or call_names.get(str(message.get("tool_call_id") or ""))
            if not name:
                raise _invalid(
                    f"`{where}` answers a tool call this conversation does not contain.", f"{where}.tool_call_id"
                )
            content = message.get("content") or ""
            _tool_parts_checked(content, where)
            output = message_text(content)  # its text parts as one text, as OpenAI reads them
            parts = [{"function_response": {"name": name, "response": {"output": output}}}]
            gemini_role = "user"
        else:
            raise _invalid(f"`{where}.role` {role!r} is not one Gemini can take.", f"{where}.role")
        if not parts:
            continue
        if contents and contents[-1]["role"] == gemini_role:
            contents[-1]["parts"].extend(parts)  # Gemini wants the roles to alternate
        else:
            contents.append({"role": gemini_role, "parts": parts})
    return system, contents


def _parts(content: Any, where: str) -> list[dict[str, Any]]:
    """A message's content as Gemini's parts. A refusal part (an assistant message's: chat validation refuses it in
    any other, ``chat.validation.ROLE_CONTENT_PARTS``) is a text part, what the model said when it refused, as
    Claude's and Cohere's translations send it on (``common.message_text``). A part Gemini cannot take (a user's sound
    or file) is a 400 naming it, ``{where}.content[M].type``, as the other translations name a part."""
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, list):
        raise _invalid(f"`{where}.content` must be a string or an array of parts.", f"{where}.content")
    parts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"text": part["refusal"]})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            parts.append(_image_part(url, f"{where}.content[{index}].image_url.url"))
        else:
            raise _invalid(
                f"`{where}.content[{index}]` is a {kind!r} part, which Gemini cannot take here.",
                f"{where}.content[{index}].type",
                "unsupported_value",
            )
    return parts


def _tool_parts_checked(content: Any, where: str) -> None:
    """A tool message's content, whose text alone Gemini's ``function_response`` takes: a part of another type (an
    image, as Claude's tool_result takes) is refused naming it, not dropped (the model would answer as if the tool had
    shown nothing); OpenAI's spec allows text parts alone there."""
    text_parts_only(content, where, takes="Gemini takes a tool's result as text only", remedy=TOOL_TEXT_REMEDY)
    _parts(content, where)  # any other part Gemini cannot take is refused as in any message


def _image_part(url: Any, param: str) -> dict[str, Any]:
    """An image part's URL (at ``param``, ``messages[N].content[M].image_url.url``, which a refusal names as Claude's
    translation does) as Gemini's inline data."""
    match = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if match is None:
        raise _invalid(
            f"`{param}`: Gemini takes images as base64 data URLs (data:image/png;base64,…) only; "
            "it cannot fetch an image from a URL.",
            param,
            code="image_url_not_supported",
        )
    mime = image_media_type(match["mime"] or "image/png")  # image/jpg as image/jpeg, in lower case
    if mime not in GEMINI_IMAGE_TYPES:
        raise _invalid(
            f"`{param}`: Gemini takes images of type {', '.join(GEMINI_IMAGE_TYPES)} only, and this data URL's is "
            f"{mime}.",
            param,
            code="invalid_image_format",
        )
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"`{param}`: the image's data URL is not valid base64.", param) from None
    return {"inline_data": {"mime_type": mime, "data": data}}


def _arguments(function: dict[str, Any], where: str) -> dict[str, Any]:
    arguments = function.get("arguments")
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments or "{}")
    except (TypeError, ValueError):
        raise _invalid(f"`{where}`: a tool call's arguments are not JSON.", f"{where}.tool_calls") from None
    if not isinstance(value, dict):
        raise _invalid(f"`{where}`: a tool call's arguments must be a JSON object.", f"{where}.tool_calls")
    return value


def _tools(tools: Any) -> list[dict[str, Any]]:
    declarations = []
    for index, tool in enumerate(tools or []):
        function = (
            tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        )
        if not isinstance(function, dict) or not function.get("name"):
            raise _invalid(f"`tools[{index}]` must be a function with a name.", f"tools[{index}]")
        declaration: dict[str, Any] = {"name": function["name"]}
        if function.get("description"):
            declaration["description"] = function["description"]
        if isinstance(function.get("parameters"), dict):
            declaration["parameters_json_schema"] = function["parameters"]
        declarations.append(declaration)
    return [{"function_declarations": declarations}] if declarations else []


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "none":
        return {"function_calling_config": {"mode": "NONE"}}
    if choice == "auto":
        return {"function_calling_config": {"mode": "AUTO"}}
    if choice == "required":
        return {"function_calling_config": {"mode": "ANY"}}
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and function.get("name"):
        return {"function_calling_config": {"mode": "ANY", "allowed_function_names": [function["name"]]}}
    raise _invalid("`tool_choice` must be none, auto, required or a named function.", "tool_choice")


# Response -----------------------------------------------------------------------------------------------------


def completion_id(response: dict[str, Any]) -> str:
    """``chatcmpl-`` and Gemini's response id, else a digest of the response (deterministic)."""
    rid = response.get("response_id")
    if not rid:
        rid = hashlib.sha256(json.dumps(response, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return f"chatcmpl-{rid}"


def _tool_call(call: dict[str, Any], response_key: str, number: int) -> dict[str, Any]:
    return {
        "id": call.get("id") or f"call_{response_key}_{number}",
        "type": "function",
        "function": {"name": call.get("name") or "", "arguments": json.dumps(call.get("args") or {})},
    }


def _candidate(
    candidate: dict[str, Any], response_key: str, first_call: int = 0, max_calls: int | None = None
) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """Text, tool calls (numbered from ``first_call``; no more than ``max_calls`` in all, counting those
    before ``first_call``) and OpenAI finish reason (None while a stream goes on) of one candidate."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in (candidate.get("content") or {}).get("parts") or []:
        if part.get("thought"):
            continue  # the model's reasoning summary is not part of its answer
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part.get("function_call"), dict):
            if max_calls is not None and first_call + len(calls) >= max_calls:
                continue
            calls.append(_tool_call(part["function_call"], response_key, first_call + len(calls)))
    reason = candidate.get("finish_reason")
    reason = getattr(reason, "value", reason)
    finish = None
    if reason:
        finish = "tool_calls" if calls else _FINISH.get(str(reason), "stop")
    return ("".join(texts) if texts else None), calls, finish


def _thoughts(candidate: dict[str, Any]) -> str | None:
    """The model's thought summary in a candidate (its ``thought`` parts, which ``include_thoughts`` asks for)."""
    thoughts = [
        part["text"]
        for part in (candidate.get("content") or {}).get("parts") or []
        if part.get("thought") and isinstance(part.get("text"), str)
    ]
    return "".join(thoughts) if thoughts else None


def _choice_logprobs(candidate: dict[str, Any]) -> dict[str, Any] | None:
    """A choice's ``logprobs`` in OpenAI's shape from the candidate's ``logprobs_result`` (what Gemini answers
    ``response_logprobs``): each token chosen, with the step's most likely tokens when ``logprobs`` asked for
    them; None when the candidate has none (not asked for, or nothing generated in this chunk)."""
    result = candidate.get("logprobs_result")
    if not isinstance(result, dict) or not result.get("chosen_candidates"):
        return None
    steps = result.get("top_candidates") or []
    content = []
    for step, chosen in enumerate(result["chosen_candidates"]):
        top = steps[step] if step < len(steps) and isinstance(steps[step], dict) else {}
        content.append(
            {**_token_logprob(chosen), "top_logprobs": [_token_logprob(each) for each in top.get("candidates") or []]}
        )
    return {"content": content, "refusal": None}


def _token_logprob(candidate: Any) -> dict[str, Any]:
    candidate = candidate if isinstance(candidate, dict) else {}
    token = str(candidate.get("token") or "")
    # Gemini leaves a zero out (proto3 JSON): a certain token's log probability is 0. Proto3 JSON spells a float JSON
    # has not as a string ("NaN", "-Infinity"), which the SDK reads as that float: made finite as OpenAI's would be.
    logprob = logprob_finite(candidate.get("log_probability") or 0.0)
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def openai_usage(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    if not metadata:
        return None
    prompt = (metadata.get("prompt_token_count") or 0) + (metadata.get("tool_use_prompt_token_count") or 0)
    thoughts = metadata.get("thoughts_token_count") or 0
    completion = (metadata.get("candidates_token_count") or 0) + thoughts
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": metadata.get("cached_content_token_count") or 0},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


def completion_from_response(response: dict[str, Any], model: str, *, max_calls: int | None = None) -> dict[str, Any]:
    """A ``chat.completion`` from a ``GenerateContentResponse`` (``model_dump()``), each choice with at most
    ``max_calls`` tool calls (``max_tool_calls``)."""
    cid = completion_id(response)
    key = cid.removeprefix("chatcmpl-")
    choices = []
    if (response.get("prompt_feedback") or {}).get("block_reason") and not response.get("candidates"):
        choices.append(
            {
                "index": 0,
                "message": {"role": "assistant", "content": "", "refusal": None},
                "logprobs": None,
                "finish_reason": "content_filter",
            }
        )
    for index, candidate in enumerate(response.get("candidates") or []):
        text, calls, finish = _candidate(candidate, f"{key}_{index}" if index else key, max_calls=max_calls)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if (thoughts := _thoughts(candidate)) is not None:
            message["reasoning_content"] = thoughts
        if calls:
            message["tool_calls"] = calls
        elif text is None:
            message["content"] = ""
        choices.append(
            {
                "index": candidate.get("index") or index,
                "message": message,
                "logprobs": _choice_logprobs(candidate),
                "finish_reason": finish or "stop",
            }
        )
    completion: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": response.get("model_version") or model,
        "choices": choices,
    }
    usage = openai_usage(response.get("usage_metadata"))
    if usage is not None:
        completion["usage"] = usage
    return completion


class StreamTranslator:
    """Each ``GenerateContentResponse`` of a stream becomes one ``chat.completion.chunk`` (the first carries
    the role); the usage, which Gemini repeats (cumulatively) on its chunks, comes once at the end in a chunk
    of its own (``usage_chunk``), as OpenAI sends it."""

    def __init__(self, model: str, *, max_calls: int | None = None) -> None:
        self.model = model
        self.max_calls = max_calls  # tool calls a choice may carry in all (``max_tool_calls``)
        self.id: str | None = None
        self.created = int(time.time())
        self.usage: dict[str, Any] | None = None
        self._started: set[int] = set()
        self._ended: set[int] = set()  # the candidates that carried their finish
        # Tool calls so far, per candidate: OpenAI numbers a streamed call within its choice.
        self._calls: dict[int, int] = {}

    def feed(self, response: dict[str, Any]) -> dict[str, Any] | None:
        if self.id is None:
            self.id = completion_id(response)
        self.model = response.get("model_version") or self.model
        usage = openai_usage(response.get("usage_metadata"))
        if usage is not None:
            self.usage = usage
        choices = []
        if (response.get("prompt_feedback") or {}).get("block_reason") and not response.get("candidates"):
            choices.append(
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": "content_filter"}
            )
        key = self.id.removeprefix("chatcmpl-")
        for position, candidate in enumerate(response.get("candidates") or []):
            index = candidate.get("index") or position
            made = self._calls.get(index, 0)
            # Call ids as complete's: the second candidate's on, with their index in them.
            text, calls, finish = _candidate(candidate, f"{key}_{index}" if index else key, made, self.max_calls)
            delta: dict[str, Any] = {}
            if index not in self._started:
                self._started.add(index)
                delta["role"] = "assistant"
            if (thoughts := _thoughts(candidate)) is not None:
                delta["reasoning_content"] = thoughts
            if text is not None:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = [{"index": made + number, **call} for number, call in enumerate(calls)]
                self._calls[index] = made = made + len(calls)
            if finish == "stop" and made:
                finish = "tool_calls"  # the calls came in an earlier chunk than the finish
            choices.append(
                {"index": index, "delta": delta, "logprobs": _choice_logprobs(candidate), "finish_reason": finish}
            )
        self._started.update(choice["index"] for choice in choices)
        self._ended.update(choice["index"] for choice in choices if choice["finish_reason"])
        if not choices:
            return None
        return self._chunk(choices)

    @property
    def finished(self) -> bool:
        """Whether every candidate begun has finished: with ``n`` > 1 they end in chunks of their own, and a
        stream cut between their finishes has not finished."""
        return bool(self._started) and self._started <= self._ended

    def usage_chunk(self) -> dict[str, Any] | None:
        if self.usage is None or self.id is None:
            return None
        return {**self._chunk([]), "usage": self.usage}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
