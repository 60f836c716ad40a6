"""The management API of billing: a user's own gateway keys and usage ledger.

Authentication is a gateway key (``Authorization: Bearer`` or ``x-api-key``) or the web session;
every read is scoped to the caller, and another user's key answers 404 exactly like a missing one.
Errors use OpenAI's shape (``core.exception_handlers``).

Roles (accounts.roles): a viewer may read only its own usage (no keys); operators and admins may read
anyone's usage with ``?user=<id or username>``.

A gateway key reads the usage of its own subtree only (itself and the keys created under it, the subtree a
``keys:manage`` key manages), unless it holds the ``usage:read`` scope, which reads all of its owner's usage
as the owner does (and, for an operator's or admin's key, ``?user=``).

Keys are managed by a person (the session) or by a key holding the ``keys:manage`` scope; any other key
gets 403 on every /api/keys/ endpoint. A managing key sees, creates and revokes only the keys in its own
subtree (itself and the keys created under it), and a key it creates never has more than it has.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from drf_spectacular.utils import (
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_field,
    extend_schema_serializer,
)
from rest_framework import permissions, serializers, status
from rest_framework.exceptions import AuthenticationFailed, NotFound, PermissionDenied
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import KEY_MANAGEMENT, KEY_MANAGEMENT_FORBIDDEN, CanViewOwnUsage
from accounts.roles import Capability, role_can
from core.openapi import ErrorResponseSerializer, error_responses
from core.serializer_fields import DateOrDateTimeField
from core.text import has_lone_surrogate
from providers.models import CatalogModel
from providers.tokens import prompt_tokens

from .models import ApiKey, BudgetPeriod, KeyScope, Operation, UsageStatus
from .selectors import (
    CostEstimate,
    UsageFilters,
    api_key_get,
    api_key_list,
    api_key_subtree_ids,
    cost_estimate,
    usage_record_list,
    usage_summary,
)
from .services.budgets import COMPLETIONS_MAX_TOKENS_DEFAULT, replies_billed
from .services.keys import CreatedKey, KeyPrincipal, api_key_create, api_key_revoke

_KEYS_TAG = ["API keys"]
_USAGE_TAG = ["Usage"]
_COST_TAG = ["Cost"]
# The ledger keeps 10 decimal places; sums may need more integer digits than one row.
_COST = {"max_digits": None, "decimal_places": 10, "coerce_to_string": True}


class ModelNameField(serializers.SlugRelatedField):
    """A public model name. Text no column can hold (PostgreSQL refuses NUL; UTF-8 cannot encode a lone
    surrogate) names no model: it is refused as such here, instead of failing in the database's lookup."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str) and ("\x00" in data or has_lone_surrogate(data)):
            self.fail("does_not_exist", slug_name=self.slug_field, value=data.encode("utf-8", "replace").decode())
        return super().to_internal_value(data)


class BoundedPagination(LimitOffsetPagination):
    """DRF's limit/offset with bounds: a ``limit`` above ``max_limit`` is clamped to it (DRF's own rule),
    and so is an ``offset`` past any real ledger, which the database could not otherwise take (SQLite
    and PostgreSQL integers are 64-bit); both answer what a smaller value would, never an error."""

    max_limit = 1000
    max_offset = 10**12

    def get_offset(self, request: Request) -> int:
        return min(super().get_offset(request), self.max_offset)


def _paginated_response(*, request: Request, view: APIView, queryset: Any, serializer_class: type) -> Response:
    paginator = view.pagination_class()
    page = paginator.paginate_queryset(queryset, request, view=view)
    return paginator.get_paginated_response(serializer_class(page, many=True).data)


# API KEYS


@extend_schema_serializer(component_name="ApiKey")
class ApiKeyOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    prefix = serializers.CharField(help_text="The visible start of the key, to tell keys apart.")
    created_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField(allow_null=True)
    expires_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)
    is_active = serializers.BooleanField(help_text="Neither revoked nor expired.")
    allowed_models = serializers.SerializerMethodField(help_text="Public model names; empty: every model of the plan.")
    budget_usd = serializers.DecimalField(
        max_digits=14, decimal_places=4, allow_null=True, help_text="US dollars, as a decimal string; null: none."
    )
    budget_period = serializers.CharField()
    rpm = serializers.IntegerField(allow_null=True, help_text="Requests per minute; null: no limit of its own.")
    tpm = serializers.IntegerField(allow_null=True, help_text="Tokens per minute; null: no limit of its own.")
    scopes = serializers.ListField(child=serializers.CharField(), help_text="Rights beyond calling models.")
    parent = serializers.IntegerField(
        source="parent_id", allow_null=True, help_text="The id of the key that created this one; null: a person did."
    )

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_allowed_models(self, api_key: ApiKey) -> list[str]:
        return [model.name for model in api_key.allowed_models.all()]


@extend_schema_serializer(component_name="ApiKeyCreated")
class ApiKeyCreatedOutputSerializer(ApiKeyOutputSerializer):
    secret = serializers.CharField(help_text="The whole key. Shown this once: llmhub keeps only its SHA-256.")

    def to_representation(self, instance: CreatedKey) -> dict[str, Any]:
        return {**ApiKeyOutputSerializer(instance.api_key).data, "secret": instance.secret}


def _managing_key_id(request: Request) -> int | None:
    """The key making the request, which sees only its own subtree; None for a session, which sees all."""
    return request.auth.key_id if isinstance(request.auth, KeyPrincipal) else None


def _own_key_or_404(request: Request, key_id: int) -> ApiKey:
    api_key = api_key_get(user=request.user, key_id=key_id, root_key_id=_managing_key_id(request))
    if api_key is None:
        raise NotFound("No API key with this id.")
    return api_key


class ApiKeyListCreateApi(APIView):
    pagination_class = BoundedPagination
    permission_classes = KEY_MANAGEMENT

    @extend_schema_serializer(component_name="ApiKeyCreate")
    class InputSerializer(serializers.Serializer):
        name = serializers.CharField(max_length=100, default="default")
        expires_at = serializers.DateTimeField(required=False, allow_null=True, help_text="Must be in the future.")
        allowed_models = ModelNameField(
            many=True,
            required=False,
            slug_field="name",
            queryset=CatalogModel.objects.filter(enabled=True),
            help_text="Public model names this key may use; omit for every model the plan allows.",
        )
        budget_usd = serializers.DecimalField(
            max_digits=14,
            decimal_places=4,
            min_value=0,
            required=False,
            allow_null=True,
            help_text="Spend cap of the key in US dollars; omit for none.",
        )
        budget_period = serializers.ChoiceField(choices=BudgetPeriod.choices, default=BudgetPeriod.MONTHLY)
        rpm = serializers.IntegerField(min_value=1, required=False, allow_null=True, help_text="Requests per minute.")
        tpm = serializers.IntegerField(min_value=1, required=False, allow_null=True, help_text="Tokens per minute.")
        scopes = serializers.ListField(
            child=serializers.ChoiceField(choices=KeyScope.choices),
            required=False,
            help_text="`keys:manage` lets the key create keys (never with more than it has) and revoke them; "
            "`conversations:manage` lets it read and manage all of its owner's conversations (without it, only the "
            "ones it and the keys created under it started); `usage:read` lets it read all of its owner's usage "
            "(without it, only its own and that of the keys created under it); `audit:read` lets it read the audit log "
            "while its owner is staff (without it, no key does); `experiments:manage` lets it manage experiments and "
            "read their results while its owner's role may (without it, no key does).",
        )

    @extend_schema(
        tags=_KEYS_TAG,
        operation_id="api_keys_list",
        summary="List your API keys",
        description=(
            "Newest first. Shows each key's prefix, never the secret or its hash. A key with the `keys:manage` "
            "scope sees itself and the keys created under it."
        ),
        responses={200: ApiKeyOutputSerializer(many=True), **error_responses(401), **KEY_MANAGEMENT_FORBIDDEN},
    )
    def get(self, request: Request) -> Response:
        return _paginated_response(
            request=request,
            view=self,
            queryset=api_key_list(user=request.user, root_key_id=_managing_key_id(request)),
            serializer_class=ApiKeyOutputSerializer,
        )

    @extend_schema(
        tags=_KEYS_TAG,
        operation_id="api_keys_create",
        summary="Create an API key",
        description=(
            "The answer carries the whole key in `secret`: store it now, it is never shown again. Created with a "
            "key (which needs the `keys:manage` scope), the new key is a child of it: where the parent has a "
            "budget, an expiry, a model list, rate limits or scopes, the child must state its own, no larger "
            "(400 names the field), and the child's spend and requests count against the parent's too."
        ),
        request=InputSerializer,
        responses={201: ApiKeyCreatedOutputSerializer, **error_responses(400, 401), **KEY_MANAGEMENT_FORBIDDEN},
    )
    def post(self, request: Request) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        managing_key_id = _managing_key_id(request)
        parent = None
        if managing_key_id is not None:
            parent = ApiKey.objects.prefetch_related("allowed_models").filter(pk=managing_key_id).first()
            if parent is None:  # deleted since this process cached it
                raise AuthenticationFailed("Incorrect API key provided.")
        created = api_key_create(user=request.user, parent=parent, **serializer.validated_data)
        return Response(ApiKeyCreatedOutputSerializer(created).data, status=status.HTTP_201_CREATED)


class ApiKeyDetailApi(APIView):
    permission_classes = KEY_MANAGEMENT

    @extend_schema(
        tags=_KEYS_TAG,
        operation_id="api_keys_retrieve",
        summary="Retrieve one of your API keys",
        responses={200: ApiKeyOutputSerializer, **error_responses(401, 404), **KEY_MANAGEMENT_FORBIDDEN},
    )
    def get(self, request: Request, key_id: int) -> Response:
        return Response(ApiKeyOutputSerializer(_own_key_or_404(request, key_id)).data)

    @extend_schema(
        tags=_KEYS_TAG,
        operation_id="api_keys_destroy",
        summary="Revoke one of your API keys (same as POST …/revoke/)",
        description=(
            "Revokes rather than deletes: the key stops working at once, and so does every key created under "
            "it; it stays listed as revoked so that the usage ledger still says which key spent what. Revoking "
            "twice is harmless."
        ),
        responses={200: ApiKeyOutputSerializer, **error_responses(401, 404), **KEY_MANAGEMENT_FORBIDDEN},
    )
    def delete(self, request: Request, key_id: int) -> Response:
        api_key = api_key_revoke(api_key=_own_key_or_404(request, key_id))
        return Response(ApiKeyOutputSerializer(api_key).data)


class ApiKeyRevokeApi(APIView):
    permission_classes = KEY_MANAGEMENT

    @extend_schema(
        tags=_KEYS_TAG,
        operation_id="api_keys_revoke",
        summary="Revoke one of your API keys",
        description=(
            "The key stops working at once, and so does every key created under it. Revoking twice is harmless "
            "and keeps the first `revoked_at`."
        ),
        request=None,
        responses={200: ApiKeyOutputSerializer, **error_responses(401, 404), **KEY_MANAGEMENT_FORBIDDEN},
    )
    def post(self, request: Request, key_id: int) -> Response:
        api_key = api_key_revoke(api_key=_own_key_or_404(request, key_id))
        return Response(ApiKeyOutputSerializer(api_key).data)


# USAGE


class UsageFilterSerializer(serializers.Serializer):
    start = DateOrDateTimeField(required=False, help_text="Inclusive.")
    end = DateOrDateTimeField(required=False, help_text="Inclusive; a date includes its whole day.")
    model = serializers.CharField(required=False, max_length=128, help_text="A public model name.")
    key = serializers.RegexField(
        r"^(?:[0-9]{1,18}|[A-Za-z][A-Za-z0-9-]{0,31})$",
        required=False,
        help_text="One of your keys: its id or its prefix.",
    )
    status = serializers.ChoiceField(choices=UsageStatus.choices, required=False)
    user = serializers.RegexField(
        r"^[\w.@+-]{1,150}$",
        required=False,
        help_text="Operators and admins: another user's usage, by id or username (anyone else gets 403).",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        try:
            since, until = UsageFilters(start=attrs.get("start"), end=attrs.get("end")).created_range()
        except OverflowError:  # the day after 9999-12-31
            raise serializers.ValidationError({"end": "end is out of range: give a day before 9999-12-31."}) from None
        if since is not None and until is not None and since >= until:
            raise serializers.ValidationError({"end": "end must not be before start."})
        return attrs


class UsageSummaryFilterSerializer(UsageFilterSerializer):
    max_days = 366

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        since, until = UsageFilters(start=attrs.get("start"), end=attrs.get("end")).created_range()
        if since is not None and until is not None and (until - since).days > self.max_days:
            raise serializers.ValidationError({"end": f"A summary spans at most {self.max_days} days."})
        return attrs


def _usage_key_ids(request: Request) -> list[int] | None:
    """The keys whose ledger rows a gateway key reads: its own subtree (the one ``keys:manage`` manages), unless
    it holds ``usage:read``; None (every row of the owner) for a person and for a key holding the scope. A key
    handed to an app must not read every other app's requests (models, tokens, costs, key prefixes)."""
    principal = request.auth
    if not isinstance(principal, KeyPrincipal) or KeyScope.USAGE_READ in principal.scopes:
        return None
    return api_key_subtree_ids(principal.key_id)


def _usage_owner(request: Request, wanted: str | None, *, key_ids: list[int] | None) -> Any:
    """Whose usage a request reads: the caller's own, or with ``?user=`` (operators and admins, by session,
    JWT or a key holding ``usage:read``) another's."""
    if wanted is None:
        return request.user
    if not role_can(request.user, Capability.VIEW_ALL_USAGE):
        raise PermissionDenied("Only operators and admins may read another user's usage (?user=).")
    if key_ids is not None:
        raise PermissionDenied(
            "This API key reads only its own usage and that of the keys created under it: another user's "
            "(?user=) needs a key with the usage:read scope, or the web session."
        )
    users = get_user_model().objects.filter(username=wanted)
    owner = users.first() or (get_user_model().objects.filter(pk=int(wanted)).first() if wanted.isdigit() else None)
    if owner is None:
        raise NotFound("No user with this id or username.")
    return owner


_USAGE_PERMISSIONS = [permissions.IsAuthenticated, CanViewOwnUsage]
_WEB_SEARCHES_HELP = (
    "Web searches the provider ran and billed apart from the tokens (Anthropic's web search tool, a chat "
    "completion's `web_search_options` on OpenAI), priced per 1,000 in the cost."
)
# What the schema says of a gateway key on the usage endpoints.
_USAGE_KEY_REACH = (
    " An API key reads only its own requests and those of the keys created under it (filter `key` included), "
    "unless it holds the `usage:read` scope, which reads all of its owner's usage as the owner does."
)
_USAGE_FORBIDDEN = {
    403: OpenApiResponse(
        response=ErrorResponseSerializer,
        description=(
            "`user` given by a caller who is neither an operator nor an admin, or with an API key lacking the "
            "`usage:read` scope."
        ),
    )
}


class UsageListApi(APIView):
    pagination_class = BoundedPagination
    permission_classes = _USAGE_PERMISSIONS

    @extend_schema_serializer(component_name="UsageRecord")
    class OutputSerializer(serializers.Serializer):
        request_id = serializers.CharField()
        created_at = serializers.DateTimeField()
        model = serializers.CharField(source="model_name")
        provider = serializers.CharField(source="provider_name")
        operation = serializers.ChoiceField(
            choices=Operation.choices,
            help_text="What the request asked for, whatever it came over (`endpoint`).",
        )
        endpoint = serializers.CharField(help_text="What it came over: REST or the chat page's WebSocket.")
        stream = serializers.BooleanField()
        prompt_tokens = serializers.IntegerField()
        completion_tokens = serializers.IntegerField()
        cached_tokens = serializers.IntegerField(help_text="Prompt tokens read from the provider's prompt cache.")
        cache_write_tokens = serializers.IntegerField(help_text="Prompt tokens written to the provider's prompt cache.")
        cache_write_1h_tokens = serializers.IntegerField(
            help_text="Of the cache writes, those to Anthropic's 1-hour cache (priced apart)."
        )
        web_search_requests = serializers.IntegerField(help_text=_WEB_SEARCHES_HELP)
        service_tier = serializers.CharField(
            help_text="The service tier the tokens were charged at: priority or flex (OpenAI's, at the deployment's "
            "price factor of it); empty: the standard prices."
        )
        cost = serializers.DecimalField(**_COST, help_text="US dollars, as a decimal string.")
        usage_estimated = serializers.BooleanField(help_text="The provider sent no usage; tokens were counted.")
        status = serializers.CharField()
        error_type = serializers.CharField()
        ttft_ms = serializers.IntegerField(allow_null=True, help_text="Time to first token.")
        duration_ms = serializers.IntegerField()
        key = serializers.CharField(source="key_prefix", allow_null=True, help_text="The prefix of the key used.")

    @extend_schema(
        tags=_USAGE_TAG,
        operation_id="usage_list",
        summary="List your requests from the usage ledger",
        description="Newest first." + _USAGE_KEY_REACH,
        parameters=[UsageFilterSerializer],
        responses={200: OutputSerializer(many=True), **error_responses(400, 401, 404), **_USAGE_FORBIDDEN},
    )
    def get(self, request: Request) -> Response:
        filters = UsageFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        key_ids = _usage_key_ids(request)
        owner = _usage_owner(request, filters.validated_data.pop("user", None), key_ids=key_ids)
        records = usage_record_list(user=owner, filters=UsageFilters(**filters.validated_data), key_ids=key_ids)
        return _paginated_response(request=request, view=self, queryset=records, serializer_class=self.OutputSerializer)


@extend_schema_serializer(component_name="UsageTotals")
class _UsageTotalsSerializer(serializers.Serializer):
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    cached_tokens = serializers.IntegerField(help_text="Prompt tokens read from the provider's prompt cache.")
    cache_write_tokens = serializers.IntegerField(help_text="Prompt tokens written to the provider's prompt cache.")
    cache_write_1h_tokens = serializers.IntegerField(
        help_text="Of the cache writes, those to Anthropic's 1-hour cache (priced apart)."
    )
    web_search_requests = serializers.IntegerField(help_text=_WEB_SEARCHES_HELP)
    cost = serializers.DecimalField(**_COST, help_text="US dollars, as a decimal string.")


@extend_schema_serializer(component_name="UsageDay")
class _UsageDaySerializer(_UsageTotalsSerializer):
    day = serializers.DateField(help_text="UTC.")


@extend_schema_serializer(component_name="UsageModel")
class _UsageModelSerializer(_UsageTotalsSerializer):
    model = serializers.CharField()


@extend_schema_serializer(component_name="UsageOperation")
class _UsageOperationSerializer(_UsageTotalsSerializer):
    operation = serializers.ChoiceField(
        choices=Operation.choices,
        help_text="What the requests asked for, whatever their transport: `chat` (chat completions), `messages` "
        "(Anthropic's Messages API), `responses` (OpenAI's Responses API), `embeddings`.",
    )


class UsageSummaryApi(APIView):
    permission_classes = _USAGE_PERMISSIONS

    @extend_schema_serializer(component_name="UsageSummary")
    class OutputSerializer(serializers.Serializer):
        total = _UsageTotalsSerializer()
        by_day = _UsageDaySerializer(many=True)
        by_model = _UsageModelSerializer(many=True)
        by_operation = _UsageOperationSerializer(many=True)

    @extend_schema(
        tags=_USAGE_TAG,
        operation_id="usage_summary",
        summary="Sum your usage, in total, per day, per model and per operation",
        description=(
            "Takes the same filters as the list; `start` and `end`, when both given, are at most 366 days "
            "apart. Costs are exact decimal sums, as strings. `by_model` lists models of the catalog only: a "
            "request refused because its model name matched none (mistyped, disabled) counts in `total`, "
            "`by_day` and `by_operation`; the list shows it with `status=rejected`. `by_operation` sums per API "
            "asked for (chat completions, the Messages API, the Responses API, embeddings), only those used."
            + _USAGE_KEY_REACH
        ),
        parameters=[UsageFilterSerializer],
        responses={200: OutputSerializer, **error_responses(400, 401, 404), **_USAGE_FORBIDDEN},
    )
    def get(self, request: Request) -> Response:
        filters = UsageSummaryFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        key_ids = _usage_key_ids(request)
        owner = _usage_owner(request, filters.validated_data.pop("user", None), key_ids=key_ids)
        summary = usage_summary(user=owner, filters=UsageFilters(**filters.validated_data), key_ids=key_ids)
        return Response(self.OutputSerializer(summary).data)


# COST ESTIMATES

# Far above any real request, low enough that a cost stays a readable number.
_MAX_TOKENS = 10**12


def _countable(content: Any, depth: int = 0) -> bool:
    """Content the estimator can count: text, or parts whose ``text`` / ``thinking`` are text (a
    ``tool_result``'s own content likewise); what it does not count (images, unknown parts) may be anything."""
    if content is None or isinstance(content, str):
        return True
    if not isinstance(content, list) or depth > 2:
        return False
    for part in content:
        if not isinstance(part, dict):
            return False
        if any(not isinstance(part.get(name) or "", str) for name in ("text", "thinking")):
            return False
        if part.get("type") == "tool_result" and not _countable(part.get("content"), depth + 1):
            return False
    return True


def _prompt_countable(prompt: Any) -> bool:
    """A text completion's ``prompt`` in one of the shapes /v1/completions takes, which the estimator counts: a text,
    a non-empty list of texts, of token ids, or of non-empty lists of token ids."""
    if isinstance(prompt, str):
        return True
    if not isinstance(prompt, list) or not prompt:
        return False
    if all(isinstance(item, str) for item in prompt):
        return True
    if all(isinstance(item, list) and item for item in prompt):
        return all(_token_ids(item) for item in prompt)
    return _token_ids(prompt)


def _token_ids(items: list[Any]) -> bool:
    return all(isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in items)


@extend_schema_serializer(component_name="CostDeployment")
class _CostDeploymentSerializer(serializers.Serializer):
    provider = serializers.CharField(help_text="The provider's name in the catalog.")
    upstream = serializers.CharField(help_text="The model's id at that provider.")
    input_tokens = serializers.IntegerField(source="cost.input_tokens", help_text="Cached ones included.")
    cached_input_tokens = serializers.IntegerField(source="cost.cached_input_tokens")
    cache_write_input_tokens = serializers.IntegerField(
        source="cost.cache_write_tokens", help_text="Input tokens written to the provider's prompt cache."
    )
    cache_write_1h_input_tokens = serializers.IntegerField(
        source="cost.cache_write_1h_tokens", help_text="Of the cache writes, those to Anthropic's 1-hour cache."
    )
    output_tokens = serializers.IntegerField(source="cost.output_tokens")
    input_per_mtok = serializers.DecimalField(
        source="model.input_per_mtok", **_COST, help_text="US dollars per million input tokens."
    )
    cached_input_per_mtok = serializers.DecimalField(
        source="model.cached_input_per_mtok",
        **_COST,
        allow_null=True,
        help_text="US dollars per million cached input tokens; null: charged as input.",
    )
    cache_write_per_mtok = serializers.DecimalField(
        source="model.cache_write_per_mtok",
        **_COST,
        allow_null=True,
        help_text="US dollars per million input tokens written to the provider's prompt cache; null: charged as input.",
    )
    cache_write_1h_per_mtok = serializers.DecimalField(
        source="model.cache_write_1h_per_mtok",
        **_COST,
        allow_null=True,
        help_text="US dollars per million input tokens written to Anthropic's 1-hour cache; null: charged as the "
        "other cache writes.",
    )
    output_per_mtok = serializers.DecimalField(
        source="model.output_per_mtok", **_COST, help_text="US dollars per million output tokens."
    )
    input_cost = serializers.DecimalField(
        source="cost.input_cost", **_COST, help_text="The input tokens neither read from nor written to the cache."
    )
    cached_input_cost = serializers.DecimalField(source="cost.cached_input_cost", **_COST)
    cache_write_cost = serializers.DecimalField(
        source="cost.cache_write_cost", **_COST, help_text="Every cache write, the 1-hour cache's included."
    )
    cache_write_1h_cost = serializers.DecimalField(
        source="cost.cache_write_1h_cost", **_COST, help_text="The 1-hour cache's writes: part of cache_write_cost."
    )
    output_cost = serializers.DecimalField(source="cost.output_cost", **_COST)
    price_factor = serializers.DecimalField(
        source="cost.price_factor",
        max_digits=8,
        decimal_places=4,
        help_text="What the service tier asked multiplied every token price by (the deployment's priority or flex "
        "factor; 1 at the standard prices). The prices above are the standard ones.",
    )
    total_cost = serializers.DecimalField(
        source="cost.total_cost", **_COST, help_text="What the ledger would record for such a request."
    )


# The service tiers an estimate prices: the one a request is served at (OpenAI's reply says it), not ``auto``.
_SERVICE_TIERS = ("default", "priority", "flex")
_SERVICE_TIER_HELP = (
    "The service tier the request is served at: OpenAI's priority and flex cost the deployment's factor of every "
    "token price (a deployment without one, its standard prices)."
)


class CostEstimateApi(APIView):
    """What a request would cost, priced exactly as the ledger prices it (``billing.pricing``)."""

    @extend_schema_serializer(component_name="CostEstimateQuery")
    class InputSerializer(serializers.Serializer):
        model = serializers.CharField(max_length=128, help_text="A public model name.")
        input_tokens = serializers.IntegerField(
            min_value=0, max_value=_MAX_TOKENS, help_text="Prompt tokens, cached ones included."
        )
        cached_input_tokens = serializers.IntegerField(
            min_value=0, max_value=_MAX_TOKENS, default=0, help_text="How many of the input tokens are cached."
        )
        cache_write_input_tokens = serializers.IntegerField(
            min_value=0,
            max_value=_MAX_TOKENS,
            default=0,
            help_text="How many of the input tokens are written to the provider's prompt cache.",
        )
        cache_write_1h_input_tokens = serializers.IntegerField(
            min_value=0,
            max_value=_MAX_TOKENS,
            default=0,
            help_text="How many of the cache writes go to Anthropic's 1-hour cache (priced apart).",
        )
        output_tokens = serializers.IntegerField(min_value=0, max_value=_MAX_TOKENS, default=0)
        service_tier = serializers.ChoiceField(choices=_SERVICE_TIERS, default="default", help_text=_SERVICE_TIER_HELP)

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            if attrs["cached_input_tokens"] > attrs["input_tokens"]:
                raise serializers.ValidationError(
                    {"cached_input_tokens": "cached_input_tokens counts part of input_tokens: it cannot be larger."}
                )
            if attrs["cached_input_tokens"] + attrs["cache_write_input_tokens"] > attrs["input_tokens"]:
                raise serializers.ValidationError(
                    {
                        "cache_write_input_tokens": "cache_write_input_tokens counts part of input_tokens, apart "
                        "from the cached ones: with them it cannot be larger."
                    }
                )
            if attrs["cache_write_1h_input_tokens"] > attrs["cache_write_input_tokens"]:
                raise serializers.ValidationError(
                    {
                        "cache_write_1h_input_tokens": "cache_write_1h_input_tokens counts part of "
                        "cache_write_input_tokens: it cannot be larger."
                    }
                )
            return attrs

    @extend_schema_serializer(component_name="CostEstimateRequest")
    class MessagesInputSerializer(serializers.Serializer):
        model = serializers.CharField(max_length=128, help_text="A public model name.")
        messages = serializers.ListField(
            child=serializers.DictField(),
            min_length=1,
            max_length=10_000,
            help_text="Chat messages as /v1/chat/completions takes them (Messages API content blocks too).",
        )
        system = serializers.JSONField(required=False, help_text="An Anthropic-style system prompt, if any.")
        tools = serializers.ListField(child=serializers.DictField(), required=False, max_length=1_000)
        functions = serializers.ListField(
            child=serializers.DictField(), required=False, max_length=1_000, help_text="The legacy form of `tools`."
        )
        max_tokens = serializers.IntegerField(
            min_value=0, max_value=_MAX_TOKENS, help_text="The most output tokens the request may produce."
        )
        service_tier = serializers.ChoiceField(choices=_SERVICE_TIERS, default="default", help_text=_SERVICE_TIER_HELP)

        def validate_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
            if not all(_countable(message.get("content")) for message in messages):
                raise serializers.ValidationError("A message's content is a string or a list of content parts.")
            return messages

        def validate_system(self, system: Any) -> Any:
            if not _countable(system):
                raise serializers.ValidationError("The system prompt is a string or a list of text blocks.")
            return system

    @extend_schema_serializer(component_name="CostEstimateCompletionRequest")
    class CompletionInputSerializer(serializers.Serializer):
        model = serializers.CharField(max_length=128, help_text="A public model name.")
        prompt = serializers.JSONField(
            help_text="As /v1/completions takes it: a text, a list of texts, token ids or a list of token id lists."
        )
        suffix = serializers.JSONField(required=False, help_text="The text after the gap (fill-in-the-middle).")
        max_tokens = serializers.IntegerField(
            min_value=0,
            max_value=_MAX_TOKENS,
            default=COMPLETIONS_MAX_TOKENS_DEFAULT,
            help_text="The most output tokens a reply may produce; OpenAI's default, 16, when left out.",
        )
        n = serializers.IntegerField(min_value=1, max_value=128, default=1, help_text="Replies for each prompt.")
        best_of = serializers.IntegerField(
            min_value=1,
            max_value=20,
            required=False,
            help_text="Candidates generated for each prompt (each one billed), at least `n`.",
        )

        def validate_prompt(self, prompt: Any) -> Any:
            if not _prompt_countable(prompt):
                raise serializers.ValidationError(
                    "A prompt is a text, a non-empty list of texts, token ids (integers from 0) or a non-empty "
                    "list of non-empty token id lists."
                )
            return prompt

        def validate_suffix(self, suffix: Any) -> Any:
            if not isinstance(suffix, str):
                raise serializers.ValidationError("The suffix is a text.")
            return suffix

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            if attrs.get("best_of", attrs["n"]) < attrs["n"]:
                raise serializers.ValidationError({"best_of": "best_of must be at least n."})
            return attrs

    @extend_schema_serializer(component_name="CostEstimate")
    class OutputSerializer(serializers.Serializer):
        model = serializers.CharField()
        currency = serializers.CharField(help_text="Always `USD`.")
        deployments = _CostDeploymentSerializer(
            many=True, help_text="One entry per place the model runs (one per catalog model today)."
        )
        min_total = serializers.DecimalField(**_COST, help_text="The cheapest deployment's total_cost.")
        max_total = serializers.DecimalField(**_COST, help_text="The dearest deployment's total_cost.")

    @extend_schema(
        tags=_COST_TAG,
        operation_id="cost_estimate",
        summary="Estimate a request's cost from token counts",
        description=(
            "Prices the given token counts with the catalog's current prices, per deployment of the model, "
            "with the same function that prices the ledger: input (neither read from nor written to the cache), "
            "cached input, cache writes and output, and "
            "the total, as decimal strings of US dollars. The model must be one your plan and key may use."
        ),
        parameters=[InputSerializer],
        responses={200: OutputSerializer, **error_responses(400, 401, 403, 404)},
    )
    def get(self, request: Request) -> Response:
        serializer = self.InputSerializer(data=request.query_params)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        return self._answer(
            request,
            model_name=data["model"],
            prompt_tokens=data["input_tokens"],
            cached_tokens=data["cached_input_tokens"],
            cache_write_tokens=data["cache_write_input_tokens"],
            cache_write_1h_tokens=data["cache_write_1h_input_tokens"],
            completion_tokens=data["output_tokens"],
            service_tier=data["service_tier"],
        )

    @extend_schema(
        tags=_COST_TAG,
        operation_id="cost_estimate_messages",
        summary="Estimate a request's cost from its messages or its prompt",
        description=(
            "Counts the input tokens of the messages (their tool calls and results too) and tools with the "
            "estimate the ledger charges when a provider counts none, about four characters a token of ASCII text "
            "and one a CJK character, plus a little per message and a flat charge per image or document (the "
            "provider's tokenizer will differ somewhat), takes `max_tokens` as the output, and prices both as the "
            "GET form does. A body with a "
            "`prompt` and no `messages` is a text completion's (/v1/completions): its prompts and `suffix` are "
            "counted alike (token ids one each), and the output is `max_tokens` (16 when left out, as OpenAI's) "
            "for every reply the request may be billed for, as admission reserves it: `n`, or `best_of` when "
            "larger, for each prompt."
        ),
        request=PolymorphicProxySerializer(
            component_name="CostEstimateBody",
            serializers=[MessagesInputSerializer, CompletionInputSerializer],
            resource_type_field_name=None,
        ),
        responses={200: OutputSerializer, **error_responses(400, 401, 403, 404)},
    )
    def post(self, request: Request) -> Response:
        if isinstance(request.data, dict) and "prompt" in request.data and "messages" not in request.data:
            return self._completion_answer(request)
        serializer = self.MessagesInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        return self._answer(
            request,
            model_name=data["model"],
            prompt_tokens=prompt_tokens(data, operation=Operation.CHAT),
            completion_tokens=data["max_tokens"],
            service_tier=data["service_tier"],
        )

    def _completion_answer(self, request: Request) -> Response:
        serializer = self.CompletionInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        return self._answer(
            request,
            model_name=data["model"],
            prompt_tokens=prompt_tokens(data, operation=Operation.COMPLETIONS),
            completion_tokens=data["max_tokens"] * replies_billed(data),
        )

    def _answer(
        self,
        request: Request,
        *,
        model_name: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
        service_tier: str = "",
    ) -> Response:
        """The estimate's answer; the cache's counts are the GET form's only (a body's messages say none)."""
        principal = request.auth
        estimate: CostEstimate = cost_estimate(
            user_id=request.user.pk,
            key_allowed_model_ids=principal.allowed_model_ids if isinstance(principal, KeyPrincipal) else None,
            model_name=model_name,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            cache_write_tokens=cache_write_tokens,
            cache_write_1h_tokens=cache_write_1h_tokens,
            service_tier=service_tier,
        )
        return Response(self.OutputSerializer(estimate).data)
