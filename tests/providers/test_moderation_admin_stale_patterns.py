"""``re:`` patterns saved before the plain form dropped accents and folded ``ß`` (5 December) can never match the
letters they name: the text they meet no longer has them. The admin refuses such a pattern when a policy is saved,
but said nothing of those already saved; the policies' list and the policy's page now flag each, with the pattern
rewritten in the plain form."""

from __future__ import annotations

import pytest
from django.urls import reverse

from providers.models import ModerationPolicy

pytestmark = pytest.mark.django_db

STALE = "# saved before 5 December\nforbidden\nre:caf[eé]\nre:\\bstraße\\b\nre:\\bcredit\\s+card\\b"


@pytest.fixture
def admin_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.com", "pw"))
    return client


def test_the_policy_page_flags_each_saved_pattern_that_cannot_match_with_its_plain_form(admin_client):
    stale = ModerationPolicy.objects.create(name="old rules", blocklist=STALE)  # written as a load or a migration would

    page = admin_client.get(reverse("admin:providers_moderationpolicy_change", args=[stale.pk])).content.decode()

    assert "Line 3: re:caf[eé] cannot match" in page
    assert "write it in the plain form: re:caf[ee]" in page
    assert "Line 4: re:\\bstraße\\b cannot match" in page and "re:\\bstrasse\\b" in page
    assert "card\\b cannot match" not in page  # the sound pattern is not flagged


def test_the_policies_list_counts_the_patterns_that_cannot_match(admin_client):
    ModerationPolicy.objects.create(name="old rules", blocklist=STALE)
    ModerationPolicy.objects.create(name="new rules", blocklist="forbidden\nre:caf[ee]")

    page = admin_client.get(reverse("admin:providers_moderationpolicy_changelist")).content.decode()

    assert page.count("cannot match") == 1
    assert "2 patterns cannot match" in page


def test_a_sound_policy_page_flags_nothing(admin_client):
    sound = ModerationPolicy.objects.create(name="new rules", blocklist="forbidden\nre:caf[ee]\nre:привет")

    page = admin_client.get(reverse("admin:providers_moderationpolicy_change", args=[sound.pk])).content.decode()

    assert "cannot match" not in page


def test_a_saved_pattern_with_a_look_alike_letter_in_a_latin_word_is_flagged_with_its_latin_spelling(admin_client):
    """A scan reads a Cyrillic "о" in a Latin word as "o", so ``fоrbid\\w+`` written with one can never match; saved
    before the admin refused it, it was not flagged either. A Russian pattern is."""
    stale = ModerationPolicy.objects.create(name="old rules", blocklist="re:f\u043erbid\\w+\nre:\\bсор\\b")

    page = admin_client.get(reverse("admin:providers_moderationpolicy_change", args=[stale.pk])).content.decode()
    listed = admin_client.get(reverse("admin:providers_moderationpolicy_changelist")).content.decode()

    assert "Line 1: re:f\u043erbid\\w+ cannot match" in page and "plain form: re:forbid\\w+" in page
    assert "Line 2" not in page
    assert "1 pattern cannot match" in listed
