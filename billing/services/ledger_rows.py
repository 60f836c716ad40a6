"""A ledger row (``UsageData``) and its one way into the ledger: ``usage_rows_write``.

Used by the ledger's writer (``ledger.py``), by the replay of its spool, and by the lost-request sweep
(``counters.py``), which writes the row a killed process had settled but not committed from that request's
in-flight record (docs/reliability.md, "A killed process"). In the database store of admission that record
is deleted in the very transaction that inserts its row.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import DataError, IntegrityError, connection, models, transaction
from django.db.models import Q
from django.utils import timezone

from core.metrics import ledger_set_aside_add
from providers.models import CatalogModel, Deployment, Provider

from ..models import ApiKey, RequestReservation, UsageRecord
from ..selectors import api_key_heirs
from .spool import spool_set_aside

logger = logging.getLogger("llmhub.ledger")

_last_used_written: dict[int, float] = {}
LAST_USED_RESOLUTION = 60.0  # seconds: a key's last_used_at is written at most this often per process


@dataclass
class UsageData:
    request_id: str
    endpoint: str
    stream: bool
    status: str
    operation: str = "chat"  # ``Operation``: what was asked (chat, messages, embeddings), whatever the transport
    user_id: int | None = None
    api_key_id: int | None = None
    provider_id: int | None = None
    model_id: int | None = None
    deployment_id: int | None = None
    provider_name: str = ""
    model_name: str = ""
    deployment_name: str = ""
    requested_model: str = ""  # the name the client sent, when another model answered (alias, fallback)
    attempts: int = 0  # upstream calls made, retries and fallbacks included
    resumed: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # prompt tokens written to the provider's cache (part of prompt_tokens)
    cache_write_1h_tokens: int = 0  # of those, the ones written to Anthropic's 1-hour cache
    web_search_requests: int = 0  # web searches the provider billed apart from the tokens (Anthropic's server tool)
    service_tier: str = ""  # the tier the tokens were charged at (``pricing.charged_tier``): priority, flex or ""
    cost: Decimal = Decimal("0")
    usage_estimated: bool = False
    upstream_latency_ms: int | None = None
    ttft_ms: int | None = None
    duration_ms: int = 0
    error_type: str = ""
    billing_source: str = "platform"  # ``BillingSource``: whose provider key paid
    user_key_cost: Decimal | None = None  # the price of a request on the user's own key (``cost`` is then
    # what counts against the platform's budgets)
    moderation: str = ""  # what moderation found (flagged, or served although the moderation service failed)
    experiment_id: int | None = None  # the A/B experiment the request was assigned in, and its variant
    experiment_variant_id: int | None = None
    created_at: datetime = field(default_factory=timezone.now)
    # Instead of user_id and api_key_id when the key could not be looked up (the database was down): the
    # key's SHA-256, as the database keeps it. The row is attributed when written (``_keys_resolved``).
    key_hash: str = ""


_FIELDS = tuple(item.name for item in fields(UsageData))


def usage_data_dump(data: UsageData) -> dict[str, Any]:
    """The row as JSON values, as the spool and a settled in-flight record keep it (``usage_data_from_spool``
    reads it back)."""
    raw = {name: getattr(data, name) for name in _FIELDS}
    raw["cost"] = str(data.cost)
    raw["user_key_cost"] = None if data.user_key_cost is None else str(data.user_key_cost)
    raw["created_at"] = data.created_at.isoformat()
    return raw


def usage_data_from_spool(raw: dict[str, Any]) -> UsageData:
    fields = {name: value for name, value in raw.items() if name != "admission"}
    user_key_cost = raw.get("user_key_cost")
    return UsageData(
        **{
            **fields,
            "cost": Decimal(raw["cost"]),
            "user_key_cost": None if user_key_cost is None else Decimal(user_key_cost),
            "created_at": datetime.fromisoformat(raw["created_at"]),
        }
    )


def usage_rows_write(rows: list[UsageData], *, settled: Collection[str] = ()) -> None:
    """Insert rows in one transaction; rows whose request id is already in the ledger are skipped.

    A row can refer to a user, key, provider or model deleted after its request ran (an admin removed
    a model mid-stream, or the row waited in the spool). Its insert would break a foreign key and take
    the whole batch with it, again at every retry and replay, so then the batch is written once more
    with those references cleared: the row keeps the provider and model names and its cost, and the
    ledger keeps every request, as ``on_delete=SET_NULL`` would have left it. A key deleted under a key that
    stayed is replaced by that key (its heir), as its earlier rows were: the budgets above it count the row.

    ``settled``: request ids whose in-flight records were settled with these rows (in the database store of
    admission they are deleted in the same transaction; Redis's are forgotten by the caller once this
    returns)."""
    rows = [_checked(data) for data in _keys_resolved(rows)]
    try:
        if not all(map(_money_fits, rows)):
            # SQLite would keep such a cost (as text), and every read of the row would then fail.
            raise ValidationError("a cost the ledger cannot hold")
        _commit_resolving(rows, settled)
    except ROW_REFUSED:
        # One row's values (a count past its column's range, a NUL in a text on PostgreSQL, a cost that is no
        # number) fail the whole batch, and would again at every retry and replay: each row goes on its own.
        _commit_apart(rows, settled)
    for api_key_id in {data.api_key_id for data in rows}:
        _touch_key(api_key_id)


# What a row's own values make the database, or the preparation of those values, refuse: writing it again
# cannot help, unlike a database that is down or locked (``OperationalError``, ``InterfaceError``).
ROW_REFUSED = (DataError, IntegrityError, ArithmeticError, ValueError, TypeError, ValidationError)
CLAMPED_FLAG = "ledger_clamped"  # ``error_type`` of a row written with values clamped (``_clamped``)


def _commit_resolving(rows: list[UsageData], settled: Collection[str]) -> None:
    try:
        _commit(rows, settled)
    except IntegrityError:
        kept = _without_dangling_references(rows)
        if kept == rows:
            raise
        logger.warning(
            "ledger rows refer to deleted users, keys, providers or models; written without them (a deleted key's "
            "on its heir)"
        )
        _commit(kept, settled)


def _commit_apart(rows: list[UsageData], settled: Collection[str]) -> None:
    """A transaction per row (a batch the database refused for a row's values): the others are written; a
    refused row is written again with its values clamped and flagged (``_clamped``), or if that is refused
    too, or its cost is no number the ledger can hold, set aside in the spool's ``.unreadable`` file for a
    person, with its settled record removed, never retried. A database that goes down meanwhile raises as
    before: the caller spools the batch, and the rows committed already are skipped by the replay."""
    settled = set(settled)
    for data in rows:
        mine = {data.request_id} & settled
        try:
            if not _money_fits(data):
                raise ValidationError("a cost the ledger cannot hold")
            _commit_resolving([data], mine)
            continue
        except ROW_REFUSED as exc:
            refused = exc
        clamped = _clamped(data)
        if clamped is not None:
            try:
                _commit_resolving([clamped], mine)
            except ROW_REFUSED as exc:
                refused = exc
            else:
                logger.warning(
                    "ledger row %s refused (%s); written with %s clamped, error_type %r",
                    data.request_id,
                    type(refused).__name__,
                    ", ".join(sorted(_changed(data, clamped) - {"error_type"})),
                    clamped.error_type,
                )
                continue
        aside = spool_set_aside(json.dumps(usage_data_dump(data), default=str))
        ledger_set_aside_add(1)
        logger.error(
            "ledger row %s refused (%s), even clamped; set aside in %s for a person to look at",
            data.request_id,
            type(refused).__name__,
            aside,
        )
        if mine and not settings.REDIS_URL:
            RequestReservation.objects.filter(request_id__in=mine, settled_row__isnull=False).delete()


def _clamped(data: UsageData) -> UsageData | None:
    """``data`` with each count clamped to its column's range and each text to its column's length, without
    NUL characters, and ``error_type`` flagged (``CLAMPED_FLAG``); None when nothing changes, or when an amount
    of money is no finite number within its column (a cost is never made up)."""
    changes: dict[str, Any] = {}
    for column, _ in _insert_columns()[1]:
        value = getattr(data, column.attname)
        if isinstance(column, models.ForeignKey) or value is None or isinstance(value, bool):
            continue
        if isinstance(column, models.DecimalField):
            if not _amount_fits(column, value):
                return None
        elif isinstance(column, models.CharField) and isinstance(value, str):
            text = value.replace("\x00", "")[: column.max_length]
            if text != value:
                changes[column.attname] = text
        elif isinstance(column, models.IntegerField) and isinstance(value, int):
            low, high = connection.ops.integer_field_range(column.get_internal_type())
            number = max(low if low is not None else value, min(value, high if high is not None else value))
            if number != value:
                changes[column.attname] = number
    if not changes:
        return None
    error_type = changes.get("error_type", data.error_type)
    flag = f"{CLAMPED_FLAG}:{error_type}" if error_type else CLAMPED_FLAG
    changes["error_type"] = flag[: UsageRecord._meta.get_field("error_type").max_length]
    return replace(data, **changes)


@functools.cache
def _count_floors() -> tuple[tuple[str, int], ...]:
    """The integer columns with a lower bound (the positive ones: 0), and that bound."""
    floors = []
    for column, _ in _insert_columns()[1]:
        if isinstance(column, models.IntegerField) and not isinstance(column, models.ForeignKey):
            low, _high = connection.ops.integer_field_range(column.get_internal_type())
            if low is not None and low >= 0:
                floors.append((column.attname, low))
    return tuple(floors)


@functools.cache
def _text_limits() -> tuple[tuple[str, int], ...]:
    """The text columns and their lengths."""
    return tuple(
        (column.attname, column.max_length)
        for column, _ in _insert_columns()[1]
        if isinstance(column, models.CharField) and column.max_length
    )


def _checked(data: UsageData) -> UsageData:
    """``data``, or clamped first (``_clamped``) when the database would take a value of it without a word but
    not as it is: SQLite's ``INSERT OR IGNORE`` skips a row that breaks a CHECK constraint (a count below zero in
    a positive column) as it skips a known request id; PostgreSQL's insert of arrays cast to ``varchar(n)`` cuts a
    text past its column (a cast does, where an insert would refuse it), and SQLite keeps it whole, longer than
    its column. A few comparisons a row."""
    for name, limit in _text_limits():
        value = getattr(data, name)
        if isinstance(value, str) and len(value) > limit:
            return _clamped_logged(data, "texts past their columns' length")
    for name, low in _count_floors():
        value = getattr(data, name)
        if isinstance(value, int) and value < low:
            return _clamped_logged(data, "counts below their columns' range")
    return data


def _clamped_logged(data: UsageData, why: str) -> UsageData:
    clamped = _clamped(data)
    if clamped is None:
        return data
    logger.warning(
        "ledger row %s has %s; written with %s clamped, error_type %r",
        data.request_id,
        why,
        ", ".join(sorted(_changed(data, clamped) - {"error_type"})),
        clamped.error_type,
    )
    return clamped


_MONEY = ("cost", "user_key_cost")


def _money_fits(data: UsageData) -> bool:
    """Whether the row's amounts are finite numbers within their columns (the check is a few comparisons)."""
    return all(
        _amount_fits(UsageRecord._meta.get_field(name), value)
        for name in _MONEY
        if (value := getattr(data, name)) is not None
    )


def _amount_fits(column: Any, value: Any) -> bool:
    try:
        amount = Decimal(value)
        return amount.is_finite() and (not amount or amount.adjusted() < column.max_digits - column.decimal_places)
    except (ArithmeticError, TypeError, ValueError):
        return False


def _changed(before: UsageData, after: UsageData) -> set[str]:
    return {name for name in _FIELDS if getattr(before, name) != getattr(after, name)}


def _commit(rows: list[UsageData], settled: Collection[str]) -> None:
    with transaction.atomic():
        _insert(rows)
        if settled and not settings.REDIS_URL:
            RequestReservation.objects.filter(request_id__in=settled, settled_row__isnull=False).delete()


def _keys_resolved(rows: list[UsageData]) -> list[UsageData]:
    """Rows recorded under a key's hash get the key and its owner; a hash of no unrevoked key gets no row
    at all, as the 401 that key would have had with the database up."""
    hashes = {data.key_hash for data in rows if data.key_hash}
    if not hashes:
        return rows
    # A rotated key's previous secret is the key too, until its grace ended (then it had a 401: no row).
    keys = ApiKey.objects.filter(
        Q(secret_hash__in=hashes) | Q(previous_secret_hash__in=hashes), revoked_at__isnull=True
    ).values_list("secret_hash", "previous_secret_hash", "previous_secret_expires_at", "pk", "user_id")
    found: dict[str, tuple[int, int, datetime | None]] = {}
    for current, previous, grace_end, key_id, user_id in keys:
        found[current] = (key_id, user_id, None)
        if previous:
            found.setdefault(previous, (key_id, user_id, grace_end))
    resolved = []
    for data in rows:
        if not data.key_hash:
            resolved.append(data)
            continue
        key = found.get(data.key_hash)
        if key is not None and (key[2] is None or data.created_at < key[2]):
            resolved.append(replace(data, api_key_id=key[0], user_id=key[1], key_hash=""))
    return resolved


# The ledger's columns a ``UsageData`` fills (``key_hash`` is resolved before the insert).
_INSERTED = [item.name for item in fields(UsageData) if item.name != "key_hash"]


def _insert(rows: list[UsageData]) -> None:
    """In the caller's transaction."""
    if connection.vendor == "postgresql":
        _insert_arrays(rows)
        return
    if connection.vendor == "sqlite":
        _insert_many(rows)
        return
    records = [UsageRecord(**{name: getattr(data, name) for name in _INSERTED}) for data in rows]
    UsageRecord.objects.bulk_create(records, ignore_conflicts=True)


# The value types a column's preparation hands SQLite unchanged, by field class (the first that matches):
# ``str`` for text, ``int`` (and ``bool``) for integers and integer foreign keys, a finite ``Decimal`` for
# decimals (which Django's SQLite adapter writes as its string), ``None`` for all. A value of another type
# (a str in an integer column, an enum member) goes through its field, which converts it or refuses it as
# ``bulk_create`` would; so does every datetime (made naive UTC and formatted by its field).
_AS_IS_BY_FIELD: tuple[tuple[type, frozenset[type]], ...] = (
    (models.BooleanField, frozenset({bool, type(None)})),
    (models.CharField, frozenset({str, type(None)})),
    (models.IntegerField, frozenset({int, bool, type(None)})),  # and every positive, small and big variant
    (models.DecimalField, frozenset({Decimal, type(None)})),
)


def _as_is_types(column: Any) -> frozenset[type]:
    if isinstance(column, models.ForeignKey):
        column = column.target_field
        if not isinstance(column, models.IntegerField):
            return frozenset()
    for field_class, types in _AS_IS_BY_FIELD:
        if isinstance(column, field_class):
            return types
    return frozenset()


# The most rows one SQLite statement carries; SQLite's variable limit may lower it (``_rows_per_statement``).
MOST_ROWS_PER_STATEMENT = 256


@functools.cache
def _insert_columns() -> tuple[str, tuple[tuple[Any, frozenset[type]], ...]]:
    """The ``INSERT OR IGNORE`` into the ledger, to its ``VALUES``, and for each of its columns the model field
    and the value types that go to SQLite as they are (``_sqlite_value``), built once."""
    by_name = {model_field.attname: model_field for model_field in UsageRecord._meta.concrete_fields}
    columns = tuple(by_name[name] for name in _INSERTED)
    names = ", ".join(column.column for column in columns)
    # Identifiers from the model's own metadata; every value is a parameter.
    head = f"INSERT OR IGNORE INTO {UsageRecord._meta.db_table} ({names}) VALUES "  # noqa: S608
    return head, tuple((column, _as_is_types(column)) for column in columns)


@functools.cache
def _insert_statement(rows: int, placeholder: str = "?") -> str:
    """The insert of ``rows`` rows in one statement (only powers of two and the largest size are asked for,
    so SQLite's statement cache keeps every one of them compiled).

    In SQLite's own ``?`` placeholders: Django's SQLite cursor rewrites each ``%s`` of a statement into one
    with a regular expression at every ``execute`` (about 7 µs of CPU per row of 31 values, 1.8 ms for a
    statement of 256 rows), where a statement without ``%s`` passes unchanged. ``"%s"`` when Django logs the
    queries (``DEBUG``, ``CaptureQueriesContext``): its log fills the parameters into ``%s`` placeholders."""
    head, columns = _insert_columns()
    row = "(" + ", ".join([placeholder] * len(columns)) + ")"
    return head + ", ".join([row] * rows)


def _rows_per_statement(columns: int) -> int:
    """``MOST_ROWS_PER_STATEMENT``, or the largest power of two under SQLite's limit on a statement's
    variables (999 in builds older than 3.32), whichever is smaller."""
    connection.ensure_connection()
    try:
        limit = connection.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    except (AttributeError, sqlite3.Error):
        limit = connection.features.max_query_params
    most = min(MOST_ROWS_PER_STATEMENT, max(1, limit // columns))
    return 1 << (most.bit_length() - 1)


def statement_sizes(rows: int, most: int) -> list[int]:
    """How ``_insert_many`` splits ``rows`` rows into statements: as many of ``most`` (a power of two) as fit,
    then the rest's binary digits, largest first (500 rows at 256: 256, 128, 64, 32, 16, 4)."""
    sizes = [most] * (rows // most)
    rest = rows % most
    while rest:
        size = 1 << (rest.bit_length() - 1)
        sizes.append(size)
        rest -= size
    return sizes


def _sqlite_value(column: Any, as_is: frozenset[type], value: Any) -> Any:
    """What ``column.get_db_prep_save`` gives SQLite for ``value``, without running it where it would hand
    back the value itself."""
    kind = type(value)
    if kind in as_is and (kind is not Decimal or value.is_finite()):
        return value
    return column.get_db_prep_save(value, connection)


def _insert_many(rows: list[UsageData]) -> None:
    """SQLite: the batch in a few multi-row ``INSERT OR IGNORE`` statements (``statement_sizes``), each value
    as its model field prepares it for ``bulk_create``.

    Not ``executemany`` of a one-row statement, as before 4 December: Python's sqlite3 releases the GIL
    around every row's ``sqlite3_step`` and must take it back after each, and while the event loop's
    thread serves requests it hands the GIL over only every switch interval (5 ms). The writer's thread
    then wrote about 600 rows a second, fewer than a saturated worker serves: the queue of unwritten rows
    grew without end, and the server's RSS with it (+20 % to +63 % over 100,000 requests). In the same
    contention a statement of 256 rows takes the GIL back once: 11,000-14,000 rows/s against 625
    (docs/ledger.md, "The writer under a busy event loop"). ``bulk_create`` built a model instance and
    compiled the statement again for every batch (0.84 ms of CPU for a batch of one), and the fields' own
    preparation cost about 55 µs a row of 31 values: it runs only where it changes the value
    (``_sqlite_value``; ``tests/billing/test_ledger_insert.py`` compares the stored columns with
    ``bulk_create``'s). Same semantics: ids already in the ledger, or twice in the batch, are skipped, and
    a reference to a deleted row fails the batch (``_write_rows``)."""
    _, columns = _insert_columns()
    values = [
        [_sqlite_value(column, types, getattr(data, column.attname)) for column, types in columns] for data in rows
    ]
    start = 0
    placeholder = "%s" if connection.queries_logged else "?"
    with connection.cursor() as cursor:
        for size in statement_sizes(len(values), _rows_per_statement(len(columns))):
            part = values[start : start + size]
            start += size
            cursor.execute(_insert_statement(size, placeholder), [value for row in part for value in row])


def _insert_arrays(rows: list[UsageData]) -> None:
    """PostgreSQL: the batch as one array per column, in one ``INSERT ... SELECT FROM unnest(...)``.

    ``bulk_create`` prepares each of the 30 values of each row in Python (and ``asdict`` deep-copied them
    before that): most of the writer's time, capping it at about 1,000 rows/s on a loaded machine, where
    this statement leaves the work to the server (docs/ledger.md). Same semantics: ids already in the
    ledger are skipped, and a reference to a deleted row fails the batch at commit (``_write_rows``)."""
    by_name = {model_field.attname: model_field for model_field in UsageRecord._meta.concrete_fields}
    columns = [by_name[name] for name in _INSERTED]
    arrays = ", ".join(f"%s::{column.db_type(connection)}[]" for column in columns)
    # Identifiers from the model's own metadata; every value is a parameter.
    names = ", ".join(column.column for column in columns)
    sql = f"INSERT INTO {UsageRecord._meta.db_table} ({names}) SELECT * FROM unnest({arrays}) ON CONFLICT (request_id) DO NOTHING"  # noqa: E501, S608
    with connection.cursor() as cursor:
        cursor.execute(sql, [[getattr(data, name) for data in rows] for name in _INSERTED])


def _without_dangling_references(rows: list[UsageData]) -> list[UsageData]:
    """``rows`` with each reference to a deleted row emptied, but a deleted key's, which becomes its heir's (the key
    above it that its delete left, which got its earlier rows: ``selectors.api_key_heirs``) while that key exists."""
    targets = {
        "user_id": get_user_model(),
        "api_key_id": ApiKey,
        "provider_id": Provider,
        "model_id": CatalogModel,
        "deployment_id": Deployment,
    }
    existing: dict[str, set[int]] = {}
    for name, target in targets.items():
        ids = {getattr(data, name) for data in rows} - {None}
        existing[name] = set(target.objects.filter(pk__in=ids).values_list("pk", flat=True)) if ids else set()
    heirs = api_key_heirs({data.api_key_id for data in rows} - {None} - existing["api_key_id"])
    kept = []
    for data in rows:
        values = {name: getattr(data, name) for name in targets}
        gone: dict[str, int | None] = {
            name: None for name, value in values.items() if value is not None and value not in existing[name]
        }
        if "api_key_id" in gone:
            gone["api_key_id"] = heirs.get(data.api_key_id)
        kept.append(replace(data, **gone) if gone else data)
    return kept


def last_used_forget_local() -> None:
    """This process forgets when it last wrote each key's ``last_used_at``: for tests, whose keys reuse the
    ids of an emptied database's rows, and whose first use must be written, not skipped as a repeat."""
    _last_used_written.clear()


def _touch_key(api_key_id: int | None) -> None:
    if api_key_id is None:
        return
    now = time.monotonic()
    if now - _last_used_written.get(api_key_id, 0.0) < LAST_USED_RESOLUTION:
        return
    _last_used_written[api_key_id] = now
    ApiKey.objects.filter(pk=api_key_id).update(last_used_at=timezone.now())
