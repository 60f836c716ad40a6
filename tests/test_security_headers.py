"""/v1 under production's transport settings: plain HTTP refused, HTTPS answers with HSTS and the other
headers SecurityMiddleware gives the full stack; ``check --deploy`` clean with production settings; and the
Content-Security-Policy of every kind of page (core/csp.py), none on /v1."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography.fernet import Fernet
from django.core.handlers.asgi import ASGIHandler
from django.test import override_settings

from llmhub.handlers import MiddlewareFreeASGIHandler, PathPrefixRouter
from tests.test_access_log import dockerfile_command

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent
SECURITY_HEADERS = (
    "strict-transport-security",
    "x-content-type-options",
    "referrer-policy",
    "cross-origin-opener-policy",
)


def production_environment() -> dict[str, str]:
    """What production settings require to load (the values are throw-away)."""
    return {
        "DJANGO_SETTINGS_MODULE": "llmhub.settings.production",
        "SECRET_KEY": Fernet.generate_key().decode() * 2,
        "FIELD_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "DATABASE_URL": "sqlite:///" + str(ROOT / "var" / f"check-deploy-{os.getpid()}.sqlite3"),
        "ALLOWED_HOSTS": "llmhub.example.com",
    }


@pytest.fixture(scope="module")
def production() -> dict[str, Any]:
    """The SECURE_* settings of llmhub.settings.production itself, for override_settings."""
    saved = dict(os.environ)
    os.environ.update(production_environment())
    try:
        module = importlib.import_module("llmhub.settings.production")
        values = {name: getattr(module, name) for name in dir(module) if name.startswith("SECURE_")}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        sys.modules.pop("llmhub.settings.production", None)
    assert values["SECURE_SSL_REDIRECT"] and values["SECURE_HSTS_SECONDS"]
    return values


async def call(
    path: str,
    *,
    scheme: str = "http",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    client: str = "127.0.0.1",
    server: Any = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request through a router built under the current settings (the handlers read them once, at
    start-up, as they do in a server), from ``client``, wrapped as ``server`` wraps an application (a function
    of the router) if given; returns (status, headers, body)."""
    app = PathPrefixRouter(prefixes=("/v1/",), lean=MiddlewareFreeASGIHandler(), full=ASGIHandler())
    if server is not None:
        app = server(app)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")]
        + [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()],
        "client": (client, 40000),
        "server": ("testserver", 443 if scheme == "https" else 80),
    }
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await asyncio.Event().wait()  # the client stays until the answer is sent
        return {"type": "http.disconnect"}

    status, response_headers, parts = 0, {}, []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, response_headers
        if message["type"] == "http.response.start":
            status = message["status"]
            response_headers = {name.decode().lower(): value.decode() for name, value in message["headers"]}
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, response_headers, b"".join(parts)


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/v1/models", {}),
        (
            "POST",
            "/v1/chat/completions",
            {"Authorization": "Bearer sk-llmhub-sent-in-clear", "Content-Type": "application/json"},
        ),
    ],
)
async def test_plain_http_to_v1_is_refused_in_production(production, method, path, headers):
    with override_settings(**production):
        status, response_headers, body = await call(path, method=method, headers=headers)

    assert status == 403  # not the view's 401: nothing was looked up
    error = json.loads(body)["error"]
    assert error["code"] == "https_required" and error["type"] == "invalid_request_error"
    assert "HTTPS only" in error["message"] and "sk-llmhub-sent-in-clear" not in body.decode()
    assert "location" not in response_headers  # refused, not redirected
    assert "strict-transport-security" not in response_headers  # HSTS over plain HTTP means nothing
    assert response_headers["x-content-type-options"] == "nosniff"


async def test_https_answers_carry_hsts(production):
    with override_settings(**production):
        status, headers, body = await call("/v1/models", scheme="https")

    assert status == 401 and json.loads(body)["error"]["code"] == "missing_api_key"
    assert headers["strict-transport-security"] == "max-age=2592000; includeSubDomains; preload"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "same-origin"


def production_server(application: Any) -> Any:
    """``application`` as the production command's uvicorn serves it (the Dockerfile's CMD, parsed by uvicorn's
    own command line parser; FORWARDED_ALLOW_IPS from the environment, as uvicorn reads it)."""
    command = dockerfile_command()
    assert command[0] == "uvicorn"
    params = uvicorn.main.make_context("uvicorn", command[1:]).params
    config = uvicorn.Config(
        application,
        proxy_headers=params["proxy_headers"],
        forwarded_allow_ips=params["forwarded_allow_ips"],
        log_config=None,
    )
    config.load()
    return config.loaded_app


async def test_only_the_proxy_uvicorn_trusts_can_say_a_request_came_over_https(production, monkeypatch):
    """Django trusted X-Forwarded-Proto from anyone (SECURE_PROXY_SSL_HEADER), while uvicorn trusts proxy headers
    only from FORWARDED_ALLOW_IPS: a client reaching the server past the proxy could say "https" and be answered
    as if it had come over TLS (its key taken over plain HTTP, its page not redirected). uvicorn alone decides
    (--proxy-headers sets the request's scheme), and Django takes the scheme it was given."""
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "192.0.2.10")
    forwarded = {"X-Forwarded-Proto": "https"}
    with override_settings(**production, ALLOWED_HOSTS=["testserver"]):
        from_anyone = await call("/v1/models", headers=forwarded, client="203.0.113.5", server=production_server)
        page_from_anyone = await call(
            "/accounts/login/", headers=forwarded, client="203.0.113.5", server=production_server
        )
        from_the_proxy = await call("/v1/models", headers=forwarded, client="192.0.2.10", server=production_server)
        page_from_the_proxy = await call(
            "/accounts/login/", headers=forwarded, client="192.0.2.10", server=production_server
        )
        plain_from_the_proxy = await call("/accounts/login/", client="192.0.2.10", server=production_server)
        probe = await call("/healthz", client="203.0.113.5", server=production_server)

    status, headers, body = from_anyone
    assert status == 403 and json.loads(body)["error"]["code"] == "https_required"
    assert "strict-transport-security" not in headers
    status, headers, _ = page_from_anyone
    assert status == 301 and headers["location"] == "https://testserver/accounts/login/"

    status, headers, body = from_the_proxy
    assert status == 401 and json.loads(body)["error"]["code"] == "missing_api_key"
    assert "strict-transport-security" in headers
    status, headers, _ = page_from_the_proxy
    assert status == 200 and "strict-transport-security" in headers
    assert plain_from_the_proxy[0] == 301  # the proxy's own plain-HTTP request is redirected
    assert probe[0] == 200  # the probes answer over plain HTTP, to anyone


async def test_v1_carries_the_same_security_headers_as_the_full_stack(production):
    with override_settings(**production):
        _, v1, _ = await call("/v1/models", scheme="https")
        _, page, _ = await call("/accounts/login/", scheme="https")

    assert {name: page[name] for name in SECURITY_HEADERS} == {name: v1[name] for name in SECURITY_HEADERS}


async def test_exempt_paths_and_development_serve_plain_http(production):
    with override_settings(**{**production, "SECURE_REDIRECT_EXEMPT": [r"^v1/models$"]}):
        status, _, _ = await call("/v1/models")
    assert status == 401

    with override_settings(SECURE_SSL_REDIRECT=False, SECURE_HSTS_SECONDS=0):
        status, headers, _ = await call("/v1/models")
    assert status == 401 and "strict-transport-security" not in headers


def test_check_deploy_is_clean_with_production_settings():
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    environment.update(production_environment())

    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "DEBUG"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout


# Content-Security-Policy (core/csp.py, docs/security.md)

STRICT_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self' ws://testserver; object-src 'none'; base-uri 'self'; frame-ancestors 'none'; "
    "form-action 'self'"
)
SIGNED_IN_PAGES = ["/", "/keys/", "/usage/", "/usage/admin/", "/ops/", "/experiments/", "/provider-keys/"]
SIGNED_IN_PAGES += ["/admin/", "/admin/providers/deployment/", "/api/docs/"]


@pytest.mark.parametrize("path", SIGNED_IN_PAGES)
def test_every_page_carries_the_strict_policy(admin_client, path):
    response = admin_client.get(path)

    assert response.status_code == 200, path
    assert response["Content-Type"].startswith("text/html")
    assert response["Content-Security-Policy"] == STRICT_POLICY


@pytest.mark.parametrize("path", ["/accounts/login/", "/admin/login/"])
def test_the_sign_in_pages_carry_the_strict_policy(client, path):
    response = client.get(path)

    assert response.status_code == 200
    assert response["Content-Security-Policy"] == STRICT_POLICY


def test_swagger_ui_loads_its_script_from_a_url_not_inline(admin_client):
    page = admin_client.get("/api/docs/").content.decode()
    assert "<script>" not in page and "<style>" not in page

    script = admin_client.get("/api/docs/?script=")
    assert script.status_code == 200 and script["Content-Type"].startswith("application/javascript")
    assert "SwaggerUIBundle(" in script.content.decode()


def test_redoc_alone_may_style_inline_and_run_its_search_worker(admin_client):
    policy = dict(
        directive.split(" ", 1) for directive in admin_client.get("/api/redoc/")["Content-Security-Policy"].split("; ")
    )

    assert policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self' 'unsafe-inline'"
    assert policy["worker-src"] == "'self' blob:"
    assert policy["img-src"] == "'self' data: https://cdn.redoc.ly"


async def test_the_websocket_source_follows_the_scheme_and_v1_gets_no_policy(production):
    with override_settings(**production):
        _, page, _ = await call("/accounts/login/", scheme="https")
        _, v1, _ = await call("/v1/models", scheme="https")

    assert "connect-src 'self' wss://testserver;" in page["content-security-policy"]
    assert "content-security-policy" not in v1  # the lean handler adds nothing to the hot path


async def test_developments_error_pages_keep_their_inline_styles():
    """DEBUG's technical 404 page styles and scripts itself inline: it is left without a policy; pages are not."""
    with override_settings(DEBUG=True):
        missing_status, missing, _ = await call("/no-such-page/")
        _, login, _ = await call("/accounts/login/")

    assert missing_status == 404 and "content-security-policy" not in missing
    assert login["content-security-policy"] == STRICT_POLICY
