"""``/api/schema/``: the OpenAPI document, generated once per process (``llmhub.schema`` holds how it is generated)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils import translation
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SCHEMA_KWARGS, SpectacularAPIView
from rest_framework.response import Response

# The document as generated, and as each renderer wrote it; kept for the life of the process.
_document: list[dict[str, Any]] = []
_rendered: dict[type, tuple[bytes, str, str]] = {}


def schema_documents_forget() -> None:
    """Drop the document kept by ``SchemaApi`` (the next request generates it again)."""
    _document.clear()
    _rendered.clear()


class SchemaApi(SpectacularAPIView):
    """``/api/schema/``, public: drf-spectacular's view, but the document is generated once per process and each
    format rendered once. Generating it takes about half a second of CPU (rendering it as YAML a tenth more), and
    it changes only with a deploy: generated at each request, anyone could keep the server's cores busy with it.

    So that nothing a client sends can make it generate again, the document is always in ``LANGUAGE_CODE`` (a
    ``lang`` parameter is ignored: llmhub's own texts are English only) and of the API's one version (a
    ``version`` parameter is ignored: the API is not versioned)."""

    @extend_schema(**SCHEMA_KWARGS)  # as drf-spectacular's: left out of the document (SERVE_INCLUDE_SCHEMA)
    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        renderer = request.accepted_renderer  # type: ignore[attr-defined]
        rendered = _rendered.get(type(renderer))
        if rendered is None:
            if not _document:
                with translation.override(settings.LANGUAGE_CODE):
                    _document.append(self._get_schema_response(request).data)
            response = Response(_document[0])
            response.accepted_renderer = renderer
            response.accepted_media_type = renderer.media_type
            response.renderer_context = self.get_renderer_context()
            response.render()
            disposition = f'inline; filename="{self._get_filename(request, None)}"'
            rendered = _rendered[type(renderer)] = (response.content, response["Content-Type"], disposition)
        content, content_type, disposition = rendered
        return HttpResponse(content, content_type=content_type, headers={"Content-Disposition": disposition})

    def _get_version_parameter(self, request: HttpRequest) -> None:
        return None
