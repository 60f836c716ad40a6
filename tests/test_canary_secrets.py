"""A user's own provider key never shows in plaintext anywhere llmhub writes or answers.

Canary keys are put through every path a key takes: a validation failure, an add, a replacement, calls
served on the user's key and one the provider refuses, the re-check and the daily re-validation (with its
email), a server error (its page and the report mailed to the admins), the admin's change forms,
``manage.py dumpproviders`` and the provider-keys page, with every logger at DEBUG. Then everything is read
back: every text column of every table (raw, as stored), every log record, every response body and header,
every page and email.

A second test does the same for the gateway's own secrets and the admin's: gateway keys in the headers of
/v1 requests (OpenAI's ``Authorization: Bearer`` and Anthropic's ``x-api-key``), an unknown key, a JWT and an
expired one (and the secret that signs them), a platform key an upstream echoes back in its error body and
headers, a server error (500) on a request carrying a key, a provider's key edited in the admin and then used,
and a gateway key rotated in the admin, then used, old and new.

The logs are read as production writes them: every logger at DEBUG, through the JSON formatter and the
request-id filter (``llmhub.logging``), each record's arguments included.
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from django.core import mail
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.utils.log import AdminEmailHandler

from billing.services.keys import api_key_create
from llmhub.logging import JsonFormatter, RequestIdFilter
from llmhub.testing.fake_upstream import FakeUpstream, key_digest
from providers.models import ByokMode, ProviderCredential, ProviderKind
from providers.tasks_credentials import provider_credentials_revalidate_all
from tests.factories import ModelFactory, ProviderFactory, UserFactory
from tests.loopback_http import LoopbackHTTPServer, QuietHandler
from tests.waiting import wait_until

PLATFORM_KEY = f"sk-platform-canary-{secrets.token_hex(16)}"
CANARY = f"sk-canary-{secrets.token_hex(16)}"
CANARY_REPLACEMENT = f"sk-canary-{secrets.token_hex(16)}"
SECRETS = (CANARY, CANARY_REPLACEMENT, PLATFORM_KEY)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter())  # production's format (LLMHUB_LOG_FORMAT=json)
        self.addFilter(RequestIdFilter())
        self.lines: list[str] = []
        self.objects: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        # The whole line as any handler would write it, traceback and arguments included.
        line = self.format(record)
        self.lines.append(line + " " + repr(record.args))
        self.objects.append(json.loads(line))


@pytest.fixture
def debug_logs() -> Iterator[_Records]:
    """Every logger at DEBUG, every record kept (also of loggers that do not propagate to the root)."""
    handler = _Records()
    loggers = [logging.getLogger()] + [
        logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    saved = [(logger, logger.level, logger.disabled) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.disabled = False
        if logger is logging.getLogger() or not logger.propagate:
            logger.addHandler(handler)
    yield handler
    for logger, level, disabled in saved:
        logger.setLevel(level)
        logger.disabled = disabled
        logger.removeHandler(handler)


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream(api_key=PLATFORM_KEY).start()
    yield server
    server.stop()


def stored_text() -> list[tuple[str, str, str]]:
    """Every value of every column of every table, as the database holds it: (table, column, text)."""
    found = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            quoted = connection.ops.quote_name(table)
            cursor.execute(f"SELECT * FROM {quoted}")  # the names come from the database itself
            columns = [column[0] for column in cursor.description]
            for row in cursor.fetchall():
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, bytes | memoryview):
                        value = bytes(value).decode("latin-1")
                    if value is not None:
                        found.append((table, column, str(value)))
    return found


def leaks(text: str) -> list[str]:
    return [secret[:14] + "…" for secret in SECRETS if secret in text]


@pytest.mark.django_db(transaction=True)
def test_a_users_own_key_shows_in_plaintext_in_no_column_log_response_page_or_email(
    llmhub_server, upstream, debug_logs, settings
):
    provider = ProviderFactory(
        name="openai-own",
        kind=ProviderKind.OPENAI,
        base_url=upstream.base_url + "/v1",
        api_key=PLATFORM_KEY,
        byok=ByokMode.OPTIONAL,
    )
    ModelFactory(name="gpt-own", provider=provider, upstream_id="fake-gpt-4o-mini")
    alice = UserFactory(username="alice", email="alice@example.com", is_staff=True, is_superuser=True)
    gateway_key = api_key_create(user=alice, name="canary", scopes=["keys:manage"]).secret
    api = httpx.Client(base_url=llmhub_server.url, headers={"Authorization": f"Bearer {gateway_key}"}, timeout=30)
    answers: list[httpx.Response] = []

    def send(method: str, path: str, **kwargs) -> httpx.Response:
        response = api.request(method, path, **kwargs)
        answers.append(response)
        return response

    def chat() -> httpx.Response:
        body = {"model": "gpt-own", "messages": [{"role": "user", "content": "hello"}]}
        return send("POST", "/v1/chat/completions", json=body)

    # A validation failure: the provider does not know the key yet.
    refused = send("POST", "/api/provider-keys/", json={"provider": "openai-own", "api_key": CANARY})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "provider_key_invalid"

    # Added, replaced, and replaced back.
    upstream.accept_keys(CANARY, CANARY_REPLACEMENT)
    added = send("POST", "/api/provider-keys/", json={"provider": "openai-own", "api_key": CANARY, "label": "x"})
    assert added.status_code == 201, added.text
    credential_id = added.json()["id"]
    assert send(
        "POST", "/api/provider-keys/", json={"provider": "openai-own", "api_key": CANARY_REPLACEMENT}
    ).is_success
    assert send("POST", "/api/provider-keys/", json={"provider": "openai-own", "api_key": CANARY}).status_code == 200
    assert send("GET", "/api/provider-keys/").is_success
    assert send("GET", f"/api/provider-keys/{credential_id}/").is_success

    # Served on the user's own key, then refused upstream once the provider revokes it.
    served = chat()
    assert served.status_code == 200, served.text
    assert upstream.requests[-1]["key_sha256"] == key_digest(CANARY)
    upstream.accept_keys()
    refused_upstream = chat()
    assert refused_upstream.status_code == 401, refused_upstream.text
    assert refused_upstream.json()["error"]["code"] == "user_key_refused"
    assert upstream.requests[-1]["key_sha256"] == key_digest(CANARY)

    # The key turns invalid (the refused call marks it in the background; else the daily re-validation
    # finds it), its owner is emailed once, and the re-check on demand says so too.
    provider_credentials_revalidate_all()
    wait_until(lambda: mail.outbox, "its owner emailed", timeout=15, interval=0.05)
    assert [message.to for message in mail.outbox] == [["alice@example.com"]]
    rechecked = send("POST", f"/api/provider-keys/{credential_id}/validate/")
    assert rechecked.json()["status"] == "invalid"

    # The pages: the provider-keys page, the admin's change forms, and a server error page with DEBUG on.
    browser = Client(raise_request_exception=False)
    browser.force_login(alice)
    pages = [browser.get("/provider-keys/")]
    pages.append(browser.get(f"/admin/providers/providercredential/{credential_id}/change/"))
    pages.append(browser.get("/admin/providers/providercredential/"))
    pages.append(browser.get(f"/admin/providers/provider/{provider.pk}/change/"))
    assert all(page.status_code == 200 for page in pages), [page.status_code for page in pages]
    # A server error inside the service that holds the key: the 500 page, and the report Django mails to the
    # admins with every frame's variables (with DEBUG on, Django's own debug page shows everything by design).
    settings.ADMINS = [("ops", "ops@example.com")]
    settings.LLMHUB_ADAPTERS = {}  # the key's live check now fails unexpectedly, inside the service
    report = AdminEmailHandler(include_html=True)
    logging.getLogger("django.request").addHandler(report)
    try:
        error_page = browser.post(
            "/api/provider-keys/", {"provider": "openai-own", "api_key": CANARY}, content_type="application/json"
        )
    finally:
        logging.getLogger("django.request").removeHandler(report)
    assert error_page.status_code == 500
    pages.append(error_page)
    reports = [message.body for message in mail.outbox if message.to == ["ops@example.com"]]
    assert reports and all("ImproperlyConfigured" in body for body in reports)
    assert any("provider_credential_save" in body for body in reports)  # with the service's frame and variables

    dumped = io.StringIO()
    call_command("dumpproviders", stdout=dumped)
    assert "openai-own" in dumped.getvalue()

    # Now read everything back.
    assert ProviderCredential.objects.get().api_key.reveal() == CANARY  # the key is there, encrypted
    in_columns = [(table, column) for table, column, text in stored_text() if leaks(text)]
    assert in_columns == []
    in_logs = [line[:200] for line in debug_logs.lines if leaks(line)]
    assert in_logs == []
    assert any("provider" in line for line in debug_logs.lines)  # the capture did capture
    for response in answers:
        assert leaks(response.text) == [], (response.request.url, response.status_code)
        assert leaks(str(response.headers.raw)) == [], response.request.url
    for page in pages:
        assert leaks(page.content.decode()) == [], page.request["PATH_INFO"]
        assert leaks(str(page.headers)) == [], page.request["PATH_INFO"]
    assert leaks(dumped.getvalue()) == []
    for message in mail.outbox:
        assert leaks(message.subject + message.body) == []
        assert leaks(str(message.alternatives) + str(message.attachments)) == []


class EchoingUpstream(LoopbackHTTPServer):
    """An OpenAI-style provider that refuses every key and echoes it back, in its error's message and in a
    response header, as some providers and proxies do: whatever logs the upstream's answer logs the key."""

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    def start(self) -> EchoingUpstream:
        class Handler(QuietHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                error = {
                    "message": f"Incorrect API key provided: {key}.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
                body = json.dumps({"error": error}).encode()
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("x-echo-authorization", key)
                self.end_headers()
                self.wfile.write(body)

        self.serve(Handler)
        return self


@pytest.fixture
def echoing_upstream() -> Iterator[EchoingUpstream]:
    server = EchoingUpstream().start()
    yield server
    server.stop()


class FailingEchoingUpstream(LoopbackHTTPServer):
    """A provider (OpenAI's or Anthropic's protocol) that answers every call, the model list included, with
    ``status`` and echoes the key it came with in its error's message and in a response header."""

    def __init__(self, status: int) -> None:
        self.status = status

    def start(self) -> FailingEchoingUpstream:
        status = self.status

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = (self.headers.get("Authorization") or "").removeprefix("Bearer ") or self.headers.get(
                    "x-api-key", ""
                )
                error = {"message": f"Something failed for the key {key}.", "type": "api_error", "param": None}
                body = json.dumps({"type": "error", "error": error}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Retry-After", "0")
                self.send_header("x-echo-key", key)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST

        self.serve(Handler)
        return self


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("status", [400, 429, 500])
@pytest.mark.parametrize("kind", [ProviderKind.OPENAI, ProviderKind.ANTHROPIC])
def test_a_users_own_key_a_failing_upstream_echoes_reaches_no_response_or_log_line(
    llmhub_server, debug_logs, kind, status
):
    """Through either SDK (the anthropic one logs every response's headers at DEBUG), on every entry point and
    when the key is checked: the key the upstream echoes back in its error and a header is in no answer and
    no log line."""
    prefix = "sk-ant-" if kind == ProviderKind.ANTHROPIC else "sk-"
    own, candidate = (f"{prefix}echoed-canary-{secrets.token_hex(16)}" for _ in range(2))
    server = FailingEchoingUpstream(status).start()
    try:
        base_url = server.origin + ("/v1" if kind == ProviderKind.OPENAI else "")
        provider = ProviderFactory(name="echoing", kind=kind, base_url=base_url, byok=ByokMode.OPTIONAL)
        ModelFactory(name="gpt-echoing", provider=provider, upstream_id="fake-gpt-4o-mini")
        alice = UserFactory(username="alice")
        credential = ProviderCredential.objects.create(owner=alice, provider=provider, api_key=own, hint="sk-…")
        secret = api_key_create(user=alice, name="alice").secret
        chat = {"model": "gpt-echoing", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
        answers = [
            httpx.post(llmhub_server.url + path, json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=30)
            for path, body in (
                ("/v1/chat/completions", chat),
                ("/v1/chat/completions", {**chat, "stream": True}),
                ("/v1/messages", chat),
            )
        ]
        browser = Client()
        browser.force_login(alice)
        answers.append(
            browser.post(
                "/api/provider-keys/", {"provider": "echoing", "api_key": candidate}, content_type="application/json"
            )
        )
        answers.append(browser.post(f"/api/provider-keys/{credential.pk}/validate/"))
    finally:
        server.stop()

    assert all(answer.status_code >= 400 or b"error" in answer.content for answer in answers)
    for answer in answers:
        text = answer.content.decode() + str(answer.headers)
        assert own not in text and candidate not in text
    assert [line[:300] for line in debug_logs.lines if own in line or candidate in line] == []
    assert any(line for line in debug_logs.lines if "HTTP Response" in line)  # the SDK's log was captured


JWT_SECRET = f"jwt-signing-canary-{secrets.token_hex(24)}"
ADMIN_KEY = f"sk-admin-canary-{secrets.token_hex(16)}"
ECHOED_KEY = f"sk-echoed-canary-{secrets.token_hex(16)}"
UNKNOWN_GATEWAY_KEY = f"sk-llmhub-canary-{secrets.token_hex(16)}"


@pytest.mark.django_db(transaction=True)
def test_gateway_keys_jwts_echoed_keys_and_admin_key_changes_reach_no_log_line(
    llmhub_server, upstream, echoing_upstream, debug_logs, settings
):
    settings.LLMHUB_JWT_HS256_SECRET = JWT_SECRET
    settings.LLMHUB_JWT_ISSUER = "https://idp.example.com/"
    settings.LLMHUB_JWT_AUDIENCE = "llmhub"
    settings.LLMHUB_JWT_ALGORITHMS = ["HS256"]
    platform = ProviderFactory(name="platform", kind=ProviderKind.OPENAI, base_url=upstream.base_url + "/v1")
    platform.api_key = PLATFORM_KEY
    platform.save()
    ModelFactory(name="gpt-canary", provider=platform, upstream_id="fake-gpt-4o-mini")
    echoing = ProviderFactory(name="echoing", kind=ProviderKind.OPENAI, base_url=echoing_upstream.base_url)
    echoing.api_key = ECHOED_KEY
    echoing.save()
    ModelFactory(name="gpt-echoed", provider=echoing, upstream_id="fake-gpt-4o-mini")
    admin = UserFactory(username="root", email="root@example.com", is_staff=True, is_superuser=True)
    gateway_key = api_key_create(user=admin, name="canary-gateway")
    checked = [gateway_key.secret, PLATFORM_KEY, JWT_SECRET, ADMIN_KEY, ECHOED_KEY, UNKNOWN_GATEWAY_KEY]
    answers: list[httpx.Response] = []
    body = {"model": "gpt-canary", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}

    def post(path: str, headers: dict[str, str], payload: dict = body) -> httpx.Response:
        response = httpx.post(llmhub_server.url + path, headers=headers, json=payload, timeout=30)
        answers.append(response)
        return response

    def bearer(secret: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"}

    # Requests: a gateway key the OpenAI way and the Anthropic way, streamed too, and one nobody issued.
    assert post("/v1/chat/completions", bearer(gateway_key.secret)).status_code == 200
    assert post("/v1/chat/completions", bearer(gateway_key.secret), {**body, "stream": True}).status_code == 200
    messages = {"model": "gpt-canary", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    assert post("/v1/messages", {"x-api-key": gateway_key.secret}, messages).status_code == 200
    assert post("/v1/chat/completions", bearer(UNKNOWN_GATEWAY_KEY)).status_code == 401
    assert httpx.get(llmhub_server.url + "/v1/models", headers=bearer(gateway_key.secret)).is_success

    # JWTs: one valid, one expired, one signed with the wrong secret.
    now = int(time.time())
    claims = {"iss": "https://idp.example.com/", "aud": "llmhub", "sub": "jwt-user", "iat": now, "exp": now + 600}
    token = jwt.encode({**claims, "preferred_username": "jwt-user"}, JWT_SECRET, algorithm="HS256")
    expired = jwt.encode({**claims, "iat": now - 7200, "exp": now - 3600}, JWT_SECRET, algorithm="HS256")
    forged = jwt.encode(claims, "not-the-secret-" + secrets.token_hex(16), algorithm="HS256")
    checked += [token, expired, forged]
    assert post("/v1/chat/completions", bearer(token)).status_code == 200
    assert post("/v1/chat/completions", bearer(expired)).status_code == 401
    assert post("/v1/chat/completions", bearer(forged)).status_code == 401

    # An upstream error that echoes the platform key, in its body and in a header.
    echoed = post("/v1/chat/completions", bearer(gateway_key.secret), {**body, "model": "gpt-echoed"})
    assert echoed.status_code >= 400 and echoed.json()["error"]
    echoed_stream = post(
        "/v1/chat/completions", bearer(gateway_key.secret), {**body, "model": "gpt-echoed", "stream": True}
    )
    assert echoed_stream.status_code >= 400 or "error" in echoed_stream.text

    # A server error (500) while serving a request that carries the gateway key: no adapter for the kind.
    broken = ProviderFactory(name="broken", kind=ProviderKind.OPENAI, base_url=upstream.base_url + "/v1")
    ModelFactory(name="gpt-broken", provider=broken, upstream_id="fake-gpt-4o-mini")
    adapters, settings.LLMHUB_ADAPTERS = settings.LLMHUB_ADAPTERS, {}
    failed = post("/v1/chat/completions", bearer(gateway_key.secret), {**body, "model": "gpt-broken"})
    settings.LLMHUB_ADAPTERS = adapters
    assert failed.status_code == 500, failed.text

    # The admin: a provider's key edited (then used), a gateway key rotated (then used, old and new).
    browser = Client(raise_request_exception=False)
    browser.force_login(admin)
    edited = browser.post(
        f"/admin/providers/provider/{platform.pk}/change/",
        {
            "name": "platform",
            "kind": ProviderKind.OPENAI,
            "enabled": "on",
            "base_url": upstream.base_url + "/v1",
            "api_key": ADMIN_KEY,
            "organization": "",
            "api_version": "",
            "extra_headers": "{}",
            "timeout_seconds": "10",
            "byok": platform.byok,
            "_save": "Save",
        },
    )
    assert edited.status_code == 302, edited.content.decode()[:2000]
    platform.refresh_from_db()
    assert platform.api_key.reveal() == ADMIN_KEY
    upstream.accept_keys(ADMIN_KEY)
    wait_until(  # within its lookup cache's TTL
        lambda: post("/v1/chat/completions", bearer(gateway_key.secret)).status_code == 200,
        "the edited key reached the server",
        timeout=15,
        interval=0.2,
    )
    assert upstream.requests[-1]["key_sha256"] == key_digest(ADMIN_KEY)

    rotated_page = browser.post(
        "/admin/billing/apikey/",
        {"action": "rotate_selected", "_selected_action": [gateway_key.api_key.pk], "index": "0"},
        follow=True,
    )
    assert rotated_page.status_code == 200
    [new_secret] = re.findall(r"the new key is (\S+) —", rotated_page.content.decode())
    checked.append(new_secret)
    assert post("/v1/chat/completions", bearer(new_secret)).status_code == 200
    assert post("/v1/chat/completions", bearer(gateway_key.secret)).status_code == 200  # its grace period

    in_logs = [line[:300] for line in debug_logs.lines if any(secret in line for secret in checked)]
    assert in_logs == []
    # The capture did capture, as JSON lines with the request ids of what was served.
    served_ids = {answer.headers.get("x-request-id") for answer in answers} - {None}
    assert served_ids & {entry["request_id"] for entry in debug_logs.objects}
    for response in answers:
        text = response.text + str(response.headers.raw)
        assert [secret[:16] for secret in checked if secret in text] == [], response.request.url
