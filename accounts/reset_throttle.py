"""Mailbox flooding through the password reset form (``/accounts/password_reset/``), held back.

Every ask is counted in the cache (the sign-in throttle's counting, ``accounts.signin_throttle``) per window of
``PASSWORD_RESET_WINDOW_SECONDS``: per client address, and per email asked for (from any address, so that many
addresses cannot flood one mailbox). Past either limit (``LLMHUB_PASSWORD_RESETS_PER_ADDRESS``,
``LLMHUB_PASSWORD_RESETS_PER_EMAIL``) no email is sent until the window ends. The page answers exactly as when
one is sent ("check your email" whether or not an account has the email): a different answer would tell
whoever asks which emails have accounts. Asks for an email without an account are counted the same way.

When the cache does not answer, reset emails go on being sent (a warning is logged), as sign-ins do.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.contrib.auth.forms import PasswordResetForm

from .signin_throttle import client_address, name_digest, window_count_add, window_key

logger = logging.getLogger(__name__)

PASSWORD_RESET_WINDOW_SECONDS = 60 * 60


def _count(*parts: str) -> int | None:
    key = window_key("password-reset", PASSWORD_RESET_WINDOW_SECONDS, *parts)
    return window_count_add(key, window_seconds=PASSWORD_RESET_WINDOW_SECONDS)


def password_reset_admitted(*, email: str, address: str) -> bool:
    """Whether a reset email for ``email`` asked from ``address`` may be sent now; counts the ask (an ask the
    address limit holds back does not count against the email)."""
    by_address = _count(address)
    if by_address is not None and by_address > settings.LLMHUB_PASSWORD_RESETS_PER_ADDRESS:
        return False
    by_email = _count("email", name_digest(email))
    return by_email is None or by_email <= settings.LLMHUB_PASSWORD_RESETS_PER_EMAIL


class ThrottledPasswordResetForm(PasswordResetForm):
    """``/accounts/password_reset/``: sends nothing past the limits, and says nothing about it."""

    def save(self, *args: Any, **kwargs: Any) -> None:
        address = client_address(kwargs.get("request"))
        if not password_reset_admitted(email=self.cleaned_data["email"], address=address):
            logger.warning("password reset: held back for an email asked from %s", address)
            return None
        return super().save(*args, **kwargs)
