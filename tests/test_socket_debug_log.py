"""The chat socket's credentials stay out of the server's DEBUG log: the production command with ``--log-level debug``
(what an operator runs to see a socket's traffic) prints each frame and each handshake header through the websockets
library (uvicorn hands it ``uvicorn.error``). The auth message's gateway key and the handshake's session cookie and
``Authorization`` are written there without their values, the frames as their type and length.

Until 7 December that log held, for every socket, the handshake's ``Cookie`` (the browser's session id: anyone who
read the log could sign in as the user) and ``Authorization`` whole, and the auth message's text cut to its first 50
and last 25 characters, most of a gateway key's secret."""

from __future__ import annotations

import json
import os
import secrets
import subprocess

import pytest
from cryptography.fernet import Fernet
from websockets.sync.client import connect

from tests.conftest import database_url_for_subprocesses, free_port, process_stop, wait_for_port
from tests.test_access_log import ROOT, dockerfile_command, on_loopback

KEY = f"sk-llmhub-Canary00-{secrets.token_urlsafe(32)}"
SESSION = f"canarysession{secrets.token_hex(12)}"
BEARER = f"canary-bearer-{secrets.token_hex(12)}"


@pytest.mark.django_db(transaction=True)
def test_the_debug_log_of_a_chat_socket_shows_no_key_cookie_or_authorization(tmp_path):
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    environment.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.production",
        SECRET_KEY=Fernet.generate_key().decode() * 2,
        FIELD_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        DATABASE_URL=database_url_for_subprocesses(),
        ALLOWED_HOSTS="127.0.0.1",
        LLMHUB_LEDGER_SPOOL=str(tmp_path / "spool.jsonl"),
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [*on_loopback(dockerfile_command(), port), "--log-level", "debug"],
            cwd=ROOT,
            env=environment,
            stdout=output,
            stderr=output,
        )
        try:
            wait_for_port(port, timeout=60, process=server)
            headers = {"Cookie": f"sessionid={SESSION}", "Authorization": f"Bearer {BEARER}"}
            with connect(f"ws://127.0.0.1:{port}/ws/chat/", additional_headers=headers, open_timeout=30) as socket:
                socket.send(json.dumps({"type": "auth", "api_key": KEY}))
                refusal = json.loads(socket.recv(timeout=30))
        finally:
            process_stop(server, grace=60)

    text = log.read_text()
    assert refusal["code"] == "invalid_api_key", refusal  # the socket was served: its frames went through the log
    assert "TEXT" in text and "< cookie: " in text, text  # the DEBUG lines are there
    secret = KEY.rsplit("-", 1)[1]
    assert not any(secret[start : start + 12] in text for start in range(len(secret) - 11)), text
    assert SESSION not in text and BEARER not in text
