"""The chat WebSocket (``/ws/chat/``): a thin adapter between JSON events and the completion pipeline.

Authentication. A socket opened with a logged-in browser session is ready at once. Any other socket is
accepted but can do nothing until its first message is ``{"type": "auth", "api_key": "sk-llmhub-…"}``
(or, with JWT sign-in on, a JWT in ``api_key`` or ``token``); a wrong key or token, any other message first,
or no ``auth`` within ``AUTH_TIMEOUT`` seconds closes it with code 4401; a frame larger than an auth message can
be (``MAX_AUTH_FRAME_CHARS``) closes it with 1009 (``frame_too_large``). A user whose role may not chat (a
viewer) gets ``permission_denied`` and code 4403; a socket signed in with a JWT is closed with 4440 at the
first ``chat.send`` after the token's expiry, and with 4410 at the first one its verification again (as on
/v1, cached ``LLMHUB_JWT_CACHE_SECONDS``) refuses, its user deactivated since. Accepting first (rather than
refusing the handshake) is what lets programs without cookies send a key, and a key is never read from the
URL, where it would end up in access logs. A handshake that carries an ``Origin`` header (every browser's
does) must name one of ``ALLOWED_HOSTS``; programs may omit the header (``chat.security``).

Flooding. A socket, signed in or not, may send ``FRAME_BURST`` frames at once and ``FRAMES_PER_SECOND`` on
average (a token bucket per socket); past it, it gets ``too_many_frames`` and is closed with 1008 (policy
violation). Until 6 December nothing bounded either: a client could make the server parse frames as fast as it
sent them, and a socket not signed in could send 1.25 MiB frames for it to parse.

Revocation. A key can be revoked or expire while its socket is open: it is checked again before every
``chat.send``, through the same cache as every request (this process's revocations are seen at once,
another process's within ``LLMHUB_LOOKUP_CACHE_TTL``). A key that no longer works gets an ``error``
(``key_revoked`` or ``key_expired``) and the socket is closed with code 4410 (revoked: the key, a key above
it, or its owner) or 4440 (expired); replies still streaming on it are stopped and saved as cancelled. A
key still working brings its models and scopes as they are now (an administrator may have narrowed them). A
socket opened with a browser session checks the session likewise (``accounts.sessions``): once it has ended
(signed out, expired, the password changed, the user deactivated) the send gets ``session_ended`` and the
socket is closed with 4401, as one that never signed in. The caller's role is read again at every send too
(``accounts.roles``' lookup cache): a user made a viewer since the socket opened gets ``permission_denied``
and 4403.

Protocol (JSON both ways)::

    → {"type": "chat.send", "conversation": id|null, "model": "...", "content": "...", "request_id": "opt",
       "reasoning_effort": "low"|"medium"|"high"|null (opt; a model whose catalog entry says it reasons),
       "client": "opt; who sends, the same on every socket it opens (the chat page: one per tab, kept across reloads)"}
    → {"type": "chat.cancel", "request_id": "..."}
    → {"type": "ping"}
    ← {"type": "chat.started", "request_id", "conversation", "message", "model", "provider", "deployment",
       "experiment", "title"}
    ← {"type": "chat.reasoning", "request_id", "content"}   (a reasoning model's reasoning, before its reply)
    ← {"type": "chat.delta", "request_id", "content"}
    ← {"type": "chat.completed", "request_id", "message", "finish_reason", "usage": {...}}
    ← {"type": "chat.cancelled", "request_id", "message", "usage": {...}|null}
    ← {"type": "error", "request_id", "code", "message"}
    ← {"type": "pong"}

Server shutdown. When the server begins to stop, a ``chat.send`` is answered with an ``error``
(``server_shutting_down``, with ``retry_after``); replies streaming get the server's grace period to end,
after which each is ended with the same ``error`` and its partial message is kept; once no reply is
streaming the socket is closed with code 1012 (service restart): reconnect and send again.

Replies. ``chat.started`` comes with the reply's first chunk, once routing has found the deployment that
answers (``model``, ``provider`` and ``deployment`` say who: another deployment of the model, or a
fallback model, when the first ones failed; ``experiment``, ``"name:variant"`` when the reply is in an
A/B experiment, as REST's ``x-llmhub-experiment``, else null); a reply that fails before any output gets
``chat.started`` with ``deployment`` null, then its ``error``. An ``error`` after ``chat.started`` ends the
reply and keeps what was written (status ``error``). A ``chat.cancel`` keeps the user's message whenever it comes:
one before the reply began (even before the turn read its conversation) gets ``chat.started`` with ``deployment``
null, then ``chat.cancelled`` naming the empty stopped reply (``docs/reliability.md``).
A ``chat.send`` refused by the pipeline (unknown model, one outside
the plan or the key's models, bad input, no budget, rate limited) gets an ``error`` and, as on REST, a
``rejected`` ledger row (a model outside the plan or the key's models is answered to a socket signed in with a key or
token as /v1 answers it, ``model_not_found`` like an unknown one; the chat page's, a browser session's, names the
plan); one refused by this socket's own checks (a field of the wrong type) or because its
conversation is busy gets an ``error`` only.

A key reaches only the conversations started by itself or by the keys created under it, unless it holds the
``conversations:manage`` scope (``chat.selectors.ConversationReach``, as on REST): a ``chat.send`` into any
other answers ``not_found``, as into a missing one; a person (session, JWT) reaches all of theirs. A
conversation a key starts records it.

Each ``chat.send`` runs in its own task, so several conversations stream at once on one socket; one
conversation streams one reply at a time, whichever socket, tab or server process sends: a send into a
conversation with a reply streaming answers ``conversation_busy`` (the check is the database's,
``chat.selectors.conversation_busy_check``; a reply a dead server left streaming does not hold it). A reply streaming
for the ``client`` a send names, on another socket, does not hold it either: that client lost the socket (its network
vanished without a close, which the server finds only when its keepalive gives up, up to 20 s), and its send takes
the conversation over: the old reply is stopped as on a disconnect (kept ``cancelled`` with what was written, billed
once for what the upstream wrote), in whichever process streams it, told at once through the channel layer
(``chat_reply_closed``), and the new one streams. Two live tabs are two
clients, and still one reply at a time; a socket's own second send into a conversation it streams in is busy.
The turn itself (history, messages, checkpoints, cancel, final status) is ``chat.services_turn.ChatTurn``:
this consumer parses and checks events, authenticates, keeps track of its streams, and turns what each
turn reports into events.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from accounts.exceptions import JwtRefused, RoleForbidden
from accounts.jwt import jwt_authenticate
from accounts.sessions import session_user_id
from audit.context import request_ip
from billing.services.keys import AuthenticationFailed, api_key_recheck, hash_key
from core.exceptions import DATABASE_OUTAGE_ERRORS, ApplicationError, DatabaseUnavailableError
from core.text import has_lone_surrogate

from .callers import caller_role_recheck
from .pipeline import Caller, caller_from_api_key, caller_from_user, refusal_as_unknown_model, shutdown_began
from .selectors import ConversationBusyError
from .services_turn import (
    ChatTurn,
    TurnCancelled,
    TurnCompleted,
    TurnDelta,
    TurnEvent,
    TurnFailed,
    TurnReasoning,
    TurnStarted,
    TurnUsage,
)
from .validation import InvalidRequestError, json_parse

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
# After HTTP's 403: signed in, but the role may not chat (a viewer).
CLOSE_FORBIDDEN = 4403
# After HTTP's 410 Gone and IIS's 440 Login Time-out: the key worked when the socket authenticated.
CLOSE_KEY_REVOKED = 4410
CLOSE_KEY_EXPIRED = 4440
# RFC 6455's "service restart": the server is stopping; the client may reconnect (to another server).
CLOSE_SERVICE_RESTART = 1012
# RFC 6455's "message too big": a frame larger than an auth message can be, from a socket not signed in.
CLOSE_MESSAGE_TOO_BIG = 1009
# RFC 6455's "policy violation": more frames than FRAME_BURST and FRAMES_PER_SECOND allow.
CLOSE_POLICY_VIOLATION = 1008
AUTH_TIMEOUT = 10.0
# The largest frame a socket not signed in may send (its auth message): twice the 8 KB request header line proxies
# take (nginx's default), which a JWT must fit in to be sent on /v1; a gateway key is about 60 characters. Anything
# larger cannot authenticate, and was read and parsed whole (up to the server's 1.25 MiB) before being refused.
MAX_AUTH_FRAME_CHARS = 16_384
# Frames one socket may send, signed in or not: a token bucket holding FRAME_BURST, refilled at FRAMES_PER_SECOND.
# The page sends a ping every 25 s, a chat.send per message and a cancel; a client past it is closed (1008).
FRAMES_PER_SECOND = 10.0
FRAME_BURST = 40
MAX_STREAMS_PER_SOCKET = 8
MAX_CONTENT_CHARS = 100_000
MAX_REQUEST_ID_CHARS = 64
MAX_DATABASE_ID = 2**63 - 1
# How long a closing socket waits for its replies to be saved before the consumer ends.
DISCONNECT_GRACE_SECONDS = 5.0
# How long one event may wait to be sent. A send waits only while more than the server buffers (64 KB) is queued
# for a client that is not reading it (a hung tab, a stalled network); such a client is let go, as on a
# disconnect, past this (docs/reliability.md).
SEND_TIMEOUT_SECONDS = 20.0


# What the page's effort control sends in ``chat.send`` (off: null or left out), for a model whose catalog entry
# says it reasons (``supports_reasoning``; another is refused by the turn).
REASONING_EFFORTS = ("low", "medium", "high")


class SocketError(ApplicationError):
    """A bad event on the socket; answered with an ``error`` event, the socket stays open."""

    code = "invalid_request"


@dataclass
class _Stream:
    """One reply in flight on this socket: the turn making it, and the task running the turn."""

    request_id: str
    turn: ChatTurn
    task: asyncio.Task[None] | None = None


class ChatConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.caller: Caller | None = None
        self.key_digest: str | None = None  # set when a key authenticated the socket, to check it again
        self.session_key: str | None = None  # set when the browser session did, likewise
        self.token: str | None = None  # set when a JWT did: verified again (cached a minute) at each send
        self.closing = False
        self.streams: dict[str, _Stream] = {}
        self.auth_deadline: asyncio.Task[None] | None = None
        self.shutdown_watch: asyncio.Task[None] | None = None
        self.frame_tokens = float(FRAME_BURST)
        self.frame_tokens_at = time.monotonic()
        user = self.scope.get("user")
        refused: ApplicationError | None = None
        if user is not None and user.is_authenticated:
            try:
                self.caller = await caller_from_user(user)
                self.session_key = getattr(self.scope.get("session"), "session_key", None)
            except RoleForbidden as exc:
                refused = exc
            except DatabaseUnavailableError:
                pass  # the socket waits for an auth message, as one without a session does
        await self.accept()
        if refused is not None:
            await self._refuse(refused.message, refused.code or "permission_denied", close_code=CLOSE_FORBIDDEN)
            return
        if self.caller is None:
            self.auth_deadline = asyncio.create_task(self._close_if_not_authenticated())
        self.shutdown_watch = asyncio.create_task(self._close_at_shutdown())

    async def disconnect(self, code: int) -> None:
        self.closing = True
        if self.auth_deadline is not None:
            self.auth_deadline.cancel()
        if self.shutdown_watch is not None:
            self.shutdown_watch.cancel()
        for stream in list(self.streams.values()):
            self._stop(stream, by_user=False)
        tasks = [stream.task for stream in self.streams.values() if stream.task is not None]
        if tasks:
            # The partial replies are saved by the tasks themselves; wait so that they land before we go.
            await asyncio.wait(tasks, timeout=DISCONNECT_GRACE_SECONDS)

    # Incoming ---------------------------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        if self.closing:
            return
        if not self._frame_admitted():
            await self._refuse(
                f"Too many frames: a socket may send {FRAME_BURST} at once and {FRAMES_PER_SECOND:g} a second.",
                "too_many_frames",
                close_code=CLOSE_POLICY_VIOLATION,
            )
            return
        if self.caller is None and len(text_data or bytes_data or "") > MAX_AUTH_FRAME_CHARS:
            await self._refuse(
                f"An auth message is at most {MAX_AUTH_FRAME_CHARS} characters: no key or token is longer.",
                "frame_too_large",
                close_code=CLOSE_MESSAGE_TOO_BIG,
            )
            return
        if text_data is None:
            await self._send_error("Send JSON text frames.", code="invalid_json")
            return
        try:
            # Not decode_json: Python's parser raises RecursionError on deep nesting, which would end the
            # consumer and drop the socket without a close frame.
            content = json_parse(text_data)
        except InvalidRequestError:
            await self._send_error("That frame is not valid JSON.", code="invalid_json")
            if self.caller is None:
                await self._refuse('Authenticate first: send {"type": "auth", "api_key": "..."}.', "auth_required")
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if self.closing:
            return
        event_type = content.get("type") if isinstance(content, dict) else None
        if not isinstance(event_type, str):
            event_type = None
        if self.caller is None:
            await self._authenticate(content if event_type == "auth" else None)
            return
        try:
            if event_type == "chat.send" and not (
                await self._key_still_works(content) and await self._role_still_chats(content)
            ):
                return
        except DatabaseUnavailableError as exc:
            await self._send_error(exc.message, code=exc.code, request_id=_client_request_id(content), exc=exc)
            return
        handlers = {"chat.send": self._chat_send, "chat.cancel": self._chat_cancel, "ping": self._ping}
        handler = handlers.get(event_type)
        if handler is None:
            if event_type == "auth":
                await self._send_error("This socket is already authenticated.", code="already_authenticated")
            else:
                await self._send_error(f"Unknown event type {event_type and event_type[:64]!r}.", code="unknown_type")
            return
        try:
            await handler(content)
        except SocketError as exc:
            await self._send_error(exc.message, code=exc.code, request_id=_client_request_id(content))

    def _frame_admitted(self) -> bool:
        """Take one frame from this socket's bucket (``FRAME_BURST``, refilled at ``FRAMES_PER_SECOND``)."""
        now = time.monotonic()
        self.frame_tokens = min(FRAME_BURST, self.frame_tokens + (now - self.frame_tokens_at) * FRAMES_PER_SECOND)
        self.frame_tokens_at = now
        if self.frame_tokens < 1:
            return False
        self.frame_tokens -= 1
        return True

    async def _authenticate(self, event: dict[str, Any] | None) -> None:
        if event is None:
            await self._refuse('Authenticate first: send {"type": "auth", "api_key": "..."}.', "auth_required")
            return
        raw = event.get("api_key", event.get("token"))
        raw = raw if isinstance(raw, str) else None
        try:
            self.caller = await caller_from_api_key(raw, ip_address=request_ip(self.scope))
        except DatabaseUnavailableError as exc:
            # Not the key's fault: the socket stays open, still unauthenticated, for the client to send
            # its auth again (within what is left of AUTH_TIMEOUT).
            await self._send_error(exc.message, code=exc.code, exc=exc)
            return
        except (AuthenticationFailed, JwtRefused, RoleForbidden) as exc:
            close_code = CLOSE_FORBIDDEN if isinstance(exc, RoleForbidden) else CLOSE_UNAUTHENTICATED
            await self._refuse(exc.message, exc.code or "invalid_api_key", close_code=close_code)
            return
        if self.caller.api_key_id is not None:
            self.key_digest = hash_key(raw)
        elif self.caller.token_expires_at is not None:
            self.token = raw
        if self.auth_deadline is not None:
            self.auth_deadline.cancel()
        await self.send_json({"type": "auth.ok"})

    async def _key_still_works(self, event: dict[str, Any]) -> bool:
        expires_at = self.caller.token_expires_at if self.caller is not None else None
        if expires_at is not None and time.time() > expires_at + settings.LLMHUB_JWT_LEEWAY_SECONDS:
            await self._end(
                "This token has expired; open a new socket with a fresh one.",
                "token_expired",
                close_code=CLOSE_KEY_EXPIRED,
                request_id=_client_request_id(event),
            )
            return False
        if self.session_key is not None:
            return await self._session_still_works(event)
        if self.token is not None:
            return await self._token_still_works(event)
        if self.key_digest is None:
            return True
        status, principal = await api_key_recheck(self.key_digest)
        if status == "active":
            assert principal is not None and self.caller is not None
            if (principal.allowed_model_ids, principal.scopes) != (
                self.caller.key_allowed_model_ids,
                self.caller.key_scopes,
            ):
                # The key's models or scopes changed since its auth message (an administrator narrowed them).
                self.caller = replace(
                    self.caller, key_allowed_model_ids=principal.allowed_model_ids, key_scopes=principal.scopes
                )
            return True
        if status == "expired":
            await self._end(
                "This API key has expired.",
                "key_expired",
                close_code=CLOSE_KEY_EXPIRED,
                request_id=_client_request_id(event),
            )
        else:
            await self._end(
                "This API key has been revoked.",
                "key_revoked",
                close_code=CLOSE_KEY_REVOKED,
                request_id=_client_request_id(event),
            )
        return False

    async def _role_still_chats(self, event: dict[str, Any]) -> bool:
        """A role changed while the socket is open (a member made a viewer) applies from the next send."""
        assert self.caller is not None
        try:
            self.caller = await caller_role_recheck(self.caller)
        except RoleForbidden as exc:
            await self._end(
                exc.message,
                exc.code or "permission_denied",
                close_code=CLOSE_FORBIDDEN,
                request_id=_client_request_id(event),
            )
            return False
        return True

    async def _token_still_works(self, event: dict[str, Any]) -> bool:
        """The token verified again as on /v1 (``jwt_authenticate``: from its cache for up to
        ``LLMHUB_JWT_CACHE_SECONDS``): a user deactivated since is refused, like a revoked key's owner."""
        assert self.token is not None
        try:
            await jwt_authenticate(self.token, ip_address=request_ip(self.scope))
        except DATABASE_OUTAGE_ERRORS as exc:  # the sign-in reads the user: told so, the socket stays
            raise DatabaseUnavailableError() from exc
        except JwtRefused as exc:
            await self._end(
                exc.message,
                exc.code or "invalid_token",
                close_code=CLOSE_KEY_REVOKED,
                request_id=_client_request_id(event),
            )
            return False
        return True

    async def _session_still_works(self, event: dict[str, Any]) -> bool:
        assert self.caller is not None and self.session_key is not None
        if await session_user_id(self.session_key) == self.caller.user_id:
            return True
        await self._end(
            "Your session has ended (signed out, expired, password changed or account deactivated); sign in again.",
            "session_ended",
            request_id=_client_request_id(event),
        )
        return False

    async def _close_if_not_authenticated(self) -> None:
        await asyncio.sleep(AUTH_TIMEOUT)
        if self.caller is None and not self.closing:
            await self._refuse(f"No auth message within {AUTH_TIMEOUT:g} seconds.", "auth_timeout")

    async def _end(
        self, message: str, code: str, *, close_code: int = CLOSE_UNAUTHENTICATED, request_id: str | None = None
    ) -> None:
        """The socket's caller may chat no more (a key revoked or expired, a token refused, a session ended, a
        role that may not chat): its replies are stopped (what they wrote is kept) and the socket refused."""
        for stream in list(self.streams.values()):
            self._stop(stream, by_user=False)
        await self._refuse(message, code, close_code=close_code, request_id=request_id)

    async def _refuse(
        self, message: str, code: str, *, close_code: int = CLOSE_UNAUTHENTICATED, request_id: str | None = None
    ) -> None:
        await self._send_error(message, code=code, request_id=request_id)
        self.closing = True
        await self.close(code=close_code)

    async def _close_at_shutdown(self) -> None:
        """Once the server begins to stop: the pipeline refuses new replies and ends the streaming ones after
        its grace period; when none is left, close with 1012 so that the client reconnects elsewhere."""
        await shutdown_began()
        while tasks := [stream.task for stream in self.streams.values() if stream.task is not None]:
            await asyncio.wait(tasks)
        if not self.closing:
            self.closing = True
            await self.close(code=CLOSE_SERVICE_RESTART)

    async def _ping(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "pong"})

    async def _chat_send(self, event: dict[str, Any]) -> None:
        request_id = _client_request_id(event)
        if request_id is None and event.get("request_id") is not None:
            raise SocketError(f"'request_id' must be a string of 1 to {MAX_REQUEST_ID_CHARS} printable characters.")
        request_id = request_id or "ws_" + uuid.uuid4().hex
        if request_id in self.streams:
            raise SocketError("A reply with this request_id is already streaming.", code="duplicate_request_id")
        if len(self.streams) >= MAX_STREAMS_PER_SOCKET:
            raise SocketError(
                f"At most {MAX_STREAMS_PER_SOCKET} replies may stream at once on one socket.", code="too_many_streams"
            )
        conversation_id = event.get("conversation")
        if conversation_id is not None and (
            not isinstance(conversation_id, int)
            or isinstance(conversation_id, bool)
            or not 0 < conversation_id <= MAX_DATABASE_ID
        ):
            raise SocketError("'conversation' must be a conversation id or null.")
        model_name = event.get("model")
        if not isinstance(model_name, str) or not model_name.strip() or has_lone_surrogate(model_name):
            raise SocketError("'model' must be a model name.")
        text = event.get("content")
        if not isinstance(text, str) or not text.strip():
            raise SocketError("'content' must be a non-empty string.")
        if len(text) > MAX_CONTENT_CHARS:
            raise SocketError(f"'content' is longer than {MAX_CONTENT_CHARS} characters.")
        if "\x00" in text:
            # The message is stored, and PostgreSQL's text cannot hold U+0000 (as the conversation API refuses it).
            raise SocketError("'content' contains a null character (U+0000), which cannot be stored.")
        effort = event.get("reasoning_effort")
        if effort is not None and effort not in REASONING_EFFORTS:
            raise SocketError("'reasoning_effort' must be " + ", ".join(REASONING_EFFORTS) + ", or null (off).")
        client = event.get("client")
        if client is not None and not _printable_id(client):
            raise SocketError(f"'client' must be a string of 1 to {MAX_REQUEST_ID_CHARS} printable characters.")
        if conversation_id is not None and any(
            other.turn.conversation_id == conversation_id for other in self.streams.values()
        ):
            # This socket streams there itself: not a socket its client lost, which a send takes over.
            raise SocketError(ConversationBusyError().message, code=ConversationBusyError.code)
        assert self.caller is not None
        turn = ChatTurn(
            caller=self.caller,
            conversation_id=conversation_id,
            model_name=model_name.strip(),
            content=text,
            report=lambda turn_event: self._turn_event(stream, turn_event),
            reasoning_effort=effort,
            client=client or "",
            channel=self.channel_name,
        )
        stream = _Stream(request_id=request_id, turn=turn)
        self.streams[request_id] = stream
        stream.task = asyncio.create_task(self._run_turn(stream))

    async def _chat_cancel(self, event: dict[str, Any]) -> None:
        request_id = _client_request_id(event)
        stream = self.streams.get(request_id) if request_id else None
        if stream is None:
            raise SocketError("No reply with this request_id is streaming.", code="not_found")
        self._stop(stream, by_user=True)

    def _stop(self, stream: _Stream, *, by_user: bool) -> None:
        stream.turn.stop(by_user=by_user)

    # From the channel layer ------------------------------------------------------------------------

    async def chat_reply_closed(self, event: dict[str, Any]) -> None:
        """``services_turn.REPLY_CLOSED``: a send of this socket's client from another socket (in any process) took over
        the reply ``message`` streaming here; its turn stops now, and this socket, if its client still reads it, gets
        ``chat.cancelled``."""
        for stream in list(self.streams.values()):
            if stream.turn.message_id == event.get("message"):
                stream.turn.closed_elsewhere()

    # One reply ------------------------------------------------------------------------------------

    async def _run_turn(self, stream: _Stream) -> None:
        try:
            await stream.turn.run()
        finally:
            self._forget(stream)

    async def _turn_event(self, stream: _Stream, event: TurnEvent) -> None:
        """What the turn reports, as this socket's events."""
        request_id = stream.request_id
        if isinstance(event, TurnStarted):
            await self._send(
                {
                    "type": "chat.started",
                    "request_id": request_id,
                    "conversation": event.conversation_id,
                    "message": event.message_id,
                    "model": event.model,
                    "provider": event.provider,
                    "deployment": event.deployment,
                    "experiment": event.experiment,
                    "title": event.title,
                }
            )
        elif isinstance(event, TurnReasoning):
            await self._send({"type": "chat.reasoning", "request_id": request_id, "content": event.content})
        elif isinstance(event, TurnDelta):
            await self._send({"type": "chat.delta", "request_id": request_id, "content": event.content})
        elif isinstance(event, TurnCompleted):
            await self._send(
                {
                    "type": "chat.completed",
                    "request_id": request_id,
                    "message": event.message_id,
                    "finish_reason": event.finish_reason,
                    "usage": _usage_event(event.usage) or {"prompt_tokens": 0, "completion_tokens": 0, "cost": "0"},
                }
            )
        elif isinstance(event, TurnCancelled):
            # Stopped by the socket's going away (a disconnect, a key revoked, a client let go): no one to tell. Stopped
            # because its reply was closed elsewhere (its conversation deleted in another tab, a takeover), a socket
            # still there is told, or its reply would stream on the page for ever.
            if event.by_user or event.closed_elsewhere:
                await self._send(
                    {
                        "type": "chat.cancelled",
                        "request_id": request_id,
                        "message": event.message_id,
                        "usage": _usage_event(event.usage),
                    }
                )
        elif isinstance(event, TurnFailed):
            exc = event.error
            if self.session_key is not None:
                # The page (a browser session) has a model menu where the API has GET /v1/models: the refusal in its
                # words when the error has them (a model outside the plan: the menu shows it locked).
                message = getattr(exc, "page_message", exc.message)
            else:
                # A program (a gateway key, a JWT), answered as on /v1: a model its plan or key excludes as one that
                # does not exist, or the answer would tell a key which models exist. The ledger row says why.
                exc = refusal_as_unknown_model(exc, stream.turn.model_name)
                message = exc.message
            await self._send_error(message, code=exc.code, request_id=request_id, exc=exc)

    def _forget(self, stream: _Stream) -> None:
        self.streams.pop(stream.request_id, None)

    # Outgoing ---------------------------------------------------------------------------------------

    async def _send(self, event: dict[str, Any]) -> None:
        if self.closing:
            return
        try:
            async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
                await self.send_json(event)
        except TimeoutError:  # before OSError, which it is a subclass of: the client stopped reading
            self._let_go()
        except OSError:
            # The client is gone and the server has not told us yet (uvicorn's ClientDisconnected); the
            # disconnect that follows stops the replies still streaming.
            self.closing = True
        except RuntimeError:
            # The server closed the socket itself: uvicorn does when the peer leaves a keepalive ping unanswered
            # (its network vanished, no close frame), and then refuses any send.
            self._let_go()

    def _let_go(self) -> None:
        """The client can be sent nothing more, and the disconnect waits for the kernel to give up on the data it
        never read, minutes away or never: after a send refused because the server closed the socket, or one
        that waited SEND_TIMEOUT_SECONDS for a client that stopped reading (uvicorn's gentle close would wait for
        that data too). The replies are stopped now, as on a disconnect, and billed for what the upstream wrote
        until then, sent on or not (``docs/reliability.md``)."""
        self.closing = True
        for stream in list(self.streams.values()):
            self._stop(stream, by_user=False)

    async def _send_error(
        self, message: str, *, code: str | None, request_id: str | None = None, exc: ApplicationError | None = None
    ) -> None:
        event: dict[str, Any] = {"type": "error", "request_id": request_id, "code": code or "error", "message": message}
        if exc is not None and exc.param:
            event["param"] = exc.param
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            event["retry_after"] = retry_after
        await self._send(event)


def _client_request_id(event: Any) -> str | None:
    value = event.get("request_id") if isinstance(event, dict) else None
    return value if _printable_id(value) else None


def _printable_id(value: Any) -> bool:
    """A client's id for a request or for itself: 1 to ``MAX_REQUEST_ID_CHARS`` printable characters."""
    return isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID_CHARS and value.isprintable()


def _usage_event(usage: TurnUsage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cost": str(usage.cost),
        "estimated": usage.estimated,
    }
