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


def _session_user_id_load(session_key: str) -> int | None:
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user = auth.get_user(SimpleNamespace(session=session))
    return user.pk if user.is_authenticated else None


async def session_user_id(session_key: str) -> int | None:
    """The id of the user ``session_key`` signs in now; None when the session ended, its user was deactivated
    or deleted, or their password changed since it began. ``DatabaseUnavailableError`` without a copy."""
    return await session_cache.get_or_load(session_key, lambda: sync_to_async(_session_user_id_load)(session_key))


def sessions_forget(*args: object, **kwargs: object) -> None:
    """A user was saved or deleted, or signed out, in this process: every copy goes (a user knows nothing of
    their sessions' keys), now and again after commit (a send in between still reads the user as they were),
    and the sockets' next sends ask again."""
    forget_now_and_after_commit(session_cache.invalidate)
