"""``/api/prompts/``: the prompt templates a client can run, and ``POST /api/prompts/{slug}/run``.

For any caller who may chat (a gateway key, a JWT or the web session; a viewer gets 403). A run is a chat
completion through the one pipeline (``chat.prompt_runs.prompt_run``): the same plan, budgets, rate limits,
experiment assignment and ledger rows as ``/v1/chat/completions``, its reply parsed and checked against the
version's output schema and limits, and repaired once when it fails. Errors use the API's JSON shape
(``core.exception_handlers``), the pipeline's statuses included (403, 404, 429, 502...), never a 500.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field, extend_schema_serializer
from rest_framework import permissions, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import CanChat
from billing.apis import BoundedPagination
from billing.models import Endpoint
from core.exceptions import ApplicationError
from core.openapi import ErrorResponseSerializer, error_responses
from prompts.models import PromptKind, PromptTemplate
from prompts.selectors import prompt_template_list

from .callers import caller_for_request
from .prompt_runs import prompt_run

_TAGS = ["Prompt templates"]
_CHAT_PERMISSIONS = [permissions.IsAuthenticated, CanChat]


# LIST


@extend_schema_field({"type": ["object", "array", "string", "number", "boolean", "null"]})
class _AnyJsonField(serializers.JSONField):
    """Any JSON value, null included, documented so: drf-spectacular's rendering of a nullable JSONField,
    ``oneOf: [{}, {type: null}]``, is matched twice by null, which ``oneOf`` refuses."""


@extend_schema_field({"type": ["object", "null"]})
class _JsonSchemaOrNullField(serializers.JSONField):
    """A JSON schema (an object) or null, documented so: drf-spectacular's rendering of a nullable JSONField,
    ``oneOf: [{}, {type: null}]``, is matched twice by null, so a client validating an answer against the
    document refused every version without a schema."""


@extend_schema_serializer(component_name="PromptVariable")
class PromptVariableSerializer(serializers.Serializer):
    name = serializers.CharField()
    type = serializers.CharField(default="string", help_text="string, integer, number, boolean, array or object.")
    required = serializers.BooleanField(help_text="Required unless it has a default or says otherwise.")
    default = _AnyJsonField(required=False, allow_null=True)
    description = serializers.CharField(required=False, allow_blank=True)

    def to_representation(self, item: dict[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": item.get("name"),
            "type": item.get("type", "string"),
            "required": bool(item.get("required", "default" not in item)),
        }
        if "default" in item:
            data["default"] = item["default"]
        if item.get("description"):
            data["description"] = item["description"]
        return data


@extend_schema_serializer(component_name="PromptVersionSummary")
class PromptVersionSummarySerializer(serializers.Serializer):
    number = serializers.IntegerField()
    variables = PromptVariableSerializer(many=True, help_text="What to send as `variables`.")
    output_schema = _JsonSchemaOrNullField(
        allow_null=True, help_text="The JSON schema the output is held to; null: free text."
    )
    field_limits = serializers.DictField(
        child=serializers.IntegerField(), help_text="Character limits per output field (dotted paths)."
    )
    note = serializers.CharField()
    created_at = serializers.DateTimeField()


class PromptTemplateListApi(APIView):
    permission_classes = _CHAT_PERMISSIONS
    pagination_class = BoundedPagination  # a limit past what SQLite can take was a 500

    @extend_schema_serializer(component_name="PromptTemplateSummary")
    class OutputSerializer(serializers.Serializer):
        slug = serializers.SlugField()
        kind = serializers.ChoiceField(choices=PromptKind.choices)
        platform = serializers.CharField(help_text="The platform whose limits apply (a social post, an ad); or ''.")
        description = serializers.CharField()
        labels = serializers.SerializerMethodField(help_text="Each label and the version number it points at.")
        latest_version = serializers.SerializerMethodField()
        default_version = serializers.SerializerMethodField(
            help_text="The version a run that names no version or label runs: the `production` label's, else the "
            "latest. Its `variables` are what such a run takes."
        )

        @extend_schema_field(serializers.DictField(child=serializers.IntegerField()))
        def get_labels(self, template: PromptTemplate) -> dict[str, int]:
            return {label.name: label.version.number for label in template.labels.all()}

        @extend_schema_field(PromptVersionSummarySerializer(allow_null=True))
        def get_latest_version(self, template: PromptTemplate) -> dict[str, Any] | None:
            latest = template.latest_versions[0] if template.latest_versions else None
            return PromptVersionSummarySerializer(latest).data if latest is not None else None

        @extend_schema_field(PromptVersionSummarySerializer(allow_null=True))
        def get_default_version(self, template: PromptTemplate) -> dict[str, Any] | None:
            chosen = (template.default_versions or template.latest_versions or [None])[0]
            return PromptVersionSummarySerializer(chosen).data if chosen is not None else None

    @extend_schema(
        tags=_TAGS,
        operation_id="prompts_list",
        summary="The prompt templates you can run",
        description="Each template with its kind, its labels (`production`, `staging`...), its latest version and "
        "the version a run naming none runs (`default_version`: the `production` label's, else the latest), each "
        "with its declared variables, output schema and limits: what to send to `POST /api/prompts/{slug}/run` or "
        'as `{"prompt": {...}}` to `/v1/chat/completions`.',
        responses={200: OutputSerializer(many=True), **error_responses(401, 403)},
    )
    def get(self, request: Request) -> Response:
        templates = prompt_template_list()
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(templates, request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)


# RUN


@extend_schema_serializer(component_name="PromptFieldCheck")
class FieldCheckSerializer(serializers.Serializer):
    field = serializers.CharField(help_text="The output field, as a path: `headline`, `features[0].title`.")
    length = serializers.IntegerField(help_text="In characters (Unicode code points).")
    limit = serializers.IntegerField(allow_null=True, help_text="Its character limit; null: none applies.")
    ok = serializers.BooleanField()
    problems = serializers.ListField(
        child=serializers.CharField(), help_text="Over its limit, a word the brand avoids."
    )


@extend_schema_serializer(component_name="PromptRunUsage")
class PromptRunUsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class PromptRunApi(APIView):
    permission_classes = _CHAT_PERMISSIONS

    @extend_schema_serializer(component_name="PromptRunRequest")
    class InputSerializer(serializers.Serializer):
        model = serializers.CharField(max_length=128, help_text="The public model name, as in `/v1/models`.")
        variables = serializers.DictField(
            required=False, default=dict, help_text="The template's variables by name (see `GET /api/prompts/`)."
        )
        brand = serializers.SlugField(
            max_length=64, required=False, help_text="A brand profile's slug: its voice goes in the system message."
        )
        version = serializers.IntegerField(
            min_value=1, max_value=2**31 - 1, required=False, help_text="A version number; or give a `label`."
        )
        label = serializers.SlugField(
            max_length=32, required=False, help_text="e.g. `production`, `staging`; neither: `production`, else latest."
        )
        stream = serializers.BooleanField(
            required=False,
            default=False,
            help_text="Stream from the provider (time to first token is measured); the answer is whole either way.",
        )

        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            # A misspelt `label` or `brand` would run `production` without the brand, unnoticed: a 400, as a
            # misspelt field inside /v1's `prompt` is.
            given = self.initial_data if isinstance(self.initial_data, dict) else {}
            unknown = [name for name in given if name not in self.fields]
            if unknown:
                raise serializers.ValidationError(
                    {unknown[0]: f"Unknown parameter: a run takes {', '.join(self.fields)}."},
                    code="unknown_parameter",
                )
            return attrs

    @extend_schema_serializer(component_name="PromptRunResult")
    class OutputSerializer(serializers.Serializer):
        output = _AnyJsonField(
            allow_null=True, help_text="The parsed JSON (a template with an output schema), else the reply's text."
        )
        raw = serializers.CharField(allow_blank=True, help_text="The reply's text as the model wrote it.")
        valid = serializers.BooleanField(help_text="The output satisfies the template's JSON schema.")
        ok = serializers.BooleanField(
            help_text="Valid, with no field over its character limit and no word the brand avoids."
        )
        errors = serializers.ListField(child=serializers.CharField(), help_text="Why it is not valid.")
        checks = FieldCheckSerializer(many=True)
        repaired = serializers.BooleanField(
            help_text="The first reply failed its checks and the model was asked once more with what was wrong."
        )
        attempts = serializers.IntegerField(help_text="Requests made: 1, or 2 with the repair.")
        request_ids = serializers.ListField(
            child=serializers.CharField(), help_text="Each request's id (its ledger row, feedback's `request_id`)."
        )
        template = serializers.SlugField()
        version = serializers.IntegerField(help_text="The version that ran (an experiment's variant may pick it).")
        model = serializers.CharField(help_text="The model that answered.")
        usage = PromptRunUsageSerializer(help_text="Both requests together.")
        cost = serializers.DecimalField(max_digits=20, decimal_places=10, help_text="USD, both requests together.")
        experiment = serializers.CharField(
            allow_null=True, help_text="`experiment:variant` when the request was in an experiment."
        )

    @extend_schema(
        tags=_TAGS,
        operation_id="prompts_run",
        summary="Run a prompt template",
        description="Renders the version (by number, by label, else the `production` label, else the latest) with "
        "your variables and brand, and runs it as a chat completion on `model` (your plan, budget and rate "
        "limits apply; each request gets its ledger row). When the version has an output schema, the reply's "
        "JSON is found (also inside code fences or prose), validated, its fields measured against their "
        "character limits and the brand's words to avoid; if that fails, the model is asked once more with what "
        "was wrong (a second, billed request), and the result says whether the final output is valid.",
        request=InputSerializer,
        responses={
            200: OutputSerializer,
            **error_responses(400, 401, 403),
            404: OpenApiResponse(
                response=ErrorResponseSerializer, description="No such template, version, label, brand or model."
            ),
            **error_responses(413, 429, 502, 503, 504),
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            result = async_to_sync(prompt_run)(
                caller=caller_for_request(request),
                slug=slug,
                version=data.get("version"),
                label=data.get("label"),
                variables=data.get("variables"),
                brand=data.get("brand"),
                model=data["model"],
                endpoint=Endpoint.REST,
                stream=data["stream"],
            )
        except ApplicationError as exc:
            # The pipeline names the fields of ``/v1``'s ``prompt`` object; here they are this body's own.
            if exc.param and exc.param.startswith("prompt."):
                exc.param = exc.param.removeprefix("prompt.")
            raise
        response = Response(self.OutputSerializer(result.as_dict()).data)
        for name, value in result.headers.items():
            response[name] = value
        response["x-request-id"] = result.request_ids[-1]
        return response
