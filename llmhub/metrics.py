"""``/metrics``: Prometheus's scrape of every worker process of this server, and the state that lives in apps.

What a scrape returns (``docs/metrics.md`` lists every metric):

- the request metrics every worker wrote into ``PROMETHEUS_MULTIPROC_DIR`` (``core.metrics``), summed over
  the workers by prometheus-client's ``MultiProcessCollector``, whichever worker answers (the answering worker
  writes its own queued requests first; the others write theirs every second, so a scrape may miss the last
  second of another worker's requests, never count one twice);
- the breaker of each enabled deployment (``llmhub_breaker_state``: 0 closed, 1 half-open, 2 open): with
  ``REDIS_URL`` as every process shares it (one pipelined round trip), else as this process decided it; an
  admin's override (``Deployment.breaker_override``) wins, as it does for routing;
- the ledger spool: rows waiting to be replayed and their bytes (one file shared by every process);
- the background tasks celery beat schedules: when a worker last finished each with success, and whether it
  is overdue (``billing.selectors_ops.ops_periodic_tasks``: the database every process shares);
- the ledger's queue (rows submitted, not yet committed): a per-process value, set each second by a sampler
  in every worker (``core.metrics.sampler_register``) so that the scrape sums the live workers.

Protected: a scrape needs ``Authorization: Bearer <LLMHUB_METRICS_TOKEN>`` or a client address within
``LLMHUB_METRICS_ALLOWED_IPS`` (the client's, not that of a proxy uvicorn does not trust:
``_client_address``). A missing or wrong token is 401 (with ``WWW-Authenticate: Bearer``); an
address not allowed, 403; with neither setting, every scrape is 403. Served by the
lean handler (``LLMHUB_MIDDLEWARE_FREE_PREFIXES``): no session or CSRF, and no Host check, since Prometheus
scrapes a worker's own address.

Wiring, not domain: it reads ``providers`` and ``billing`` state, which ``core`` must not import."""

from __future__ import annotations

import glob
import hmac
import ipaddress
import logging
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, connections
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_safe

from billing.selectors_ops import ops_periodic_tasks
from billing.services import ledger
from billing.services.spool import SpoolTally
from core import metrics as core_metrics
from providers.models import Deployment
from providers.routing.breaker_machine import HALF_OPEN, OPEN
from providers.routing.breakers import breaker_states

logger = logging.getLogger("llmhub.metrics")

BREAKER_VALUES = {"closed": 0, HALF_OPEN: 1, OPEN: 2}


# ACCESS


@lru_cache(maxsize=8)
def _networks(allowed: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for entry in allowed:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            logger.error("LLMHUB_METRICS_ALLOWED_IPS: %r is not an address or a network; ignored", entry)
    return tuple(networks)


def _client_address(request: HttpRequest) -> str:
    """The address the allow-list judges: the connection's, which uvicorn's ``--proxy-headers`` has already
    replaced with the client a trusted proxy names (``--forwarded-allow-ips``). Empty when the request came
    through a proxy uvicorn does not trust: the connection is then the proxy's own, on the private network an
    operator allow-lists for Prometheus, and every client of that proxy would pass as it. Told by the proxy's
    headers: ``X-Forwarded-For`` whose last hop is not the address uvicorn kept (a trusted proxy's hop is), or
    ``Forwarded``, which uvicorn does not read."""
    address = request.META.get("REMOTE_ADDR", "")
    forwarded_for = request.headers.get("X-Forwarded-For")
    if forwarded_for is not None:
        return address if forwarded_for.rsplit(",", 1)[-1].strip() == address else ""
    if "Forwarded" in request.headers:
        return ""
    return address


def _address_allowed(address: str) -> bool:
    allowed = tuple(settings.LLMHUB_METRICS_ALLOWED_IPS)
    if not allowed or not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in _networks(allowed))


def _refusal(request: HttpRequest) -> HttpResponse | None:
    """None when the scrape may proceed; else the answer to it."""
    token = settings.LLMHUB_METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, presented = header.partition(" ")
        if token and scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode()):
            return None
        return _refused(401, "The metrics token is wrong.")
    if _address_allowed(_client_address(request)):
        return None
    if token:
        return _refused(401, "Scraping the metrics needs `Authorization: Bearer <LLMHUB_METRICS_TOKEN>`.")
    if settings.LLMHUB_METRICS_ALLOWED_IPS:
        return _refused(403, "This address may not scrape the metrics (LLMHUB_METRICS_ALLOWED_IPS).")
    return _refused(403, "Metrics are not open to scrapes: set LLMHUB_METRICS_TOKEN or LLMHUB_METRICS_ALLOWED_IPS.")


def _refused(status: int, message: str) -> HttpResponse:
    response = HttpResponse(message + "\n", status=status, content_type="text/plain; charset=utf-8")
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    response["Cache-Control"] = "no-store"
    return response


# THE VIEW


@require_safe
async def metrics_view(request: HttpRequest) -> HttpResponse:
    if not core_metrics.metrics_enabled():
        return HttpResponse("Metrics are off (LLMHUB_METRICS_ENABLED).\n", status=404, content_type="text/plain")
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    # Reading the workers' files, the database and Redis: in a thread of its own, not the event loop's, nor the
    # thread the /v1 requests' ORM calls share (a slow database delays a scrape, never a request).
    body, content_type = await sync_to_async(_exposition, thread_sensitive=False)(request.headers.get("Accept", ""))
    return HttpResponse(body, content_type=content_type, headers={"Cache-Control": "no-store"})


def _exposition(accept: str) -> tuple[bytes, str]:
    from prometheus_client import CollectorRegistry, exposition

    try:
        core_metrics.metrics_sample()  # this process's queued requests and ledger queue, up to now
        _forget_dead_workers()
        _database_reads_bounded()
        registry = CollectorRegistry()
        _worker_files_collector()(registry)
        registry.register(AppStateCollector())
        encoder, content_type = exposition.choose_encoder(accept)
        return encoder(registry), content_type
    finally:
        connections.close_all()


# The most each read of the database a scrape makes may take (PostgreSQL's statement timeout, lock waits included):
# the deployments for the breakers, the schedules and the task runs, three reads well within Prometheus's default
# scrape timeout of 10 s.
DATABASE_READ_SECONDS = 2


def _database_reads_bounded() -> None:
    """Give up each read of this scrape's connection (this thread's, closed at the scrape's end) after
    ``DATABASE_READ_SECONDS``: a table locked by a migration or a VACUUM FULL, or a database too slow to answer,
    costs the scrape the families read from it (each logged, and absent from the answer), not every metric of the
    server, which a scrape hanging past Prometheus's timeout lost (until 7 December: waited for as long as the lock
    was held). SQLite's readers wait for no lock (WAL). A database that cannot be reached fails each read at once."""
    if connection.vendor != "postgresql":
        return
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SET statement_timeout = {DATABASE_READ_SECONDS * 1000}")
    except Exception as exc:
        logger.warning("metrics: could not bound the scrape's database reads (%s)", type(exc).__name__)


@lru_cache(maxsize=1)
def _worker_files_collector() -> type:
    """Built on first use, as prometheus-client is imported everywhere here: after the settings."""
    from prometheus_client import multiprocess

    class WorkerFilesCollector(multiprocess.MultiProcessCollector):
        """prometheus-client's collector of the workers' files, without the two ways a file in the directory
        can fail a scrape (a 500): a file a worker has created but not sized yet (``MmapedDict`` opens it, then
        truncates it to its size: a worker killed in between leaves it empty for good), and a dead worker's
        gauge file removed between listing the directory and reading it (``_forget_dead_workers``)."""

        def collect(self) -> Any:
            for _attempt in range(2):
                try:
                    return self.merge(self._readable_files(), accumulate=True)
                except FileNotFoundError:
                    continue
            return self.merge(self._readable_files(), accumulate=True)

        def _readable_files(self) -> list[str]:
            return [path for path in glob.glob(os.path.join(self._path, "*.db")) if _has_header(path)]

    return WorkerFilesCollector


def _has_header(path: str) -> bool:
    """Whether a worker's file holds at least its header (the bytes in use, 8 once written)."""
    try:
        return os.stat(path).st_size >= 8
    except FileNotFoundError:
        return False


def _forget_dead_workers() -> None:
    """Live gauges (in flight, ledger queue) of worker processes that are gone (killed, or restarted by their
    master: no hook tells us) are dropped, so that a dead worker's last value is not summed for ever. Its
    counters stay: what it counted happened."""
    from prometheus_client import multiprocess

    directory = Path(os.environ[core_metrics.ENV])
    pids = {path.stem.rsplit("_", 1)[-1] for path in directory.glob("gauge_live*_*.db")}
    for pid in pids:
        if pid.isdigit() and core_metrics._process_identity(int(pid)) is None:
            multiprocess.mark_process_dead(int(pid), str(directory))


class AppStateCollector:
    """Metrics read at scrape time from state that lives in apps (shared by every worker, or read by this one)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        breakers = GaugeMetricFamily(
            "llmhub_breaker_state",
            "Circuit breaker of each enabled deployment: 0 closed, 1 half-open, 2 open (an admin's override counts).",
            labels=["model", "deployment", "provider"],
        )
        try:
            for labels, value in _breaker_values():
                breakers.add_metric(labels, value)
        except Exception:
            logger.exception("metrics: could not read the circuit breakers")
        yield breakers

        rows, size = _spool_contents()
        yield GaugeMetricFamily(
            "llmhub_ledger_spooled_rows",
            "Ledger rows waiting in the spool (the database refused them) to be replayed.",
            value=rows,
        )
        yield GaugeMetricFamily("llmhub_ledger_spool_bytes", "Bytes of the ledger spool.", value=size)

        last_success = GaugeMetricFamily(
            "llmhub_periodic_task_last_success_timestamp_seconds",
            "When a worker last finished each scheduled task with success (Unix time); absent: never.",
            labels=["task"],
        )
        overdue = GaugeMetricFamily(
            "llmhub_periodic_task_overdue",
            "1 when no run of a scheduled task succeeded within twice its interval and a grace (a crontab task: "
            "since its last due time), else 0.",
            labels=["task"],
        )
        try:
            for task, (succeeded_at, late) in _periodic_task_values().items():
                if succeeded_at is not None:
                    last_success.add_metric([task], succeeded_at)
                overdue.add_metric([task], late)
        except Exception:
            logger.exception("metrics: could not read the periodic tasks")
        yield last_success
        yield overdue


def _periodic_task_values() -> dict[str, tuple[float | None, float]]:
    """Per task path (two schedules may run the same task, a label set must appear once): the latest success
    and 1 if any of its schedules finds it overdue."""
    values: dict[str, tuple[float | None, float]] = {}
    for row in ops_periodic_tasks(now=timezone.now()):
        succeeded_at = row.last_success_at.timestamp() if row.last_success_at is not None else None
        previous_at, previous_late = values.get(row.task, (None, 0.0))
        if previous_at is not None and (succeeded_at is None or previous_at > succeeded_at):
            succeeded_at = previous_at
        values[row.task] = (succeeded_at, max(previous_late, float(row.overdue)))
    return values


def _breaker_values() -> list[tuple[list[str], float]]:
    deployments = list(
        Deployment.objects.filter(enabled=True).values_list(
            "id", "name", "model__name", "provider__name", "breaker_override"
        )
    )
    states = breaker_states([row[0] for row in deployments])
    values = []
    for deployment_id, name, model, provider, override in deployments:
        state = override or states[deployment_id].state
        values.append(([model, name or provider, provider], float(BREAKER_VALUES.get(state, 0))))
    return values


# The spool's rows, counted from what was appended since the last scrape (the spool can grow large during a
# database outage, and a scrape comes every 15 s).
_spool_tally = SpoolTally()


def _spool_contents() -> tuple[int, int]:
    """Rows (lines) and bytes in the spool and in the files being replayed; read without the spool's lock."""
    return _spool_tally.counts()


def _ledger_queue_sample() -> None:
    gauge = core_metrics.ledger_queue_gauge()
    if gauge is not None:
        gauge.set(len(ledger._unwritten))


core_metrics.sampler_register(_ledger_queue_sample)
