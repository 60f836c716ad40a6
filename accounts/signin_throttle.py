"""Password guessing on the sign-in forms (``/accounts/login/`` and the admin's), held back.

Failed sign-ins are counted in the cache (Redis in production: every worker shares the counts) per window of
``SIGNIN_WINDOW_SECONDS``: per (name tried, address) and per address. Once either reaches its limit
(``LLMHUB_SIGNIN_FAILURES_PER_NAME``, ``LLMHUB_SIGNIN_FAILURES_PER_ADDRESS``), the form checks no password
for that name from that address (or none from that address) until the window ends, and says so; the right
password is refused too, or guessing would go on (the attempt is still a failed sign-in to the audit log). A
successful sign-in clears its name's count. The limit is per address, not per name alone, so nobody can lock
someone else out from elsewhere. The client address is ``REMOTE_ADDR``: a proxy's ``X-Forwarded-For`` is not
trusted (as the audit log's); an IPv6 address counts as its /64 network (``client_address``).

When the cache does not answer, sign-ins go on unthrottled (a warning is logged): a cache outage must not
lock everyone out, nor answer 500.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Any

import redis
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.signals import user_login_failed
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.http import HttpRequest

from core.addresses import address_throttle_key

logger = logging.getLogger(__name__)

SIGNIN_WINDOW_SECONDS = 15 * 60
_CACHE_ERRORS = (redis.RedisError, OSError)


# The counting, shared with other forms that hold back floods (``accounts.reset_throttle``): counts per key
# per fixed window, in the cache, a name (or email) stored only as a hash.


def window_key(kind: str, window_seconds: int, *parts: str) -> str:
    window = int(time.time() // window_seconds)
    return ":".join((f"llmhub:{kind}", str(window), *parts))


def name_digest(name: str) -> str:
    return hashlib.sha256(name.strip().lower().encode()).hexdigest()[:24]


def window_seconds_left(window_seconds: int) -> int:
    return math.ceil(window_seconds - time.time() % window_seconds)


def window_count_add(key: str, *, window_seconds: int) -> int | None:
    """Add one to ``key``'s count for its window; the new count, or None when the cache does not answer."""
    try:
        cache.add(key, 0, timeout=window_seconds + 60)
        return cache.incr(key)
    except ValueError:  # expired between the two calls
        return None
    except _CACHE_ERRORS as exc:
        logger.warning("%s: the cache did not answer (%s); not counted", key.split(":")[1], type(exc).__name__)
        return None


def client_address(request: HttpRequest | None) -> str:
    """What the counts are kept per: the client's IPv4 address (also when it comes mapped into IPv6), or its IPv6
    address's /64 network (``core.addresses``)."""
    return address_throttle_key(request.META.get("REMOTE_ADDR") if request is not None else None)


def _keys(username: str, address: str) -> tuple[str, str]:
    by_address = window_key("signin-failed", SIGNIN_WINDOW_SECONDS, address)
    return f"{by_address}:{name_digest(username)}", by_address


def signin_wait_seconds(*, username: str, request: HttpRequest | None) -> int:
    """Seconds until ``username`` may be tried again from the request's address; 0: now."""
    by_name, by_address = _keys(username, client_address(request))
    try:
        counts = cache.get_many([by_name, by_address])
    except _CACHE_ERRORS as exc:
        logger.warning("sign-in throttle: the cache did not answer (%s); not throttled", type(exc).__name__)
        return 0
    if (
        counts.get(by_name, 0) < settings.LLMHUB_SIGNIN_FAILURES_PER_NAME
        and counts.get(by_address, 0) < settings.LLMHUB_SIGNIN_FAILURES_PER_ADDRESS
    ):
        return 0
    return window_seconds_left(SIGNIN_WINDOW_SECONDS)


def signin_failed(*, username: str, request: HttpRequest | None) -> None:
    for key in _keys(username, client_address(request)):
        window_count_add(key, window_seconds=SIGNIN_WINDOW_SECONDS)


def signin_succeeded(*, username: str, request: HttpRequest | None) -> None:
    try:
        cache.delete(_keys(username, client_address(request))[0])
    except _CACHE_ERRORS as exc:
        logger.warning("sign-in throttle: the cache did not answer (%s)", type(exc).__name__)


class SignInThrottleMixin:
    """For an ``AuthenticationForm``: no password is checked while the name (or the address) is held back."""

    request: HttpRequest | None
    cleaned_data: dict[str, Any]
    throttled = False  # for the template: the error to show is the wait, not "didn't match"

    def clean(self) -> dict[str, Any]:
        username = self.cleaned_data.get("username")
        if username is None or not self.cleaned_data.get("password"):
            return super().clean()  # type: ignore[misc]
        wait = signin_wait_seconds(username=username, request=self.request)
        if wait:
            self.throttled = True
            # Still a failed sign-in for whoever listens (the audit log, with its own rate limit).
            user_login_failed.send(sender=__name__, credentials={"username": username}, request=self.request)
            raise ValidationError(
                "Too many failed sign-ins from your address: try again in %(minutes)d minutes.",
                code="throttled",
                params={"minutes": max(1, math.ceil(wait / 60))},
            )
        try:
            cleaned = super().clean()  # type: ignore[misc]
        except ValidationError as exc:
            if exc.code == "invalid_login":
                signin_failed(username=username, request=self.request)
            raise
        signin_succeeded(username=username, request=self.request)
        return cleaned


class SignInForm(SignInThrottleMixin, AuthenticationForm):
    """``/accounts/login/``."""


class AdminSignInForm(SignInThrottleMixin, AdminAuthenticationForm):
    """The admin's sign-in."""
