"""Requests and tokens per minute, per key and per user, as sliding one-minute windows.

A window holds an entry per admitted request (its time, and for tokens its amount): a request is
admitted when the entries of the last 60 seconds leave room for it, so a limit of 30 admits exactly 30
in any minute however the requests bunch up. With Redis the windows live in Redis and are checked in
the same script as the budgets (``redis_scripts/admission_acquire.lua``); without Redis,
``LocalRateLimiter`` keeps them in this process, which is exact for a single process only.

Tokens are counted as the prompt's upper bound plus the client's max_tokens when admitted (the prompt alone
when it set none: ``budgets.window_tokens``), at most the limit (``window_amount``), then corrected to what the
request really used when it settles. A request is too large for a limit, never to be admitted, only when its
likely size (the prompt at the ledger's estimate, ``budgets.window_tokens_likely``) is over it.

The x-ratelimit-* headers follow OpenAI's names and duration format; ``reset`` is the time until the window's
oldest entry leaves it, i.e. until ``remaining`` rises. The Messages API's answers also carry
Anthropic's names (``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``), whose ``reset`` is that
moment as an RFC 3339 time. A 429 carries both dimensions too, as OpenAI's do (``rate_limit_error``): the refused
one's ``remaining`` as it is, its ``reset`` the wait until the request fits (``Retry-After``). The tokens
window counts input and output together: there are no ``input-tokens``/``output-tokens`` headers, as no limit
of ours splits them.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..exceptions import NO_RETRY, RateLimitExceededError
from ..models import ScopeKind

WINDOW_MS = 60_000


@dataclass(frozen=True, slots=True)
class RateSpec:
    scope_kind: str
    scope_id: int
    rpm: int | None
    tpm: int | None
    label: str = ""  # how messages name the scope, when "this API key" / "your account" would be wrong

    @property
    def keys(self) -> tuple[str, str, str]:
        base = f"llmhub:rl:{self.scope_kind}:{self.scope_id}"
        return f"{base}:req", f"{base}:tok", f"{base}:tokamt"

    @property
    def where(self) -> str:
        if self.label:
            return self.label
        return "this API key" if self.scope_kind == ScopeKind.KEY else "your account"


def rate_specs(
    *,
    user_id: int,
    api_key_id: int | None,
    user_rpm: int | None,
    user_tpm: int | None,
    key_rpm: int | None,
    key_tpm: int | None,
) -> tuple[RateSpec, ...]:
    specs = []
    if api_key_id is not None and (key_rpm is not None or key_tpm is not None):
        specs.append(RateSpec(ScopeKind.KEY, api_key_id, key_rpm, key_tpm))
    if user_rpm is not None or user_tpm is not None:
        specs.append(RateSpec(ScopeKind.USER, user_id, user_rpm, user_tpm))
    return tuple(specs)


@dataclass(frozen=True, slots=True)
class WindowState:
    """One dimension (requests or tokens) of one scope after admission."""

    limit: int
    remaining: int
    reset_ms: int


@dataclass(frozen=True, slots=True)
class RateState:
    requests: WindowState | None
    tokens: WindowState | None


def format_reset(ms: int) -> str:
    """OpenAI's (Go's) duration format: "17ms", "1s", "1.5s", "6m0s", "1h2m3s"."""
    ms = max(int(ms), 0)
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    text = f"{hours}h" if hours else ""
    if hours or minutes:
        text += f"{minutes}m"
    return f"{text}{seconds}s"


def _headers_for(name: str, state: WindowState) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{name}": str(state.limit),
        f"x-ratelimit-remaining-{name}": str(max(state.remaining, 0)),
        f"x-ratelimit-reset-{name}": format_reset(state.reset_ms),
    }


def format_reset_at(epoch_ms: int) -> str:
    """Anthropic's reset format: an RFC 3339 time in UTC, to the millisecond ("2026-12-05T12:01:00.250Z")."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _anthropic_headers_for(name: str, state: WindowState, now_ms: int) -> dict[str, str]:
    return {
        f"anthropic-ratelimit-{name}-limit": str(state.limit),
        f"anthropic-ratelimit-{name}-remaining": str(max(state.remaining, 0)),
        f"anthropic-ratelimit-{name}-reset": format_reset_at(now_ms + max(state.reset_ms, 0)),
    }


def _tightest(states: Sequence[RateState], name: str) -> WindowState | None:
    """Of one dimension's windows, the scope with the least room left: the one the client must respect."""
    windows = [getattr(state, name) for state in states if getattr(state, name) is not None]
    return min(windows, key=lambda w: (w.remaining, -w.reset_ms)) if windows else None


def ratelimit_headers(states: Sequence[RateState]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, per dimension for the scope with the least room left."""
    headers: dict[str, str] = {}
    for name in ("requests", "tokens"):
        if (window := _tightest(states, name)) is not None:
            headers.update(_headers_for(name, window))
    return headers


def anthropic_ratelimit_headers(states: Sequence[RateState], *, now_ms: int) -> dict[str, str]:
    """Anthropic's anthropic-ratelimit-* headers for the same windows, admitted at ``now_ms``."""
    headers: dict[str, str] = {}
    for name in ("requests", "tokens"):
        if (window := _tightest(states, name)) is not None:
            headers.update(_anthropic_headers_for(name, window, now_ms))
    return headers


def rate_limit_error(
    spec: RateSpec,
    *,
    dimension: str,
    limit: int,
    used: int,
    requested: int,
    retry_after_ms: int,
    now_ms: int,
    states: Sequence[RateState] = (),
) -> RateLimitExceededError:
    """``retry_after_ms`` < 0: the request alone is more than the limit and can never be admitted. A refusal
    that no wait can lift (that, or a limit of 0) carries no ``Retry-After``, as an exhausted budget's does:
    the SDKs would otherwise wait a minute before each of their retries of it; it carries ``x-should-retry: false``
    instead, which they obey.

    ``states``: every scope's windows as the refusal found them (the request not counted). The answer carries
    both dimensions' headers, as OpenAI's 429s do: the other dimension's as they are (of the scope with the
    least room left, as on an admission), the refused one's with the ``remaining`` it has (``limit - used``: a
    request larger than what is left is refused with room still in the window) and its ``reset`` the wait, when
    this request fits."""
    name = "requests" if dimension == "requests" else "tokens"
    retry_after: int | None = None
    if limit <= 0:
        owner = "the key's owner or an administrator" if spec.scope_kind == ScopeKind.KEY else "an administrator"
        where = spec.where[0].upper() + spec.where[1:]
        message = f"{where} admits no {name}: its limit is 0 {name} per minute. Ask {owner} to raise it."
        retry_ms = WINDOW_MS
    elif retry_after_ms < 0:
        message = (
            f"Request too large for {spec.where}: it would use about {requested:,} tokens (its input, estimated, "
            f"plus max_tokens for a reply) and the limit is {limit:,} tokens per minute. Shorten the input or lower "
            "max_tokens."
        )
        retry_ms = WINDOW_MS
    else:
        # Each server process stamps its entries with its own clock when it admits, so a process can see an
        # entry stamped a moment after its own `now` (another process admitted later but ran the script
        # first): the wait then computes a few milliseconds past the window, which it can never be.
        retry_ms = min(retry_after_ms, WINDOW_MS)
        retry_after = math.ceil(retry_ms / 1000)
        message = (
            f"Rate limit reached for {name} per minute on {spec.where}: limit {limit:,}, used {used:,}, "
            f"requested {requested:,}. Please try again in {format_reset(retry_ms)}."
        )
    window = WindowState(limit=limit, remaining=max(limit - used, 0), reset_ms=retry_ms)
    headers = {**ratelimit_headers(states), **_headers_for(name, window)}
    if retry_after is None:
        headers.update(NO_RETRY)  # no wait lifts it: the SDKs would send it again twice for the same answer
    error = RateLimitExceededError(
        message, retry_after=retry_after, retry_after_ms=retry_ms if retry_after else None, headers=headers
    )
    error.extra["anthropic_headers"] = {
        **anthropic_ratelimit_headers(states, now_ms=now_ms),
        **_anthropic_headers_for(name, window, now_ms),
    }
    return error


def window_amount(tokens: int, tpm: int) -> int:
    """What a request counts in a tokens window when admitted: its bound, but no more than the limit. A request
    whose bound is over the limit and whose likely size is not (``too_large``) then needs the whole window, which
    keeps the limit as exact as the bound would have; what it really used replaces it when it settles."""
    return min(tokens, tpm)


def too_large(likely_tokens: int, tpm: int) -> bool:
    """Whether no wait lets a request through a tokens window: its likely size is over the limit (its bound
    may be, and the request still fit), or the limit is 0."""
    return likely_tokens > tpm or tpm <= 0


def refusal_latest(refusals: Sequence[dict]) -> dict:
    """Of the windows refusing a request (``rate_limit_error``'s arguments), the one to report: one that no wait
    lets through (the request is larger than its limit, or the limit is 0), else the one that frees last. A
    client coming back after an earlier one's wait would find the others still full."""

    def wait(refusal: dict) -> float:
        return math.inf if refusal["retry_after_ms"] < 0 or refusal["limit"] <= 0 else refusal["retry_after_ms"]

    return max(refusals, key=wait)


@dataclass
class _Window:
    entries: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)  # request id -> (ms, amount)
    total: int = 0

    def expire(self, now_ms: int) -> None:
        while self.entries:
            request_id, (at, amount) = next(iter(self.entries.items()))
            if at > now_ms - WINDOW_MS:
                return
            del self.entries[request_id]
            self.total -= amount

    def reset_ms(self, now_ms: int) -> int:
        if not self.entries:
            return 0
        return next(iter(self.entries.values()))[0] + WINDOW_MS - now_ms

    def retry_after_ms(self, now_ms: int, excess: int) -> int:
        freed = 0
        for at, amount in self.entries.values():
            freed += amount
            if freed >= excess:
                return at + WINDOW_MS - now_ms
        return WINDOW_MS


class LocalRateLimiter:
    """The windows in this process's memory, for deployments without Redis (one process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, int, str], _Window] = {}

    def _window(self, spec: RateSpec, name: str) -> _Window:
        return self._windows.setdefault((spec.scope_kind, spec.scope_id, name), _Window())

    def acquire(
        self,
        *,
        request_id: str,
        specs: Sequence[RateSpec],
        tokens: int,
        now_ms: int,
        likely_tokens: int | None = None,
    ) -> list[RateState]:
        """Check every window, then record the request in all of them, or in none. Refused, the refusal is
        the window's that frees last (``refusal_latest``). ``tokens``: its count at the bound, recorded up to
        each limit (``window_amount``); ``likely_tokens``: its likely count (``budgets.window_tokens_likely``),
        which alone makes it too large for a limit."""
        likely = tokens if likely_tokens is None else likely_tokens
        with self._lock:
            refusals: list[dict] = []
            for spec in specs:
                if spec.rpm is not None:
                    window = self._window(spec, "requests")
                    window.expire(now_ms)
                    if window.total + 1 > spec.rpm:
                        refusals.append(
                            dict(
                                spec=spec,
                                dimension="requests",
                                limit=spec.rpm,
                                used=window.total,
                                requested=1,
                                retry_after_ms=window.retry_after_ms(now_ms, window.total + 1 - spec.rpm),
                            )
                        )
                if spec.tpm is not None:
                    window = self._window(spec, "tokens")
                    window.expire(now_ms)
                    amount = window_amount(tokens, spec.tpm)
                    if too_large(likely, spec.tpm):
                        refusals.append(
                            dict(
                                spec=spec,
                                dimension="tokens",
                                limit=spec.tpm,
                                used=window.total,
                                requested=likely,
                                retry_after_ms=-1,
                            )
                        )
                    elif window.total + amount > spec.tpm:
                        refusals.append(
                            dict(
                                spec=spec,
                                dimension="tokens",
                                limit=spec.tpm,
                                used=window.total,
                                requested=amount,
                                retry_after_ms=window.retry_after_ms(now_ms, window.total + amount - spec.tpm),
                            )
                        )
            if refusals:
                refusal = refusal_latest(refusals)
                states = self._states(specs, now_ms)
                raise rate_limit_error(refusal.pop("spec"), **refusal, now_ms=now_ms, states=states)
            states = []
            for spec in specs:
                requests = tokens_state = None
                if spec.rpm is not None:
                    window = self._window(spec, "requests")
                    window.entries[request_id] = (now_ms, 1)
                    window.total += 1
                    requests = WindowState(spec.rpm, spec.rpm - window.total, window.reset_ms(now_ms))
                if spec.tpm is not None:
                    window = self._window(spec, "tokens")
                    amount = window_amount(tokens, spec.tpm)
                    window.entries[request_id] = (now_ms, amount)
                    window.total += amount
                    tokens_state = WindowState(spec.tpm, spec.tpm - window.total, window.reset_ms(now_ms))
                states.append(RateState(requests, tokens_state))
            return states

    def _states(self, specs: Sequence[RateSpec], now_ms: int) -> list[RateState]:
        """Every scope's windows as they stand (expired entries gone), for a refusal's headers."""
        states = []
        for spec in specs:
            found = {}
            for name, limit in (("requests", spec.rpm), ("tokens", spec.tpm)):
                if limit is not None:
                    window = self._window(spec, name)
                    found[name] = WindowState(limit, limit - window.total, window.reset_ms(now_ms))
            states.append(RateState(found.get("requests"), found.get("tokens")))
        return states

    def release(self, *, request_id: str, specs: Sequence[RateSpec]) -> None:
        """Take back a request that was recorded but then refused for another reason (its budget)."""
        with self._lock:
            for spec in specs:
                for name in ("requests", "tokens"):
                    window = self._windows.get((spec.scope_kind, spec.scope_id, name))
                    if window is not None and request_id in window.entries:
                        window.total -= window.entries.pop(request_id)[1]

    def clear(self) -> None:
        """Forget every window (a test's scopes must not leak into the next test's)."""
        with self._lock:
            self._windows.clear()

    def settle(self, *, request_id: str, specs: Sequence[RateSpec], tokens: int) -> None:
        """Replace the admitted token estimate with what the request really used."""
        with self._lock:
            for spec in specs:
                window = self._windows.get((spec.scope_kind, spec.scope_id, "tokens"))
                if window is not None and request_id in window.entries:
                    at, reserved = window.entries[request_id]
                    window.entries[request_id] = (at, tokens)
                    window.total += tokens - reserved


local_rate_limiter = LocalRateLimiter()
