"""The circuit breaker of one deployment as a state machine: pure Python, no I/O.

``Machine`` is the in-process twin of the Redis scripts ``providers/redis_scripts/breaker_*.lua``: the same
fields, the same transitions, the same answers (``tests/providers/test_breakers_machine.py`` runs both
through one table of cases). Change one, change the other.

States: closed (calls go through; outcomes are counted), open (no calls until ``opened_until``), half-open
(open, cooldown over: one probe call goes through, claimed atomically; its outcome closes or re-opens).
Times are integers, milliseconds since the epoch, passed in by the caller (so a test can pin the clock,
and every process writes the same kind of instant into Redis).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

WINDOW_BUCKETS = 12  # the sliding window is kept as this many buckets (5 s each for a 60 s window)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failures: int  # consecutive failures that open a closed breaker
    error_rate: float  # % of failed calls in the window above which it opens...
    min_volume: int  # ...once the window holds at least this many calls
    window_ms: int
    cooldown_ms: int  # first opening; doubled after each failed probe
    max_cooldown_ms: int
    lease_ms: int  # a claimed probe that reports nothing for this long lets another one through
    buckets: int = WINDOW_BUCKETS

    @classmethod
    def from_settings(cls) -> BreakerConfig:
        return cls(
            failures=settings.LLMHUB_BREAKER_FAILURES,
            error_rate=float(settings.LLMHUB_BREAKER_ERROR_RATE),
            min_volume=settings.LLMHUB_BREAKER_MIN_VOLUME,
            window_ms=int(settings.LLMHUB_BREAKER_WINDOW_SECONDS * 1000),
            cooldown_ms=int(settings.LLMHUB_BREAKER_COOLDOWN_SECONDS * 1000),
            max_cooldown_ms=int(settings.LLMHUB_BREAKER_MAX_COOLDOWN_SECONDS * 1000),
            lease_ms=int(settings.LLMHUB_BREAKER_PROBE_LEASE_SECONDS * 1000),
        )

    def lua_args(self) -> list[str | int]:
        """ARGV[3:11] of the breaker scripts (``breaker_common.lua``)."""
        return [
            self.failures,
            repr(self.error_rate),
            self.window_ms,
            self.min_volume,
            self.cooldown_ms,
            self.max_cooldown_ms,
            self.lease_ms,
            self.buckets,
        ]

    @property
    def bucket_ms(self) -> int:
        return max(1, self.window_ms // self.buckets)


@dataclass(frozen=True, slots=True)
class BreakerView:
    """What every process keeps of a breaker to decide without I/O: its fields but the window, and the
    version of its last change (a message older than what a process already knows is ignored)."""

    state: str  # CLOSED or OPEN (half-open is OPEN with the cooldown over)
    failures: int
    opened_until: int
    cooldown: int
    probe_until: int
    version: int

    def leaves_out(self, now_ms: float) -> bool:
        """Open and cooling down, or half-open with its probe out: no call should go there now."""
        return now_ms < self.opened_until or now_ms < self.probe_until

    def phase(self, now_ms: float) -> str:
        if self.state != OPEN:
            return CLOSED
        return OPEN if now_ms < self.opened_until else HALF_OPEN

    @classmethod
    def parse(cls, fields: list) -> BreakerView:
        """From the scripts' [state, failures, opened_until, cooldown, probe_until, v]."""
        state, failures, opened_until, cooldown, probe_until, version = fields
        return cls(state, int(failures), int(opened_until), int(cooldown), int(probe_until), int(version))


@dataclass(frozen=True, slots=True)
class BreakerState:
    """A breaker as an admin sees it."""

    deployment_id: int
    state: str  # CLOSED, OPEN or HALF_OPEN
    failures: int  # consecutive failures so far (closed)
    opened_until: datetime | None  # open: when the cooldown ends and a probe may go through
    cooldown_seconds: float  # of the current opening, or of the next one
    probe_until: datetime | None  # half-open: the probe out holds its claim until then
    window_calls: int  # calls in the sliding window (closed)
    window_failures: int
    shared: bool  # kept in Redis (every process sees it) or in this process only

    def seconds_to_probe(self, now: datetime) -> float:
        """Open: seconds until the cooldown ends and a probe may go through; else 0."""
        if self.state != OPEN or self.opened_until is None:
            return 0.0
        return max(0.0, (self.opened_until - now).total_seconds())


def _instant(ms: int) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=UTC) if ms else None


class Machine:
    """One breaker's fields and transitions (the twin of ``breaker_*.lua``). Each transition returns
    ``(changed, won)`` as the scripts do; ``version`` is left to the caller (``Machine.view``)."""

    __slots__ = ("cooldown", "failures", "opened_until", "probe_until", "state", "window")

    def __init__(self, cfg: BreakerConfig, view: BreakerView | None = None) -> None:
        self.state = CLOSED
        self.failures = 0
        self.opened_until = 0
        self.cooldown = cfg.cooldown_ms
        self.probe_until = 0
        self.window: dict[int, list[int]] = {}  # bucket -> [succeeded, failed]
        if view is not None:
            self.state, self.failures, self.opened_until = view.state, view.failures, view.opened_until
            self.cooldown, self.probe_until = view.cooldown, view.probe_until

    @classmethod
    def from_hash(cls, cfg: BreakerConfig, fields: dict[str, str]) -> Machine:
        """From the breaker's Redis hash (``breaker_common.lua`` describes it)."""
        machine = cls(cfg)
        machine.state = fields.get("state", CLOSED)
        machine.failures = int(fields.get("failures", 0))
        machine.opened_until = int(fields.get("opened_until", 0))
        machine.cooldown = int(fields.get("cooldown", cfg.cooldown_ms))
        machine.probe_until = int(fields.get("probe_until", 0))
        for name, value in fields.items():
            kind, _, bucket = name.partition(":")
            if kind in ("o", "f") and bucket.isdigit():
                machine.window.setdefault(int(bucket), [0, 0])[kind == "f"] += int(value)
        return machine

    def view(self, version: int) -> BreakerView:
        return BreakerView(self.state, self.failures, self.opened_until, self.cooldown, self.probe_until, version)

    def state_for_admin(self, deployment_id: int, cfg: BreakerConfig, now: int, *, shared: bool) -> BreakerState:
        calls, failed = self.window_counts(cfg, now, prune=False)
        return BreakerState(
            deployment_id=deployment_id,
            state=self.view(0).phase(now),
            failures=self.failures,
            opened_until=_instant(self.opened_until) if self.state == OPEN else None,
            cooldown_seconds=self.cooldown / 1000,
            probe_until=_instant(self.probe_until) if self.probe_until > now else None,
            window_calls=calls,
            window_failures=failed,
            shared=shared,
        )

    def window_counts(self, cfg: BreakerConfig, now: int, *, prune: bool = True) -> tuple[int, int]:
        oldest = now // cfg.bucket_ms - cfg.buckets + 1
        calls = failed = 0
        for bucket, (ok, bad) in list(self.window.items()):
            if bucket < oldest:
                if prune:
                    del self.window[bucket]
                continue
            calls += ok + bad
            failed += bad
        return calls, failed

    def _open_for(self, ms: int, now: int) -> None:
        self.state = OPEN
        self.cooldown = ms
        self.opened_until = now + ms
        self.probe_until = 0
        self.window.clear()

    def _close(self, cfg: BreakerConfig) -> None:
        self.state = CLOSED
        self.failures = 0
        self.opened_until = 0
        self.cooldown = cfg.cooldown_ms
        self.probe_until = 0
        self.window.clear()

    def record(self, cfg: BreakerConfig, now: int, *, ok: int, failed: int, tail: int) -> tuple[bool, bool]:
        """``ok`` and ``failed`` calls ended, ``tail`` of the failures after the last success
        (``breaker_record.lua``)."""
        if self.state == OPEN:
            if now < self.opened_until:
                return False, False
            if tail > 0:
                self._open_for(min(self.cooldown * 2, cfg.max_cooldown_ms), now)
                return True, False
            if ok > 0:
                self._close(cfg)
                return True, False
            return False, False
        counts = self.window.setdefault(now // cfg.bucket_ms, [0, 0])
        counts[0] += ok
        counts[1] += failed
        self.failures = tail if ok > 0 else self.failures + failed
        calls, bad = self.window_counts(cfg, now)
        if self.failures >= cfg.failures or (calls >= cfg.min_volume and bad * 100 > cfg.error_rate * calls):
            self._open_for(cfg.cooldown_ms, now)
            return True, False
        return False, False

    def claim(self, cfg: BreakerConfig, now: int) -> tuple[bool, bool]:
        """The half-open probe (``breaker_claim.lua``)."""
        if self.state != OPEN:
            return False, True
        if now < self.opened_until or now < self.probe_until:
            return False, False
        self.probe_until = now + cfg.lease_ms
        return True, True

    def release(self, token: int) -> tuple[bool, bool]:
        """The probe whose claim set ``probe_until`` to ``token`` ended saying nothing (``breaker_release.lua``)."""
        if self.state == OPEN and self.probe_until > 0 and self.probe_until == token:
            self.probe_until = 0
            return True, False
        return False, False

    def trip(self, cfg: BreakerConfig, now: int) -> tuple[bool, bool]:
        """Open now (``breaker_trip.lua``)."""
        if self.state != OPEN:
            self._open_for(cfg.cooldown_ms, now)
            return True, False
        if now < self.opened_until:
            return False, False
        self._open_for(min(self.cooldown * 2, cfg.max_cooldown_ms), now)
        return True, False

    def reset(self, cfg: BreakerConfig) -> tuple[bool, bool]:
        """Closed and forgotten (``breaker_reset.lua``)."""
        self._close(cfg)
        return True, True
