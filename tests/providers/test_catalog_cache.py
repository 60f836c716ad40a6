"""The catalog's in-process cache (``providers.selectors.catalog_cache``) against a change being committed: a
request that reads the catalog between an admin's save and its commit must not keep what it read."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync

from providers.exceptions import ModelNotFoundError
from providers.selectors import model_resolve, models_enabled
from tests.factories import ModelFactory
from tests.transactions import read_before_commit

pytestmark = pytest.mark.django_db(transaction=True)


def _names() -> set[str]:
    return {model.name for model in async_to_sync(models_enabled)()}


def test_a_request_that_reads_a_model_while_its_disabling_commits_does_not_keep_it_for_the_next():
    """Disabling a model drops the cached catalog before it commits; a request that reads the model in between
    (another connection: the model is still enabled for it) must not keep that copy, or the requests after the
    change answered would still be served by the disabled model for the cache's TTL."""
    model = ModelFactory(name="retiring")
    assert async_to_sync(model_resolve)("retiring").id == model.pk
    model.enabled = False

    meanwhile = read_before_commit(model.save, lambda: (async_to_sync(model_resolve)("retiring").id, _names()))

    assert meanwhile == (model.pk, {"retiring"})  # the change was not committed yet
    with pytest.raises(ModelNotFoundError):
        async_to_sync(model_resolve)("retiring")
    assert _names() == set()
