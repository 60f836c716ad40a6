"""Secrets encrypted at rest.

``EncryptedTextField`` stores Fernet tokens (``MultiFernet`` over ``settings.FIELD_ENCRYPTION_KEYS``:
the first key encrypts, every key decrypts, so a key is rotated by putting a new one first and
re-saving rows at leisure). In Python the value is a :class:`Secret`, whose ``str`` and ``repr`` are
masked, so that a secret formatted into a log line, an exception or a debug page shows only a hint.
Code that really needs the plaintext asks for it by name: ``secret.reveal()``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.signals import setting_changed
from django.db import models
from django.db.models.query_utils import DeferredAttribute
from django.dispatch import receiver

TOKEN_PREFIX = "fernet:"
_KIND_PREFIX = re.compile(r"[A-Za-z]{1,4}[-_]")


class Secret:
    """A string that does not show itself by accident."""

    __slots__ = ("_value",)

    def __init__(self, value: str = "") -> None:
        self._value = value or ""

    def reveal(self) -> str:
        return self._value

    @property
    def hint(self) -> str:
        """What an admin may see: the first characters of the kind of key and the last four."""
        value = self._value
        if not value:
            return ""
        if len(value) < 12:
            return "…" + value[-2:] if len(value) > 4 else "…"
        # The kind prefix ("sk-", "gsk_", "xai-") is public and tells an admin which key is stored.
        kind = _KIND_PREFIX.match(value)
        head = kind.group(0) if kind else ""
        return f"{head}…{value[-4:]}"

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return self._value == other._value
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._value)

    def __str__(self) -> str:
        return self.hint

    def __repr__(self) -> str:
        return f"Secret({self.hint!r})"

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is not to be pickled")

    # Immutable, so a copy may be the same object; without these, copy.copy() of a model instance
    # holding a Secret would hit the pickling guard above.
    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self


@functools.cache
def _fernet() -> MultiFernet:
    keys = settings.FIELD_ENCRYPTION_KEYS
    if not keys:
        raise ImproperlyConfigured("FIELD_ENCRYPTION_KEYS is empty.")
    try:
        return MultiFernet([Fernet(key.encode() if isinstance(key, str) else key) for key in keys])
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured("FIELD_ENCRYPTION_KEYS holds a malformed Fernet key.") from exc


@receiver(setting_changed)
def _reset_fernet(*, setting: str, **kwargs: Any) -> None:
    if setting == "FIELD_ENCRYPTION_KEYS":
        _fernet.cache_clear()


def encrypt(plaintext: str) -> str:
    return TOKEN_PREFIX + _fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    if not token.startswith(TOKEN_PREFIX):
        raise ValidationError("stored value is not an encrypted token")
    try:
        return _fernet().decrypt(token[len(TOKEN_PREFIX) :].encode()).decode()
    except InvalidToken as exc:
        # Say which problem it is without saying anything about the value.
        raise ImproperlyConfigured(
            "An encrypted value cannot be decrypted with any key in FIELD_ENCRYPTION_KEYS."
        ) from exc


def rotate(token: str) -> str:
    """Re-encrypt a stored token under the first (newest) key."""
    return TOKEN_PREFIX + _fernet().rotate(token[len(TOKEN_PREFIX) :].encode()).decode()


class _SecretAttribute(DeferredAttribute):
    """Wraps whatever is assigned in a :class:`Secret`, so that ``Provider(api_key="sk-...")`` holds the same
    type as a row loaded from the database, and the plaintext never sits on an instance as a bare ``str``."""

    def __set__(self, instance: models.Model, value: Any) -> None:
        instance.__dict__[self.field.attname] = self.field.to_python(value)


class EncryptedTextField(models.TextField):
    """A text column whose value is encrypted before it reaches the database."""

    description = "Text encrypted at rest with Fernet"
    descriptor_class = _SecretAttribute

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> Secret | None:
        if value is None:
            return None
        if value == "":
            return Secret("")
        return Secret(decrypt(value))

    def to_python(self, value: Any) -> Secret | None:
        if value is None or isinstance(value, Secret):
            return value
        return Secret(str(value))

    def get_prep_value(self, value: Any) -> str | None:
        if value is None:
            return None
        plaintext = value.reveal() if isinstance(value, Secret) else str(value)
        if plaintext == "":
            return ""
        return encrypt(plaintext)

    def value_to_string(self, obj: models.Model) -> str:
        # Serialization (dumpdata) writes the ciphertext, never the plaintext.
        value = self.value_from_object(obj)
        return self.get_prep_value(value) or ""

    def save_form_data(self, instance: models.Model, data: Any) -> None:
        # ``SecretFormField`` cleans an empty submission to None, meaning "keep what is stored" (its
        # placeholder says so). ModelForm's construct_instance would otherwise write "" over the key.
        if data is None:
            return
        super().save_form_data(instance, data)

    def formfield(self, **kwargs: Any) -> Any:
        from .forms import SecretFormField, SecretInput

        kwargs.setdefault("form_class", SecretFormField)
        # Forced: TextField.formfield() passes a Textarea and the admin an AdminTextareaWidget, either of
        # which would render the stored value (and resubmit its hint as the new key).
        kwargs["widget"] = SecretInput
        return super().formfield(**kwargs)
