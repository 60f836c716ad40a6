"""Re-encryption of every encrypted column under the newest key of ``FIELD_ENCRYPTION_KEYS``.

The columns are every ``EncryptedField`` of every installed model (a provider's key and extra headers,
users' own provider keys, and whatever is added later), found at run time. Each column is done in batches
of ``LLMHUB_ENCRYPTION_ROTATION_BATCH_SIZE`` rows in primary-key order, each batch and its progress row
(``EncryptionRotation``) committed together: a run that stops (a crash, a deploy, a value no key decrypts)
leaves every row either moved or not, and the next run goes on from the last committed batch. Rows written
while it runs are encrypted under the newest key already. The work is on stored tokens (Fernet's rotate):
no plaintext is handled, and a token rotated twice is still the same secret.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable

from cryptography.fernet import InvalidToken
from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models, transaction
from django.db.models.functions import Cast
from django.utils import timezone

from ..fields import EncryptedField, rotate
from ..models import EncryptionRotation

logger = logging.getLogger(__name__)

AfterBatch = Callable[[EncryptionRotation], None]


def _encrypted_columns() -> Iterable[tuple[type[models.Model], str]]:
    for model in apps.get_models():
        for field in model._meta.concrete_fields:
            if isinstance(field, EncryptedField):
                yield model, field.attname


def encryption_key_id() -> str:
    """A fingerprint of the key values are encrypted under (the first of ``FIELD_ENCRYPTION_KEYS``): SHA-256
    of a label and the key, cut short. It tells keys apart in the progress rows without revealing them."""
    keys = settings.FIELD_ENCRYPTION_KEYS
    if not keys:
        raise ImproperlyConfigured("FIELD_ENCRYPTION_KEYS is empty.")
    key = keys[0].encode() if isinstance(keys[0], str) else keys[0]
    return hashlib.sha256(b"llmhub-encryption-key-id\x00" + key).hexdigest()[:16]


def provider_rotate_encryption(
    *, batch_size: int | None = None, restart: bool = False, after_batch: AfterBatch | None = None
) -> int:
    """Re-encrypt every stored secret under the first key of ``FIELD_ENCRYPTION_KEYS``, after which the older
    keys can be dropped (once every column shows finished in the admin). Returns how many values this run
    rewrote.

    Resumes where an earlier run for the same key stopped and skips the columns it finished; ``restart``
    starts every column over (say, after restoring a backup taken under an older key). ``after_batch`` is
    called with the progress row after each committed batch (a command's progress output). A value that no
    key decrypts stops the run with ``ImproperlyConfigured`` naming its row, recorded as the column's last
    error; the batches before it stay done."""
    size = batch_size or settings.LLMHUB_ENCRYPTION_ROTATION_BATCH_SIZE
    key_id = encryption_key_id()
    return sum(
        _column_rotate(model, attname, key_id=key_id, size=size, restart=restart, after_batch=after_batch)
        for model, attname in _encrypted_columns()
    )


def _column_rotate(
    model: type[models.Model],
    attname: str,
    *,
    key_id: str,
    size: int,
    restart: bool,
    after_batch: AfterBatch | None,
) -> int:
    progress = _column_start(model, attname, key_id=key_id, restart=restart)
    if progress.finished_at is not None:
        return 0
    rewritten = 0
    try:
        while True:
            with transaction.atomic():
                done = _batch_rotate(model, attname, progress_pk=progress.pk, key_id=key_id, size=size)
            if done is None:
                return rewritten
            progress, count = done
            rewritten += count
            if after_batch is not None:
                after_batch(progress)
    except Exception as exc:
        _column_failed(progress.pk, exc)
        raise


def _column_start(model: type[models.Model], attname: str, *, key_id: str, restart: bool) -> EncryptionRotation:
    """The column's progress row for this key: kept (a resume, or already finished) or started over."""
    column = f"{model._meta.label}.{attname}"
    with transaction.atomic():
        progress, created = EncryptionRotation.objects.select_for_update().get_or_create(
            column=column, defaults={"key_id": key_id}
        )
        if created or restart or progress.key_id != key_id:
            progress.key_id, progress.last_pk = key_id, ""
            progress.rows_done = progress.rows_rewritten = progress.runs = 0
            progress.started_at, progress.finished_at = timezone.now(), None
        elif progress.finished_at is not None:
            return progress
        pending = model._base_manager.all()
        if progress.last_pk:
            pending = pending.filter(pk__gt=model._meta.pk.to_python(progress.last_pk))
        progress.rows_total = progress.rows_done + pending.count()
        progress.runs += 1
        progress.last_error = ""
        progress.save()
    return progress


def _batch_rotate(
    model: type[models.Model], attname: str, *, progress_pk: int, key_id: str, size: int
) -> tuple[EncryptionRotation, int] | None:
    """The next batch of the column, in the caller's transaction; None once the column is finished, or taken
    over by a run under another first key. The progress row is locked first, so two runs at once take turns
    batch by batch instead of both doing one."""
    progress = EncryptionRotation.objects.select_for_update().get(pk=progress_pk)
    if progress.finished_at is not None:
        return None
    if progress.key_id != key_id:
        # A process with other FIELD_ENCRYPTION_KEYS (a rolling restart after a new key was put first) started
        # the column over under its key: the rows this run moved from here would be counted done under that key
        # while encrypted under this one's, and stay so once the column showed finished.
        logger.warning("%s: a rotation under another first key took the column over; left to it", progress.column)
        return None
    rows = model._base_manager.order_by("pk")
    if progress.last_pk:
        rows = rows.filter(pk__gt=model._meta.pk.to_python(progress.last_pk))
    # Cast to a plain TextField: the raw token, without the field's decryption on the way out.
    batch = list(
        rows.select_for_update()
        .annotate(raw_token=Cast(attname, models.TextField()))
        .values_list("pk", "raw_token")[:size]
    )
    if not batch:
        progress.finished_at = timezone.now()
        progress.rows_total = progress.rows_done
        progress.save(update_fields=["finished_at", "rows_total", "updated_at"])
        return None
    rewritten = 0
    for pk, token in batch:
        if not token:
            continue
        try:
            fresh = rotate(token)
        except InvalidToken:
            raise ImproperlyConfigured(
                f"{model._meta.label}.{attname} of row {pk} cannot be decrypted with any key in "
                "FIELD_ENCRYPTION_KEYS; its batch was not rotated."
            ) from None
        # A Value expression is written as given; a plain value would be encrypted a second time.
        model._base_manager.filter(pk=pk).update(**{attname: models.Value(fresh, output_field=models.TextField())})
        rewritten += 1
    progress.last_pk = str(batch[-1][0])
    progress.rows_done += len(batch)
    progress.rows_total = max(progress.rows_total, progress.rows_done)
    progress.rows_rewritten += rewritten
    progress.save(update_fields=["last_pk", "rows_done", "rows_total", "rows_rewritten", "updated_at"])
    return progress, rewritten


def _column_failed(progress_pk: int, exc: Exception) -> None:
    # The message of our own error names the row; of anything else, only its kind (a driver's message may
    # quote a stored token).
    reason = str(exc) if isinstance(exc, ImproperlyConfigured) else f"{type(exc).__name__} (see the worker's log)"
    EncryptionRotation.objects.filter(pk=progress_pk).update(last_error=reason[:2000], updated_at=timezone.now())
