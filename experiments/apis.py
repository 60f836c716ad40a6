"""``/api/experiments/``: A/B experiments for staff (operators and admins: ``Capability.MANAGE_EXPERIMENTS``).

Authenticated like every /api/ endpoint (web session, a JWT, or a staff user's gateway key holding the
``experiments:manage`` scope: automation may run experiments, but not every key of an operator); a signed-in
user whose role may not manage experiments, or a key without the scope, gets 403, anonymous callers 401/403
as elsewhere. Errors use the project's JSON shape (``core.exception_handlers``), a 400 naming the field at
fault in ``error.param`` (``variants.1.deployment``). Every change is recorded in the audit log by the service
that makes it, as the request's acting principal (``audit.context``): the key a change was made with, else the
person.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from django.db.models import Prefetch
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_serializer
from rest_framework import renderers, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import EXPERIMENT_MANAGEMENT, EXPERIMENT_MANAGEMENT_FORBIDDEN
from billing.apis import BoundedPagination
from core.openapi import error_responses
from core.streaming import ThreadedStreamingHttpResponse, csv_lines

from .models import AllocationStep, Experiment, ExperimentStatus, Variant
from .results import experiment_results
from .serializers import (
    ExperimentCreateSerializer,
    ExperimentOutputSerializer,
    ExperimentUpdateSerializer,
    steps_check,
    variants_resolve,
)
from .services import (
    experiment_conclude,
    experiment_pause,
    experiment_promote,
    experiment_rollout_advance,
    experiment_start,
)
from .services_definition import experiment_create, experiment_delete, experiment_update

_TAG = ["Experiments"]
# What the schema says of a gateway key on every operation.
_KEY_NEEDS_SCOPE = " An API key needs the `experiments:manage` scope (and its owner an operator's or admin's role)."


def _experiments() -> Any:
    return Experiment.objects.select_related("model", "promoted_variant").prefetch_related(
        Prefetch("variants", queryset=Variant.objects.select_related("deployment", "target_model")),
        Prefetch("steps", queryset=AllocationStep.objects.order_by("position", "id")),
    )


def _experiment_or_404(experiment_id: int) -> Experiment:
    return get_object_or_404(_experiments(), pk=experiment_id)


def _answer(experiment: Experiment, code: int = status.HTTP_200_OK) -> Response:
    return Response(ExperimentOutputSerializer(_experiment_or_404(experiment.pk)).data, status=code)


class ExperimentFilterSerializer(serializers.Serializer):
    status = serializers.ChoiceField(
        choices=ExperimentStatus.choices, required=False, help_text="Only experiments in this status."
    )
    model = serializers.CharField(required=False, max_length=128, help_text="Only experiments on this public model.")


class ExperimentListCreateApi(APIView):
    permission_classes = EXPERIMENT_MANAGEMENT
    pagination_class = BoundedPagination

    @extend_schema(
        tags=_TAG,
        operation_id="experiments_list",
        summary="List experiments (staff)",
        description="Newest first, with their variants and rollout steps." + _KEY_NEEDS_SCOPE,
        parameters=[ExperimentFilterSerializer],
        responses={
            200: ExperimentOutputSerializer(many=True),
            **error_responses(401),
            **EXPERIMENT_MANAGEMENT_FORBIDDEN,
        },
    )
    def get(self, request: Request) -> Response:
        filters = ExperimentFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        rows = _experiments()
        if filters.validated_data.get("status"):
            rows = rows.filter(status=filters.validated_data["status"])
        if filters.validated_data.get("model"):
            rows = rows.filter(model__name=filters.validated_data["model"])
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(rows, request, view=self)
        return paginator.get_paginated_response(ExperimentOutputSerializer(page, many=True).data)

    @extend_schema(
        tags=_TAG,
        operation_id="experiments_create",
        summary="Create an experiment (staff)",
        description=(
            "A draft on a public model, with at least two variants (exactly one the control), each served by one "
            "of the model's deployments (`deployment`, by name), another public model (`target_model`), or the "
            "model as routed (neither), optionally with a prompt version and parameter overrides, and an "
            "allocation in percent (together at most 100; the rest is the untouched share). `steps` is an "
            "optional gradual rollout: allocations applied at `at`, or when advanced by hand. Start it with "
            "`POST /api/experiments/{id}/start/`." + _KEY_NEEDS_SCOPE
        ),
        request=ExperimentCreateSerializer,
        responses={201: ExperimentOutputSerializer, **error_responses(400, 401), **EXPERIMENT_MANAGEMENT_FORBIDDEN},
    )
    def post(self, request: Request) -> Response:
        serializer = ExperimentCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        experiment = experiment_create(**serializer.validated_data)
        return _answer(experiment, status.HTTP_201_CREATED)


class ExperimentDetailApi(APIView):
    permission_classes = EXPERIMENT_MANAGEMENT

    @extend_schema(
        tags=_TAG,
        operation_id="experiments_retrieve",
        summary="Retrieve an experiment (staff)",
        description=_KEY_NEEDS_SCOPE.strip(),
        responses={200: ExperimentOutputSerializer, **error_responses(401, 404), **EXPERIMENT_MANAGEMENT_FORBIDDEN},
    )
    def get(self, request: Request, experiment_id: int) -> Response:
        return Response(ExperimentOutputSerializer(_experiment_or_404(experiment_id)).data)

    @extend_schema(
        tags=_TAG,
        operation_id="experiments_partial_update",
        summary="Change an experiment (staff)",
        description=(
            "Any of the experiment's fields (once started, not its name, metrics, alpha or start: 400); `variants` "
            "by name. A draft's variants may change anything and new ones may be added; once started, a variant "
            "cannot be retargeted (its deployment, target model, "
            "prompt version, overrides and control flag stay: 400), only its `allocation` changes, which moves "
            "as few users as possible and is recorded in the audit log. `steps` replaces the rollout steps not "
            "yet applied." + _KEY_NEEDS_SCOPE
        ),
        request=ExperimentUpdateSerializer,
        responses={
            200: ExperimentOutputSerializer,
            **error_responses(400, 401, 404),
            **EXPERIMENT_MANAGEMENT_FORBIDDEN,
        },
    )
    def patch(self, request: Request, experiment_id: int) -> Response:
        experiment = _experiment_or_404(experiment_id)
        serializer = ExperimentUpdateSerializer(experiment, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        variants = data.pop("variants", None)
        steps = data.pop("steps", None)
        if variants is not None:
            variants = variants_resolve(experiment.model, variants)
        if steps is not None:
            start = {v.name: v.allocation for v in experiment.variants.all()}
            start.update({v["name"]: v["allocation"] for v in variants or [] if v.get("allocation") is not None})
            for v in variants or []:
                start.setdefault(v.get("name"), Decimal(0))
            steps_check(steps, start)
        experiment = experiment_update(experiment=experiment, fields=data, variants=variants, steps=steps)
        return _answer(experiment)

    @extend_schema(
        tags=_TAG,
        operation_id="experiments_destroy",
        summary="Delete an experiment (staff)",
        description="A draft or concluded one only (400 otherwise). Its ledger rows keep the experiment's id."
        + _KEY_NEEDS_SCOPE,
        responses={204: None, **error_responses(400, 401, 404), **EXPERIMENT_MANAGEMENT_FORBIDDEN},
    )
    def delete(self, request: Request, experiment_id: int) -> Response:
        experiment_delete(experiment=_experiment_or_404(experiment_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


def _transition_api(service: Any, *, action: str, summary: str, description: str) -> type[APIView]:
    class TransitionApi(APIView):
        permission_classes = EXPERIMENT_MANAGEMENT

        @extend_schema(
            tags=_TAG,
            operation_id=f"experiments_{action}",
            summary=summary,
            description=description + _KEY_NEEDS_SCOPE,
            request=None,
            responses={
                200: ExperimentOutputSerializer,
                **error_responses(400, 401, 404),
                **EXPERIMENT_MANAGEMENT_FORBIDDEN,
            },
        )
        def post(self, request: Request, experiment_id: int) -> Response:
            experiment = _experiment_or_404(experiment_id)
            service(experiment=experiment)
            return _answer(experiment)

    TransitionApi.__name__ = TransitionApi.__qualname__ = f"Experiment{action.title()}Api"
    return TransitionApi


ExperimentStartApi = _transition_api(
    experiment_start,
    action="start",
    summary="Start or resume an experiment (staff)",
    description=(
        "It assigns from now on. 400 naming the problem when it has fewer than two variants, not exactly one "
        "control, a variant its model cannot serve, an `ends_at` that has passed, allocations over 100 %, or "
        "another experiment already runs on the model. A paused experiment resumes with every user in the "
        "variant they had."
    ),
)
ExperimentPauseApi = _transition_api(
    experiment_pause,
    action="pause",
    summary="Pause an experiment (staff)",
    description="Nobody is assigned until it is started again; everyone is served as if there were none.",
)
ExperimentConcludeApi = _transition_api(
    experiment_conclude,
    action="conclude",
    summary="Conclude an experiment (staff)",
    description="For good: `ends_at` becomes now. A promoted variant keeps serving the model's traffic.",
)
ExperimentAdvanceApi = _transition_api(
    experiment_rollout_advance,
    action="advance",
    summary="Apply the rollout's next step now (staff)",
    description="The first step not yet applied, timed or not; recorded in the audit log. 400 when none is left.",
)


class ExperimentPromoteApi(APIView):
    permission_classes = EXPERIMENT_MANAGEMENT

    @extend_schema_serializer(component_name="ExperimentPromote")
    class InputSerializer(serializers.Serializer):
        variant = serializers.SlugField(max_length=64, help_text="The name of the variant to promote.")

    @extend_schema(
        tags=_TAG,
        operation_id="experiments_promote",
        summary="Promote a variant (staff)",
        description=(
            "Its allocation becomes 100 % and every other variant's 0 %, so every user of the model gets it; "
            "the rollout's remaining steps no longer apply. Recorded in the audit log as `experiment.promote`."
            + _KEY_NEEDS_SCOPE
        ),
        request=InputSerializer,
        responses={
            200: ExperimentOutputSerializer,
            **error_responses(400, 401, 404),
            **EXPERIMENT_MANAGEMENT_FORBIDDEN,
        },
    )
    def post(self, request: Request, experiment_id: int) -> Response:
        experiment = _experiment_or_404(experiment_id)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        name = serializer.validated_data["variant"]
        variant = next((v for v in experiment.variants.all() if v.name == name), None)
        if variant is None:
            raise serializers.ValidationError({"variant": f"{experiment.name} has no variant named {name!r}."})
        experiment_promote(experiment=experiment, variant=variant)
        return _answer(experiment)


# One CSV row per variant and metric.
CSV_COLUMNS = (
    "experiment",
    "variant",
    "is_control",
    "requests",
    "users",
    "metric",
    "value",
    "interval_low",
    "interval_high",
    "n",
    "p50",
    "p95",
    "verdict",
    "difference",
    "difference_low",
    "difference_high",
    "p_value",
    "samples_needed",
)


def results_csv_lines(results: dict[str, Any]) -> Iterator[str]:
    """The results (``experiments.results``) as CSV lines: one per variant and metric (named scores as
    ``scores.<name>``), with the comparison against the control where there is one. Empty cells for what
    has no value."""
    return csv_lines(CSV_COLUMNS, _results_rows(results))


def _results_rows(results: dict[str, Any]) -> Iterator[list[Any]]:
    def cell(value: Any) -> Any:
        return "" if value is None else value

    for variant in results["variants"]:
        figures = [(metric["key"], variant["metrics"][metric["key"]]) for metric in results["metrics"]]
        figures += [(f"scores.{name}", figure) for name, figure in variant.get("scores", {}).items()]
        for key, figure in figures:
            interval = figure.get("interval") or [None, None]
            comparison = variant["comparisons"].get(key) or {}
            difference_interval = comparison.get("interval") or [None, None]
            yield [
                cell(v)
                for v in (
                    results["experiment"]["name"],
                    variant["name"],
                    "true" if variant["is_control"] else "false",
                    variant["requests"],
                    variant["users"],
                    key,
                    figure["value"],
                    interval[0],
                    interval[1],
                    figure["n"],
                    figure.get("p50"),
                    figure.get("p95"),
                    comparison.get("verdict"),
                    comparison.get("difference"),
                    difference_interval[0],
                    difference_interval[1],
                    comparison.get("p_value"),
                    comparison.get("samples_needed"),
                )
            ]


@extend_schema_serializer(component_name="ExperimentResults")
class ResultsOutputSerializer(serializers.Serializer):
    """Documented in full in ``experiments/results.py`` and docs/experiments.md."""

    experiment = serializers.DictField()
    generated_at = serializers.DateTimeField()
    confidence = serializers.FloatField(help_text="Of every interval: 1 − alpha.")
    method = serializers.CharField(help_text="The test behind the verdicts and its reference.")
    control = serializers.CharField(allow_null=True)
    winner = serializers.CharField(
        allow_null=True, help_text="Better on the primary metric with no guardrail worse; null: none yet."
    )
    winner_reason = serializers.CharField()
    metrics = serializers.ListField(child=serializers.DictField())
    variants = serializers.ListField(
        child=serializers.DictField(),
        help_text="Per variant: requests, users, statuses, `metrics` {key: value, interval, n, …} and "
        "`comparisons` {key: verdict, difference, interval, p_value, samples_needed} against the control.",
    )
    series = serializers.DictField(help_text="`days` and per variant `requests`, `rated`, `positive_rate` per day.")


class ExperimentResultsApi(APIView):
    permission_classes = EXPERIMENT_MANAGEMENT
    renderer_classes = [renderers.JSONRenderer]

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # ``?format=csv`` is answered by the view with a streamed CSV, not by a renderer (as the audit API).
        if request.query_params.get("format") == "csv":
            return renderers.JSONRenderer(), "application/json"
        return super().perform_content_negotiation(request, force)

    @extend_schema(
        tags=_TAG,
        operation_id="experiments_results",
        summary="An experiment's results (staff)",
        description=(
            "Per variant, from the ledger and the feedback: requests, users, positive-feedback rate, mean score, "
            "error rate, latency p50/p95 and mean, time to first token, mean cost and cost per positive answer, "
            "each with an interval, and against the control a verdict per metric (`better`, `worse`, `unknown` "
            "with `samples_needed`) by an anytime-valid test, so it may be looked at as often as wanted; the "
            "`winner`; a per-day series. `?format=csv`: one row per variant and metric." + _KEY_NEEDS_SCOPE
        ),
        parameters=[OpenApiParameter("format", str, enum=["json", "csv"], description="`csv` for a CSV file.")],
        responses={
            200: ResultsOutputSerializer,
            (200, "text/csv"): OpenApiResponse(response=OpenApiTypes.STR, description="CSV with a header row."),
            **error_responses(401, 404),
            **EXPERIMENT_MANAGEMENT_FORBIDDEN,
        },
    )
    def get(self, request: Request, experiment_id: int) -> Any:
        experiment = _experiment_or_404(experiment_id)
        results = experiment_results(experiment)
        if request.query_params.get("format") == "csv":
            stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
            response = ThreadedStreamingHttpResponse(results_csv_lines(results), content_type="text/csv; charset=utf-8")
            response["Content-Disposition"] = f'attachment; filename="experiment-{experiment.name}-{stamp}.csv"'
            return response
        return Response(results)
