"""``POST /api/keys/{id}/rotate/``: a new secret for a gateway key, the old one kept for a grace period.

Same access rules as the other key endpoints (``billing.apis``): a person through the web session rotates
any of their keys, a key with the ``keys:manage`` scope only itself and the keys created under it, and not with
a secret that a rotation already replaced (``accounts.permissions.NotAReplacedSecret``, in ``KEY_MANAGEMENT``).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import KEY_MANAGEMENT, KEY_MANAGEMENT_FORBIDDEN
from core.openapi import error_responses

from .apis import _KEYS_TAG, ApiKeyCreatedOutputSerializer, _own_key_or_404
from .services.keys import MAX_ROTATION_GRACE_SECONDS, CreatedKey, api_key_rotate


@extend_schema_serializer(component_name="ApiKeyRotated")
class ApiKeyRotatedOutputSerializer(ApiKeyCreatedOutputSerializer):
    rotated_at = serializers.DateTimeField()
    previous_secret_expires_at = serializers.DateTimeField(
        allow_null=True, help_text="Until when the secret before this one keeps working; null: it stopped at once."
    )

    def to_representation(self, instance: CreatedKey) -> dict[str, Any]:
        api_key = instance.api_key
        return {
            **super().to_representation(instance),
            "rotated_at": serializers.DateTimeField().to_representation(api_key.rotated_at),
            "previous_secret_expires_at": (
                serializers.DateTimeField().to_representation(api_key.previous_secret_expires_at)
                if api_key.previous_secret_expires_at is not None
                else None
            ),
        }


class ApiKeyRotateApi(APIView):
    permission_classes = KEY_MANAGEMENT

    @extend_schema_serializer(component_name="ApiKeyRotate")
    class InputSerializer(serializers.Serializer):
        grace_seconds = serializers.IntegerField(
            min_value=0,
            max_value=MAX_ROTATION_GRACE_SECONDS,
            required=False,
            allow_null=True,
            help_text="How long the current secret keeps working; 0: it stops at once. Omit for the default (24 h).",
        )

    @extend_schema(
        tags=_KEYS_TAG,
        operation_id="api_keys_rotate",
        summary="Rotate one of your API keys",
        description=(
            "Issues a new secret (with a new prefix) for the same key: its id, limits, child keys and usage stay. "
            "The answer carries the whole new key in `secret`, shown this once. The secret it replaces keeps "
            "working until `previous_secret_expires_at`, then gets 401 everywhere; a secret replaced by an "
            "earlier rotation stops at once. Revoking the key stops both."
        ),
        request=InputSerializer,
        responses={200: ApiKeyRotatedOutputSerializer, **error_responses(400, 401, 404), **KEY_MANAGEMENT_FORBIDDEN},
    )
    def post(self, request: Request, key_id: int) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        rotated = api_key_rotate(
            api_key=_own_key_or_404(request, key_id), grace_seconds=serializer.validated_data.get("grace_seconds")
        )
        return Response(ApiKeyRotatedOutputSerializer(rotated).data, status=status.HTTP_200_OK)
