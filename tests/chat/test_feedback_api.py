"""``POST /v1/feedback`` through a live llmhub: a completion made with the openai SDK, then rated with httpx as
any client would; own requests only (another user's id and an unknown one answer the same 404), one record
per request and metric that a second rating replaces, OpenAI-shaped 400s that name the parameter, and a
rating sent while the request's ledger row is still on its way to the database."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import openai
import pytest
from asgiref.sync import async_to_sync
from django.db import connection, transaction
from django.test import Client
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from billing.models import ApiKey, UsageRecord
from billing.services.keys import api_key_create
from billing.services.ledger import _writers_now, ledger_flush, usage_unwritten
from billing.services.spool import spool_rows
from experiments.models import Feedback
from experiments.services_feedback import LEDGER_WAIT_SECONDS, feedback_set
from tests.factories import UsageRecordFactory, UserFactory
from tests.gateway.conftest import make_catalog
from tests.waiting import wait_for_record, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Say hello"}]
ERROR_FIELDS = {"message", "type", "param", "code"}
JWT_SECRET = "a-shared-secret-for-the-feedback-tests-0123456789"


class Site:
    def __init__(self, url: str) -> None:
        self.url = url

    def sdk(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=20)

    def completion(self, key: str) -> str:
        """A real completion; the id of its request, as its answer says it."""
        raw = self.sdk(key).chat.completions.with_raw_response.create(model="gpt-test", messages=HELLO)
        assert raw.parse().choices[0].message.content
        return raw.headers["x-request-id"]

    def feedback(self, key: str, body: Any = None, *, content: bytes | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"}
        if content is not None:
            headers["content-type"] = "application/json"
            return httpx.post(self.url + "/v1/feedback", content=content, headers=headers, timeout=20)
        return httpx.post(self.url + "/v1/feedback", json=body, headers=headers, timeout=20)


@pytest.fixture
def site(llmhub_server, fake_upstream) -> Site:
    make_catalog(fake_upstream)
    return Site(llmhub_server.url)


@pytest.fixture
def alice():
    return UserFactory(username="alice")


@pytest.fixture
def alice_key(alice) -> str:
    return api_key_create(user=alice, name="alice").secret


@pytest.fixture
def bob_key() -> str:
    return api_key_create(user=UserFactory(username="bob"), name="bob").secret


def assert_openai_error(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code, error


def timed(call) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_a_completion_is_rated_then_the_rating_replaced(site, alice, alice_key):
    request_id = site.completion(alice_key)

    created = site.feedback(alice_key, {"request_id": request_id, "thumbs": "up"})

    assert created.status_code == 201, created.text
    body = created.json()
    assert list(body) == [
        "object",
        "request_id",
        "metric",
        "value",
        "thumbs",
        "comment",
        "created_at",
        "updated_at",
    ]
    assert (body["object"], body["request_id"], body["metric"], body["value"], body["thumbs"]) == (
        "feedback",
        request_id,
        "thumbs",
        1.0,
        "up",
    )
    assert body["comment"] == ""
    assert created.headers["x-request-id"] != request_id

    replaced = site.feedback(alice_key, {"request_id": request_id, "thumbs": "down", "comment": "too curt"})

    assert replaced.status_code == 200, replaced.text
    again = replaced.json()
    assert (again["value"], again["thumbs"], again["comment"]) == (-1.0, "down", "too curt")
    assert again["created_at"] == body["created_at"]
    row = Feedback.objects.get()
    assert (row.request_id, row.user_id, row.metric, row.value, row.comment, row.source) == (
        request_id,
        alice.pk,
        "thumbs",
        -1.0,
        "too curt",
        "api",
    )


def test_scores_are_kept_per_metric_beside_the_thumbs(site, alice_key):
    request_id = site.completion(alice_key)

    thumbs = site.feedback(alice_key, {"request_id": request_id, "thumbs": "up"})
    score = site.feedback(alice_key, {"request_id": request_id, "score": 4.5})
    named = site.feedback(alice_key, {"request_id": request_id, "score": -2, "metric": "tone.v2"})
    named_again = site.feedback(alice_key, {"request_id": request_id, "score": 3, "metric": "tone.v2"})

    assert [r.status_code for r in (thumbs, score, named, named_again)] == [201, 201, 201, 200]
    assert (score.json()["metric"], score.json()["score"], score.json()["value"]) == ("score", 4.5, 4.5)
    assert "thumbs" not in score.json()
    assert named_again.json()["metric"] == "tone.v2" and named_again.json()["score"] == 3.0
    assert dict(Feedback.objects.values_list("metric", "value")) == {"thumbs": 1.0, "score": 4.5, "tone.v2": 3.0}


def test_the_rating_itself_is_not_a_ledger_row(site, alice_key):
    """Like /v1/models: no model was called, so nothing is priced or counted as a request."""
    request_id = site.completion(alice_key)

    rated = site.feedback(alice_key, {"request_id": request_id, "thumbs": "up"})
    async_to_sync(ledger_flush)()

    assert rated.status_code == 201
    assert list(UsageRecord.objects.values_list("request_id", flat=True)) == [request_id]


def test_another_users_request_is_refused_like_an_unknown_one(site, alice_key, bob_key):
    request_id = site.completion(alice_key)

    unknown_id = "req_" + uuid.uuid4().hex
    by_bob, by_bob_took = timed(lambda: site.feedback(bob_key, {"request_id": request_id, "thumbs": "down"}))
    unknown, unknown_took = timed(lambda: site.feedback(bob_key, {"request_id": unknown_id, "thumbs": "down"}))
    made_up = site.feedback(bob_key, {"request_id": "not-an-id-of-ours", "thumbs": "down"})

    for refused in (by_bob, unknown, made_up):
        assert_openai_error(refused, 404, "request_id", "not_found")
    # Whether the id exists is not told: another user's request reads like a missing one.
    assert by_bob.json()["error"]["message"].replace(request_id, "…") == unknown.json()["error"]["message"].replace(
        unknown_id, "…"
    )
    # Nor how long the answer took: an unknown id is waited for (its row may be on its way), and so is
    # another user's.
    assert by_bob_took >= LEDGER_WAIT_SECONDS and unknown_took >= LEDGER_WAIT_SECONDS
    assert not Feedback.objects.exists()


def test_a_key_rates_only_the_requests_of_its_own_subtree(site, alice):
    """A key handed to an app must not rate, or replace the rating of, another app's requests or its owner's
    web-chat replies: it rates the requests made by itself and by the keys created under it. A refused id
    answers exactly like an unknown one (status, body, time), so ids cannot be probed."""
    parent = api_key_create(user=alice, name="parent", scopes=["keys:manage"]).secret
    created = httpx.post(
        site.url + "/api/keys/", json={"name": "child"}, headers={"authorization": f"Bearer {parent}"}, timeout=20
    )
    assert created.status_code == 201, created.text
    child = created.json()["secret"]
    sibling = api_key_create(user=alice, name="sibling").secret
    made = {
        name: site.completion(secret) for name, secret in (("parent", parent), ("child", child), ("sibling", sibling))
    }
    web_chat = UsageRecordFactory(user=alice, endpoint="websocket", request_id="ws_" + uuid.uuid4().hex).request_id
    for request_id in made.values():
        wait_for_record(request_id)
    assert site.feedback(sibling, {"request_id": made["sibling"], "thumbs": "up"}).status_code == 201
    assert site.feedback(parent, {"request_id": made["parent"], "thumbs": "up"}).status_code == 201

    unknown_id = "req_" + uuid.uuid4().hex
    unknown = site.feedback(sibling, {"request_id": unknown_id, "thumbs": "down"})
    for key, request_id in (
        (sibling, made["parent"]),  # another app's request, and an attempt to replace its rating
        (child, made["parent"]),  # the key above it
        (child, made["sibling"]),
        (parent, web_chat),  # the owner's web chat
    ):
        refused, took = timed(
            lambda key=key, request_id=request_id: site.feedback(key, {"request_id": request_id, "thumbs": "down"})
        )
        assert_openai_error(refused, 404, "request_id", "not_found")
        assert refused.json() == {
            "error": {
                **unknown.json()["error"],
                "message": unknown.json()["error"]["message"].replace(unknown_id, request_id),
            }
        }
        assert took >= LEDGER_WAIT_SECONDS

    assert site.feedback(parent, {"request_id": made["child"], "thumbs": "down"}).status_code == 201
    replaced = site.feedback(child, {"request_id": made["child"], "thumbs": "up"})
    assert replaced.status_code == 200, replaced.text
    ratings = dict(Feedback.objects.values_list("request_id", "value"))
    assert ratings == {made["sibling"]: 1.0, made["parent"]: 1.0, made["child"]: 1.0}


def test_a_key_rates_its_own_request_before_its_row_is_written_and_no_other_key_does(site, alice):
    app = api_key_create(user=alice, name="app").secret
    other = api_key_create(user=alice, name="other").secret
    site.completion(other)  # the key is known to the server from here on
    with ledger_inserts_held() as release:
        request_id = site.completion(app)
        assert usage_unwritten(request_id) is not None

        thread, result = in_background(lambda: site.feedback(other, {"request_id": request_id, "thumbs": "up"}))
        thread.join(timeout=LEDGER_WAIT_SECONDS + 1.0)
        release.set()
        thread.join(timeout=30)

    assert_openai_error(result["response"], 404, "request_id", "not_found")
    assert site.feedback(app, {"request_id": request_id, "thumbs": "up"}).status_code == 201


def test_a_jwt_user_rates_their_own_requests(site, settings, alice_key):
    settings.LLMHUB_JWT_HS256_SECRET = JWT_SECRET
    settings.LLMHUB_JWT_ISSUER = "https://idp.feedback.example"
    settings.LLMHUB_JWT_AUDIENCE = "llmhub-feedback-tests"
    settings.LLMHUB_JWT_ALGORITHMS = ["HS256"]
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": "https://idp.feedback.example",
            "aud": "llmhub-feedback-tests",
            "sub": "ada-1",
            "preferred_username": "ada",
            "iat": now,
            "nbf": now,
            "exp": now + 600,
        },
        JWT_SECRET,
        algorithm="HS256",
    )
    adas = site.completion(token)
    alices = site.completion(alice_key)

    own = site.feedback(token, {"request_id": adas, "score": 0.75})
    not_own = site.feedback(token, {"request_id": alices, "score": 0.75})
    across = site.feedback(alice_key, {"request_id": adas, "score": 0.0})

    assert own.status_code == 201, own.text
    assert Feedback.objects.get().user.username == "ada"
    assert_openai_error(not_own, 404, "request_id", "not_found")
    assert_openai_error(across, 404, "request_id", "not_found")

    # A person rates all of their requests, whichever key made them, and their web-chat replies.
    ada = Feedback.objects.get().user
    by_her_key = site.completion(api_key_create(user=ada, name="app").secret)
    web_chat = UsageRecordFactory(user=ada, endpoint="websocket", request_id="ws_" + uuid.uuid4().hex).request_id
    for request_id in (by_her_key, web_chat):
        rated = site.feedback(token, {"request_id": request_id, "thumbs": "up"})
        assert rated.status_code == 201, rated.text


BAD_INPUTS = [
    ({"thumbs": "up"}, "request_id", "missing_required_parameter"),
    ({"request_id": 7, "thumbs": "up"}, "request_id", "invalid_type"),
    ({"request_id": "", "thumbs": "up"}, "request_id", "invalid_value"),
    ({"request_id": "x" * 65, "thumbs": "up"}, "request_id", "invalid_value"),
    ({"request_id": "{rid}"}, "thumbs", "missing_required_parameter"),
    ({"request_id": "{rid}", "thumbs": "up", "score": 1}, "score", "invalid_value"),
    ({"request_id": "{rid}", "thumbs": "sideways"}, "thumbs", "invalid_value"),
    ({"request_id": "{rid}", "thumbs": ["up"]}, "thumbs", "invalid_value"),
    ({"request_id": "{rid}", "thumbs": "up", "metric": "helpful"}, "metric", "invalid_value"),
    ({"request_id": "{rid}", "score": "5"}, "score", "invalid_type"),
    ({"request_id": "{rid}", "score": True}, "score", "invalid_type"),
    ({"request_id": "{rid}", "score": 1, "metric": "thumbs"}, "metric", "invalid_value"),
    ({"request_id": "{rid}", "score": 1, "metric": "Not A Name"}, "metric", "invalid_value"),
    ({"request_id": "{rid}", "thumbs": "up", "comment": "x" * 2001}, "comment", "string_above_max_length"),
    ({"request_id": "{rid}", "thumbs": "up", "comment": "a\x00b"}, "comment", "invalid_value"),
    ({"request_id": "{rid}", "thumbs": "up", "comment": 12}, "comment", "invalid_type"),
    ({"request_id": "{rid}", "thumb": "up"}, "thumb", "unknown_parameter"),
    (["{rid}", "up"], None, "invalid_type"),
]


def test_bad_input_is_a_400_naming_the_parameter(site, alice_key):
    request_id = site.completion(alice_key)

    def filled(body: Any) -> Any:
        if isinstance(body, dict):
            return {name: request_id if value == "{rid}" else value for name, value in body.items()}
        return [request_id if value == "{rid}" else value for value in body]

    for body, param, code in BAD_INPUTS:
        assert_openai_error(site.feedback(alice_key, filled(body)), 400, param, code)
    # JSON has no infinity; a number too large for a float reads as one, which is no score.
    infinite = site.feedback(alice_key, content=b'{"request_id": "%s", "score": 1e999}' % request_id.encode())
    assert_openai_error(infinite, 400, "score", "invalid_value")
    assert_openai_error(site.feedback(alice_key, content=b'{"request_id": "'), 400, None, "invalid_json")
    assert_openai_error(site.feedback(alice_key, content=b'{"score": NaN}'), 400, None, "invalid_json")

    longest = site.feedback(alice_key, {"request_id": request_id, "thumbs": "up", "comment": "y" * 2000})
    assert longest.status_code == 201
    assert Feedback.objects.get().comment == "y" * 2000


def test_who_is_asking_is_checked_first(site, alice_key):
    request_id = site.completion(alice_key)

    anonymous = httpx.post(site.url + "/v1/feedback", json={"request_id": request_id, "thumbs": "up"}, timeout=20)
    listing = httpx.get(site.url + "/v1/feedback", headers={"authorization": f"Bearer {alice_key}"}, timeout=20)

    assert anonymous.status_code == 401 and set(anonymous.json()["error"]) == ERROR_FIELDS
    assert listing.status_code == 405 and listing.headers["allow"] == "POST"
    assert not Feedback.objects.exists()


@contextlib.contextmanager
def ledger_inserts_held() -> Iterator[threading.Event]:
    """While the block runs (or until the event it gives is set) the ledger writer's inserts wait, as behind
    another process's long transaction: PostgreSQL's usage table is locked (other tables stay writable);
    SQLite has one write lock for the whole database, which is held (its readers go on reading)."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            # On SQLite the IMMEDIATE transaction (the test settings' transaction_mode) takes the write lock.
            with transaction.atomic(), connection.cursor() as cursor:
                if connection.vendor == "postgresql":
                    cursor.execute("LOCK TABLE billing_usagerecord IN SHARE ROW EXCLUSIVE MODE")
                held.set()
                release.wait(timeout=60)
        finally:
            connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(timeout=20)
    try:
        yield release
    finally:
        release.set()
        thread.join(timeout=60)


def in_background(call) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("response", call()))
    thread.start()
    return thread, result


def test_a_rating_right_after_the_reply_finds_the_row_not_yet_written(site, alice, alice_key):
    with ledger_inserts_held() as release:
        request_id = site.completion(alice_key)
        # The reply is out; its ledger row waits in this process's writer, not in the database.
        assert usage_unwritten(request_id) is not None
        assert not UsageRecord.objects.filter(request_id=request_id).exists()

        thread, result = in_background(lambda: site.feedback(alice_key, {"request_id": request_id, "thumbs": "up"}))
        # PostgreSQL answers now; on SQLite the feedback's own insert waits for the same lock.
        thread.join(timeout=1.0)
        release.set()
        thread.join(timeout=30)

    assert result["response"].status_code == 201, result["response"].text
    assert Feedback.objects.get().user_id == alice.pk
    async_to_sync(ledger_flush)()
    assert UsageRecord.objects.get(request_id=request_id).user_id == alice.pk


def _row_placed(request_id: str) -> bool:
    """``request_id``'s row is with this process's ledger writer or in the spool, and no spill is on its way."""
    placed = usage_unwritten(request_id) is not None or request_id in {row["request_id"] for row in spool_rows()}
    return placed and all(writer.spill is None for writer in _writers_now())


def test_a_rating_finds_a_row_a_slow_ledger_sent_to_the_spool(site, alice, alice_key, settings, tmp_path):
    """The database writes slower than requests come: past the writer's bound (``LLMHUB_LEDGER_QUEUE_MAX``) the
    newest rows wait in the spool, not in memory, until it catches up. Their requests can be rated meanwhile,
    and not only within the ledger wait (``LEDGER_WAIT_SECONDS``) of a row on its way."""
    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "ledger-spool.jsonl"
    settings.LLMHUB_LEDGER_QUEUE_MAX = 2
    settings.LLMHUB_LEDGER_LINGER_MS = 0
    with ledger_inserts_held() as release:
        request_ids = []
        for _ in range(6):
            request_id = site.completion(alice_key)
            # Its row with the writer or spooled, and no spill on its way: a row that came while one was (a
            # spill's append, in a thread, is slow on a loaded machine) stayed queued, no second spill began,
            # and the spool held 2 rows for good (8054b03's fresh-clone CI).
            wait_until(lambda request_id=request_id: _row_placed(request_id), "its row placed", timeout=20)
            request_ids.append(request_id)
        # One row in flight, one kept queued, and two spills of two (the rows past half the bound), each
        # appended in a thread of its own: wait for both. Read before the second had landed, the newest
        # spooled row was one the second spill then pushed out of the writer's memory of spooled rows
        # (the newest LLMHUB_LEDGER_QUEUE_MAX of them), and the rating was refused (seen on PostgreSQL).
        wait_until(lambda: len(spool_rows()) >= 4, "both spills in the spool", timeout=20)
        spooled = {row["request_id"] for row in spool_rows()}
        rated = [request_id for request_id in request_ids if request_id in spooled][-1]
        # Out of the writer's memory: the spill's thread forgets its rows just after their append, which the
        # wait above saw.
        wait_until(lambda: usage_unwritten(rated) is None, "the spilled row out of the writer's memory", timeout=20)
        assert not UsageRecord.objects.filter(request_id=rated).exists()

        thread, result = in_background(lambda: site.feedback(alice_key, {"request_id": rated, "thumbs": "up"}))
        # Longer than the ledger wait: the answer does not come from the row landing meanwhile.
        thread.join(timeout=LEDGER_WAIT_SECONDS + 1.0)
        assert UsageRecord.objects.filter(request_id=rated).count() == 0
        release.set()
        thread.join(timeout=30)

    assert result["response"].status_code == 201, result["response"].text
    assert Feedback.objects.get(request_id=rated).user_id == alice.pk
    async_to_sync(ledger_flush)()
    wait_for_record(rated, timeout=15)
    assert UsageRecord.objects.get(request_id=rated).user_id == alice.pk


def test_a_rating_waits_briefly_for_a_row_another_process_is_writing(site, alice, alice_key):
    """A request served by another server process: its row is in neither this process's writer nor the
    ledger when the rating comes, and is committed a moment later."""
    site.completion(alice_key)  # the key is known to the server from here on
    request_id = "req_" + uuid.uuid4().hex

    thread, result = in_background(lambda: site.feedback(alice_key, {"request_id": request_id, "score": 5}))
    # Well inside the server's wait (LEDGER_WAIT_SECONDS), and long after the rating arrived.
    time.sleep(1.0)
    UsageRecordFactory(request_id=request_id, user=alice, api_key=ApiKey.objects.get(user=alice, name="alice"))
    thread.join(timeout=30)

    assert result["response"].status_code == 201, result["response"].text
    assert Feedback.objects.get(request_id=request_id).value == 5.0


def test_concurrent_ratings_of_one_request_leave_one_record(alice):
    """The upsert under contention: every writer succeeds, one of them created the row, the others replaced
    it (on PostgreSQL the inserts race on the unique constraint)."""
    UsageRecordFactory(request_id="req_raced", user=alice)
    start = threading.Barrier(6)
    outcomes: list[bool] = []
    failures: list[BaseException] = []

    def rate(value: float) -> None:
        try:
            start.wait(timeout=20)
            _, created = feedback_set(
                request_id="req_raced", user_id=alice.pk, metric="score", value=value, comment="", source="api"
            )
            outcomes.append(created)
        except BaseException as exc:
            failures.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=rate, args=(float(n),)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not failures, failures
    assert sorted(outcomes) == [False] * 5 + [True]
    assert Feedback.objects.filter(request_id="req_raced").count() == 1


def test_the_schema_documents_the_endpoint_and_a_real_answer_matches_it(site, alice_key):
    schema = Client().get("/api/schema/", {"format": "json"}).json()
    operation = schema["paths"]["/v1/feedback"]["post"]
    assert {"200", "201", "400", "401", "404"} <= set(operation["responses"])
    assert "created under it" in operation["description"]  # what a key may rate
    resource = Resource.from_contents({"components": schema["components"]}, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:llmhub:schema", resource)

    def validator(component: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": f"urn:llmhub:schema#/components/schemas/{component}"}, registry=registry)

    request_id = site.completion(alice_key)
    body = {"request_id": request_id, "thumbs": "up", "comment": "clear"}
    validator("CreateFeedbackRequest").validate(body)
    validator("FeedbackResponse").validate(site.feedback(alice_key, body).json())
    validator("FeedbackResponse").validate(site.feedback(alice_key, {"request_id": request_id, "score": 2}).json())
    assert not validator("CreateFeedbackRequest").is_valid({"request_id": request_id, "thumbs": "up", "score": 1})
    validator("ErrorResponse").validate(site.feedback(alice_key, {"request_id": "nope", "thumbs": "up"}).json())
