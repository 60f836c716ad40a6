"""The breaker's state machine, one table of cases run through both of its implementations: the Lua scripts
on a real Redis (what every process shares) and their in-process twin ``Machine`` (no Redis). Each step
checks what a caller would notice (open or not, the probe won or not, the cooldown), and both
implementations must give the same answers and leave the same fields at every step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import redis

from providers.routing import breakers
from providers.routing.breaker_machine import CLOSED, HALF_OPEN, OPEN, BreakerConfig, BreakerView, Machine
from tests.shared_redis import redis_emptied
from tests.waiting import wait_until

T0 = 1_800_000_000_000  # ms since the epoch: the clock is an argument of every transition
CFG = BreakerConfig(
    failures=3,
    error_rate=50.0,
    min_volume=4,
    window_ms=60_000,
    cooldown_ms=1_000,
    max_cooldown_ms=4_000,
    lease_ms=500,
)

# (operation, ms after T0, expected); operations: ok, fail, claim, trip, reset, ("batch", ok, failed, tail),
# ("release", the claim's probe_until in ms after T0).
# expected: the phase (closed, open, half_open) after the step, and any of failures / cooldown / won / changed.
CASES = {
    "consecutive failures open it": [
        ("fail", 0, {"phase": CLOSED, "failures": 1}),
        ("fail", 10, {"phase": CLOSED, "failures": 2}),
        ("fail", 20, {"phase": OPEN, "changed": True, "cooldown": 1_000, "opened_until": T0 + 1_020}),
    ],
    "a success ends the run of failures": [
        ("ok", 0, {}),
        ("ok", 0, {}),
        ("ok", 0, {}),
        ("ok", 0, {}),
        ("fail", 0, {"failures": 1}),
        ("fail", 1, {"failures": 2}),
        ("ok", 2, {"phase": CLOSED, "failures": 0}),
        ("fail", 3, {"failures": 1}),
        ("fail", 4, {"phase": CLOSED, "failures": 2}),
    ],
    "the error rate opens it once the window has the minimum volume": [
        ("fail", 0, {}),
        ("fail", 1, {}),
        ("ok", 2, {"phase": CLOSED}),  # 2 of 3 failed, but 3 calls are under the minimum volume of 4
        ("fail", 3, {"phase": OPEN, "failures": 1, "changed": True}),  # 3 of 4 failed: 75 % > 50 %
    ],
    "an error rate of exactly the threshold does not open it": [
        ("ok", 0, {}),
        ("fail", 1, {}),
        ("ok", 2, {}),
        ("fail", 3, {"phase": CLOSED}),  # 2 of 4: not above 50 %
        ("ok", 4, {}),
        ("fail", 5, {"phase": CLOSED}),  # 3 of 6
    ],
    "old calls slide out of the window": [
        ("fail", 0, {}),
        ("fail", 1, {}),
        ("ok", 2, {}),
        ("ok", 61_000, {"phase": CLOSED}),
        ("fail", 61_001, {"phase": CLOSED}),  # 1 of 2 in the window now (the first three are older than 60 s)
        ("fail", 61_002, {"phase": CLOSED, "failures": 2}),  # 2 of 3: under the volume
    ],
    "open, it ignores outcomes until the cooldown ends": [
        ("trip", 0, {"phase": OPEN, "changed": True}),
        ("ok", 500, {"phase": OPEN, "changed": False}),
        ("fail", 900, {"phase": OPEN, "changed": False}),
        ("claim", 999, {"won": False}),
    ],
    "half-open lets one probe through; its success closes it": [
        ("trip", 0, {}),
        ("claim", 1_000, {"phase": HALF_OPEN, "won": True, "changed": True}),
        ("claim", 1_001, {"won": False, "changed": False}),
        ("claim", 1_002, {"won": False}),
        ("ok", 1_100, {"phase": CLOSED, "changed": True, "cooldown": 1_000, "failures": 0}),
        ("claim", 1_101, {"won": True, "changed": False}),  # closed: everyone goes through
    ],
    "each failed probe doubles the cooldown, up to the cap, and a success resets it": [
        ("fail", 0, {}),
        ("fail", 0, {}),
        ("fail", 0, {"phase": OPEN, "cooldown": 1_000}),
        ("claim", 1_000, {"won": True}),
        ("fail", 1_050, {"phase": OPEN, "cooldown": 2_000, "opened_until": T0 + 3_050}),
        ("claim", 3_049, {"won": False}),
        ("claim", 3_050, {"won": True}),
        ("fail", 3_060, {"phase": OPEN, "cooldown": 4_000}),
        ("claim", 7_060, {"won": True}),
        ("fail", 7_070, {"phase": OPEN, "cooldown": 4_000}),  # capped
        ("claim", 11_070, {"won": True}),
        ("ok", 11_080, {"phase": CLOSED, "cooldown": 1_000}),
        ("fail", 11_090, {}),
        ("fail", 11_091, {}),
        ("fail", 11_092, {"phase": OPEN, "cooldown": 1_000}),  # back to the base cooldown
    ],
    "a probe that never reports loses its claim after the lease": [
        ("trip", 0, {}),
        ("claim", 1_000, {"won": True}),
        ("claim", 1_499, {"won": False}),
        ("claim", 1_500, {"won": True, "changed": True}),
    ],
    "a probe that ends saying nothing gives its claim back, and only its own": [
        ("trip", 0, {}),
        ("claim", 1_000, {"won": True}),  # its claim: probe_until = T0 + 1_500
        (("release", 1_499), 1_010, {"changed": False}),  # not that claim
        ("claim", 1_020, {"won": False}),
        (("release", 1_500), 1_030, {"changed": True, "phase": HALF_OPEN}),
        (("release", 1_500), 1_040, {"changed": False}),
        ("claim", 1_050, {"won": True}),  # the next caller probes at once
        ("ok", 1_060, {"phase": CLOSED}),
        (("release", 1_550), 1_070, {"changed": False, "phase": CLOSED}),
    ],
    "batched outcomes keep their order": [
        # (succeeded, failed, failed after the last success): the run of failures is the batch's tail.
        (("batch", 5, 3, 1), 0, {"phase": CLOSED, "failures": 1}),  # 3 of 8 failed
        (("batch", 0, 1, 1), 1, {"phase": CLOSED, "failures": 2}),  # 4 of 9
        (("batch", 2, 1, 0), 2, {"phase": CLOSED, "failures": 0}),  # the failure came before the successes
        (("batch", 1, 2, 2), 3, {"phase": CLOSED, "failures": 2}),  # 7 of 15
        (("batch", 0, 1, 1), 4, {"phase": OPEN, "failures": 3}),  # 8 of 16 is not above 50 %: the run opens it
    ],
    "half-open: the last outcome of a batch decides": [
        ("trip", 0, {}),
        (("batch", 2, 1, 1), 1_000, {"phase": OPEN, "cooldown": 2_000}),
        (("batch", 1, 1, 0), 3_000, {"phase": CLOSED}),
    ],
    "trip and reset": [
        ("fail", 0, {"failures": 1}),
        ("trip", 1, {"phase": OPEN, "cooldown": 1_000, "changed": True}),
        ("trip", 2, {"phase": OPEN, "cooldown": 1_000, "changed": False}),  # already open: as it was
        ("trip", 1_001, {"phase": OPEN, "cooldown": 2_000, "changed": True}),  # half-open: as a failed probe
        ("reset", 1_002, {"phase": CLOSED, "cooldown": 1_000, "failures": 0, "changed": True}),
        ("fail", 1_003, {"failures": 1}),
    ],
}


class TwinRunner:
    def __init__(self) -> None:
        self.machine = Machine(CFG)

    def step(self, op, now: int) -> tuple[bool, bool, BreakerView, tuple[int, int]]:
        m = self.machine
        if isinstance(op, tuple) and op[0] == "release":
            changed, won = m.release(T0 + op[1])
        elif isinstance(op, tuple):
            changed, won = m.record(CFG, now, ok=op[1], failed=op[2], tail=op[3])
        elif op == "ok":
            changed, won = m.record(CFG, now, ok=1, failed=0, tail=0)
        elif op == "fail":
            changed, won = m.record(CFG, now, ok=0, failed=1, tail=1)
        elif op == "claim":
            changed, won = m.claim(CFG, now)
        elif op == "trip":
            changed, won = m.trip(CFG, now)
        else:
            changed, won = m.reset(CFG)
        return changed, won, m.view(0), m.window_counts(CFG, now, prune=False)


class LuaRunner:
    def __init__(self, client: redis.Redis, deployment_id: int) -> None:
        self.client = client
        self.deployment_id = deployment_id

    def step(self, op, now: int) -> tuple[bool, bool, BreakerView, tuple[int, int]]:
        extra: tuple[int, ...] = ()
        if isinstance(op, tuple) and op[0] == "release":
            name, extra = "breaker_release", (T0 + op[1],)
        elif isinstance(op, tuple):
            name, extra = "breaker_record", op[1:]
        elif op in ("ok", "fail"):
            name, extra = "breaker_record", (1, 0, 0) if op == "ok" else (0, 1, 1)
        else:
            name = f"breaker_{op}"
        script = breakers._script(self.client, name)
        reply = script(
            keys=breakers._keys(self.deployment_id), args=breakers._args(self.deployment_id, CFG, now, *extra)
        )
        fields = self.client.hgetall(breakers._keys(self.deployment_id)[0])
        window = Machine.from_hash(CFG, fields).window_counts(CFG, now, prune=False)
        return bool(reply[0]), bool(reply[1]), BreakerView.parse(reply[2:]), window


@pytest.fixture
def redis_client(redis_url):
    with redis_emptied(redis_url, decode_responses=True) as client:
        yield client


def _check(name: str, impl: str, step: int, now: int, got, expected: dict) -> None:
    changed, won, view, _window = got
    actual = {
        "phase": view.phase(now),
        "failures": view.failures,
        "cooldown": view.cooldown,
        "opened_until": view.opened_until,
        "won": won,
        "changed": changed,
    }
    wanted = {key: actual[key] for key in expected}
    assert wanted == expected, f"{name}, step {step} ({impl})"


@pytest.mark.parametrize("name", list(CASES))
def test_lua_and_twin_agree(name, redis_client):
    twin, lua = TwinRunner(), LuaRunner(redis_client, deployment_id=7)
    for i, (op, offset, expected) in enumerate(CASES[name]):
        now = T0 + offset
        from_twin, from_lua = twin.step(op, now), lua.step(op, now)
        _check(name, "twin", i, now, from_twin, expected)
        _check(name, "lua", i, now, from_lua, expected)
        # Same answers and fields (the version is Redis's counter: the twin leaves it to its caller).
        assert from_twin[:2] == from_lua[:2], f"{name}, step {i}"
        assert from_twin[2] == replace(from_lua[2], version=0), f"{name}, step {i}"
        assert from_twin[3] == from_lua[3], f"{name}, step {i}: window"


def test_a_change_is_published_and_versioned(redis_client):
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(breakers.CHANNEL)
    lua = LuaRunner(redis_client, deployment_id=9)
    lua.step("fail", T0)  # no change: nothing published
    _, _, opened, _ = lua.step("trip", T0 + 1)
    _, _, closed, _ = lua.step("reset", T0 + 2)
    messages = []

    def both_published() -> bool:
        message = pubsub.get_message(timeout=0.1)
        if message is not None:
            messages.append(message["data"])
        return len(messages) >= 2

    wait_until(both_published, lambda: f"both changes published (got {messages})", timeout=10, interval=0)
    assert pubsub.get_message(timeout=0.2) is None  # and nothing else
    pubsub.close()
    assert [BreakerView.parse(m.split()[1:7]) for m in messages] == [opened, closed]
    assert [m.split()[0] for m in messages] == ["9", "9"]
    # Each with the epoch of the data it changed: one read after Redis lost that data is not taken for news.
    assert [m.split()[7] for m in messages] == [redis_client.get(breakers.EPOCH_KEY)] * 2
    assert closed.version > opened.version > 0
    # A closed breaker leaves no hash behind, and the index of open breakers forgets it.
    assert not redis_client.exists(breakers._keys(9)[0])
    assert not redis_client.smembers(breakers.INDEX_KEY)
