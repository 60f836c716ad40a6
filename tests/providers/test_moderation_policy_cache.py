"""Moderation policies' in-process cache (``providers.moderation.policy_cache``) against a change being committed:
a request that reads a policy between an admin's save and its commit must not keep what it read."""

from __future__ import annotations

import threading

import pytest
from asgiref.sync import async_to_sync
from django.db import connection, transaction

from providers.models import ModerationPolicy
from providers.moderation import moderation_policies

pytestmark = pytest.mark.django_db(transaction=True)


def _enabled(policy_id: int) -> list[int]:
    return [policy.id for policy in async_to_sync(moderation_policies)((policy_id,))]


def test_a_request_that_reads_a_policy_while_its_disabling_commits_does_not_keep_it_for_the_next():
    """Disabling a policy drops the cached policies before it commits; a request that reads the policy in between
    (another connection: it is still enabled for it) must not keep that copy, or the requests after the change
    answered would still be moderated by it for the cache's TTL."""
    policy = ModerationPolicy.objects.create(name="house rules", blocklist="forbidden")
    assert _enabled(policy.pk) == [policy.pk]
    read_meanwhile: list[list[int]] = []

    def a_request_reads_the_policy() -> None:  # another thread, another connection: committed data only
        try:
            read_meanwhile.append(_enabled(policy.pk))
        finally:
            connection.close()

    with transaction.atomic():
        policy.enabled = False
        policy.save()
        reader = threading.Thread(target=a_request_reads_the_policy)
        reader.start()
        reader.join(timeout=10)
    assert read_meanwhile == [[policy.pk]]  # the change was not committed yet

    assert _enabled(policy.pk) == []
