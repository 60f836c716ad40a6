"""Moderation policies' in-process cache (``providers.moderation.policy_cache``) against a change being committed:
a request that reads a policy between an admin's save and its commit must not keep what it read."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync

from providers.models import ModerationPolicy
from providers.moderation import moderation_policies
from tests.transactions import read_before_commit

pytestmark = pytest.mark.django_db(transaction=True)


def _enabled(policy_id: int) -> list[int]:
    return [policy.id for policy in async_to_sync(moderation_policies)((policy_id,))]


def test_a_request_that_reads_a_policy_while_its_disabling_commits_does_not_keep_it_for_the_next():
    """Disabling a policy drops the cached policies before it commits; a request that reads the policy in between
    (another connection: it is still enabled for it) must not keep that copy, or the requests after the change
    answered would still be moderated by it for the cache's TTL."""
    policy = ModerationPolicy.objects.create(name="house rules", blocklist="forbidden")
    assert _enabled(policy.pk) == [policy.pk]
    policy.enabled = False

    meanwhile = read_before_commit(policy.save, lambda: _enabled(policy.pk))

    assert meanwhile == [policy.pk]  # the change was not committed yet
    assert _enabled(policy.pk) == []
