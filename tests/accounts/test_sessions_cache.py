"""The sessions' in-process cache (``accounts.sessions.session_cache``, what a chat socket asks at every send)
against a change being committed: a request that reads a session between a user's change and its commit must
not keep what it read."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from accounts.sessions import session_user_id
from tests.factories import UserFactory
from tests.transactions import read_before_commit

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_socket_that_reads_a_session_while_its_users_deactivation_commits_does_not_keep_it_for_the_next():
    """Deactivating a user drops the cached sessions before it commits; a send that reads the session in between
    (another connection: the user is still active for it) must not keep that copy, or the deactivated user's chat
    socket would go on answering for the cache's TTL."""
    user = UserFactory(username="leaving")
    browser = Client()
    browser.force_login(user)
    session_key = browser.session.session_key
    assert async_to_sync(session_user_id)(session_key) == user.pk
    user.is_active = False

    meanwhile = read_before_commit(
        lambda: user.save(update_fields=["is_active"]), lambda: async_to_sync(session_user_id)(session_key)
    )

    assert meanwhile == user.pk  # the change was not committed yet
    assert async_to_sync(session_user_id)(session_key) is None
