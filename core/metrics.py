"""Prometheus metrics: what every request did, counted in this process and read by ``/metrics`` across all of
a server's worker processes (``llmhub/metrics.py`` serves them; ``docs/metrics.md`` lists them).

Multi-process: prometheus-client's multiprocess mode. Each process writes its counters, histograms and gauges
into memory-mapped files of its own in one directory (``PROMETHEUS_MULTIPROC_DIR``), and a scrape, whichever
worker answers it, sums the files of every process. prometheus-client picks its storage when it is first
imported, from that environment variable, so the variable must be set before then: the settings set it
(``metrics_directory_choose``), and nothing of ours imports prometheus-client before the settings have loaded.
The directory is emptied when a new server starts on it (``_directory_prepare``): a marker names the process
that owns it (the uvicorn master of a ``--workers`` server, or the one server process), and files left by an
owner that is gone would otherwise add an earlier run's counts to this one's: a new owner removes the files of the
processes that are gone (``_writer_alive``), and keeps those of live processes that share the directory.

Cost on the hot path (``request_metrics_record``): one append to a queue. A thread of each process drains it
every ``FLUSH_SECONDS`` (and the process answering a scrape drains its own first), summing the queued requests
per label tuple before it writes to the mmap files: a write costs about a microsecond, a request touches a
dozen series, and a second's requests share a few dozen writes. Nothing at all when ``LLMHUB_METRICS_ENABLED``
is off: not even prometheus-client is imported.

Label values are bounded: model, deployment and provider names come from the catalog (a request for a model
that does not exist is counted with an empty model), operation, transport, status and the rejection's reason
from our own vocabularies. No request id, user or key is ever a label.

``core`` imports no app: state that lives in apps (breakers, the ledger's queue, the spool) is read by
collectors in ``llmhub/metrics.py``, which registers a sampler here for per-process values that must be
summed across workers (``sampler_register``)."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import multiprocessing
import os
import shutil
import threading
import time
from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.core.signals import setting_changed
from django.dispatch import receiver

if TYPE_CHECKING:
    from .telemetry import RequestObservation

logger = logging.getLogger("llmhub.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
OWNER_FILE = ".owner"
LOCK_FILE = ".lock"

# Seconds: whole requests, the first token, and llmhub's own share (sub-ms). A stream runs as long as it writes (only
# its idle time is bounded: a long reply at a few dozen tokens a second takes ten minutes and more), and its first
# token may come as late as the request's deadline (LLMHUB_REQUEST_DEADLINE_SECONDS, 300 s by default: a reasoning
# model writes nothing until it has thought, a minute or more). A value past the last finite bucket is counted in
# +Inf only, and a quantile over it reads as that bucket's bound: until 7 December the first token's stopped at 30 s
# and a request's at 300 s, and a p95 of two minutes read as 30 s.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


# THE DIRECTORY


def _process_identity(pid: int) -> str | None:
    """``pid:start time`` (clock ticks since boot, from /proc): a pid reused by another process gets another
    identity. None when no such process lives."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        stat = ""
    if stat:
        # The command name (field 2) is in parentheses and may hold spaces: fields are counted after it.
        fields = stat.rsplit(")", 1)[1].split()
        return f"{pid}:{fields[19]}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return f"{pid}:"


def _owner_pid() -> int:
    """The process a server's metrics belong to: a uvicorn worker's master (workers are started with
    ``multiprocessing``; their parent is the master) or, for a single-process server, this process."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getpid()


def metrics_directory_choose(root: Path) -> str:
    """The multiprocess directory, set in ``PROMETHEUS_MULTIPROC_DIR`` for prometheus-client (called by the
    settings, before anything imports it). The operator's (Docker: a tmpfs) when set; else one per server run
    under ``root``, named for the run's owner (so the workers of one ``uvicorn --workers`` share it)."""
    chosen = os.environ.get(ENV)
    if not chosen:
        chosen = str(root / f"run-{_owner_pid()}")
        os.environ[ENV] = chosen
    return chosen


def _directory_prepare(directory: Path) -> None:
    """Create the directory; empty it if the server that owned it is gone (a new run, or a restarted container),
    and leave it as it is when its owner lives (another worker of the same server, or a second process an
    operator points at the same directory on purpose). Under a ``flock``: the workers start together.
    Also removes sibling ``run-*`` directories (see ``metrics_directory_choose``) whose owners are gone
    (``_sibling_sweep``)."""
    owner = _process_identity(_owner_pid())
    with _directory_locked(directory):
        marker = directory / OWNER_FILE
        try:
            recorded = marker.read_text().strip()
        except FileNotFoundError:
            recorded = ""
        if recorded != owner and not _identity_alive(recorded):
            for stale in directory.glob("*.db"):
                if not _writer_alive(stale):
                    stale.unlink(missing_ok=True)
            marker.write_text(f"{owner}\n")
    if directory.name.startswith("run-"):
        _sibling_sweep(directory)


@contextlib.contextmanager
def _directory_locked(directory: Path, *, attempts: int = 10):
    """The directory, created if need be, under its ``flock``. A sibling's sweep may remove the directory between
    its creation and the lock, or while this process waits for the lock (``_sibling_sweep`` removes it holding
    that lock): the lock is then on a file no longer in the directory, and the directory is made again."""
    for _ in range(attempts):
        directory.mkdir(parents=True, exist_ok=True)
        try:
            lock = open(directory / LOCK_FILE, "a")  # closed below, after the caller's block
        except FileNotFoundError:
            continue  # removed after the mkdir
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                held = os.fstat(lock.fileno()).st_ino == os.stat(directory / LOCK_FILE).st_ino
            except FileNotFoundError:
                held = False
            if held:
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
                return
            fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            lock.close()
    raise OSError(f"metrics directory {directory} kept being removed while it was prepared")


def _sibling_sweep(directory: Path) -> None:
    """Remove the ``run-*`` siblings of ``directory`` nobody uses, each under its own lock, taken without waiting:
    a sibling whose lock is held is being prepared right now (a server or worker starting in it, its marker not
    yet written) and is left; one unlocked is judged again under the lock, so a process that starts in it after
    the judgement waits for the removal and makes it again (``_directory_locked``)."""
    for sibling in directory.parent.glob("run-*"):
        if sibling == directory or not sibling.is_dir() or _directory_owned(sibling):
            continue
        try:
            lock = open(sibling / LOCK_FILE, "a")
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed by another server's sweep
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            try:
                if not _directory_owned(sibling):
                    shutil.rmtree(sibling, ignore_errors=True)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _writer_alive(path: Path) -> bool:
    """Whether the process that writes the metrics file ``path`` (prometheus-client names it ``<kind>_<pid>.db``)
    lives. A new owner removes the files of the processes that are gone, not the files of processes that share the
    directory and live: a process the directory was handed to (a server a test starts, a Celery worker) that
    prepared it first leaves its own identity in the marker, and the process that chose the directory, still writing
    its files there, may never have written its own (the marker named a live process when it prepared); once the
    first is gone, the next process to prepare the directory emptied the live one's files with the rest, and its
    metrics were gone from every scrape after (a full-suite run's access test found a scrape of no worker's file)."""
    pid = path.stem.rsplit("_", 1)[-1]
    return pid.isdigit() and int(pid) != 0 and _process_identity(int(pid)) is not None


def _identity_alive(identity: str) -> bool:
    if not identity or ":" not in identity:
        return False
    pid = identity.split(":", 1)[0]
    return pid.isdigit() and _process_identity(int(pid)) == identity


def _directory_owned(directory: Path) -> bool:
    """Whether a ``run-<pid>`` sibling is in use: its marker's owner lives, or the process it is named for does.
    The name counts even under a marker of a dead owner: a process the directory was handed to (its environment's
    ``PROMETHEUS_MULTIPROC_DIR``: a Celery worker, a server a test starts) takes it over when the marker is missing
    or stale and leaves its own identity there when it exits, while the process that chose the directory still
    writes and reads it (a test worker's scrape found its directory removed)."""
    try:
        if _identity_alive((directory / OWNER_FILE).read_text().strip()):
            return True
    except (FileNotFoundError, NotADirectoryError):
        pass  # no marker yet: a server may be starting in it right now
    pid = directory.name.removeprefix("run-")
    return pid.isdigit() and _process_identity(int(pid)) is not None


# THE METRICS


class _Metrics:
    """Every metric of this process, built once (prometheus-client then holds their files open)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram, values

        if not getattr(values.ValueClass, "_multiprocess", False):
            logger.warning(
                "prometheus-client was imported before %s was set: this process's metrics will not reach /metrics",
                ENV,
            )
        where = ("model", "deployment", "provider")
        self.requests = Counter(
            "llmhub_requests",
            "Requests settled or refused, by what answered and how they ended (status as the ledger says it).",
            [*where, "operation", "transport", "status"],
            registry=None,
        )
        self.duration = Histogram(
            "llmhub_request_duration_seconds",
            "Whole request, from arrival to the last byte (streams: to their end); refused requests are not timed.",
            [*where, "operation", "transport"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.ttft = Histogram(
            "llmhub_time_to_first_token_seconds",
            "Streams: from arrival to the first token sent to the client.",
            [*where, "transport"],
            buckets=TTFT_BUCKETS,
            registry=None,
        )
        self.overhead = Histogram(
            "llmhub_overhead_seconds",
            "llmhub's own share of a request: its duration less the time spent waiting for the provider.",
            ["model", "operation", "transport"],
            buckets=OVERHEAD_BUCKETS,
            registry=None,
        )
        self.tokens = Counter(
            "llmhub_tokens", "Tokens in (prompt) and out (completion).", [*where, "direction"], registry=None
        )
        self.cost = Counter(
            "llmhub_cost_usd",
            "Cost in USD as the ledger priced it (a float: the ledger is the exact record).",
            [*where, "operation"],
            registry=None,
        )
        self.attempts = Counter(
            "llmhub_upstream_attempts",
            "Calls to a deployment, by outcome (ok, failure, neutral) and the failure's code.",
            [*where, "outcome", "error_type"],
            registry=None,
        )
        self.retries = Counter(
            "llmhub_retries",
            "Upstream calls after a request's first (another deployment, the same one again, or a fallback).",
            ["model"],
            registry=None,
        )
        self.fallbacks = Counter(
            "llmhub_fallbacks",
            "Requests answered (or last tried) by another model than the one first tried.",
            ["model", "fallback_model"],
            registry=None,
        )
        self.rejections = Counter(
            "llmhub_rejections",
            "Requests refused before any upstream call, by reason: rate_limit_exceeded, insufficient_quota "
            "(budgets and token quotas), model_not_allowed, billing_unavailable, …",
            ["model", "reason", "transport"],
            registry=None,
        )
        self.inflight = Gauge(
            "llmhub_requests_in_flight",
            "Requests admitted whose run has not settled yet, summed over live worker processes.",
            [],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.ledger_queue = Gauge(
            "llmhub_ledger_queue_rows",
            "Ledger rows submitted and not yet committed, summed over live worker processes (sampled each second).",
            [],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.ledger_spilled = Counter(
            "llmhub_ledger_spilled_rows",
            "Ledger rows sent to the spool because the queue passed LLMHUB_LEDGER_QUEUE_MAX (the database wrote "
            "slower than requests came); the replay writes them.",
            [],
            registry=None,
        )
        self.ledger_set_aside = Counter(
            "llmhub_ledger_set_aside_rows",
            "Ledger rows the database refused for their own values, even clamped: set aside in the spool's "
            ".unreadable file for a person, not retried.",
            [],
            registry=None,
        )

        self.responses_not_stored = Counter(
            "llmhub_responses_not_stored",
            "Responses of /v1/responses asked to be stored (`store`) that could not be kept (the database refused "
            "or was down): answered all the same, with `store` false.",
            [],
            registry=None,
        )

    def write(self, batch: list[RequestObservation]) -> None:
        """Add ``batch`` to the metrics: summed per label tuple first, then one write per series and bucket (a
        write into the mmap file costs about a microsecond; a second's requests share a few dozen)."""
        requests: dict[tuple[str, ...], float] = defaultdict(float)
        rejections: dict[tuple[str, ...], float] = defaultdict(float)
        tokens: dict[tuple[str, ...], float] = defaultdict(float)
        cost: dict[tuple[str, ...], float] = defaultdict(float)
        attempts: dict[tuple[str, ...], float] = defaultdict(float)
        retries: dict[tuple[str, ...], float] = defaultdict(float)
        fallbacks: dict[tuple[str, ...], float] = defaultdict(float)
        duration: dict[tuple[str, ...], list[float]] = {}
        overhead: dict[tuple[str, ...], list[float]] = {}
        ttft: dict[tuple[str, ...], list[float]] = {}
        empty_duration = [0.0] * (len(DURATION_BUCKETS) + 2)  # the sum, then a count per bucket (and +Inf)
        empty_overhead = [0.0] * (len(OVERHEAD_BUCKETS) + 2)
        empty_ttft = [0.0] * (len(TTFT_BUCKETS) + 2)

        for index, o in enumerate(batch):
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                time.sleep(0)  # let the event loop's thread have the GIL: a long batch must not stall requests
            where = (o.model, o.deployment, o.provider)
            requests[(*where, o.operation, o.transport, o.status)] += 1
            if o.status == "rejected":
                rejections[(o.model, o.error_type or "unknown", o.transport)] += 1
                continue
            key = (*where, o.operation, o.transport)
            series = duration.get(key) or duration.setdefault(key, empty_duration.copy())
            series[0] += o.duration
            series[1 + bisect_left(DURATION_BUCKETS, o.duration)] += 1
            if o.overhead is not None:
                key = (o.model, o.operation, o.transport)
                series = overhead.get(key) or overhead.setdefault(key, empty_overhead.copy())
                series[0] += o.overhead
                series[1 + bisect_left(OVERHEAD_BUCKETS, o.overhead)] += 1
            if o.ttft is not None:
                key = (*where, o.transport)
                series = ttft.get(key) or ttft.setdefault(key, empty_ttft.copy())
                series[0] += o.ttft
                series[1 + bisect_left(TTFT_BUCKETS, o.ttft)] += 1
            if o.prompt_tokens:
                tokens[(*where, "input")] += o.prompt_tokens
            if o.completion_tokens:
                tokens[(*where, "output")] += o.completion_tokens
            if o.cost:
                cost[(*where, o.operation)] += float(o.cost)
            tried = o.attempts
            for attempt in tried:
                attempts[
                    (attempt.model, attempt.deployment, attempt.provider, attempt.outcome, attempt.error_type)
                ] += 1
            if len(tried) > 1:
                first = tried[0].model
                retries[(first,)] += len(tried) - 1
                if o.fell_back:
                    fallbacks[(first, tried[-1].model)] += 1

        for counter, series_of in (
            (self.requests, requests),
            (self.rejections, rejections),
            (self.tokens, tokens),
            (self.cost, cost),
            (self.attempts, attempts),
            (self.retries, retries),
            (self.fallbacks, fallbacks),
        ):
            for key, amount in series_of.items():
                counter.labels(*key).inc(amount)
        for histogram, series_of in ((self.duration, duration), (self.overhead, overhead), (self.ttft, ttft)):
            for key, (total, *buckets) in series_of.items():
                # What ``Histogram.observe`` does once per value (its sum, and the one bucket the value falls
                # in: multiprocess files hold buckets uncumulated), here once per batch.
                child = histogram.labels(*key)
                child._sum.inc(total)
                for index, amount in enumerate(buckets):
                    if amount:
                        child._buckets[index].inc(amount)


# None: metrics are off (LLMHUB_METRICS_ENABLED). Unset (_UNDECIDED) until the first call reads the settings.
_UNDECIDED: Any = object()
_metrics: _Metrics | None = _UNDECIDED
_built: _Metrics | None = None
_init_lock = threading.Lock()
_flush_lock = threading.Lock()
# Observations waiting for the next flush. Bounded: should the flusher stop, memory does not grow without end
# (the oldest are dropped, and the metrics undercount: the ledger is the exact record).
_pending: deque[RequestObservation] = deque(maxlen=500_000)
_inflight = 0
_inflight_lock = threading.Lock()
_samplers: list[Callable[[], None]] = []
_sampler_thread: threading.Thread | None = None
FLUSH_SECONDS = 1.0
YIELD_EVERY = 128  # observations summed between two releases of the GIL (a few hundred µs of work)


def metrics_enabled() -> bool:
    return _current() is not None


def _current() -> _Metrics | None:
    metrics = _metrics
    if metrics is _UNDECIDED:
        metrics = _init()
    return metrics


def _init() -> _Metrics | None:
    global _metrics, _built
    from django.conf import settings

    with _init_lock:
        if _metrics is not _UNDECIDED:
            return _metrics
        if not getattr(settings, "LLMHUB_METRICS_ENABLED", True) or not os.environ.get(ENV):
            _metrics = None
            return None
        if _built is None:
            _directory_prepare(Path(os.environ[ENV]))
            _built = _Metrics()
            atexit.register(_process_exiting)
        _metrics = built = _built
        _sampler_start()
        return built


def metrics_settings_changed() -> None:
    """Read ``LLMHUB_METRICS_ENABLED`` again at the next call (tests that switch metrics off and on). The
    metrics built before are kept for when they are switched on again."""
    global _metrics
    with _init_lock:
        _metrics = _UNDECIDED


@receiver(setting_changed)
def _setting_changed(*, setting: str, **kwargs: object) -> None:
    if setting == "LLMHUB_METRICS_ENABLED":
        metrics_settings_changed()


def request_metrics_record(observation: RequestObservation) -> None:
    """Count and time one request (settled or refused): queued here, written by ``metrics_flush`` (every
    ``FLUSH_SECONDS`` in a thread of this process, before this process answers a scrape, and at exit). The
    request pays for one append. Never raises into the request (``core.telemetry``)."""
    metrics = _metrics
    if metrics is _UNDECIDED:
        metrics = _init()
    if metrics is not None:
        _pending.append(observation)


def inflight_add(delta: int) -> None:
    """The requests-in-flight gauge: +1 when a run begins, -1 when it settles (written at the next flush)."""
    global _inflight
    metrics = _metrics
    if metrics is _UNDECIDED:
        metrics = _init()
    if metrics is not None:
        with _inflight_lock:
            _inflight += delta


def metrics_flush() -> None:
    """Write what this process queued since the last flush into its metrics files. Never raises."""
    metrics = _metrics
    if metrics is None or metrics is _UNDECIDED:
        return
    with _flush_lock:
        batch = []
        try:
            while True:
                batch.append(_pending.popleft())
        except IndexError:
            pass
        try:
            metrics.inflight.set(_inflight)
            if batch:
                metrics.write(batch)
        except Exception:
            logger.exception("metrics: %d request(s) could not be written", len(batch))


# PER-PROCESS VALUES READ FROM APPS


def ledger_queue_gauge() -> Any | None:
    """The ledger-queue gauge of this process (None when metrics are off), for the sampler that sets it."""
    metrics = _current()
    return None if metrics is None else metrics.ledger_queue


def ledger_spilled_add(rows: int) -> None:
    """Count ledger rows spilled from a full queue to the spool. Never raises (the rows are spooled already)."""
    try:
        metrics = _current()
        if metrics is not None:
            metrics.ledger_spilled.inc(rows)
    except Exception:
        logger.exception("metrics: %d spilled ledger rows could not be counted", rows)


def ledger_set_aside_add(rows: int) -> None:
    """Count ledger rows set aside for a person (``ledger_rows``). Never raises (the rows are on disk already)."""
    try:
        metrics = _current()
        if metrics is not None:
            metrics.ledger_set_aside.inc(rows)
    except Exception:
        logger.exception("metrics: %d set-aside ledger rows could not be counted", rows)


def responses_not_stored_add() -> None:
    """Count a response of /v1/responses that could not be stored (``chat.api_responses``). Never raises."""
    try:
        metrics = _current()
        if metrics is not None:
            metrics.responses_not_stored.inc()
    except Exception:
        logger.exception("metrics: a response not stored could not be counted")


def sampler_register(sampler: Callable[[], None]) -> None:
    """Run ``sampler`` every ``FLUSH_SECONDS`` in a daemon thread of this process once metrics are in use (the
    thread starts with the first request or scrape): for values that live in one process and must be summed
    across workers (a scrape reaches one worker only). Registering starts nothing: a management command that
    loads the URLs leaves no thread and no metrics directory behind."""
    if sampler not in _samplers:
        _samplers.append(sampler)


def _sampler_start() -> None:
    global _sampler_thread
    if _sampler_thread is not None and _sampler_thread.is_alive():
        return
    _sampler_thread = threading.Thread(target=_sample_forever, name="llmhub-metrics-sampler", daemon=True)
    _sampler_thread.start()


def _sample_forever() -> None:
    while True:
        metrics_sample()
        time.sleep(FLUSH_SECONDS)


def metrics_sample() -> None:
    """Flush the queued requests and run the samplers: every ``FLUSH_SECONDS``, and before a scrape."""
    if _metrics is None or _metrics is _UNDECIDED:
        return
    metrics_flush()
    for sampler in list(_samplers):
        try:
            sampler()
        except Exception:
            logger.exception("metrics: a sampler failed")


def _process_exiting() -> None:
    """What this process queued is written; its live gauges (in flight, ledger queue) stop counting once it
    is gone. Not under uvicorn, which ends the process by raising the stop signal again (no ``atexit`` handler
    runs): its lifespan's shutdown flushes (``llmhub.lifespan``), and the next scrape drops its live gauges."""
    metrics_flush()
    with contextlib.suppress(Exception):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
