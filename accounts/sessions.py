"""Whether a browser session still signs its user in, for what holds one past the request that opened it (the
chat WebSocket, ``chat.consumers``).

Django checks a session at every request: the session must exist (not signed out, not expired), its user must
be active, and the session's hash of the password must still match (a changed password ends the other
sessions). A WebSocket is one request that lasts for hours; this asks Django's own check
(``django.contrib.auth.get_user``) again, through a lookup cache as every hot-path lookup: this process's
sign-outs and changes of a user are seen at once, another process's within ``LLMHUB_LOOKUP_CACHE_TTL``.
"""

from __future__ import annotations

from importlib import import_module
from types import SimpleNamespace

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib import auth

from core.cache import TTLCache, forget_now_and_after_commit

# session key -> the id of the user it signs in now, or None.
session_cache: TTLCache[int | None] = TTLCache("sessions")
# Sessions signed out in this process, from the sign-out's signal: Django sends ``user_logged_out`` before it
# deletes the session, so a send in between (or while the delete waits for the database) would read the session
# still valid and keep it for the TTL. A signed-out key never signs anyone in again (a new session gets a new key):
# it is kept long past any delete's wait, and not dropped with the copies (``sessions_forget``).
signed_out: TTLCache[bool] = TTLCache("sessions-signed-out")
SIGNED_OUT_KEPT = 600.0


def _session_user_id_load(session_key: str) -> int | None:
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user = auth.get_user(SimpleNamespace(session=session))
    return user.pk if user.is_authenticated else None


async def session_user_id(session_key: str) -> int | None:
    """The id of the user ``session_key`` signs in now; None when the session ended, its user was deactivated
    or deleted, or their password changed since it began. ``DatabaseUnavailableError`` without a copy."""
    if signed_out.get(session_key) is True:
        return None
    return await session_cache.get_or_load(session_key, lambda: sync_to_async(_session_user_id_load)(session_key))


def sessions_forget(*args: object, **kwargs: object) -> None:
    """A user was saved or deleted, or signed out (``session_signed_out``), in this process: every copy goes (a
    user knows nothing of their sessions' keys), now and again after commit (a send in between still reads the user
    as they were), and the sockets' next sends ask again."""
    forget_now_and_after_commit(session_cache.invalidate)


def session_signed_out(sender: object, request: object = None, **kwargs: object) -> None:
    """A user signed out in this process (``user_logged_out``, sent before Django deletes the session): their
    session signs no one in from now on, whatever a send reads before the delete, and every copy goes
    (``sessions_forget``)."""
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if session_key:
        signed_out.set(session_key, True, ttl=SIGNED_OUT_KEPT)
    sessions_forget()
