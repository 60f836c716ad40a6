"""Secrets encrypted at rest.

Every :class:`EncryptedField` stores a Fernet token (``MultiFernet`` over ``settings.FIELD_ENCRYPTION_KEYS``:
the first key encrypts, every key decrypts, so a key is rotated by putting a new one first and
re-encrypting the stored tokens, ``provider_rotate_encryption``). ``EncryptedTextField`` holds one secret
(an API key); ``EncryptedMappingField`` a JSON object of names to secrets (a provider's extra headers,
which may carry a credential such as ``X-Upstream-Token``). In Python every secret is a :class:`Secret`,
whose ``str`` and ``repr`` are masked, so that a secret formatted into a log line, an exception or a
debug page shows only a hint. Code that really needs the plaintext asks for it by name:
``secret.reveal()``.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any
from urllib.parse import urlsplit

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
    """Passes whatever is assigned through the field's ``to_python``, so that ``Provider(api_key="sk-...")``
    holds the same type as a row loaded from the database, and the plaintext never sits on an instance as a
    bare ``str``."""

    def __set__(self, instance: models.Model, value: Any) -> None:
        instance.__dict__[self.field.attname] = self.field.to_python(value)


class EncryptedField(models.TextField):
    """A text column holding a Fernet token of the value's plaintext, or "" for an empty value.

    Subclasses say what the plaintext of a Python value is and back; ``provider_rotate_encryption``
    re-encrypts every column of this class, whatever the subclass."""

    descriptor_class = _SecretAttribute

    def to_plaintext(self, value: Any) -> str:
        raise NotImplementedError

    def from_plaintext(self, plaintext: str) -> Any:
        raise NotImplementedError

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> Any:
        if value is None:
            return None
        return self.from_plaintext(decrypt(value) if value else "")

    def get_prep_value(self, value: Any) -> str | None:
        if value is None:
            return None
        plaintext = self.to_plaintext(self.to_python(value))
        return encrypt(plaintext) if plaintext else ""

    def value_to_string(self, obj: models.Model) -> str:
        # Serialization (dumpdata) writes the ciphertext, never the plaintext.
        return self.get_prep_value(self.value_from_object(obj)) or ""


class EncryptedTextField(EncryptedField):
    """One secret string (an API key)."""

    description = "Text encrypted at rest with Fernet"

    def to_python(self, value: Any) -> Secret | None:
        if value is None or isinstance(value, Secret):
            return value
        return Secret(str(value))

    def to_plaintext(self, value: Secret) -> str:
        return value.reveal()

    def from_plaintext(self, plaintext: str) -> Secret:
        return Secret(plaintext)

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


class SecretUrl(Secret):
    """A URL whose path or query is its secret (a Slack-style webhook): its hint names the host, which an
    operator needs to tell one webhook from another, and the last four characters."""

    __slots__ = ()

    @property
    def hint(self) -> str:
        value = self._value
        if not value:
            return ""
        try:
            parts = urlsplit(value)
            host = parts.hostname
        except ValueError:
            host = None
        if not host or not parts.scheme:
            return super().hint
        return f"{parts.scheme}://{host}/…{value[-4:]}"


UNREADABLE = "cannot be decrypted with any key in FIELD_ENCRYPTION_KEYS"


class UnreadableSecretUrl(SecretUrl):
    """A stored URL that no key decrypts (written under a key since dropped from ``FIELD_ENCRYPTION_KEYS``). Its
    row still loads, so that one such row does not fail every query that reads its table (an alert rule's
    webhook: the evaluator and the alert sweep read them all); ``reveal()`` raises ``ImproperlyConfigured``, the
    hint says what is wrong, and saving the row writes the stored token back unchanged."""

    __slots__ = ("token",)

    def __init__(self, token: str) -> None:
        super().__init__("")
        self.token = token

    def reveal(self) -> str:
        raise ImproperlyConfigured(f"An encrypted value {UNREADABLE}.")

    @property
    def hint(self) -> str:
        return f"({UNREADABLE}: type it again)"

    def __bool__(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnreadableSecretUrl) and other.token == self.token

    def __hash__(self) -> int:
        return hash(self.token)


class EncryptedUrlField(EncryptedTextField):
    """One URL holding a secret (a webhook), encrypted at rest; its Python value is a :class:`SecretUrl`, or an
    :class:`UnreadableSecretUrl` when no key decrypts it."""

    description = "A URL encrypted at rest with Fernet"

    def to_python(self, value: Any) -> SecretUrl | None:
        if value is None or isinstance(value, SecretUrl):
            return value
        return SecretUrl(value.reveal() if isinstance(value, Secret) else str(value))

    def from_plaintext(self, plaintext: str) -> SecretUrl:
        return SecretUrl(plaintext)

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> Any:
        try:
            return super().from_db_value(value, expression, connection)
        except ImproperlyConfigured as exc:
            if not isinstance(exc.__cause__, InvalidToken):
                raise  # no usable key at all: the deployment is misconfigured, not this row
            return UnreadableSecretUrl(value or "")

    def get_prep_value(self, value: Any) -> str | None:
        if isinstance(value, UnreadableSecretUrl):
            return value.token
        return super().get_prep_value(value)


class EncryptedMappingField(EncryptedField):
    """A JSON object of names to secret strings (a provider's extra headers), encrypted as a whole: the
    names are not secret, but one token per row keeps rotation and the column simple.

    In Python the value is a ``dict`` of names to :class:`Secret`. Values of any other type are left as
    they are, for the model's ``clean()`` to refuse."""

    description = "A JSON object of names to strings, encrypted at rest with Fernet"

    def to_python(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith(TOKEN_PREFIX):
            return self.from_plaintext(decrypt(value))  # what value_to_string wrote (loaddata)
        if not isinstance(value, dict):
            return value
        return {name: Secret(item) if isinstance(item, str) else item for name, item in value.items()}

    def to_plaintext(self, value: Any) -> str:
        if not value:
            return ""
        revealed = {name: item.reveal() if isinstance(item, Secret) else item for name, item in value.items()}
        return json.dumps(revealed, sort_keys=True, separators=(",", ":"))

    def from_plaintext(self, plaintext: str) -> dict[str, Any]:
        return self.to_python(json.loads(plaintext)) if plaintext else {}

    def save_form_data(self, instance: models.Model, data: Any) -> None:
        # The form shows each stored value as its hint; a hint sent back under the same name means "keep the
        # value stored under that name". A hint always contains "…", which no HTTP header value can, so a
        # typed value is never mistaken for one. A hint under another name stays as typed, and clean()
        # refuses it as a header value.
        stored = getattr(instance, self.attname) or {}
        if isinstance(data, dict):
            data = {
                name: stored[name]
                if isinstance(value, Secret)
                and isinstance(stored.get(name), Secret)
                and value.reveal() == stored[name].hint
                else value
                for name, value in data.items()
            }
        super().save_form_data(instance, data)

    def formfield(self, **kwargs: Any) -> Any:
        from .forms import SecretMappingFormField

        kwargs["form_class"] = SecretMappingFormField
        return super().formfield(**kwargs)
