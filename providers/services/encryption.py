"""Re-encryption of every encrypted column under the newest key (``LLMHUB_ENCRYPTION_KEYS``)."""

from __future__ import annotations

from collections.abc import Iterable

from cryptography.fernet import InvalidToken
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import models, transaction
from django.db.models.functions import Cast

from ..fields import EncryptedField, rotate

# Key rotation -------------------------------------------------------------------------------------


def _encrypted_columns() -> Iterable[tuple[type[models.Model], str]]:
    for model in apps.get_models():
        for field in model._meta.concrete_fields:
            if isinstance(field, EncryptedField):
                yield model, field.attname


@transaction.atomic
def provider_rotate_encryption() -> int:
    """Re-encrypt every stored secret (every ``EncryptedField`` of every model) under the first key of
    ``FIELD_ENCRYPTION_KEYS``, after which the older keys can be dropped. Returns how many values were
    rewritten. Works on the stored tokens, so no plaintext is handled; all or nothing."""
    rewritten = 0
    for model, attname in _encrypted_columns():
        # Cast to a plain TextField: the raw token, without the field's decryption on the way out.
        rows = (
            model._base_manager.select_for_update()
            .annotate(raw_token=Cast(attname, models.TextField()))
            .values_list("pk", "raw_token")
        )
        for pk, token in rows:
            if not token:
                continue
            try:
                fresh = rotate(token)
            except InvalidToken:
                raise ImproperlyConfigured(
                    f"{model._meta.label}.{attname} of row {pk} cannot be decrypted with any key in "
                    "FIELD_ENCRYPTION_KEYS; nothing was rotated."
                ) from None
            # A Value expression is written as given; a plain value would be encrypted a second time.
            model._base_manager.filter(pk=pk).update(**{attname: models.Value(fresh, output_field=models.TextField())})
            rewritten += 1
    return rewritten
