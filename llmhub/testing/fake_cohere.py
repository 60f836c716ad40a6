"""Cohere's v2 wire format for the fake upstream: ``POST /cohere/v2/chat`` (JSON, or SSE with Cohere's
event types), ``POST /cohere/v2/embed`` (honouring ``output_dimension``; at most 96 texts a call, more a 400 as Cohere
answers) and ``GET /cohere/v1/models``.

Cohere's model list lives at ``/v1/models`` like OpenAI's, with another shape, so the fake serves Cohere
under ``/cohere``: a test provider's base URL is ``http://127.0.0.1:<port>/cohere``. Replies, tool calls,
usage and the fault menu are the fake upstream's own (the same steering markers); errors are Cohere's
``{"message": ...}`` with the HTTP status. A stream's ``error-event`` fault ends the stream with a
``message-end`` whose finish reason is ``ERROR``. An embed's ``[[vectors=N]]`` answers the first N texts' only.
A chat's ``thinking`` (its reasoning models': ``{"type": "enabled" or "disabled", "token_budget": N}``) is checked
as Cohere's API types it, N a positive integer: another is a 400, as Cohere refuses it. ``[[thinking=TEXT]]`` is a
reasoning model's thinking, as Cohere's reasoning models think by default: a ``thinking`` content block before the
reply's text (streamed: ``content.thinking`` deltas, the text's block at index 1), cut at the ``token_budget``, its
tokens counted in the output, as Cohere bills them; none when ``thinking`` is ``disabled``, nor beside a tool call.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import fake_upstream as fake

if TYPE_CHECKING:
    from .fake_upstream import _App

PREFIX = "/cohere"
CONTEXT_WINDOW = 128_000
EMBED_BATCH_LIMIT = 96  # texts in one v2/embed call
MODELS = (
    ("command-a-03-2025", ["chat"]),
    ("command-r-plus-08-2024", ["chat"]),
    ("embed-v4.0", ["embed"]),
)
_FINISH = {"stop": "COMPLETE", "stop_sequence": "STOP_SEQUENCE", "length": "MAX_TOKENS", "tool": "TOOL_CALL"}
_FAULT_MESSAGES = {
    400: "invalid request: the request was malformed.",
    401: "invalid api token",
    403: "Forbidden: your API key does not have access to this resource.",
    404: "model not found",
    422: "unprocessable entity",
    429: "You are using a Trial key, which is limited to 10 API calls / minute.",
    500: "internal server error, this has been reported to our developers.",
    503: "service unavailable",
}


def cohere_error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


def add_routes(router: web.UrlDispatcher, app: _App) -> None:
    def handler(serve: Any) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await serve(app, request)

        return handle

    router.add_post(f"{PREFIX}/v2/chat", handler(chat))
    router.add_post(f"{PREFIX}/v2/embed", handler(embed))
    router.add_get(f"{PREFIX}/v1/models", handler(models))


async def _fault(
    app: _App, request: web.Request, fault: str, prompt_tokens: int, stream: bool
) -> web.StreamResponse | None:
    status_fault = fake._fault_status(fault)
    if status_fault is not None:
        status, retry_after = status_fault
        response = cohere_error(status, _FAULT_MESSAGES.get(status, f"Injected fault {status}"))
        if status == 429:
            response.headers["Retry-After"] = retry_after
        return response
    if fault == "context":
        return cohere_error(
            400,
            f"too many tokens: total number of tokens in the prompt cannot exceed {CONTEXT_WINDOW} - "
            f"received {CONTEXT_WINDOW + prompt_tokens}. Try using a shorter prompt.",
        )
    if fault == "error-event" and not stream:
        return cohere_error(500, _FAULT_MESSAGES[500])
    # refuse, hang, cut-N, error-event while streaming, unknown faults: the fake upstream's own handling.
    early = await app._immediate_fault(request, "openai", fault, prompt_tokens, stream)
    if early is not None and early.status == 400:
        return cohere_error(400, f"Unknown fake fault {fault!r}")
    return early


async def models(app: _App, request: web.Request) -> web.StreamResponse:
    await app._pause(app._timing({}).latency)
    fault = app._fault_name(request, {}, None)
    if fault is not None:
        early = await _fault(app, request, fault, 0, stream=False)
        if early is not None:
            return early
    return web.json_response(
        {
            "models": [
                {
                    "name": name,
                    "endpoints": endpoints,
                    "finetuned": False,
                    "context_length": CONTEXT_WINDOW,
                    "features": ["tools"] if "chat" in endpoints else [],
                }
                for name, endpoints in MODELS
            ],
            "next_page_token": None,
        }
    )


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    counts = {"input_tokens": prompt, "output_tokens": completion}
    usage: dict[str, Any] = {"billed_units": counts, "tokens": dict(counts)}
    if cached:
        usage["cached_tokens"] = cached
    return usage


async def chat(app: _App, request: web.Request) -> web.StreamResponse:
    body = request[fake._BODY_KEY]
    if not isinstance(body, dict):
        return cohere_error(400, "invalid request: the request body is not valid JSON.")
    conv = fake._parse_openai(body)  # Cohere v2 messages have OpenAI's roles and content parts
    timing = app._timing(conv.directives)
    await app._pause(timing.latency)
    stream = body.get("stream") is True
    fault = app._fault_name(request, conv.directives, body.get("model"))
    if fault is not None:
        early = await _fault(app, request, fault, conv.prompt_tokens, stream)
        if early is not None:
            return early
    if not isinstance(body.get("model"), str) or not body["model"]:
        return cohere_error(400, "invalid request: model must be a non-empty string.")
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return cohere_error(400, "invalid request: messages cannot be empty.")
    if not _thinking_valid(body.get("thinking")):
        return cohere_error(
            400, "invalid request: thinking must be {type: enabled or disabled, token_budget: a positive integer}."
        )
    if "raw_cohere" in conv.directives:  # as ``[[raw=...]]`` on OpenAI's route: exactly the bytes given
        encoding = conv.directives.get("raw_encoding")
        return await app._raw_answer(request, conv.directives["raw_cohere"], stream=stream, encoding=encoding)
    stops = [stop for stop in body.get("stop_sequences") or [] if isinstance(stop, str)]
    tool = fake._openai_tool(body) if body.get("tool_choice") != "NONE" else None
    reply = fake._build_reply(conv, tool, fake._int_or_none(body.get("max_tokens")), stops, "call_", app.demo)
    thought = _thought(body.get("thinking"), conv.directives) if reply.tool_name is None else []
    cached = min(fake._directive_int(conv.directives, "cache") or 0, conv.prompt_tokens)
    usage = _usage(conv.prompt_tokens, reply.completion_tokens + len(thought), cached)
    response_id = fake._new_id("", 32)
    if stream:
        return await _chat_stream(app, request, response_id, reply, thought, usage, timing, fault)
    await app._pause(timing.whole_reply(len(reply.tokens)))
    message: dict[str, Any] = {"role": "assistant"}
    if reply.tool_name is not None:
        message["tool_plan"] = f"I will call {reply.tool_name}."
        message["tool_calls"] = [_tool_call(reply, call_id) for call_id in reply.tool_ids]
    else:
        thinking = [{"type": "thinking", "thinking": "".join(thought)}] if thought else []
        message["content"] = [*thinking, {"type": "text", "text": reply.text}]
    return web.json_response(
        {"id": response_id, "finish_reason": _FINISH[reply.finish], "message": message, "usage": usage}
    )


def _thought(thinking: Any, directives: dict[str, str]) -> list[str]:
    """The tokens of the thinking a ``[[thinking=TEXT]]`` asks for, unless ``thinking`` turns it off; cut at its
    ``token_budget``, where the model stops thinking."""
    text = directives.get("thinking")
    if not text or (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        return []
    tokens = fake.split_tokens(text)
    budget = thinking.get("token_budget") if isinstance(thinking, dict) else None
    return tokens[:budget] if isinstance(budget, int) else tokens


def _thinking_valid(thinking: Any) -> bool:
    """Whether a chat's ``thinking`` is of Cohere's ``Thinking`` type (none is)."""
    if thinking is None:
        return True
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
        return False
    if set(thinking) - {"type", "token_budget"}:
        return False
    budget = thinking.get("token_budget")
    return budget is None or (type(budget) is int and budget > 0)


def _tool_call(reply: fake._Reply, call_id: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": reply.tool_name, "arguments": reply.arguments_json},
    }


async def _chat_stream(
    app: _App,
    request: web.Request,
    response_id: str,
    reply: fake._Reply,
    thought: list[str],
    usage: dict[str, Any],
    timing: fake._Timing,
    fault: str | None,
) -> web.StreamResponse:
    response = await app._start_sse(request, {})

    async def send(kind: str, **fields: Any) -> None:
        payload = json.dumps({"type": kind, **fields}, separators=(",", ":"))
        await response.write(f"event: {kind}\ndata: {payload}\n\n".encode())

    limit = fake._content_limit(fault)
    await send(
        "message-start",
        id=response_id,
        delta={"message": {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}},
    )
    if reply.tool_name is not None:
        await send("tool-plan-delta", delta={"message": {"tool_plan": f"I will call {reply.tool_name}."}})
        for index, call_id in enumerate(reply.tool_ids):  # ``[[tool_calls=N]]``: one call after another
            call = {"id": call_id, "type": "function", "function": {"name": reply.tool_name, "arguments": ""}}
            await send("tool-call-start", index=index, delta={"message": {"tool_calls": call}})
            for position, piece in enumerate(fake._split_pieces(reply.arguments_json)):
                if limit is not None and position >= limit:
                    break
                await app._pause(timing.before_piece(position))
                arguments = {"function": {"arguments": piece}}
                await send("tool-call-delta", index=index, delta={"message": {"tool_calls": arguments}})
            else:
                await send("tool-call-end", index=index)
    else:
        if thought:
            await send("content-start", index=0, delta={"message": {"content": {"type": "thinking", "thinking": ""}}})
            for token in thought:
                await send("content-delta", index=0, delta={"message": {"content": {"thinking": token}}})
            await send("content-end", index=0)
        index = 1 if thought else 0
        await send("content-start", index=index, delta={"message": {"content": {"type": "text", "text": ""}}})
        for position, token in enumerate(reply.tokens):
            if limit is not None and position >= limit:
                break
            await app._pause(timing.before_piece(position))
            await send("content-delta", index=index, delta={"message": {"content": {"text": token}}})
        else:
            await send("content-end", index=index)
    if fault == "error-event":
        await send("message-end", delta={"finish_reason": "ERROR", "error": "internal server error"})
        await response.write_eof()
        return response
    if limit is not None and re.fullmatch(r"cut-\d+", fault or ""):
        await app._cut(request)
    await send("message-end", delta={"finish_reason": _FINISH[reply.finish], "usage": usage})
    await response.write_eof()
    return response


async def embed(app: _App, request: web.Request) -> web.StreamResponse:
    body = request[fake._BODY_KEY]
    if not isinstance(body, dict):
        return cohere_error(400, "invalid request: the request body is not valid JSON.")
    texts = body.get("texts")
    directives: dict[str, str] = {}
    for text in texts if isinstance(texts, list) else ():
        if isinstance(text, str):
            directives.update(fake._extract_directives(text)[1])
    await app._pause(app._timing(directives).latency)
    prompt_tokens = sum(fake.count_words(text) for text in texts or () if isinstance(text, str))
    fault = app._fault_name(request, directives, body.get("model"))
    if fault is not None:
        early = await _fault(app, request, fault, prompt_tokens, stream=False)
        if early is not None:
            return early
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
        return cohere_error(400, "invalid request: texts must be a non-empty list of strings.")
    if len(texts) > EMBED_BATCH_LIMIT:
        return cohere_error(
            400, f"invalid request: total number of texts must be at most {EMBED_BATCH_LIMIT} - received {len(texts)}"
        )
    if not body.get("input_type"):
        return cohere_error(400, "invalid request: input_type is required for embed models v3 and higher.")
    dimensions = body.get("output_dimension") or fake._EMBEDDING_DIMENSIONS  # embed-v4's, as Cohere takes it
    # A query is embedded apart from the documents it should find, as Cohere does: another input type, another
    # vector (search_document's are the OpenAI-protocol route's, as before).
    kind = "" if body["input_type"] == "search_document" else "\0" + str(body["input_type"])
    vectors = [fake._embedding_vector(text + kind, dimensions).tolist() for text in texts]
    kept = fake._directive_int(directives, "vectors")
    if kept is not None:
        del vectors[kept:]
    return web.json_response(
        {
            "id": fake._new_id("", 32),
            "embeddings": {"float": vectors},
            "texts": texts,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": prompt_tokens}},
            "response_type": "embeddings_by_type",
        }
    )
