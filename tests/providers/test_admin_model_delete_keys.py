"""Deleting a public model in the admin that is all a gateway key may use is refused, naming the key.

A key's model list empty means every model its owner's plan allows (``ApiKey.allowed_models``): deleting the one
model a key was held to emptied the list, and the key, meant for a cheap model alone, could call every model of the
plan (its chain's lists still apply). Until 7 December the delete page listed the key's link to the model among what
the delete takes, and went on. A key that keeps another model is only narrowed, and the delete goes on."""

from __future__ import annotations

import pytest
from django.urls import reverse

from billing.services.keys import api_key_authenticate_sync, api_key_create
from providers.models import CatalogModel
from tests.factories import ModelFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_deleting_the_only_model_a_key_may_use_is_refused_naming_the_key(admin_client):
    mini, large, other = ModelFactory(name="mini"), ModelFactory(name="large"), ModelFactory(name="other")
    held = api_key_create(user=UserFactory(username="alice"), name="cheap-bot", allowed_models=[mini])
    narrowed = api_key_create(user=UserFactory(username="bob"), name="two-models", allowed_models=[mini, other])
    url = reverse("admin:providers_catalogmodel_delete", args=[mini.pk])

    page = admin_client.get(url).content.decode()
    refused = admin_client.post(url, {"post": "yes"})

    assert f"mini: the only model the key {held.api_key.prefix} (cheap-bot, alice) may use" in page
    assert refused.status_code == 200 and CatalogModel.objects.filter(pk=mini.pk).exists()
    principal = api_key_authenticate_sync(held.secret)
    assert principal.allowed_model_ids == frozenset({mini.pk})  # not None: every model of the plan
    assert narrowed.api_key.prefix not in page

    # The bulk action refuses it too, and so a selection that takes every model of a key's list.
    changelist = reverse("admin:providers_catalogmodel_changelist")
    admin_client.post(changelist, {"action": "delete_selected", "_selected_action": [mini.pk], "post": "yes"})
    assert CatalogModel.objects.filter(pk=mini.pk).exists()
    both = admin_client.post(changelist, {"action": "delete_selected", "_selected_action": [other.pk, mini.pk]})
    assert narrowed.api_key.prefix in both.content.decode()

    # A model no key is held to alone goes as before: the key that kept another is narrowed to it.
    api_key_create(user=UserFactory(username="carol"), name="broad", allowed_models=[large, other])
    done = admin_client.post(reverse("admin:providers_catalogmodel_delete", args=[large.pk]), {"post": "yes"})
    assert done.status_code == 302 and not CatalogModel.objects.filter(pk=large.pk).exists()
