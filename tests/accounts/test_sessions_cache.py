"""The sessions' in-process cache (``accounts.sessions.session_cache``, what a chat socket asks at every send)
against a change being committed: a request that reads a session between a user's change and its commit must
not keep what it read."""

from __future__ import annotations

import threading

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.signals import user_logged_out
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client
from django.urls import reverse

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


def test_a_socket_that_reads_a_session_while_its_sign_out_deletes_it_does_not_keep_it_for_the_next():
    """Django sends ``user_logged_out`` (which dropped the cached sessions) before it deletes the session: a send
    that read the session in between (on another thread while the sign-out's deletes it, or waits for the
    database's lock to) found it still valid and kept that copy, so the signed-out chat socket went on answering
    for the cache's TTL. The session is refused from the signal on."""
    user = UserFactory(username="leaving")
    browser = Client()
    browser.force_login(user)
    session_key = browser.session.session_key
    assert async_to_sync(session_user_id)(session_key) == user.pk
    read_meanwhile: list[int | None] = []

    def a_send_reads_the_session(**kwargs: object) -> None:  # after accounts' receiver, before the delete
        def read() -> None:  # another thread, another connection, as a socket's send
            try:
                read_meanwhile.append(async_to_sync(session_user_id)(session_key))
            finally:
                connection.close()

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(timeout=10)

    user_logged_out.connect(a_send_reads_the_session, dispatch_uid="test.a_send_reads_the_session")
    try:
        signed_out = browser.post(reverse("logout"))
    finally:
        user_logged_out.disconnect(dispatch_uid="test.a_send_reads_the_session")
    assert signed_out.status_code == 302
    assert read_meanwhile == [None]  # signed out, though not deleted yet
    assert not Session.objects.filter(session_key=session_key).exists()

    assert async_to_sync(session_user_id)(session_key) is None
