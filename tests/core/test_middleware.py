"""``core.middleware.SyncAndAsyncMiddleware``, the base of llmhub's own middleware: a synchronous chain (WSGI, the
test ``Client``) runs its ``call`` in the request's thread, an asynchronous one (uvicorn, ``AsyncClient``) its
``acall`` on the event loop, with no thread hop, whether the view is sync or async."""

from __future__ import annotations

import threading

import pytest
from django.http import HttpResponse
from django.test import AsyncClient, Client
from django.urls import path

from core.middleware import SyncAndAsyncMiddleware


class PathMiddleware(SyncAndAsyncMiddleware):
    """Says which of its paths served the answer, and in which thread."""

    def call(self, request):
        response = self.get_response(request)
        response["X-Path"] = f"sync {threading.get_ident()}"
        return response

    async def acall(self, request):
        response = await self.get_response(request)
        response["X-Path"] = f"async {threading.get_ident()}"
        return response


def sync_view(request):
    return HttpResponse(str(threading.get_ident()))


async def async_view(request):
    return HttpResponse(str(threading.get_ident()))


urlpatterns = [path("sync/", sync_view), path("async/", async_view)]

pytestmark = [pytest.mark.urls(__name__)]


@pytest.fixture(autouse=True)
def only_this_middleware(settings):
    settings.MIDDLEWARE = [f"{__name__}.PathMiddleware"]


@pytest.mark.parametrize("view", ["sync", "async"])
def test_a_synchronous_chain_runs_the_sync_path_in_the_requests_thread(view):
    response = Client().get(f"/{view}/")

    assert response.status_code == 200
    assert response["X-Path"] == f"sync {threading.get_ident()}"


@pytest.mark.parametrize("view", ["sync", "async"])
async def test_an_asynchronous_chain_runs_the_async_path_on_the_event_loop(view):
    response = await AsyncClient().get(f"/{view}/")

    assert response.status_code == 200
    assert response["X-Path"] == f"async {threading.get_ident()}"
    if view == "async":
        assert response.content.decode() == str(threading.get_ident())  # nothing moved the request off the loop


def test_a_middleware_that_writes_one_path_only_cannot_be_built():
    """Both paths are abstract: a subclass without its async path fails when Django builds the chain, not on the
    first request an async server hands it."""

    class SyncOnly(SyncAndAsyncMiddleware):
        def call(self, request):
            return self.get_response(request)

    with pytest.raises(TypeError, match="acall"):
        SyncOnly(lambda request: None)
