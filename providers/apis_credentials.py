"""The management API of users' own provider keys (bring your own key), mounted at /api/provider-keys/.

Authenticated like every /api/ endpoint (web session, gateway key, or a JWT); each user sees and changes
only their own keys, and another user's key answers 404 exactly like a missing one. The key itself is
write-only: answers show its hint (``sk-…abcd``), never the key. Errors use OpenAI's shape
(``core.exception_handlers``).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.utils.decorators import method_decorator
from django.views.decorators.debug import sensitive_post_parameters, sensitive_variables
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import UserRateThrottle
from rest_framework.views import APIView

from accounts.permissions import KEY_MANAGEMENT, KEY_MANAGEMENT_FORBIDDEN
from core.openapi import ErrorResponseSerializer, error_responses
from core.text import has_lone_surrogate

from .models import CREDENTIAL_PAUSED, ByokMode, CredentialStatus, Provider, ProviderCredential
from .services.credentials import (
    key_prefix,
    provider_credential_delete,
    provider_credential_host_confirm,
    provider_credential_label_set,
    provider_credential_save,
    provider_credential_validate,
)

_TAG = ["Provider keys"]


def _no_surrogates(value: str) -> str:
    # Text no column can hold (NUL, which DRF's CharField already refuses, or a lone surrogate).
    if has_lone_surrogate(value):
        raise serializers.ValidationError("Text with lone surrogate code points cannot be stored.")
    return value


@extend_schema_serializer(component_name="ProviderKey")
class ProviderCredentialOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    provider = serializers.CharField(source="provider.name", help_text="The provider's name.")
    label = serializers.CharField()
    hint = serializers.CharField(help_text="The visible start and end of the key (`sk-…abcd`); the key is never shown.")
    status = serializers.ChoiceField(
        source="shown_status",
        choices=[*CredentialStatus.choices, (CREDENTIAL_PAUSED, "Paused")],
        help_text="`paused`: the administrator moved the provider to another host than the one you gave the key "
        "for; it is not used until you confirm (`POST /api/provider-keys/{id}/confirm-host/`).",
    )
    status_detail = serializers.CharField(
        source="shown_status_detail", help_text="Why the provider refused the key, or why it is paused."
    )
    confirmed_host = serializers.CharField(
        source="confirmed_origin", help_text="The host (`scheme://host[:port]`) you agreed to send the key to."
    )
    provider_host = serializers.CharField(
        source="provider.origin", help_text="The host the provider sends requests to now."
    )
    last_validated_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()
    rotated_at = serializers.DateTimeField(allow_null=True, help_text="When the key was last replaced.")


@extend_schema_serializer(component_name="ProviderAcceptingKeys")
class ProviderOutputSerializer(serializers.Serializer):
    name = serializers.CharField()
    kind = serializers.CharField()
    byok = serializers.ChoiceField(
        choices=ByokMode.choices, help_text="`optional`: your key when you have one; `required`: only with yours."
    )
    key_prefix = serializers.SerializerMethodField(help_text="How this provider's keys start; empty: no known form.")

    def get_key_prefix(self, provider: Provider) -> str:
        return key_prefix(provider.kind)


def _own_credential_or_404(request: Request, credential_id: int) -> ProviderCredential:
    credential = (
        ProviderCredential.objects.select_related("provider").filter(pk=credential_id, owner=request.user).first()
    )
    if credential is None:
        raise NotFound("No provider key with this id.")
    return credential


# A viewer (accounts.roles) may not manage keys of its own, nor a gateway key without the keys:manage scope
# (one that may only call models): as on /api/keys/.
_OWN_KEYS = KEY_MANAGEMENT
_NOT_ALLOWED = KEY_MANAGEMENT_FORBIDDEN


class ProviderKeyChecksThrottle(UserRateThrottle):
    """A user's key checks (``LLMHUB_PROVIDER_KEY_CHECKS_RATE``, 20 an hour by default): adding or replacing a
    key and checking one again each ask the provider with it, so that unbounded, the hub would be a free way
    to test keys found elsewhere. Counted per user in Django's cache (Redis when ``REDIS_URL`` is set: every
    worker shares the count). Over it: 429 with ``Retry-After``. Listing, renaming and deleting are not counted."""

    scope = "provider_key_checks"

    def get_rate(self) -> str:
        return settings.LLMHUB_PROVIDER_KEY_CHECKS_RATE

    def allow_request(self, request: Request, view: APIView) -> bool:
        return request.method != "POST" or super().allow_request(request, view)


_CHECKS_LIMITED = {
    429: OpenApiResponse(
        response=ErrorResponseSerializer,
        description="Too many key checks for this user (`LLMHUB_PROVIDER_KEY_CHECKS_RATE`); see `Retry-After`.",
    )
}


# A debug error page shows a form POST's fields and each frame's variables: neither may show the key.
@method_decorator(sensitive_post_parameters("api_key"), name="dispatch")
class ProviderCredentialListCreateApi(APIView):
    permission_classes = _OWN_KEYS
    throttle_classes = [ProviderKeyChecksThrottle]

    @extend_schema_serializer(component_name="ProviderKeyCreate")
    class InputSerializer(serializers.Serializer):
        provider = serializers.CharField(max_length=64, validators=[_no_surrogates], help_text="A provider's name.")
        api_key = serializers.CharField(
            max_length=1024, write_only=True, help_text="The key, as the provider issued it. Never shown back."
        )
        label = serializers.CharField(
            max_length=100, required=False, allow_blank=True, default="", validators=[_no_surrogates]
        )

        def validate_provider(self, value: str) -> Provider:
            provider = Provider.objects.filter(name=value, enabled=True).first()
            if provider is None:
                # The value is not repeated: a key pasted into the wrong field must not come back in the answer.
                raise serializers.ValidationError(
                    "No enabled provider has this name; GET /api/provider-keys/providers/ lists those that take "
                    "your own keys."
                )
            return provider

    @extend_schema(
        tags=_TAG,
        operation_id="provider_keys_list",
        summary="List your own provider keys",
        description="One key a provider at most. Shows each key's hint and status, never the key.",
        responses={200: ProviderCredentialOutputSerializer(many=True), **error_responses(401), **_NOT_ALLOWED},
    )
    def get(self, request: Request) -> Response:
        rows = ProviderCredential.objects.select_related("provider").filter(owner=request.user)
        return Response(ProviderCredentialOutputSerializer(rows, many=True).data)

    @extend_schema(
        tags=_TAG,
        operation_id="provider_keys_save",
        summary="Add your key for a provider, or replace the one you have",
        description=(
            "The key is checked first: its form for the provider (`sk-`, `sk-ant-`, `sk-or-`, …), then live with "
            "the provider's model list, which costs nothing. A key the provider refuses (wrong key, no access, "
            "quota exhausted) or that cannot be checked is not stored: 400 `provider_key_invalid` says why. "
            "201 when the key was added; 200 when it replaced your previous key for the provider (requests "
            "already running finish on the previous key)."
        ),
        request=InputSerializer,
        responses={
            201: ProviderCredentialOutputSerializer,
            200: ProviderCredentialOutputSerializer,
            **error_responses(400, 401),
            **_NOT_ALLOWED,
            **_CHECKS_LIMITED,
        },
    )
    @method_decorator(sensitive_variables("serializer"))
    def post(self, request: Request) -> Response:
        serializer = self.InputSerializer(data=request.data)  # its repr shows the data, key included
        serializer.is_valid(raise_exception=True)
        credential = provider_credential_save(owner=request.user, **serializer.validated_data)
        # A key that has never been replaced was just added.
        added = credential.rotated_at is None
        return Response(
            ProviderCredentialOutputSerializer(credential).data,
            status=status.HTTP_201_CREATED if added else status.HTTP_200_OK,
        )


class ProviderCredentialDetailApi(APIView):
    permission_classes = _OWN_KEYS

    @extend_schema_serializer(component_name="ProviderKeyUpdate")
    class InputSerializer(serializers.Serializer):
        label = serializers.CharField(max_length=100, allow_blank=True, validators=[_no_surrogates])

    @extend_schema(
        tags=_TAG,
        operation_id="provider_keys_retrieve",
        summary="Retrieve one of your provider keys",
        responses={200: ProviderCredentialOutputSerializer, **error_responses(401, 404), **_NOT_ALLOWED},
    )
    def get(self, request: Request, credential_id: int) -> Response:
        return Response(ProviderCredentialOutputSerializer(_own_credential_or_404(request, credential_id)).data)

    @extend_schema(
        tags=_TAG,
        operation_id="provider_keys_partial_update",
        summary="Rename one of your provider keys",
        description="Only the label changes here; to change the key, POST a new one for the provider.",
        request=InputSerializer,
        responses={200: ProviderCredentialOutputSerializer, **error_responses(400, 401, 404), **_NOT_ALLOWED},
    )
    def patch(self, request: Request, credential_id: int) -> Response:
        credential = _own_credential_or_404(request, credential_id)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        credential = provider_credential_label_set(credential=credential, label=serializer.validated_data["label"])
        return Response(ProviderCredentialOutputSerializer(credential).data)

    @extend_schema(
        tags=_TAG,
        operation_id="provider_keys_destroy",
        summary="Delete one of your provider keys",
        description=(
            "Your requests to the provider go back to the platform's key where the provider allows it "
            "(`optional`), and are refused where it requires your own (`required`)."
        ),
        responses={204: None, **error_responses(401, 404), **_NOT_ALLOWED},
    )
    def delete(self, request: Request, credential_id: int) -> Response:
        provider_credential_delete(credential=_own_credential_or_404(request, credential_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class ProviderCredentialValidateApi(APIView):
    permission_classes = _OWN_KEYS
    throttle_classes = [ProviderKeyChecksThrottle]

    @extend_schema(
        tags=_TAG,
        operation_id="provider_keys_validate",
        summary="Check one of your provider keys again",
        description=(
            "Asks the provider for its model list with the key (free) and records the outcome in `status`, "
            "`status_detail` and `last_validated_at`. 502 `provider_key_unchecked` when the provider could not "
            "be asked; the status is then left as it was. 400 `provider_key_not_accepted`, with nothing sent, when "
            "the provider is disabled or no longer takes users' keys."
        ),
        request=None,
        responses={
            200: ProviderCredentialOutputSerializer,
            **error_responses(400, 401, 404),
            **_NOT_ALLOWED,
            **_CHECKS_LIMITED,
            502: OpenApiResponse(response=ErrorResponseSerializer, description="The provider could not be asked."),
        },
    )
    def post(self, request: Request, credential_id: int) -> Response:
        credential = _own_credential_or_404(request, credential_id)
        provider_credential_validate(credential=credential)
        return Response(ProviderCredentialOutputSerializer(credential).data)


class ProviderCredentialHostConfirmApi(APIView):
    permission_classes = _OWN_KEYS

    @extend_schema(
        tags=_TAG,
        operation_id="provider_keys_confirm_host",
        summary="Let one of your provider keys go to the provider's new host",
        description=(
            "When the administrator moves a provider to another host, your key for it is paused (`status: "
            "paused`): nothing is sent there. This confirms that the key may go to the host the provider uses now "
            "(`provider_host`), which becomes its `confirmed_host`; the key is used again at once. Nothing is sent "
            "to check it. A key not paused is answered as it is."
        ),
        request=None,
        responses={200: ProviderCredentialOutputSerializer, **error_responses(401, 404), **_NOT_ALLOWED},
    )
    def post(self, request: Request, credential_id: int) -> Response:
        credential = _own_credential_or_404(request, credential_id)
        credential = provider_credential_host_confirm(credential=credential)
        return Response(ProviderCredentialOutputSerializer(credential).data)


class ProviderAcceptingKeysListApi(APIView):
    permission_classes = _OWN_KEYS

    @extend_schema(
        tags=_TAG,
        operation_id="provider_keys_providers",
        summary="List the providers that accept your own key",
        responses={200: ProviderOutputSerializer(many=True), **error_responses(401), **_NOT_ALLOWED},
    )
    def get(self, request: Request) -> Response:
        rows: Any = Provider.objects.filter(enabled=True).exclude(byok=ByokMode.DISABLED).order_by("name")
        return Response(ProviderOutputSerializer(rows, many=True).data)
