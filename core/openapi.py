"""What the apps' DRF views document their errors with (drf-spectacular): OpenAI's error shape, which
every error of ours takes (``core.errors``), and what each status means.

The project's own schema wiring (the ``AutoSchema`` class, the gateway key's security scheme, the hooks
that add ``/v1/*``) stays in ``llmhub.schema``.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema_serializer
from rest_framework import serializers

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid request: `error.param` names the offending parameter.",
    401: "Missing, malformed, unknown, revoked or expired API key.",
    403: "The key or the owner's plan does not allow this model.",
    404: "No such object, or not yours (the two are indistinguishable).",
    413: (
        "The request body is larger than the server accepts: on /v1, `LLMHUB_MAX_REQUEST_MB` (32 MB by default); "
        "elsewhere Django's `DATA_UPLOAD_MAX_MEMORY_SIZE` (2.5 MB)."
    ),
    429: "A rate limit or the budget is exhausted; `Retry-After` says when to retry.",
    502: "The upstream provider failed or answered something unusable.",
    503: "No upstream provider is available for this model right now.",
    504: "The upstream provider did not answer in time.",
}


@extend_schema_serializer(component_name="Error")
class ErrorSerializer(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.CharField(help_text="e.g. invalid_request_error, rate_limit_error, api_error.")
    param = serializers.CharField(allow_null=True, help_text="The request parameter at fault, if any.")
    code = serializers.CharField(allow_null=True, help_text="A machine-readable code, e.g. invalid_api_key.")


@extend_schema_serializer(component_name="ErrorResponse")
class ErrorResponseSerializer(serializers.Serializer):
    """Every error, on /api/* as on /v1/*: OpenAI's ``{"error": {...}}``."""

    error = ErrorSerializer()


def error_responses(*status_codes: int) -> dict[int, OpenApiResponse]:
    """``extend_schema(responses=...)`` entries for the given error statuses of a DRF view."""
    return {
        status: OpenApiResponse(response=ErrorResponseSerializer, description=ERROR_DESCRIPTIONS[status])
        for status in status_codes
    }
