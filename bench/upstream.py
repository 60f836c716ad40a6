"""The FAST upstream: nginx answering canned OpenAI chat completions in microseconds.

With an upstream this quick, what a client waits for through llmhub is llmhub's own cost. Both answers
are static files: nginx's static module refuses POST with a 405, which ``error_page`` turns into a 200
with the same file (a ``return 200 '...'`` would do too, but nginx caps a configuration string at 4 KiB,
less than the canned stream). Streamed and non-streamed requests take the same path and nginx cannot
read the body, so each answer has its own base URL, and the benchmark its own catalog model for each.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

SSE_CONTENT_CHUNKS = 20
_CREATED = 1735689600


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def canned_completion() -> str:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": _CREATED,
            "model": "fake-gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! Nice to meet you.", "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 14, "completion_tokens": 6, "total_tokens": 20},
            "system_fingerprint": "fp_bench",
        },
        separators=(",", ":"),
    )


def canned_stream() -> str:
    """A role chunk, 20 content chunks, a finish chunk, a usage chunk and ``[DONE]``, as OpenAI sends them."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": _CREATED, "model": "fake-gpt-4o-mini"}

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        data = {**base, "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return "data: " + json.dumps(data, separators=(",", ":")) + "\n\n"

    def delta(content: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]

    events = [event(delta({"role": "assistant", "content": ""}))]
    events += [event(delta({"content": f" word{i}"})) for i in range(SSE_CONTENT_CHUNKS)]
    events.append(event(delta({}, "stop")))
    events.append(event([], {"prompt_tokens": 14, "completion_tokens": SSE_CONTENT_CHUNKS, "total_tokens": 34}))
    events.append("data: [DONE]\n\n")
    return "".join(events)


def nginx_conf(work: Path, port: int, more_ports: tuple[int, ...] = ()) -> str:
    """The configuration (one worker: two cores are shared with the server and wrk); writes the answers.
    ``more_ports`` serve the same answers: each is another host to llmhub (a deployment of a routed model)."""
    (work / "completion.json").write_text(canned_completion())
    (work / "stream.sse").write_text(canned_stream())
    # Workers of a root master run as nobody, who may not be able to read the work tree.
    user = "user root;" if os.geteuid() == 0 else ""
    listen = "\n        ".join(f"listen 127.0.0.1:{each};" for each in (port, *more_ports))
    return f"""
{user}
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    etag off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    server {{
        {listen}
        location = /json/v1/chat/completions {{
            default_type application/json;
            alias {work}/completion.json;
            error_page 405 =200 $uri;
        }}
        location = /sse/v1/chat/completions {{
            default_type text/event-stream;
            alias {work}/stream.sse;
            error_page 405 =200 $uri;
        }}
    }}
}}
"""
