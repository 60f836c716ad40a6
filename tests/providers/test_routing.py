"""Routing strategies, hints and caps, in one process (the router is pure Python over in-process figures).

Randomness comes from the router's own generator, seeded per test: the figures are the same at every run,
and a router that split traffic wrongly would still miss the bounds."""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import time_machine
from hypothesis import given, settings
from hypothesis import strategies as st

from providers.fields import Secret
from providers.routing import Outcome, call_finished, call_started, caps_retry_after, route_candidates, router
from providers.routing.stats import CallTicket, in_flight, latency_score, stats_clear
from providers.types import ProviderConfig, ResolvedDeployment, ResolvedModel, RoutingStrategy

# Ids of their own, far from the database's, so that no other test's breaker or statistics touch them; a
# random start so that figures a previous run left in the session's Redis are not this run's.
_ids = itertools.count(random.randrange(10**6, 10**9, 1000))


def deployment(name: str, **fields: Any) -> ResolvedDeployment:
    fields.setdefault("input_per_mtok", Decimal("1"))
    fields.setdefault("output_per_mtok", Decimal("2"))
    provider = ProviderConfig(
        id=1, name=f"provider-{name}", kind="openai_compatible", base_url="http://127.0.0.1:9/v1", api_key=Secret("k")
    )
    return ResolvedDeployment(id=next(_ids), name=name, provider=provider, upstream_id=f"up-{name}", **fields)


def model(*deployments: ResolvedDeployment, strategy: str = RoutingStrategy.WEIGHTED) -> ResolvedModel:
    first = deployments[0]
    return ResolvedModel(
        id=1,
        name="routed",
        upstream_id=first.upstream_id,
        provider=first.provider,
        input_per_mtok=max(d.input_per_mtok for d in deployments),
        output_per_mtok=max(d.output_per_mtok for d in deployments),
        cached_input_per_mtok=None,
        context_window=8192,
        max_output_tokens=None,
        deployments=deployments,
        strategy=strategy,
    )


@pytest.fixture(autouse=True)
def _fresh_statistics():
    stats_clear()
    router.rng.seed(20261201)
    yield
    stats_clear()


def first_choices(routed, n: int, **kwargs) -> Counter:
    return Counter(route_candidates(routed, **kwargs)[0].name for _ in range(n))


def attempt(d, *, ttft_s: float | None = None, ok: bool = True, tokens: int = 0) -> None:
    call_finished(call_started(d.id), outcome=Outcome.OK if ok else Outcome.FAILURE, ttft_s=ttft_s, tokens=tokens)


# WEIGHTED AND PRIORITY


def test_weighted_splits_traffic_by_weight():
    routed = model(deployment("east", weight=3), deployment("west", weight=1))
    counts = first_choices(routed, 2000)
    assert 0.70 <= counts["east"] / 2000 <= 0.80
    assert 0.20 <= counts["west"] / 2000 <= 0.30


def test_weighted_lists_every_deployment_once_and_the_next_by_weight_among_the_rest():
    routed = model(deployment("a", weight=6), deployment("b", weight=3), deployment("c", weight=1))
    seconds = Counter()
    for _ in range(2000):
        order = [d.name for d in route_candidates(routed)]
        assert sorted(order) == ["a", "b", "c"]
        if order[0] == "a":
            seconds[order[1]] += 1
    # Without replacement: once a is out, b follows 3 times in 4.
    assert 0.70 <= seconds["b"] / sum(seconds.values()) <= 0.80


def test_a_weight_of_zero_is_a_standby_tried_last():
    routed = model(deployment("standby", weight=0), deployment("a"), deployment("b"))
    assert all(route_candidates(routed)[-1].name == "standby" for _ in range(200))


def test_priority_tries_the_lowest_number_first_and_shares_equal_priorities_by_weight():
    routed = model(
        deployment("backup", priority=1, weight=100),
        deployment("east", priority=0, weight=3),
        deployment("west", priority=0, weight=1),
        strategy=RoutingStrategy.PRIORITY,
    )
    counts = Counter()
    for _ in range(2000):
        order = [d.name for d in route_candidates(routed)]
        assert order[-1] == "backup"
        counts[order[0]] += 1
    assert 0.70 <= counts["east"] / 2000 <= 0.80


def test_open_breakers_are_left_out_and_a_single_usable_deployment_is_returned_alone():
    down = deployment("down", forced_state="open")
    up = deployment("up")
    assert route_candidates(model(down, up)) == [up]
    assert route_candidates(model(down)) == []


# LOWEST LATENCY


def test_lowest_latency_measures_new_deployments_first():
    slow, fast = deployment("slow"), deployment("fast")
    routed = model(slow, fast, strategy=RoutingStrategy.LOWEST_LATENCY)
    attempt(slow, ttft_s=0.050)
    assert first_choices(routed, 200)["fast"] >= 180  # never measured: it goes first (but for exploration)
    attempt(fast, ttft_s=0.005)
    newcomer = deployment("newcomer")
    with_newcomer = model(slow, fast, newcomer, strategy=RoutingStrategy.LOWEST_LATENCY)
    assert first_choices(with_newcomer, 200)["newcomer"] >= 180


def serve(routed, latencies: dict[str, float], n: int) -> Counter:
    """``n`` requests routed, each sent to the first candidate, which answers after its latency."""
    served = Counter()
    for _ in range(n):
        chosen = route_candidates(routed)[0]
        attempt(chosen, ttft_s=latencies[chosen.name])
        served[chosen.name] += 1
    return served


def test_lowest_latency_sends_nearly_everything_to_the_faster_deployment():
    routed = model(deployment("slow"), deployment("fast"), strategy=RoutingStrategy.LOWEST_LATENCY)
    latencies = {"slow": 0.050, "fast": 0.005}
    serve(routed, latencies, 50)  # warm-up
    served = serve(routed, latencies, 2000)
    assert served["fast"] / 2000 >= 0.90
    assert served["slow"] > 0  # exploration keeps measuring it


def test_lowest_latency_notices_a_slow_deployment_that_got_faster():
    routed = model(deployment("a"), deployment("b"), strategy=RoutingStrategy.LOWEST_LATENCY)
    serve(routed, {"a": 0.050, "b": 0.005}, 200)
    served = serve(routed, {"a": 0.005, "b": 0.050}, 600)  # they swap
    assert served["a"] > served["b"]
    assert serve(routed, {"a": 0.005, "b": 0.050}, 1000)["a"] / 1000 >= 0.90


def test_whole_call_latency_counts_when_there_is_no_time_to_first_token():
    slow, fast = deployment("slow"), deployment("fast")
    for d, seconds in ((slow, 0.200), (fast, 0.020)):
        call_finished(CallTicket(d.id, started=time.perf_counter() - seconds), outcome=Outcome.OK)
    routed = model(slow, fast, strategy=RoutingStrategy.LOWEST_LATENCY)
    assert first_choices(routed, 400)["fast"] / 400 >= 0.90


def test_a_fast_failure_does_not_make_a_deployment_look_faster_but_a_timeout_makes_it_slower():
    d = deployment("flaky")
    call_finished(CallTicket(d.id, started=time.perf_counter() - 0.100), outcome=Outcome.OK)
    before = latency_score(d.id)
    call_finished(call_started(d.id), outcome=Outcome.FAILURE)  # refused at once
    assert latency_score(d.id) == before
    call_finished(CallTicket(d.id, started=time.perf_counter() - 5.0), outcome=Outcome.FAILURE)  # timed out
    assert latency_score(d.id) > before


# LEAST BUSY


def test_least_busy_prefers_the_deployment_with_fewer_requests_in_flight():
    east, west = deployment("east"), deployment("west")
    routed = model(east, west, strategy=RoutingStrategy.LEAST_BUSY)
    held = [call_started(east.id), call_started(east.id)]
    assert in_flight(east.id) == 2
    assert all(route_candidates(routed)[0] == west for _ in range(50))
    held += [call_started(west.id) for _ in range(3)]
    assert all(route_candidates(routed)[0] == east for _ in range(50))
    for ticket in held:
        call_finished(ticket, outcome=Outcome.OK)
    assert in_flight(east.id) == in_flight(west.id) == 0
    assert set(first_choices(routed, 200)) == {"east", "west"}  # idle again: both get traffic


# CHEAPEST


prices = st.decimals(min_value=Decimal("0"), max_value=Decimal("100"), places=2)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(prices, prices, st.booleans(), st.integers(min_value=0, max_value=5)), min_size=1, max_size=6)
)
def test_cheapest_never_picks_a_pricier_healthy_deployment(rows):
    deployments = [
        deployment(f"d{i}", input_per_mtok=i_price, output_per_mtok=o_price, weight=weight, forced_state=state)
        for i, (i_price, o_price, healthy, weight) in enumerate(rows)
        for state in ["" if healthy else "open"]
    ]
    healthy = [d for d in deployments if not d.forced_state]
    for hint, strategy in ((None, RoutingStrategy.CHEAPEST), ("cost", RoutingStrategy.WEIGHTED)):
        order = route_candidates(model(*deployments, strategy=strategy), hint=hint)
        assert sorted(d.name for d in order) == sorted(d.name for d in healthy)
        paid = [d.input_per_mtok + d.output_per_mtok for d in order]
        assert paid == sorted(paid)


def test_cheapest_shares_equal_prices_by_weight():
    routed = model(
        deployment("pricey", input_per_mtok=Decimal("5")),
        deployment("a", weight=3),
        deployment("b", weight=1),
        strategy=RoutingStrategy.CHEAPEST,
    )
    counts = first_choices(routed, 2000)
    assert counts["pricey"] == 0
    assert 0.70 <= counts["a"] / 2000 <= 0.80


# HINTS


def test_hints_override_the_models_strategy():
    cheap = deployment("cheap", priority=2, input_per_mtok=Decimal("0.1"), quality=0.2)
    good = deployment("good", priority=1, input_per_mtok=Decimal("3"), quality=0.9)
    fast = deployment("fast", priority=0, input_per_mtok=Decimal("2"))  # unscored
    routed = model(cheap, good, fast, strategy=RoutingStrategy.PRIORITY)
    for d, seconds in ((cheap, 0.3), (good, 0.2), (fast, 0.01)):
        attempt(d, ttft_s=seconds)
    assert route_candidates(routed) == [fast, good, cheap]
    assert route_candidates(routed, hint="cost") == [cheap, fast, good]
    assert route_candidates(routed, hint="quality") == [good, cheap, fast]
    assert first_choices(routed, 200, hint="latency")["fast"] >= 180
    assert route_candidates(routed, hint=" Cost ") == [cheap, fast, good]


def test_an_unknown_hint_is_ignored():
    routed = model(deployment("first", priority=0), deployment("second", priority=1), strategy=RoutingStrategy.PRIORITY)
    assert [d.name for d in route_candidates(routed, hint="fastest-please")] == ["first", "second"]


# CAPS


@time_machine.travel(datetime(2026, 12, 1, 12, 0, 10, tzinfo=UTC), tick=False)
def test_a_deployment_at_its_rpm_is_skipped_until_the_minute_rolls_over(time_machine):
    capped = deployment("capped", priority=0, rpm_limit=2)
    spare = deployment("spare", priority=1)
    routed = model(capped, spare, strategy=RoutingStrategy.PRIORITY)
    for _ in range(2):
        assert route_candidates(routed)[0] == capped
        attempt(capped)
    assert route_candidates(routed) == [spare]
    time_machine.move_to(datetime(2026, 12, 1, 12, 0, 59, tzinfo=UTC))
    assert route_candidates(routed) == [spare]
    time_machine.move_to(datetime(2026, 12, 1, 12, 1, 0, tzinfo=UTC))
    assert route_candidates(routed) == [capped, spare]


@time_machine.travel(datetime(2026, 12, 1, 12, 0, 10, tzinfo=UTC), tick=False)
def test_a_deployment_at_its_tpm_is_skipped_until_the_minute_rolls_over(time_machine):
    capped = deployment("capped", priority=0, tpm_limit=1000)
    spare = deployment("spare", priority=1)
    routed = model(capped, spare, strategy=RoutingStrategy.PRIORITY)
    attempt(capped, tokens=600)
    assert route_candidates(routed)[0] == capped  # room for more: tokens are known when an attempt ends
    attempt(capped, tokens=400)
    assert route_candidates(routed) == [spare]
    time_machine.move_to(datetime(2026, 12, 1, 12, 1, 0, tzinfo=UTC))
    assert route_candidates(routed)[0] == capped


@time_machine.travel(datetime(2026, 12, 1, 12, 0, 15, tzinfo=UTC), tick=False)
def test_when_caps_leave_nothing_the_list_is_empty_with_the_wait_until_the_next_minute():
    only = deployment("only", rpm_limit=1)
    routed = model(only)
    attempt(only)
    assert route_candidates(routed) == []
    assert caps_retry_after(routed) == pytest.approx(45.0)
    shut = model(deployment("down", forced_state="open"))
    assert route_candidates(shut) == []
    assert caps_retry_after(shut) is None  # open breakers: not a rate limit
    assert caps_retry_after(model(deployment("fine"))) is None


def test_a_model_bound_to_a_deployment_is_built_once_and_carries_that_deployment():
    cheap = deployment("cheap", input_per_mtok=Decimal("1"), output_per_mtok=Decimal("2"))
    dear = deployment("dear", input_per_mtok=Decimal("5"), output_per_mtok=Decimal("9"))
    routed = model(cheap, dear)
    on_cheap, on_dear = routed.on(cheap), routed.on(dear)
    assert routed.on(cheap) is on_cheap  # the same snapshot and deployment: the same bound object
    assert (on_cheap.deployment, on_cheap.upstream_id, on_cheap.input_per_mtok) == (cheap, "up-cheap", Decimal("1"))
    assert (on_dear.deployment, on_dear.output_per_mtok, on_dear.provider) == (dear, Decimal("9"), dear.provider)
    # An equal snapshot made later (a catalog reload) gets its own bound object, never another snapshot's.
    reloaded = model(cheap, dear)
    assert reloaded.on(cheap) is not on_cheap
    assert reloaded.on(cheap).deployment is cheap
