"""Requests and tokens per minute, per key and per user: sliding windows in Redis or in this process,
OpenAI's x-ratelimit-* headers, Retry-After, and the same limits on WebSocket messages."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone

from billing.exceptions import QuotaExceededError, RateLimitExceededError
from billing.services.admission import admission_acquire, admission_settle
from billing.services.budgets import Charge, api_key_limits_set
from billing.services.counters import admission_store
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from billing.services.ratelimits import RateSpec, format_reset
from providers.selectors import resolved_model
from tests.billing.conftest import FLAT_TOKEN
from tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.period_instants]


@pytest.fixture
def account(plans, catalog):
    user = UserFactory(username="limited")
    plan_assign(user=user, plan=plans["Enterprise"])
    api_key = api_key_create(user=user, name="limited").api_key
    return {"user": user, "key": api_key, "flat": resolved_model(catalog["flat"]), "catalog": catalog}


async def acquire(
    account, request_id: str, *, prompt_upper: int = 0, prompt_likely: int | None = None, with_key: bool = True, **body
):
    return await admission_acquire(
        user_id=account["user"].pk,
        api_key_id=account["key"].pk if with_key else None,
        key_allowed_model_ids=None,
        model=account["flat"],
        body={"model": "flat-model", "messages": [], **body},
        request_id=request_id,
        prompt_tokens_upper=prompt_upper,
        prompt_tokens_estimate=prompt_likely,
    )


@pytest.mark.period_instants(only=())  # reads no clock: once, not once an instant
@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (17, "17ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (59_999, "59.999s"),
        (360_000, "6m0s"),
        (61_250, "1m1.25s"),
        (3_723_000, "1h2m3s"),
    ],
)
def test_reset_durations_read_like_openais(ms, text):
    assert format_reset(ms) == text


async def test_requests_per_minute_admit_the_limit_then_429(store, account):
    await sync_to_async(api_key_limits_set)(api_key=account["key"], budget_usd=None, rpm=3)

    admitted = [await acquire(account, f"r{i}", max_tokens=5) for i in range(3)]

    assert [a.headers["x-ratelimit-remaining-requests"] for a in admitted] == ["2", "1", "0"]
    assert all(a.headers["x-ratelimit-limit-requests"] == "3" for a in admitted)
    assert admitted[0].headers["x-ratelimit-reset-requests"] in ("59.999s", "1m0s", "59.998s")
    assert "x-ratelimit-limit-tokens" not in admitted[0].headers  # no tokens-per-minute limit here
    with pytest.raises(RateLimitExceededError) as refused:
        await acquire(account, "r3", max_tokens=5)
    error = refused.value
    assert (error.status_code, error.error_type, error.code) == (429, "rate_limit_error", "rate_limit_exceeded")
    assert "Rate limit reached for requests per minute on this API key: limit 3, used 3" in error.message
    assert 59 <= error.retry_after <= 60
    assert error.extra["headers"]["x-ratelimit-remaining-requests"] == "0"
    assert error.extra["headers"]["x-ratelimit-limit-requests"] == "3"


async def test_the_window_slides(store, account):
    """A slot frees exactly sixty seconds after the request that took it."""
    rates = (RateSpec("key", account["key"].pk, rpm=2, tpm=None),)
    charge = Charge(Decimal(0), Decimal(0), 1, 1, 0, 1)
    now = timezone.now()

    async def at(seconds: float, request_id: str):
        return await admission_store().acquire(
            request_id=request_id, counters=(), rates=rates, charge=charge, now=now + timedelta(seconds=seconds)
        )

    await at(0, "w0")
    await at(30, "w1")
    with pytest.raises(RateLimitExceededError) as refused:
        await at(59, "w2")
    assert refused.value.retry_after == 1
    later = await at(60.5, "w3")
    assert later.rate_states[0].requests.remaining == 0  # w1 is still in the window
    assert later.rate_states[0].requests.reset_ms == 29_500  # until w1 leaves it


async def test_retry_after_waits_for_every_scope_that_refuses(store, account):
    """The key's one request a minute and the account's 100 tokens a minute both refuse: Retry-After is the later
    of their waits. The key's alone (20 s) sent the client back while the account's window was still full."""
    key = RateSpec("key", account["key"].pk, rpm=1, tpm=None)
    user = RateSpec("user", account["user"].pk, rpm=None, tpm=100)
    now = timezone.now()

    async def at(seconds: float, request_id: str, rates: tuple[RateSpec, ...], tokens: int):
        return await admission_store().acquire(
            request_id=request_id,
            counters=(),
            rates=rates,
            charge=Charge(Decimal(0), Decimal(0), tokens, tokens, 0, 1, window_max_tokens=tokens),
            now=now + timedelta(seconds=seconds),
        )

    await at(0, "a", (key, user), 10)
    await at(30, "b", (user,), 90)  # another key of the account
    with pytest.raises(RateLimitExceededError) as refused:
        await at(40, "c", (key, user), 20)
    assert refused.value.retry_after == 50  # b leaves the account's window at 90 s; a the key's at 60 s
    assert "tokens per minute on your account" in refused.value.message

    admitted = await at(40 + refused.value.retry_after, "c", (key, user), 20)
    assert admitted.rate_states[1].tokens.remaining == 80


async def test_tokens_per_minute_count_the_estimate_then_the_real_use(store, account):
    await sync_to_async(api_key_limits_set)(api_key=account["key"], budget_usd=None, tpm=100)

    first = await acquire(account, "t0", prompt_upper=30, max_tokens=20)  # counts 50
    second = await acquire(account, "t1", prompt_upper=30, max_tokens=20)  # 100
    assert (first.headers["x-ratelimit-remaining-tokens"], second.headers["x-ratelimit-remaining-tokens"]) == (
        "50",
        "0",
    )
    with pytest.raises(RateLimitExceededError) as refused:
        await acquire(account, "t2", prompt_upper=30, max_tokens=20)
    assert "tokens per minute on this API key: limit 100, used 100, requested 50" in refused.value.message

    # The first really used 10 tokens: settling gives back the other 40.
    await admission_settle(admission=first, cost=Decimal(0), prompt_tokens=6, completion_tokens=4, ok=True)
    third = await acquire(account, "t3", prompt_upper=30, max_tokens=10)  # 10 + 50 + 40
    assert third.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_a_request_without_max_tokens_under_a_budget_is_not_too_large_for_the_token_limit(store, account):
    """The budget picks max_tokens (up to 4,096) for a request that set none; the tokens-per-minute window must not
    refuse that pick, forever, as a request "too large" whose client should "lower max_tokens" it never sent. The
    window counts the prompt now and the rest when the request settles, as it does under no budget."""
    await sync_to_async(api_key_limits_set)(api_key=account["key"], budget_usd=Decimal("5"), tpm=3000)

    admitted = await acquire(account, "no-max", prompt_upper=20)

    assert admitted.max_tokens == 4096  # what the budget pays for, sent upstream
    assert admitted.headers["x-ratelimit-remaining-tokens"] == "2980"
    await admission_settle(admission=admitted, cost=Decimal(0), prompt_tokens=20, completion_tokens=1000, ok=True)
    after = await acquire(account, "no-max-2", prompt_upper=20)
    assert after.headers["x-ratelimit-remaining-tokens"] == "1960"  # 3000 - 1020 settled - 20


@pytest.mark.parametrize("budget", [None, Decimal("5")], ids=["no-budget", "budget"])
async def test_a_limit_a_rule_sends_is_reserved_but_not_counted_in_the_token_window(store, account, budget):
    """A parameter rule's limit (``fixed``, or a dropped one's most) replaces the client's in what is sent and
    reserved (``body_as_sent``); the tokens-per-minute window counts the client's own limit, or the prompt when it set
    none, as for any request: the rest when it settles. Counting the rule's refused a key whose limit is below it."""
    await sync_to_async(api_key_limits_set)(api_key=account["key"], budget_usd=budget, tpm=3000)

    async def acquire_sent(request_id: str, **client_limit):
        return await admission_acquire(
            user_id=account["user"].pk,
            api_key_id=account["key"].pk,
            key_allowed_model_ids=None,
            model=account["flat"],
            body={"model": "flat-model", "messages": [], **client_limit},
            body_as_sent={"model": "flat-model", "messages": [], "max_tokens": 5000},
            request_id=request_id,
            prompt_tokens_upper=20,
        )

    unlimited = await acquire_sent("rule-only")
    limited = await acquire_sent("client-limit", max_tokens=100)

    assert unlimited.headers["x-ratelimit-remaining-tokens"] == "2980"  # the prompt
    assert limited.headers["x-ratelimit-remaining-tokens"] == "2860"  # and the client's 100
    if budget is not None:
        assert unlimited.reserved_cost == limited.reserved_cost == 5000 * FLAT_TOKEN  # the rule's limit, reserved


async def test_a_request_larger_than_the_token_limit_can_never_pass(store, account):
    await sync_to_async(api_key_limits_set)(api_key=account["key"], budget_usd=None, tpm=100)
    with pytest.raises(RateLimitExceededError) as refused:
        await acquire(account, "big", prompt_upper=30, max_tokens=500)
    assert refused.value.message.startswith("Request too large for this API key")
    # Said for embeddings as for chat: an embeddings request has no messages, and its input is what to shorten.
    assert refused.value.message.endswith("Shorten the input or lower max_tokens.")
    assert refused.value.retry_after is None  # no wait lets it through: no Retry-After, as for a spent budget


async def test_a_prompt_whose_bound_alone_is_over_the_token_limit_waits_for_the_whole_window(store, account):
    """Its likely size fits (7,503 of 10,000 tokens), its bound (15,024) does not: it is admitted into an empty
    window and counts as the whole limit until it settles, so the limit holds as the bound kept it; a request
    behind it waits for the window rather than being told it can never pass. Only a likely size over the limit
    is too large."""
    await sync_to_async(api_key_limits_set)(api_key=account["key"], budget_usd=None, tpm=10_000)

    long = await acquire(account, "long", prompt_upper=15_024, prompt_likely=7_503, max_tokens=100)
    assert long.headers["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimitExceededError) as waiting:
        await acquire(account, "next", prompt_upper=50, prompt_likely=20, max_tokens=10)
    assert waiting.value.retry_after == 60  # until "long" leaves the window: a wait, not "too large"
    assert "requested 60" in waiting.value.message

    await admission_settle(admission=long, cost=Decimal(0), prompt_tokens=7_480, completion_tokens=100, ok=True)
    admitted = await acquire(account, "next", prompt_upper=50, prompt_likely=20, max_tokens=10)
    assert admitted.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 7_580 - 60)

    with pytest.raises(RateLimitExceededError) as too_large:
        await acquire(account, "huge", prompt_upper=30_024, prompt_likely=10_003, max_tokens=100)
    assert too_large.value.message.startswith(
        "Request too large for this API key: it would use about 10,103 tokens (its input, estimated, plus max_tokens"
    )
    assert too_large.value.retry_after is None


async def test_the_tighter_of_user_and_key_limits_is_reported(store, account, plans):
    """The plan allows 600 rpm, the key only 5: the headers describe the key, the tighter one."""
    await sync_to_async(plan_assign)(user=account["user"], plan=plans["Pro"])
    await sync_to_async(api_key_limits_set)(api_key=account["key"], budget_usd=None, rpm=5)
    admission = await acquire(account, "both", max_tokens=1)
    assert admission.headers["x-ratelimit-limit-requests"] == "5"
    assert admission.headers["x-ratelimit-remaining-requests"] == "4"

    # Without the key (the chat page's session), only the plan's limit applies: the key's window is untouched.
    session = await acquire(account, "session", with_key=False, max_tokens=1)
    assert session.headers["x-ratelimit-limit-requests"] == "600"
    assert session.headers["x-ratelimit-remaining-requests"] == "598"


async def test_a_request_refused_for_its_budget_takes_no_rate_limit_slot(store, account):
    await sync_to_async(api_key_limits_set)(api_key=account["key"], budget_usd=Decimal("0.0003"), rpm=2)
    with pytest.raises(QuotaExceededError):
        await acquire(account, "too-dear", max_tokens=4)
    first = await acquire(account, "cheap", max_tokens=1)
    assert first.headers["x-ratelimit-remaining-requests"] == "1"


@pytest.fixture
def socket_user(plans, catalog):
    user = UserFactory(username="socket")
    user_plan = plan_assign(user=user, plan=plans["Enterprise"])
    user_plan.rpm = 2
    user_plan.save()
    client = Client()
    client.force_login(user)
    return {"user": user, "cookie": client.cookies[django_settings.SESSION_COOKIE_NAME].value}


async def test_websocket_messages_go_through_the_same_limits(store, socket_user, catalog, fake_upstream):
    from llmhub.asgi import application

    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"origin", b"http://127.0.0.1:8000"),
        (b"cookie", f"{django_settings.SESSION_COOKIE_NAME}={socket_user['cookie']}".encode()),
    ]
    socket = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    connected, _ = await socket.connect(timeout=5)
    assert connected
    try:
        outcomes = {}
        for index in range(3):
            request_id = f"ws{index}"
            await socket.send_json_to(
                {
                    "type": "chat.send",
                    "conversation": None,
                    "model": "cheap-model",
                    "content": "hello",
                    "request_id": request_id,
                }
            )
            while request_id not in outcomes:
                event = await socket.receive_json_from(timeout=30)
                if event.get("request_id") == request_id and event["type"] in ("chat.completed", "error"):
                    outcomes[request_id] = event
        assert [outcomes[f"ws{i}"]["type"] for i in range(3)] == ["chat.completed", "chat.completed", "error"]
        assert outcomes["ws2"]["code"] == "rate_limit_exceeded"
        assert fake_upstream.stats["requests"] == 2
    finally:
        await socket.disconnect(timeout=10)


@pytest.mark.period_instants(only=())  # reads no clock: once, not once an instant
def test_retry_after_never_exceeds_the_window():
    """Two server processes stamp window entries with their own clocks; one may compute a wait a few
    milliseconds past the window (seen as `Retry-After: 61` in the two-process test). It is capped."""
    from billing.services.ratelimits import RateSpec, rate_limit_error

    error = rate_limit_error(
        RateSpec("key", 1, rpm=30, tpm=None),
        dimension="requests",
        limit=30,
        used=30,
        requested=1,
        retry_after_ms=60_004,
        now_ms=0,
    )
    assert error.retry_after == 60
    assert error.extra["headers"]["x-ratelimit-reset-requests"] == "1m0s"
    assert error.message.endswith("Please try again in 1m0s.")


@pytest.mark.parametrize("limit", ["rpm", "tpm"])
async def test_a_limit_of_zero_says_no_request_passes_rather_than_when_to_try_again(store, account, limit):
    """A limit of 0 admits nothing, ever: "try again in 1m0s" or "lower max_tokens" would be a wait or a change
    that cannot help."""
    await sync_to_async(api_key_limits_set)(api_key=account["key"], budget_usd=None, **{limit: 0})
    with pytest.raises(RateLimitExceededError) as refused:
        await acquire(account, "blocked", max_tokens=1)
    message = refused.value.message
    dimension = "requests" if limit == "rpm" else "tokens"
    assert message.startswith(f"This API key admits no {dimension}: its limit is 0 {dimension} per minute."), message
    assert "try again" not in message and "Lower max_tokens" not in message
    assert refused.value.retry_after is None  # no Retry-After: the SDK would wait a minute before each retry


async def test_a_429_carries_the_exact_wait_in_retry_after_ms(store, account):
    """The openai and anthropic SDKs wait ``retry-after-ms`` when it is there; ``Retry-After`` alone, in whole
    seconds rounded up, made them wait up to a second longer than the window needed."""
    from core.errors import error_headers

    rates = (RateSpec("key", account["key"].pk, rpm=1, tpm=None),)
    charge = Charge(Decimal(0), Decimal(0), 1, 1, 0, 1)
    now = timezone.now()
    await admission_store().acquire(request_id="e0", counters=(), rates=rates, charge=charge, now=now)
    with pytest.raises(RateLimitExceededError) as refused:
        await admission_store().acquire(
            request_id="e1", counters=(), rates=rates, charge=charge, now=now + timedelta(seconds=59.75)
        )
    headers = error_headers(refused.value)
    assert (headers["Retry-After"], headers["retry-after-ms"]) == ("1", "250")
    assert headers["x-ratelimit-reset-requests"] == "250ms"


@pytest.mark.period_instants(only=())  # reads no clock: once, not once an instant
def test_every_answer_with_retry_after_carries_retry_after_ms():
    """An upstream's own wait passed on, a server shutting down, the database down: the same wait in ms."""
    from chat.pipeline import ServerShuttingDownError
    from core.errors import error_headers
    from core.exceptions import DatabaseUnavailableError
    from providers.exceptions import ProviderRateLimitError

    upstream = ProviderRateLimitError("slow down", provider="fake", retry_after=1.5)
    assert error_headers(upstream)["Retry-After"] == "2"
    assert error_headers(upstream)["retry-after-ms"] == "1500"
    shutdown = error_headers(ServerShuttingDownError())
    assert (shutdown["Retry-After"], shutdown["retry-after-ms"]) == ("5", "5000")
    database = error_headers(DatabaseUnavailableError())
    assert database["retry-after-ms"] == str(round(float(django_settings.LLMHUB_DATABASE_RETRY_AFTER) * 1000))


async def test_anthropics_reset_is_the_moment_the_next_request_is_admitted(store, account, period_clock):
    """``anthropic-ratelimit-*-reset`` is an RFC 3339 time: the moment the window lets the next request in. A
    request a millisecond before it is refused (and told the same moment), one at it is admitted."""
    import time_machine

    from billing.services.ratelimits import format_reset_at

    await sync_to_async(api_key_limits_set)(api_key=account["key"], budget_usd=None, rpm=2, tpm=1000)
    first = await acquire(account, "a0", prompt_upper=30, max_tokens=20)
    reset_at = format_reset_at(int(period_clock.timestamp() * 1000) + 60_000)
    assert first.anthropic_headers == {
        "anthropic-ratelimit-requests-limit": "2",
        "anthropic-ratelimit-requests-remaining": "1",
        "anthropic-ratelimit-requests-reset": reset_at,
        "anthropic-ratelimit-tokens-limit": "1000",
        "anthropic-ratelimit-tokens-remaining": "950",
        "anthropic-ratelimit-tokens-reset": reset_at,
    }
    assert reset_at == (period_clock + timedelta(minutes=1)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    with time_machine.travel(period_clock + timedelta(seconds=20), tick=False):
        second = await acquire(account, "a1", prompt_upper=30, max_tokens=20)
    assert second.anthropic_headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert second.anthropic_headers["anthropic-ratelimit-requests-reset"] == reset_at  # when a0 leaves the window
    assert "anthropic-ratelimit-requests-limit" not in second.headers  # OpenAI's names stay OpenAI's alone

    with time_machine.travel(period_clock + timedelta(seconds=59.999), tick=False):
        with pytest.raises(RateLimitExceededError) as refused:
            await acquire(account, "a2", prompt_upper=30, max_tokens=20)
    assert refused.value.extra["anthropic_headers"] == {
        "anthropic-ratelimit-requests-limit": "2",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": reset_at,
        "anthropic-ratelimit-tokens-limit": "1000",  # the other dimension too, as it is
        "anthropic-ratelimit-tokens-remaining": "900",
        "anthropic-ratelimit-tokens-reset": reset_at,
    }
    with time_machine.travel(period_clock + timedelta(seconds=60), tick=False):
        third = await acquire(account, "a3", prompt_upper=30, max_tokens=20)
    assert third.anthropic_headers["anthropic-ratelimit-requests-remaining"] == "0"  # a1 and a3 in the window


async def test_a_429_carries_both_dimensions_as_they_stand(store, account, period_clock):
    """OpenAI sends the requests and the tokens headers together on every answer, 429s included, and clients'
    backoff code reads both: a refusal for one dimension says the other's true state too (``remaining`` as it
    is, nothing of the refused request counted), and the refused dimension's ``remaining`` is what it has left
    (50 tokens, too few for a request of 60: until 5 December it said 0, as if the window were spent), its
    ``reset`` the wait until the request fits. In Anthropic's names as well."""
    import time_machine

    from billing.services.ratelimits import format_reset_at

    await sync_to_async(api_key_limits_set)(api_key=account["key"], budget_usd=None, rpm=2, tpm=100)
    await acquire(account, "b0", prompt_upper=30, max_tokens=20)  # 50 tokens, until 60 s
    with time_machine.travel(period_clock + timedelta(seconds=20), tick=False):
        with pytest.raises(RateLimitExceededError) as by_tokens:
            await acquire(account, "b1", prompt_upper=40, max_tokens=20)  # 60 more: over 100
    headers = by_tokens.value.extra["headers"]
    assert {name: value for name, value in headers.items() if name.startswith("x-ratelimit")} == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "50",  # b0's 50 of 100
        "x-ratelimit-reset-tokens": "40s",  # when b0 leaves the window: the wait
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",  # b0 alone: the refused request took no slot
        "x-ratelimit-reset-requests": "40s",
    }
    reset_at = format_reset_at(int(period_clock.timestamp() * 1000) + 60_000)
    assert by_tokens.value.extra["anthropic_headers"] == {
        "anthropic-ratelimit-tokens-limit": "100",
        "anthropic-ratelimit-tokens-remaining": "50",
        "anthropic-ratelimit-tokens-reset": reset_at,
        "anthropic-ratelimit-requests-limit": "2",
        "anthropic-ratelimit-requests-remaining": "1",
        "anthropic-ratelimit-requests-reset": reset_at,
    }

    with time_machine.travel(period_clock + timedelta(seconds=30), tick=False):
        await acquire(account, "b2", prompt_upper=10, max_tokens=10)  # 20 tokens: 70 in the window, 2 requests
        with pytest.raises(RateLimitExceededError) as by_requests:
            await acquire(account, "b3", prompt_upper=5, max_tokens=5)
    headers = by_requests.value.extra["headers"]
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "30s"
    assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) == ("100", "30")
    assert headers["x-ratelimit-reset-tokens"] == "30s"  # until b0's 50 leave the window
    assert by_requests.value.extra["anthropic_headers"]["anthropic-ratelimit-tokens-remaining"] == "30"


async def test_a_request_that_runs_nothing_takes_a_requests_slot_and_holds_nothing(store, account):
    """``/v1/messages/count_tokens``: a slot of the requests-per-minute windows, shared with real requests, no
    tokens, and nothing left in flight (no reservation, no record a lost-request sweep would make a row of)."""
    import redis

    from billing.services.admission import admission_count_request
    from billing.services.inflight import inflight_key, instance_id

    await sync_to_async(api_key_limits_set)(api_key=account["key"], budget_usd=Decimal("5"), rpm=2, tpm=100)
    ids = {"user_id": account["user"].pk, "api_key_id": account["key"].pk}

    counted = await admission_count_request(**ids, request_id="c0")
    assert counted.headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",
    }
    assert counted.handle is None  # nothing to settle
    admitted = await acquire(account, "c1", prompt_upper=30, max_tokens=20)
    assert admitted.headers["x-ratelimit-remaining-requests"] == "0"
    assert admitted.headers["x-ratelimit-remaining-tokens"] == "50"  # the count took none
    with pytest.raises(RateLimitExceededError) as refused:
        await admission_count_request(**ids, request_id="c2")
    assert "Rate limit reached for requests per minute on this API key" in refused.value.message
    assert refused.value.extra["anthropic_headers"]["anthropic-ratelimit-requests-remaining"] == "0"
    if store == "redis":
        client = redis.Redis.from_url(django_settings.REDIS_URL)
        assert client.hkeys(inflight_key(instance_id())) == [b"c1"]
        client.close()
