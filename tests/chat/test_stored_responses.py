"""Stored responses of ``/v1/responses`` in the database: who keeps them when a key or a user is deleted (as their
conversations), the retention task's batches, and the admin, which shows them read-only."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db import IntegrityError, connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.services.keys import api_key_create
from chat import selectors
from chat.models import StoredResponse
from chat.responses_chain import chain
from chat.selectors import ConversationReach, NotFoundError, stored_response_get, stored_response_input
from chat.services_responses import (
    stored_response_delete,
    stored_response_save,
    stored_responses_expire,
    stored_responses_remove,
)
from chat.tasks import stored_responses_expire_task
from tests.factories import UserFactory
from tests.transactions import transaction_held_open
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def _response(number: int, now: datetime, output: list | None = None) -> dict:
    return {
        "id": f"resp_{number}",
        "object": "response",
        "created_at": int(now.timestamp()),
        "status": "completed",
        "model": "gpt-test",
        "instructions": None,
        "output": output or [],
        "store": True,
    }


def stored(user, key=None, *, number: int = 1, now: datetime = NOW) -> StoredResponse:
    return stored_response_save(
        user_id=user.pk,
        api_key_id=key.pk if key else None,
        response=_response(number, now),
        input="private words",
        now=now,
    )


def _reply(number: int) -> dict:
    return {
        "id": f"msg_out{number}",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": f"reply {number}", "annotations": []}],
    }


def turns(user, count: int, *, start: int = 1, previous: StoredResponse | None = None, now: datetime = NOW):
    """``count`` responses, each continuing the one before (as ``chat.pipeline`` chains them), a day apart."""
    made = []
    for number in range(start, start + count):
        at = now + timedelta(days=number - start)
        body = {"model": "gpt-test", "input": f"turn {number}"}
        chained = None
        if previous is not None:
            whole = stored_response_input(previous)
            chained = chain(
                body,
                input_items=whole.items,
                output_items=previous.output_items,
                previous=previous.pk,
                length=whole.length,
            )
            body = chained.body
        previous = stored_response_save(
            user_id=user.pk,
            api_key_id=None,
            response=_response(number, at, [_reply(number)]),
            input=body["input"],
            chained=chained,
            now=at,
        )
        made.append(previous)
    return made


def texts(stored: StoredResponse) -> list[str]:
    return [item["content"][0]["text"] for item in stored_response_input(stored).items]


def test_a_deleted_key_leaves_its_responses_to_their_owner_and_a_deleted_user_takes_them(settings):
    user = UserFactory()
    key = api_key_create(user=user, name="app").api_key
    kept = stored(user, key)
    key.delete()
    kept.refresh_from_db()
    assert kept.api_key_id is None
    with time_machine.travel(NOW, tick=False):
        assert stored_response_get(reach=ConversationReach(user_id=user.pk), response_id="resp_1") == kept
        with pytest.raises(NotFoundError):  # no other key reaches what a deleted key made, as for conversations
            other = api_key_create(user=user, name="other").api_key
            stored_response_get(
                reach=ConversationReach(user_id=user.pk, key_id=other.pk, whole_history=False), response_id="resp_1"
            )
    turns(user, 3, start=2, previous=kept)  # a chain: each refers to the one before
    user.delete()
    assert not StoredResponse.objects.exists()


def test_the_task_deletes_the_expired_ones_in_batches_and_keeps_the_rest(settings):
    settings.LLMHUB_RESPONSES_RETENTION_DAYS = 30
    user = UserFactory()
    for number in range(5):
        stored(user, number=number, now=NOW - timedelta(days=31))
    fresh = stored(user, number=9, now=NOW - timedelta(days=29))
    with time_machine.travel(NOW, tick=False):
        assert stored_responses_expire(batch_size=2) == 5
        assert stored_responses_expire_task() == 0
    assert list(StoredResponse.objects.all()) == [fresh]


def test_the_admin_shows_them_read_only_and_finds_one_by_its_id(admin_client):
    response = stored(UserFactory(username="alice"))
    changelist = reverse("admin:chat_storedresponse_changelist")
    found = admin_client.get(changelist, {"q": " resp_1 "})
    assert found.status_code == 200 and list(found.context["cl"].result_list) == [response]
    assert list(admin_client.get(changelist, {"q": "alice"}).context["cl"].result_list) == [response]
    assert list(admin_client.get(changelist, {"q": "private"}).context["cl"].result_list) == []
    page = admin_client.get(reverse("admin:chat_storedresponse_change", args=[response.pk]))
    assert page.status_code == 200 and "private words" in page.content.decode()
    assert 'name="_save"' not in page.content.decode()
    assert admin_client.get(reverse("admin:chat_storedresponse_add")).status_code == 403


def test_the_admin_list_reads_no_stored_conversation(admin_client):
    """The list shows ids, owners, models and dates; it read every column of its 100 rows, each response's whole
    input with it (a chain's every turn, its images as data URLs: megabytes a row). Its own page shows them."""
    response = stored(UserFactory(username="alice"))
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(reverse("admin:chat_storedresponse_changelist"))
    assert page.status_code == 200 and "resp_1" in page.content.decode()
    read = [query["sql"] for query in queries if 'FROM "chat_storedresponse"' in query["sql"]]
    assert read and not any(column in sql for sql in read for column in ('"input_items"', '"output_items"'))
    page = admin_client.get(reverse("admin:chat_storedresponse_change", args=[response.pk]))
    assert "private words" in page.content.decode()


def test_the_admin_lists_its_status_filter_without_reading_the_table(admin_client):
    """The status filter's choices came from a SELECT DISTINCT over every stored response (no index): on each load of
    the list. The statuses a stored response can have are two; the filter still filters."""
    kept = stored(UserFactory(username="alice"))
    changelist = reverse("admin:chat_storedresponse_changelist")
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(changelist)
    assert page.status_code == 200 and "incomplete" in page.content.decode()
    assert not [query["sql"] for query in queries if "DISTINCT" in query["sql"]]
    assert list(admin_client.get(changelist, {"status": "completed"}).context["cl"].result_list) == [kept]
    assert list(admin_client.get(changelist, {"status": "incomplete"}).context["cl"].result_list) == []


def test_an_expired_response_a_live_one_continues_is_kept_until_its_last_descendant_goes(settings):
    settings.LLMHUB_RESPONSES_RETENTION_DAYS = 30
    user = UserFactory()
    reach = ConversationReach(user_id=user.pk)
    first, second, _ = turns(user, 3)  # a day apart
    with time_machine.travel(NOW + timedelta(days=31, hours=12), tick=False):  # the first two expired
        for gone in (first, second):
            with pytest.raises(NotFoundError):
                stored_response_get(reach=reach, response_id=gone.response_id)
        assert stored_responses_expire() == 0  # the third continues them
        assert texts(stored_response_get(reach=reach, response_id="resp_3")) == [
            "turn 1",
            "reply 1",
            "turn 2",
            "reply 2",
            "turn 3",
        ]
    with time_machine.travel(NOW + timedelta(days=32, hours=12), tick=False):  # the third expired too
        assert stored_responses_expire(batch_size=2) == 3
    assert not StoredResponse.objects.exists()


def test_deleting_the_last_response_frees_the_expired_ones_before_it_and_the_task_frees_the_hidden_ones(settings):
    settings.LLMHUB_RESPONSES_RETENTION_DAYS = 30
    user = UserFactory()
    reach = ConversationReach(user_id=user.pk)
    turns(user, 3)  # from NOW, a day apart
    later = NOW + timedelta(days=31, hours=12)  # the first two expired, kept for the third
    with time_machine.travel(later, tick=False):
        other = stored(user, number=9, now=later)  # another chain, untouched
        assert stored_response_delete(reach=reach, response_id="resp_3")  # none continues it: it goes at once
        assert list(StoredResponse.objects.all()) == [other]  # and the expired ones kept for it alone
        fourth, _ = turns(user, 2, start=4, now=later - timedelta(days=2))
        assert stored_response_delete(reach=reach, response_id="resp_4")  # the fifth continues it: hidden, kept
        assert not stored_response_delete(reach=reach, response_id="resp_4")  # already gone for its owner
        assert StoredResponse.objects.get(pk=fourth.pk).deleted_at is not None
        assert stored_responses_expire() == 0
    with time_machine.travel(later + timedelta(days=29, hours=1), tick=False):  # the fifth expired: both go
        assert stored_responses_expire() == 2
    assert list(StoredResponse.objects.all()) == [other]


def test_a_chain_too_long_to_follow_is_kept_whole_again(settings, monkeypatch):
    """Read back in one recursive query of a bounded depth: a response continuing a chain of the most it may hold is
    kept whole, and starts a new one (one row of a long chain's whole input, once in that many turns)."""
    monkeypatch.setattr(selectors, "STORED_CHAIN_MAX_LENGTH", 3)
    monkeypatch.setattr("chat.services_responses.STORED_CHAIN_MAX_LENGTH", 3)
    user = UserFactory()
    made = turns(user, 5)
    assert [row.previous_id for row in made] == [None, made[0].pk, made[1].pk, None, made[3].pk]
    assert len(made[3].input_items) == 7  # the whole input: three turns and their replies, and its own
    assert texts(made[4]) == [text for number in range(1, 5) for text in (f"turn {number}", f"reply {number}")] + [
        "turn 5"
    ]


def test_a_chain_that_loops_is_not_found_and_logged(caplog):
    """A loop (rows edited by hand) is found within the bounded walk, never followed for ever, and is not a 500."""
    user = UserFactory()
    first, second = turns(user, 2)
    StoredResponse.objects.filter(pk=first.pk).update(previous=second)
    second.refresh_from_db()
    with pytest.raises(NotFoundError), caplog.at_level("ERROR", logger="chat.selectors"):
        stored_response_input(second)
    assert any("resp_2" in record.getMessage() for record in caplog.records)


def test_the_admin_deletes_a_response_with_those_continuing_it_and_the_hidden_ones_kept_for_it_alone(
    admin_client, settings
):
    """An admin's delete is a data removal: the response, every response that continues it (listed on the
    confirmation page, as Django lists a cascade), and the hidden ones before it that nothing live refers to any
    more. Another chain, and a hidden one a live branch still continues, stay."""
    settings.LLMHUB_RESPONSES_RETENTION_DAYS = 30
    user = UserFactory(username="alice")
    reach = ConversationReach(user_id=user.pk)
    _, second, third, _ = turns(user, 4)  # from NOW, a day apart
    chain_of(user, 1, start=5, previous=third)  # a branch: the fourth and the fifth continue the third
    other = stored(user, number=9)
    with time_machine.travel(NOW + timedelta(days=5), tick=False):
        assert stored_response_delete(reach=reach, response_id="resp_1")  # hidden: kept for the second
        assert stored_response_delete(reach=reach, response_id="resp_2")  # hidden: kept for the third
        shown = admin_client.get(reverse("admin:chat_storedresponse_change", args=[second.pk])).content.decode()
        assert "resp_1" in shown and "turn 2" in shown  # the one it continued, and its own input
        url = reverse("admin:chat_storedresponse_delete", args=[third.pk])
        page = admin_client.get(url)
        assert page.status_code == 200 and "protected" not in page.content.decode().lower()
        listed = str(page.context["deleted_objects"])
        for taken in ("resp_1", "resp_2", "resp_3", "resp_4", "resp_5"):
            assert taken in listed
        assert "resp_9" not in listed
        assert admin_client.post(url, {"post": "yes"}).status_code == 302
    assert list(StoredResponse.objects.all()) == [other]

    # Of a branch: the other branch still continues the hidden ones, which stay.
    first, second, third = turns(user, 3, start=10)
    fourth = chain_of(user, 1, start=20, previous=second)[0]
    with time_machine.travel(NOW + timedelta(days=5), tick=False):
        assert stored_response_delete(reach=reach, response_id=second.response_id)  # hidden, kept for both
        response = admin_client.post(
            reverse("admin:chat_storedresponse_changelist"),
            {"action": "delete_selected", "_selected_action": [third.pk], "post": "yes"},
        )
        assert response.status_code == 302
    assert set(StoredResponse.objects.all()) == {other, first, second, fourth}
    assert len(stored_response_input(fourth).items) == 5  # its chain whole


def test_the_admin_lists_the_hidden_ones_as_such(admin_client, settings):
    """Deleted by their owner, or expired, but kept for a chain that continues them: a column and a filter say so."""
    settings.LLMHUB_RESPONSES_RETENTION_DAYS = 30
    user = UserFactory()
    first, second, third = turns(user, 3, now=NOW - timedelta(days=30, hours=12))  # the first expired, kept
    with time_machine.travel(NOW, tick=False):
        assert stored_response_delete(reach=ConversationReach(user_id=user.pk), response_id="resp_2")
        changelist = reverse("admin:chat_storedresponse_changelist")
        page = admin_client.get(changelist)
        rows = {row.response_id: row for row in page.context["cl"].result_list}
        assert [page.context["cl"].model_admin.hidden(rows[name]) for name in ("resp_1", "resp_2", "resp_3")] == [
            "expired",
            "deleted",
            None,
        ]
        assert "hidden" in page.content.decode()
        for value, expected in (("deleted", [second]), ("expired", [first]), ("no", [third])):
            assert list(admin_client.get(changelist, {"hidden": value}).context["cl"].result_list) == expected


def chain_of(user, length: int, *, start: int = 1, previous: StoredResponse | None = None, now: datetime = NOW):
    """``length`` responses each continuing the one before, made as ``stored_response_save`` makes them (a
    reference, their own items), without reading each chain back: long chains in a few seconds."""
    made = []
    for number in range(start, start + length):
        previous = StoredResponse.objects.create(
            response_id=f"resp_{number}",
            owner=user,
            model_name="gpt-test",
            status="completed",
            previous=previous,
            input_items=[{"id": f"msg_in{number}", "type": "message", "role": "user", "content": []}],
            created_at=now,
            expires_at=now + timedelta(days=30),
        )
        made.append(previous)
    return made


@pytest.mark.parametrize("batch_size", [1000, 300])
def test_the_task_deletes_a_long_dead_chain_in_a_few_statements(settings, batch_size):
    """A chain that ended (its last response expired) goes whole in one pass, or in whole chains' ends per batch:
    not one row per pass (a 1,000-deep chain took 1,000 passes of several queries). A dead one that a live branch
    continues, and those before it, are kept; a dead branch beside it goes."""
    user = UserFactory()
    dead = chain_of(user, 1000, now=NOW - timedelta(days=31))
    root, *_ = kept = chain_of(user, 3, start=2000, now=NOW - timedelta(days=31))
    live = chain_of(user, 1, start=3000, previous=kept[-1], now=NOW)  # continues the expired ones
    beside = chain_of(user, 2, start=4000, previous=kept[1], now=NOW - timedelta(days=31))  # a dead branch
    with time_machine.travel(NOW, tick=False), CaptureQueriesContext(connection) as queries:
        assert stored_responses_expire(batch_size=batch_size) == len(dead) + len(beside)
    assert len(queries) <= 3 * (len(dead) // batch_size + 2)  # a batch: its statement, in a transaction
    assert set(StoredResponse.objects.values_list("pk", flat=True)) == {row.pk for row in [*kept, *live]}
    assert len(stored_response_input(live[0]).items) == 4  # its chain read whole, from ``root`` on
    assert stored_response_input(live[0]).length == 4 and root.previous_id is None


def test_the_admin_deletes_a_response_continued_while_it_deletes_it(admin_client, monkeypatch):
    """A response continuing the chain is kept between the moment the admin's delete finds what it takes and the
    deletion (forced here: kept right after it is found): it goes too (it could not be read whole), never a 500
    (the protected page, or the database refusing the deletion), never a row that refers to none."""
    from chat import services_responses

    user = UserFactory()
    first, second = turns(user, 2)
    found = services_responses.stored_responses_removal
    late: list[StoredResponse] = []

    def found_then_continued(pks, **kwargs):
        taken = found(pks, **kwargs)
        if not late:
            late.extend(turns(user, 1, start=3, previous=second))
        return taken

    monkeypatch.setattr(services_responses, "stored_responses_removal", found_then_continued)
    response = admin_client.post(reverse("admin:chat_storedresponse_delete", args=[first.pk]), {"post": "yes"})
    assert response.status_code == 302 and late
    assert not StoredResponse.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="two writers at once (SQLite has one)")
@pytest.mark.parametrize("deleter", ["owner", "admin"])
def test_a_response_kept_on_another_connection_as_its_chain_is_deleted_is_refused_by_the_database(deleter):
    """Two connections: a response continuing the second is written (not yet committed) while its owner deletes the
    second (which none continues that it can see: it goes at once), or an admin deletes the chain. The deletion is
    not held up; the new row's reference, checked at its commit, is refused (the request answers ``store: false``),
    and no row is left referring to none."""
    user = UserFactory()
    first, second = turns(user, 2)
    # The kept response's reference is checked at its commit, as the block ends.
    with pytest.raises(IntegrityError), transaction_held_open(lambda: turns(user, 1, start=3, previous=second)):
        if deleter == "owner":
            assert stored_response_delete(reach=ConversationReach(user_id=user.pk), response_id=second.response_id)
        else:
            assert stored_responses_remove([first.pk]) == 2
    assert list(StoredResponse.objects.all()) == ([first] if deleter == "owner" else [])


@pytest.mark.parametrize("deleter", ["owner", "admin"])
def test_deleting_the_last_of_a_long_hidden_chain_frees_it_in_a_few_queries(settings, deleter):
    """The owner's delete of a chain's last response, or an admin's, frees the hidden ones kept for it alone (1,000
    here): in a few queries, not a few per response of the chain."""
    settings.LLMHUB_RESPONSES_RETENTION_DAYS = 30
    user = UserFactory()
    *hidden, last = chain_of(user, 1000, now=NOW - timedelta(days=31))
    StoredResponse.objects.filter(pk=last.pk).update(expires_at=NOW + timedelta(days=1))  # the others expired
    other = chain_of(user, 2, start=2000, previous=hidden[10], now=NOW)[0]  # a live branch keeps the 11 first
    with time_machine.travel(NOW, tick=False), CaptureQueriesContext(connection) as queries:
        if deleter == "owner":
            assert stored_response_delete(reach=ConversationReach(user_id=user.pk), response_id=last.response_id)
        else:
            assert stored_responses_remove([last.pk]) == len(hidden) - 11 + 1
    assert len(queries) <= 15 + len(hidden) // 100  # and Django deletes rows 100 a statement
    assert StoredResponse.objects.count() == 11 + 2 and StoredResponse.objects.filter(pk=other.pk).exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks of two connections (SQLite has one writer)")
@pytest.mark.parametrize("deleter", ["task", "admin"])
def test_a_response_continued_while_it_is_deleted_is_kept_or_taken_whole(deleter):
    """The hourly task's statement has chosen an expired response (or an admin's delete has found it) when a
    response continuing it is kept (its request read it before it expired), before the deletion reaches its row
    (forced here: another transaction holds the row, as a lock for update without its key, which the new reference
    may share and the deletion waits for). The database refuses the task's batch at its end; the task tries again,
    sees the new one, and keeps the expired one for it. The admin's delete, locking what it takes, finds the new one
    once it has the lock and takes it too. No error, no row that refers to none."""
    user = UserFactory()
    [expired] = turns(user, 1, now=NOW - timedelta(days=31))
    outcome: list[object] = []

    def expire() -> None:
        try:
            if deleter == "task":
                outcome.append(stored_responses_expire(now=NOW))
            else:
                outcome.append(stored_responses_remove([expired.pk], now=NOW))
        except Exception as exc:  # what the task would have raised
            outcome.append(exc)
        finally:
            connection.close()

    def deleting_waits() -> bool:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                ["%DELETE FROM%chat_storedresponse%" if deleter == "task" else "%chat_storedresponse%FOR UPDATE%"],
            )
            return cursor.fetchone()[0] == 1

    task = threading.Thread(target=expire)
    with transaction_held_open(lambda: StoredResponse.objects.select_for_update(no_key=True).get(pk=expired.pk)):
        task.start()
        wait_until(deleting_waits, "the deletion waiting for the held row")
        [kept] = turns(user, 1, start=2, previous=expired, now=NOW)  # committed: its reference shares the lock
    task.join(10)
    if deleter == "task":
        assert outcome == [0]
        assert set(StoredResponse.objects.all()) == {expired, kept}
    else:
        assert outcome == [2]
        assert not StoredResponse.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_the_task_leaves_a_batch_the_database_keeps_refusing_to_its_next_run(caplog):
    """Two expired rows edited by hand into a loop, and batches of one: each batch would leave the other referring to
    none, and the database refuses it. The task stops after a few tries (logged), never loops for ever; a whole
    batch takes both."""
    user = UserFactory()
    first, second = chain_of(user, 2, now=NOW - timedelta(days=31))
    StoredResponse.objects.filter(pk=first.pk).update(previous=second)
    with caplog.at_level("WARNING", logger="chat.services_responses"):
        assert stored_responses_expire(now=NOW, batch_size=1) == 0
    assert any("refused 3 times" in record.getMessage() for record in caplog.records)
    assert StoredResponse.objects.count() == 2
    assert stored_responses_expire(now=NOW) == 2


def test_the_admin_deletes_the_hidden_ones_that_only_a_dead_branch_still_refers_to(admin_client, settings):
    """A hidden one before the response deleted, also continued by a branch that is all expired (kept for nothing
    live): nothing live refers to it any more, so it goes, and that dead branch with it; a live branch keeps its
    own."""
    settings.LLMHUB_RESPONSES_RETENTION_DAYS = 30
    user = UserFactory()
    first, second, third = chain_of(user, 3, now=NOW - timedelta(days=31))  # expired: kept for the fourth
    [fourth] = chain_of(user, 1, start=4, previous=third, now=NOW)
    dead_branch = chain_of(user, 2, start=10, previous=second, now=NOW - timedelta(days=31))
    with time_machine.travel(NOW, tick=False):
        listed = str(
            admin_client.get(reverse("admin:chat_storedresponse_delete", args=[fourth.pk])).context["deleted_objects"]
        )
        assert all(f">{row.response_id}<" in listed for row in [first, second, third, fourth, *dead_branch])
        assert (
            admin_client.post(
                reverse("admin:chat_storedresponse_delete", args=[fourth.pk]), {"post": "yes"}
            ).status_code
            == 302
        )
    assert not StoredResponse.objects.exists()


def stored_rows(owner, start: int, count: int, previous: list[StoredResponse] | None = None) -> list[StoredResponse]:
    """``count`` stored responses in bulk, each continuing its own of ``previous`` (if given)."""
    return StoredResponse.objects.bulk_create(
        StoredResponse(
            response_id=f"resp_{start + index}",
            owner=owner,
            model_name="gpt-test",
            status="completed",
            previous=previous[index] if previous else None,
            created_at=NOW,
            expires_at=NOW + timedelta(days=30),
        )
        for index in range(count)
    )


@pytest.mark.usefixtures("sqlite_variable_limit")
def test_the_admin_deletes_more_stored_responses_than_a_statement_can_name(admin_client, settings):
    """One user's responses, selected across the list and deleted (chains of two: more rows than a statement can
    name): the confirmation page and the delete answer (they were a 500, "too many SQL variables"), every one goes
    with the one continuing it, another user's stay."""
    settings.LLMHUB_RESPONSES_RETENTION_DAYS = 30
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    chains = 1_100
    firsts = stored_rows(alice, 0, chains)
    stored_rows(alice, chains, chains, previous=firsts)
    kept = stored_rows(bob, 10 * chains, 2)
    changelist = reverse("admin:chat_storedresponse_changelist") + "?q=alice"
    action = {"action": "delete_selected", "select_across": "1", "index": "0", "_selected_action": [firsts[0].pk]}
    with time_machine.travel(NOW, tick=False):
        page = admin_client.post(changelist, action)
        assert page.status_code == 200
        assert admin_client.post(changelist, {**action, "post": "yes"}).status_code == 302
    assert list(StoredResponse.objects.order_by("pk")) == kept


def test_the_admin_delete_page_of_many_stored_responses_lists_the_first_and_counts_the_rest(admin_client, settings):
    """One user's responses selected across the list: the confirmation page lists the first 100 and says how many
    more go (it read and rendered every one: past 120 s at 68,000 on PostgreSQL), its queries the same for 50 as
    for 2,000 but for the removal's walk, a few a batch of ids; confirming deletes every one."""
    settings.LLMHUB_RESPONSES_RETENTION_DAYS = 30
    alice = UserFactory(username="alice")
    kept = stored_rows(UserFactory(username="bob"), 100_000, 2)
    changelist = reverse("admin:chat_storedresponse_changelist") + "?q=alice"

    def page(count: int):
        first = StoredResponse.objects.filter(owner=alice).order_by("pk").first()
        action = {"action": "delete_selected", "select_across": "1", "index": "0", "_selected_action": [first.pk]}
        with CaptureQueriesContext(connection) as queries:
            response = admin_client.post(changelist, action)
        assert response.status_code == 200 and dict(response.context["model_count"]) == {"stored responses": count}
        assert not response.context["protected"] and not response.context["perms_lacking"]
        return response, len(queries), action

    with time_machine.travel(NOW, tick=False):
        stored_rows(alice, 0, 50)
        page(50)  # the first view fills Django's caches (content types): not counted
        _, few, _ = page(50)
        stored_rows(alice, 50, 1_950)
        response, many, action = page(2_000)
        # But for the removal's walk (stored_responses_removal): a query a batch of ids (IDS_A_STATEMENT, 900), one
        # batch for 50 and three for 2,000.
        assert many == few + 2
        content = response.content.decode()
        assert content.count("Stored response: <a") == 100 and "… and 1900 more stored responses" in content
        assert admin_client.post(changelist, {**action, "post": "yes"}).status_code == 302
    assert list(StoredResponse.objects.order_by("pk")) == kept


@pytest.mark.parametrize("hidden", [False, True], ids=["live", "hidden"])
def test_the_admin_deletes_responses_continuing_others_in_a_few_queries_a_batch(admin_client, settings, hidden):
    """The second of each of a user's chains of three, selected (those before them live, or hidden and kept for
    them alone, the first of each also continued by a dead branch): the confirmation page and the delete cost a few
    queries a batch of responses, not one or more a response (each walk up a chain, and each dead branch beside it,
    was a query of its own); the hidden ones before them go with them, the live ones stay."""
    settings.LLMHUB_RESPONSES_RETENTION_DAYS = 30
    alice = UserFactory(username="alice")
    changelist = reverse("admin:chat_storedresponse_changelist")
    created = NOW - timedelta(days=31) if hidden else NOW

    def chains(start: int, count: int) -> tuple[list[StoredResponse], list[StoredResponse]]:
        firsts = stored_rows(alice, start, count)
        seconds = stored_rows(alice, start + count, count, previous=firsts)
        stored_rows(alice, start + 2 * count, count, previous=seconds)  # continue the seconds: taken with them
        branches = stored_rows(alice, start + 3 * count, count, previous=firsts)
        StoredResponse.objects.filter(pk__in=[row.pk for row in [*firsts, *branches]]).update(
            created_at=created, expires_at=created + timedelta(days=30)
        )
        if not hidden:  # a dead branch does not hold back a hidden one; beside a live one, it stays
            StoredResponse.objects.filter(pk__in=[row.pk for row in branches]).update(
                created_at=NOW - timedelta(days=31), expires_at=NOW - timedelta(days=1)
            )
        return firsts, seconds

    def delete(seconds: list[StoredResponse]) -> tuple[int, int]:
        action = {"action": "delete_selected", "_selected_action": [row.pk for row in seconds]}
        with CaptureQueriesContext(connection) as page:
            response = admin_client.post(changelist, action)
        assert response.status_code == 200
        assert dict(response.context["model_count"]) == {"stored responses": len(seconds) * (4 if hidden else 2)}
        with CaptureQueriesContext(connection) as deletion:
            assert admin_client.post(changelist, {**action, "post": "yes"}).status_code == 302
        return len(page), len(deletion)

    with time_machine.travel(NOW, tick=False):
        delete(chains(0, 1)[1])  # the first fills Django's caches: not counted
        few = delete(chains(100, 5)[1])
        firsts, seconds = chains(1_000, 200)
        many = delete(seconds)
        remaining = set(StoredResponse.objects.values_list("pk", flat=True))
    for on_few, on_many in zip(few, many, strict=True):
        assert on_many < on_few + 20  # it was a few queries more a response: hundreds more for 195 more
    assert not remaining if hidden else {row.pk for row in firsts} <= remaining
