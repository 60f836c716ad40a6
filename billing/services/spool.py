"""The ledger spool on disk: rows the database could not take, one JSON object a line.

One file (``LLMHUB_LEDGER_SPOOL``) shared by every process that writes or replays it, rather than a file
per process: a process that dies leaves nothing only it could replay, and whichever process sees the
database first (a server's spool watcher, the beat task, a start-up) replays every row. Three
operations share it, coordinated with ``flock`` on a lock file beside it (the spool itself is renamed,
so it cannot carry the lock):

- append (``spool_append``): under the lock, short.
- claim (``spool_claim``): under the lock, the spool is renamed to a claimed file that only the claimer
  replays, holding a lock of its own on it for as long as it does. A claimed file no process holds any
  more (its replayer died) is claimed again by the next replayer.
- read (``spool_rows``, ``spool_rows_each``; ``SpoolIndex`` once per sweep or reconciliation run): under
  the lock, the spool and every claimed file, for reconciliation to count spend that is on its way to the
  ledger, and for the lost-request sweep to find a dead process's rows. A claimed file is unlinked only
  after its rows are committed (or appended back to the spool), so a row is always in the ledger, in a
  file, or both; readers drop rows whose request id the ledger already has.

A line that holds no row (a write torn by a crash or a full disk, which the next append then runs on
from) is set aside by the replay in ``<spool>.unreadable`` for a person to look at (``spool_set_aside``), and
skipped by readers: the rows around it are replayed and counted as any others, not held back behind it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, BinaryIO

from django.conf import settings

CLAIMED_INFIX = ".replaying-"
UNREADABLE_SUFFIX = ".unreadable"


def spool_path() -> Path:
    return Path(settings.LLMHUB_LEDGER_SPOOL)


def spool_line_row(line: str) -> dict[str, Any] | None:
    """The row a spooled line holds, or None for a line that holds none (torn, or not a JSON object)."""
    try:
        raw = json.loads(line)
    except ValueError:
        return None
    return raw if isinstance(raw, dict) else None


def spool_set_aside(line: str) -> Path:
    """Keep a line no replay can write in ``<spool>.unreadable`` (on disk before this returns), out of the
    spool's way; returns that file's path."""
    path = spool_path()
    aside = path.with_name(path.name + UNREADABLE_SUFFIX)
    with _locked(path, fcntl.LOCK_EX), open(aside, "a", encoding="utf-8") as kept:
        kept.write(line + "\n")
        kept.flush()
        os.fsync(kept.fileno())
    return aside


@contextlib.contextmanager
def _locked(path: Path, mode: int) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def spool_append(lines: Iterable[str]) -> None:
    """Append JSON lines to the spool, on disk (fsync) before this returns. A line at a time, through the
    file's buffer: a spill of thousands of rows (``ledger._spill_start``) never holds its whole text, which
    in a worker thread's own malloc arena stayed in the process's memory after it was freed (12 MB more
    per 5,000-row spill, until each of the executor's threads had held one)."""
    lines = iter(lines)
    first = next(lines, None)
    if first is None:
        return
    path = spool_path()
    with _locked(path, fcntl.LOCK_EX), open(path, "a", encoding="utf-8") as spool:
        spool.write(first + "\n")
        for line in lines:
            spool.write(line)
            spool.write("\n")
        spool.flush()
        os.fsync(spool.fileno())


def spool_pending() -> bool:
    """Whether any row waits in the spool or in a claimed file."""
    path = spool_path()
    try:
        # Read without the lock: another process may claim (rename) the file between any two looks at it.
        waiting = path.stat().st_size > 0
    except FileNotFoundError:
        waiting = False
    return waiting or any(_claimed_files(path))


def spool_size_bytes() -> int:
    """The bytes waiting in the spool and in claimed files, from ``stat`` alone (no lock, no reading): cheap
    enough for a readiness probe however large an outage has made the spool."""
    path = spool_path()
    size = 0
    for name in [path, *_claimed_files(path)]:
        try:
            size += name.stat().st_size
        except FileNotFoundError:
            continue  # claimed, or replayed and unlinked, between the listing and the look
    return size


# The first bytes of a file a ``SpoolTally`` keeps, to know it for the same file at its next count: an inode is
# given again once its file is gone (a replayed file unlinked, the next append creating the spool anew).
_TALLY_HEAD = 4096


@dataclass(slots=True)
class _Tallied:
    size: int  # bytes counted, from the file's start
    rows: int  # the lines among them
    head: bytes


class SpoolTally:
    """The rows (lines) and bytes waiting in the spool and in the claimed files (``/metrics``), counted as they are
    appended rather than read whole at every count: a spool grown in a database outage is megabytes, and Prometheus
    scrapes every 15 s. Each file, known by its device and inode (the spool renamed to a claimed file is the same
    file, not read again), is read on from where its last count ended; it is counted afresh when it is shorter than
    that (truncated) or its first bytes differ (rewritten, or another file given the inode of one gone). Read
    without the spool's lock: a line being written is counted with its newline, at the next count. One a process,
    for every thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[tuple[int, int], _Tallied] = {}

    def counts(self) -> tuple[int, int]:
        """Rows and bytes in the spool and the claimed files now."""
        path = spool_path()
        rows = size = 0
        with self._lock:
            files: dict[tuple[int, int], _Tallied] = {}
            for name in [path, *_claimed_files(path)]:
                try:
                    handle = open(name, "rb")
                except FileNotFoundError:
                    continue  # claimed, or replayed and unlinked, between the listing and the read
                with handle:
                    stat = os.fstat(handle.fileno())
                    key = (stat.st_dev, stat.st_ino)
                    if key in files:
                        continue  # renamed between the listing and the open: counted under its other name
                    files[key] = tallied = _tally(handle, self._files.get(key), stat.st_size)
                rows += tallied.rows
                size += tallied.size
            self._files = files  # the files gone are forgotten
        return rows, size


def _tally(handle: BinaryIO, before: _Tallied | None, size: int) -> _Tallied:
    """The file's count: ``before``'s, with the lines appended since; afresh when ``before`` is not of this file."""
    head = handle.read(min(size, _TALLY_HEAD))
    if before is None or size < before.size or head[: len(before.head)] != before.head:
        before = _Tallied(0, 0, b"")
    handle.seek(before.size)
    rows, counted = before.rows, before.size
    while block := handle.read(1 << 20):
        rows += block.count(b"\n")
        counted += len(block)
    return _Tallied(counted, rows, head)


def _claimed_files(path: Path) -> list[Path]:
    if not path.parent.exists():
        return []
    # Also the names an earlier llmhub gave the file it was replaying (``ledger-spool.replaying-<pid>``),
    # which nothing replayed again if that process died.
    patterns = {path.name + CLAIMED_INFIX + "*", path.stem + CLAIMED_INFIX + "*"}
    return sorted({name for pattern in patterns for name in path.parent.glob(pattern)})


@contextlib.contextmanager
def spool_claim() -> Iterator[list[IO[str]]]:
    """The files this process replays now, each held (flock) until the block ends, when they are unlinked:
    the spool as it stands (renamed, so appends from here on start a new one) and every claimed file whose
    replayer is gone. The block must have written their rows (or appended them back) before it ends."""
    path = spool_path()
    held: list[tuple[Path, IO[str]]] = []
    try:
        with _locked(path, fcntl.LOCK_EX):
            for claimed in _claimed_files(path):
                try:
                    handle = open(claimed, encoding="utf-8")
                except FileNotFoundError:
                    continue  # its replayer has just finished (it unlinks without this lock)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()  # a live replayer holds it
                    continue
                if os.fstat(handle.fileno()).st_nlink == 0:
                    handle.close()  # finished and unlinked between the open and the lock
                    continue
                held.append((claimed, handle))
            if path.exists():
                claimed = path.with_name(f"{path.name}{CLAIMED_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
                path.rename(claimed)
                handle = open(claimed, encoding="utf-8")
                fcntl.flock(handle, fcntl.LOCK_EX)
                held.append((claimed, handle))
        yield [handle for _, handle in held]
        for claimed, _ in held:
            claimed.unlink(missing_ok=True)
    finally:
        for _, handle in held:
            handle.close()


def spool_rows() -> list[dict[str, Any]]:
    """Every row waiting in the spool or in a claimed file (a row may appear twice: replay skips known
    ids, and so must a reader that sums them); a line that holds no row is skipped (the replay sets it
    aside)."""
    return list(spool_rows_each())


def spool_rows_each() -> Iterator[dict[str, Any]]:
    """``spool_rows`` a row at a time, the files read a line at a time (never one of them whole in memory).
    The shared lock is held until the iteration ends: consume it at once."""
    path = spool_path()
    with _locked(path, fcntl.LOCK_SH):
        yield from _rows_read(path)


def _rows_read(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of the spool and of the claimed files, under the caller's lock."""
    for name in [path, *_claimed_files(path)]:
        try:
            handle = open(name, encoding="utf-8")
        except FileNotFoundError:
            continue
        with handle:
            for line in handle:
                if line.strip() and (row := spool_line_row(line)) is not None:
                    yield row


@dataclass(frozen=True, slots=True)
class SpooledRow:
    """What the lost-request sweep and reconciliation read of a spooled row."""

    request_id: str
    user_id: int | None
    api_key_id: int | None
    created_at: datetime
    cost: Decimal
    prompt_tokens: int
    completion_tokens: int


class SpoolIndex:
    """The spooled rows for one run of the lost-request sweep or of reconciliation: read once, rather than
    once per lost request or per counter (after a long outage that was lost requests, or counters, times
    the spool's lines), and kept small (``SpooledRow``). Read again only when the files changed on disk since
    (an append, a claim, a replay's end: a file's name, inode, size or modification time differs), so that
    what a caller sees is what a fresh read would give it; nothing is read while the spool is empty."""

    def __init__(self) -> None:
        self._signature: tuple[tuple[str, int, int, int], ...] | None = None
        self._by_request: dict[str, SpooledRow] = {}
        self._by_key: dict[int, list[SpooledRow]] = {}
        self._by_user: dict[int, list[SpooledRow]] = {}
        self._heirs: dict[int, int] | None = None

    def row(self, request_id: str) -> SpooledRow | None:
        """The request's row (the first, if it was spooled twice)."""
        self._refresh()
        return self._by_request.get(request_id)

    def of_keys(self, key_ids: Iterable[int]) -> list[SpooledRow]:
        """The rows of these keys, each key's in file order."""
        self._refresh()
        return [row for key_id in key_ids for row in self._by_key.get(key_id, ())]

    def heirs(self, resolve: Callable[[set[int]], dict[int, int]]) -> dict[int, int]:
        """The heirs of the spooled rows' keys that were deleted (``resolve``: ``billing.selectors.api_key_heirs``),
        resolved once a read of the files, not once a counter."""
        self._refresh()
        if self._heirs is None:
            keys = {key_id for key_id in self._by_key if key_id is not None}
            self._heirs = resolve(keys) if keys else {}
        return self._heirs

    def of_user(self, user_id: int) -> list[SpooledRow]:
        self._refresh()
        return self._by_user.get(user_id, [])

    def _refresh(self) -> None:
        path = spool_path()
        if self._signature is not None and _files_signature(path) == self._signature:
            return
        by_request: dict[str, SpooledRow] = {}
        by_key: dict[int, list[SpooledRow]] = {}
        by_user: dict[int, list[SpooledRow]] = {}
        with _locked(path, fcntl.LOCK_SH):
            signature = _files_signature(path)
            for raw in _rows_read(path) if signature else ():
                try:
                    row = SpooledRow(
                        request_id=raw.get("request_id"),
                        user_id=raw.get("user_id"),
                        api_key_id=raw.get("api_key_id"),
                        created_at=datetime.fromisoformat(raw["created_at"]),
                        cost=Decimal(raw["cost"]),
                        prompt_tokens=int(raw.get("prompt_tokens") or 0),
                        completion_tokens=int(raw.get("completion_tokens") or 0),
                    )
                except (KeyError, TypeError, ValueError, ArithmeticError):
                    continue  # a JSON object that is no ledger row: one bad line must not stop every reader
                by_request.setdefault(row.request_id, row)
                by_key.setdefault(row.api_key_id, []).append(row)
                by_user.setdefault(row.user_id, []).append(row)
        self._signature, self._by_request, self._by_key, self._by_user = signature, by_request, by_key, by_user
        self._heirs = None


def _files_signature(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    """The spool's and the claimed files' names, inodes, sizes and modification times (empty files left out)."""
    signature = []
    for name in [path, *_claimed_files(path)]:
        try:
            stat = name.stat()
        except FileNotFoundError:
            continue
        if stat.st_size:
            signature.append((name.name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(signature)
