"""The chat socket's credentials stay out of the server's DEBUG log: the production command with ``--log-level debug``
(what an operator runs to see a socket's traffic) prints each frame and each handshake header through the websockets
library (uvicorn hands it ``uvicorn.error``). The auth message's gateway key and the handshake's session cookie and
``Authorization`` are written there without their values, the frames as their type and length.

Until 7 December that log held, for every socket, the handshake's ``Cookie`` (the browser's session id: anyone who
read the log could sign in as the user) and ``Authorization`` whole, and the auth message's text cut to its first 50
and last 25 characters, most of a gateway key's secret."""

from __future__ import annotations

import json
import secrets

import pytest
from websockets.sync.client import connect

from tests.test_access_log import production_server

KEY = f"sk-llmhub-Canary00-{secrets.token_urlsafe(32)}"
SESSION = f"canarysession{secrets.token_hex(12)}"
BEARER = f"canary-bearer-{secrets.token_hex(12)}"


@pytest.mark.django_db(transaction=True)
def test_the_debug_log_of_a_chat_socket_shows_no_key_cookie_or_authorization(tmp_path):
    with production_server(tmp_path, "--log-level", "debug") as (port, log):
        headers = {"Cookie": f"sessionid={SESSION}", "Authorization": f"Bearer {BEARER}"}
        with connect(f"ws://127.0.0.1:{port}/ws/chat/", additional_headers=headers, open_timeout=30) as socket:
            socket.send(json.dumps({"type": "auth", "api_key": KEY}))
            refusal = json.loads(socket.recv(timeout=30))

    text = log.read_text()
    assert refusal["code"] == "invalid_api_key", refusal  # the socket was served: its frames went through the log
    assert "TEXT" in text and "< cookie: " in text, text  # the DEBUG lines are there
    secret = KEY.rsplit("-", 1)[1]
    assert not any(secret[start : start + 12] in text for start in range(len(secret) - 11)), text
    assert SESSION not in text and BEARER not in text
