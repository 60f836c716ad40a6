"""``GET /v1/models`` and ``GET /v1/models/{model}``, and the 404 of a /v1 path llmhub does not serve, answered in
the shape of the SDK asking.

Both official SDKs list models at the same path. The anthropic SDK sends ``anthropic-version`` on every
request and gets Anthropic's ``ModelInfo`` pages and errors (``api_anthropic``); any other client gets OpenAI's
list and model objects (``api_openai``). So for a path neither serves here (the Files API both have, Anthropic's
legacy ``/v1/complete``): Anthropic's ``not_found_error`` with its ``request-id``, or OpenAI's ``unknown_url``.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from core.errors import speaks_anthropic

from . import api_anthropic, api_openai


def _anthropic_client(request: HttpRequest) -> bool:
    return speaks_anthropic(request.path, request.headers)


async def models_list(request: HttpRequest) -> HttpResponse:
    if _anthropic_client(request):
        return await api_anthropic.models_list(request)
    return await api_openai.models_list(request)


async def model_retrieve(request: HttpRequest, model: str) -> HttpResponse:
    if _anthropic_client(request):
        return await api_anthropic.model_retrieve(request, model)
    return await api_openai.model_retrieve(request, model)


async def not_found(request: HttpRequest, path: str) -> HttpResponse:
    if _anthropic_client(request) and request.method != "TRACE":  # TRACE: the 405 every path answers
        return await api_anthropic.not_found(request)
    return await api_openai.not_found(request, path)
