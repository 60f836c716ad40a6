"""``/api/audit/``: the audit log for staff (``is_staff``), newest first, filtered, as JSON pages or CSV.

Authentication is whatever the other ``/api/`` endpoints take (the web session, a JWT, a gateway key); anyone
else gets 403. A gateway key reads it only if it holds the ``audit:read`` scope and its owner is staff: a key
handed to an app, perhaps limited to one model, must not read who did what across the whole installation
because its owner happens to be staff. Reading the log is not itself recorded.
"""

from __future__ import annotations

from typing import Any

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_serializer
from rest_framework import permissions, renderers, serializers
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request
from rest_framework.views import APIView

from core.openapi import ErrorResponseSerializer, error_responses
from core.serializer_fields import InstantField

from .exports import audit_csv_response
from .models import ActorType
from .selectors import AuditFilters, audit_event_list

_TAG = ["Audit log"]
_STAFF_ONLY = {
    403: OpenApiResponse(
        response=ErrorResponseSerializer,
        description="Only staff may read the audit log; with an API key, only one holding the `audit:read` scope.",
    )
}
# What the schema says of a gateway key on these endpoints.
_KEY_NEEDS_SCOPE = " An API key needs the `audit:read` scope (and its owner must be staff)."
# The scope a gateway key needs (``billing.models.KeyScope.AUDIT_READ``), spelled out here because audit sits
# below billing.
AUDIT_READ_SCOPE = "audit:read"


class CanReadAuditLog(permissions.BasePermission):
    """Staff may read the log by session or JWT; a gateway key (the principal with ``scopes``, ``billing``'s
    ``KeyPrincipal``) only with ``audit:read``, its owner still staff (checked by ``IsAdminUser`` beside it)."""

    message = (
        "This API key may not read the audit log: only a key created with the audit:read scope may (its owner "
        "must be staff), or a staff member from the web session."
    )

    def has_permission(self, request: Request, view: Any) -> bool:
        scopes = getattr(request.auth, "scopes", None)
        return scopes is None or AUDIT_READ_SCOPE in scopes


class AuditPagination(LimitOffsetPagination):
    max_limit = 1000
    max_offset = 10**12

    def get_offset(self, request: Request) -> int:
        return min(super().get_offset(request), self.max_offset)


class AuditFilterSerializer(serializers.Serializer):
    action = serializers.CharField(
        required=False, max_length=64, help_text="An action (`provider_key.add`), or a prefix ending in `.`."
    )
    actor = serializers.CharField(
        required=False,
        max_length=200,
        help_text="A username, a key prefix, `system`, or `<actor_type>:<actor_id>` (`user:42`, `key:7`).",
    )
    target_type = serializers.CharField(required=False, max_length=64, help_text="e.g. `providers.provider`.")
    target_id = serializers.CharField(required=False, max_length=64)
    since = InstantField(required=False, help_text="Inclusive.")
    until = InstantField(required=False, help_text="Exclusive; a date means its start.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        for name, value in attrs.items():
            if isinstance(value, str) and not value.isprintable():
                raise serializers.ValidationError({name: "Give printable text."})
        since, until = attrs.get("since"), attrs.get("until")
        if since is not None and until is not None and since >= until:
            raise serializers.ValidationError({"until": "until must be after since."})
        return attrs


@extend_schema_serializer(component_name="AuditEvent")
class AuditEventOutputSerializer(serializers.Serializer):
    seq = serializers.IntegerField(help_text="The row's place in the chain.")
    created_at = serializers.DateTimeField()
    actor_type = serializers.ChoiceField(choices=ActorType.choices)
    actor_id = serializers.CharField(help_text="A user's or a key's id; empty for the system.")
    actor_repr = serializers.CharField(help_text="A username, a key prefix, or `system`.")
    action = serializers.CharField()
    target_type = serializers.CharField()
    target_id = serializers.CharField()
    target_repr = serializers.CharField()
    changes = serializers.DictField(
        child=serializers.JSONField(), help_text="field: [old, new]; secret values are `[secret]`."
    )
    ip_address = serializers.IPAddressField(allow_null=True)
    user_agent = serializers.CharField()
    prev_hash = serializers.CharField()
    hash = serializers.CharField()


def _filters(request: Request) -> AuditFilters:
    serializer = AuditFilterSerializer(data=request.query_params)
    serializer.is_valid(raise_exception=True)
    return AuditFilters(**serializer.validated_data)


def _wants_csv(request: Request) -> bool:
    return request.query_params.get("format") == "csv"


class _AuditApi(APIView):
    permission_classes = [permissions.IsAdminUser, CanReadAuditLog]
    renderer_classes = [renderers.JSONRenderer]

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # ``?format=csv`` is answered by the view with a streamed export (``audit_csv_response``), not by a
        # renderer; anything DRF renders here (a page, an error) is JSON, like every /api/ answer.
        if _wants_csv(request):
            return renderers.JSONRenderer(), "application/json"
        return super().perform_content_negotiation(request, force)


class AuditEventListApi(_AuditApi):
    pagination_class = AuditPagination

    @extend_schema(
        tags=_TAG,
        operation_id="audit_events_list",
        summary="List audit events (staff)",
        description=(
            "Newest first. Who did what to which object, from which address, with `changes` as field: "
            "[old, new] (secrets masked). `?format=csv` answers every matching event as CSV, as "
            "`/api/audit/export.csv` does." + _KEY_NEEDS_SCOPE
        ),
        parameters=[AuditFilterSerializer],
        responses={200: AuditEventOutputSerializer(many=True), **error_responses(400, 401), **_STAFF_ONLY},
    )
    def get(self, request: Request) -> Any:
        events = audit_event_list(filters=_filters(request))
        if _wants_csv(request):
            return audit_csv_response(events)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(events, request, view=self)
        return paginator.get_paginated_response(AuditEventOutputSerializer(page, many=True).data)


class AuditEventExportApi(_AuditApi):
    @extend_schema(
        tags=_TAG,
        operation_id="audit_events_export",
        summary="Export audit events as CSV (staff)",
        description=(
            "Every matching event, newest first, one row each: the columns of the JSON list, `changes` as JSON."
            + _KEY_NEEDS_SCOPE
        ),
        parameters=[AuditFilterSerializer],
        responses={
            (200, "text/csv"): OpenApiResponse(response=OpenApiTypes.STR, description="CSV with a header row."),
            **error_responses(400, 401),
            **_STAFF_ONLY,
        },
    )
    def get(self, request: Request) -> Any:
        stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
        return audit_csv_response(audit_event_list(filters=_filters(request)), filename=f"audit-log-{stamp}.csv")
