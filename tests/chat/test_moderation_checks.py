"""The block-list matcher, the reply guard's incremental checks (pure logic), and the policy admin, which
refuses a block-list that could not be matched safely."""

from __future__ import annotations

import pytest
from django.urls import reverse

from audit.models import AuditEvent
from chat.callers import Caller
from chat.moderation import ContentPolicyViolationError, Moderation, ReplyGuard, moderation_drain
from providers.models import ModerationAction, ModerationChecker, ModerationPolicy
from providers.moderation import SCAN_LIMIT_CHARS, Blocklist, blocklist_problems, policy_snapshot

# THE BLOCK-LIST


def test_words_and_phrases_match_as_whole_words_in_any_case():
    blocklist = Blocklist("kill\nbad   phrase\n# a comment\n")

    assert blocklist.scan("I will KILL it").where == "entry 1 at character 7"
    assert blocklist.scan("a Bad\nphrase here").where == "entry 2 at character 2"
    assert blocklist.scan("killer skills, badphrase") is None


def test_a_word_matched_in_another_case_names_its_entry():
    blocklist = Blocklist("# house rules\nstraße\nkill")

    assert blocklist.scan("KİLL").where == "entry 3 at character 0"  # İ matches i, though their case folds differ
    assert blocklist.scan("STRAẞE").where == "entry 2 at character 0"


def test_patterns_and_the_first_hit_in_the_text():
    blocklist = Blocklist("zebra\nre:\\d{3}-\\d{4}")

    assert blocklist.scan("call 555-1234 about the zebra").where == "entry 2 at character 5"
    assert blocklist.scan("nothing here 55-1234") is None


def test_a_stream_scan_waits_for_the_next_piece_before_counting_a_word_at_the_very_end():
    blocklist = Blocklist("kill")

    assert blocklist.scan("we kill", final=False) is None  # it may yet be "killer"
    assert blocklist.scan("we killer", final=False) is None
    assert blocklist.scan("we kill it", final=False) is not None
    assert blocklist.scan("we kill", final=True) is not None


@pytest.mark.parametrize("where", ["first", "seam", "last"])
async def test_a_whole_input_is_scanned_however_long(where):
    """A request's input is read whole, a window at a time: a blocked word ahead of 200,000 characters of
    padding (the scan of one window) was let through, and one across two windows' seam is found too."""
    blocklist = Blocklist("forbidden\nre:secret\\s+plan")
    padding = "lorem ipsum " * 40_000  # 480,000 characters: three windows
    seam = SCAN_LIMIT_CHARS - SCAN_LIMIT_CHARS % 12  # after a space, less than a word before the first window ends
    text = {
        "first": "forbidden " + padding,
        "seam": padding[:seam] + "forbidden " + padding,
        "last": padding + " secret  plan",
    }[where]
    hit = await blocklist.scan_whole(text)
    assert hit is not None and hit.categories == ("blocklist",)
    assert await blocklist.scan_whole(padding + " forbiddenly") is None  # still whole words only


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("re:(x|y", "not a regular expression"),
        ("re:(a)\\1", "no back-references"),
        ("re:(?<=a)b", "no look-arounds"),
        ("re:foo(?!bar)", "no look-arounds"),
        ("re:a*", "matches empty text"),
        ("re:" + "a" * 301, "at most 300 characters"),
    ],
)
def test_patterns_the_linear_matcher_does_not_take_or_that_match_anything_are_refused(entry, problem):
    (found,) = blocklist_problems(f"fine words\n{entry}")

    assert found.startswith("Line 2:") and problem in found


# Patterns that backtracked for seconds to minutes under Python's re (on 26-40 characters, or a.*c on
# 200,000): accepted now that RE2 matches them in linear time, and still found where they match.
BACKTRACKING = ["(a+)+$", "(\\w*)*x", ".*.*=", "((a+))+b", "(a|aa)+b", "a.*b.*c", "a\\w*c", "x\\w+y[^z]*z"]


def test_patterns_that_backtrack_under_pythons_re_are_taken_and_matched_by_re2():
    entries = "\n".join(f"re:{pattern}" for pattern in BACKTRACKING)
    assert blocklist_problems(entries) == []
    blocklist = Blocklist(entries)
    assert {type(regex).__module__.split(".")[0] for line, regex in blocklist._matchers()} == {"re2"}
    assert blocklist.scan("a" * 40 + "!") is None  # where Python's re took 43 s on (a|aa)+b
    assert blocklist.scan("xx AAAAB") is not None
    assert blocklist.scan("then a, b and C").where == "entry 6 at character 5"  # a.*b.*c, any case


def test_sound_patterns_are_accepted():
    assert blocklist_problems("word\nre:\\bcredit\\s+card\\b\nre:\\d{3,4}-\\d+\nre:(?:foo|bar)baz") == []
    assert blocklist_problems("re:foo\\s+bar\\s+baz\nre:(?:ab)+c\nre:(?:cat|dog)s?\nre:[a-z]{2,40}@x") == []


# THE REPLY GUARD


def policy(**fields) -> object:
    row = ModerationPolicy(
        pk=fields.pop("pk", 1),
        name="p",
        checker=ModerationChecker.BLOCKLIST,
        **{"stream_interval_chars": 1, "blocklist": "adipiscing", **fields},
    )
    return policy_snapshot(row, None)


def guard_for(*policies) -> tuple[Moderation, ReplyGuard]:
    moderation = Moderation(list(policies), caller=Caller(user_id=1, username="u"), request_id="req_1", model="m")
    guard = moderation.output()
    assert guard is not None
    return moderation, guard


async def test_a_term_split_over_two_pieces_is_found():
    _, guard = guard_for(policy())

    await guard.feed("lorem adip")
    with pytest.raises(ContentPolicyViolationError) as blocked:
        await guard.feed("iscing elit")

    assert blocked.value.code == "content_policy_violation"
    assert blocked.value.moderation == 'blocked output: blocklist (entry 1 at character 6), policy "p"'


async def test_a_piece_ending_in_a_blocked_word_is_held_back_until_the_next_shows_it_whole():
    _, guard = guard_for(policy(stream_interval_chars=5))

    assert await guard.feed("lorem adipi") is True
    assert await guard.feed("scing") is False  # "adipiscing" so far: it may yet be "adipiscingly"
    assert await guard.feed("") is False
    assert await guard.feed("ly") is True  # scanned although under the mark: not the word
    assert await guard.feed(" adipiscing") is False
    with pytest.raises(ContentPolicyViolationError):
        await guard.feed(" elit")


async def test_a_blocking_blocklist_scans_every_piece_whatever_its_interval():
    _, guard = guard_for(policy(stream_interval_chars=1000))

    with pytest.raises(ContentPolicyViolationError):
        await guard.feed("lorem adipiscing elit")  # under the mark, and still not relayed


@pytest.mark.django_db(transaction=True)
async def test_a_flagging_blocklist_scans_at_its_marks_and_the_end_scans_the_rest():
    moderation, guard = guard_for(policy(stream_interval_chars=1000, action=ModerationAction.FLAG))

    await guard.feed("lorem adipiscing elit")  # under the mark: not scanned yet
    assert moderation.summary == ""
    await guard.finish()
    await moderation_drain()
    assert moderation.summary.startswith("flagged output: blocklist")


@pytest.mark.django_db(transaction=True)
async def test_a_flag_is_recorded_once_however_often_the_term_comes_back():
    moderation, guard = guard_for(policy(action=ModerationAction.FLAG))

    for piece in ("adipiscing ", "and ", "adipiscing ", "again"):
        await guard.feed(piece)
    await guard.finish()
    await moderation_drain()

    assert moderation.summary == 'flagged output: blocklist (entry 1 at character 0), policy "p"'
    events = [event async for event in AuditEvent.objects.filter(action="moderation.flag")]
    assert [(e.actor_type, e.actor_id, e.target_id) for e in events] == [("user", "1", "req_1")]


def test_an_output_guard_only_when_a_policy_checks_output():
    moderation = Moderation(
        [policy(check_output=False)], caller=Caller(user_id=1, username="u"), request_id="r", model="m"
    )

    assert moderation.output() is None


# THE ADMIN


@pytest.fixture
def admin_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.com", "pw"))
    return client


def policy_form(**fields) -> dict:
    return {
        "name": "house rules",
        "enabled": "on",
        "checker": "blocklist",
        "action": "block",
        "check_input": "on",
        "check_output": "on",
        "stream_interval_chars": "200",
        "blocklist": "",
        "moderation_model": "omni-moderation-latest",
        "categories": "[]",
        "timeout_seconds": "5.0",
        **fields,
    }


@pytest.mark.django_db
def test_the_admin_refuses_a_pattern_the_matcher_does_not_take_and_saves_a_sound_list(admin_client):
    url = reverse("admin:providers_moderationpolicy_add")

    refused = admin_client.post(url, policy_form(blocklist="fine\nre:(?<!not )bad"))
    saved = admin_client.post(url, policy_form(blocklist="fine\nre:\\bcredit\\s+card\\b"))

    assert refused.status_code == 200
    assert "Line 2: not a regular expression the matcher takes" in refused.content.decode()
    assert saved.status_code == 302
    assert list(ModerationPolicy.objects.values_list("blocklist", flat=True)) == ["fine\nre:\\bcredit\\s+card\\b"]


@pytest.mark.django_db
def test_the_openai_checker_needs_a_provider_in_the_admin(admin_client):
    response = admin_client.post(
        reverse("admin:providers_moderationpolicy_add"), policy_form(checker="openai", blocklist="")
    )

    assert response.status_code == 200
    assert "/v1/moderations" in response.content.decode()
    assert not ModerationPolicy.objects.exists()


@pytest.mark.django_db
def test_a_policy_in_use_cannot_be_deleted_until_nothing_names_it(admin_client):
    """Deleting a policy attached to a plan or a model left them unprotected, and the admin's delete page did not
    say so (the link was simply emptied). The page now names what uses it and refuses; once detached it goes."""
    from billing.models import Plan
    from tests.factories import ModelFactory

    used = ModerationPolicy.objects.create(name="house rules", blocklist="forbidden")
    plan = Plan.objects.create(name="Team", moderation_policy=used)
    model = ModelFactory(name="gpt-guarded", moderation_policy=used)
    url = reverse("admin:providers_moderationpolicy_delete", args=[used.pk])

    page = admin_client.get(url).content.decode()
    assert "Team" in page and "gpt-guarded" in page
    response = admin_client.post(url, {"post": "yes"})
    assert response.status_code == 200  # the page again: nothing deleted
    assert ModerationPolicy.objects.filter(pk=used.pk).exists()

    plan.moderation_policy = None
    plan.save()
    model.moderation_policy = None
    model.save()
    assert admin_client.post(url, {"post": "yes"}).status_code == 302
    assert not ModerationPolicy.objects.filter(pk=used.pk).exists()
