"""What ``/api/experiments/`` reads and answers (``experiments.apis``): an experiment with its variants and
rollout steps, nested, in and out.

A variant is named in every answer and request by its ``name`` (unique in the experiment); what serves it
by name too: ``deployment`` is the name of one of the experiment's model's deployments, ``target_model``
another public model's name, ``prompt_version`` a prompt template version's id."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema_field, extend_schema_serializer
from rest_framework import serializers

from core.text import has_lone_surrogate
from prompts.models import PromptVersion
from providers.models import CatalogModel, Deployment

from .models import AllocationStep, Experiment, Metric, Variant
from .overrides import OVERRIDABLE, overrides_validate
from .services import HUNDRED, allocation_percent, rollout_steps_check


def _printable(value: str) -> str:
    if "\x00" in value or has_lone_surrogate(value):
        raise serializers.ValidationError("Text with NUL or lone surrogate code points cannot be stored.")
    return value


class PercentField(serializers.CharField):
    """A percent 0–100 with at most two decimals (the bucket grain), as a JSON string or number."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("help_text", 'Percent of the model\'s users, 0–100, at most two decimals, e.g. `"12.5"`.')
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Decimal:
        if isinstance(data, bool) or not isinstance(data, (str, int, float)):
            raise serializers.ValidationError("Give a percent as a number or a decimal string.")
        try:
            return allocation_percent(data)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(next(iter(exc.message_dict.values()))) from None

    def to_representation(self, value: Any) -> str:
        return f"{Decimal(value).quantize(Decimal('0.01'))}"


@extend_schema_field({"type": "object", "additionalProperties": {"type": "string"}, "example": {"b": "25.00"}})
class AllocationsField(serializers.DictField):
    """``{variant name: percent}``."""

    child = PercentField()

    def to_representation(self, value: Any) -> dict[str, str]:
        return {name: f"{Decimal(str(percent)).quantize(Decimal('0.01'))}" for name, percent in (value or {}).items()}


def overrides_check(overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides_validate`` for DRF: a ``ValidationError`` naming the parameter."""
    try:
        return overrides_validate(overrides)
    except DjangoValidationError as exc:
        raise serializers.ValidationError(exc.message_dict) from None


@extend_schema_serializer(component_name="ExperimentVariant")
class VariantSerializer(serializers.Serializer):
    id = serializers.IntegerField(read_only=True)
    name = serializers.SlugField(max_length=64, help_text="Shown in x-llmhub-experiment: `experiment:variant`.")
    is_control = serializers.BooleanField(default=False, help_text="Exactly one variant is the control.")
    deployment = serializers.CharField(
        max_length=64,
        required=False,
        allow_null=True,
        default=None,
        help_text="The name of one of the model's deployments that serves this variant.",
    )
    target_model = serializers.CharField(
        max_length=128,
        required=False,
        allow_null=True,
        default=None,
        help_text="Another public model that serves this variant instead (the caller's plan must allow it).",
    )
    prompt_version = serializers.IntegerField(
        required=False,
        allow_null=True,
        default=None,
        help_text="A prompt template version's id: requests that run a template run this version.",
    )
    overrides = serializers.DictField(
        required=False,
        default=dict,
        validators=[overrides_check],
        help_text='Sampling parameters set upstream, replacing the client\'s, e.g. `{"temperature": 0.2}`: '
        + ", ".join(f"`{name}`" for name in OVERRIDABLE)
        + ".",
    )
    allocation = PercentField(default=Decimal("0"))

    def to_representation(self, variant: Variant) -> dict[str, Any]:
        return {
            "id": variant.pk,
            "name": variant.name,
            "is_control": variant.is_control,
            "deployment": (variant.deployment.name or None) if variant.deployment_id else None,
            "target_model": variant.target_model.name if variant.target_model_id else None,
            "prompt_version": variant.prompt_version_id,
            "overrides": variant.overrides or {},
            "allocation": f"{variant.allocation}",
        }


@extend_schema_serializer(component_name="ExperimentRolloutStep")
class StepSerializer(serializers.Serializer):
    position = serializers.IntegerField(read_only=True)
    allocations = AllocationsField(help_text="The allocations this step sets, `{variant name: percent}`.")
    at = serializers.DateTimeField(
        required=False, allow_null=True, default=None, help_text="When it applies; empty: when an admin advances."
    )
    applied_at = serializers.DateTimeField(read_only=True, allow_null=True)

    def to_representation(self, step: AllocationStep) -> dict[str, Any]:
        return {
            "position": step.position,
            "allocations": AllocationsField().to_representation(step.allocations),
            "at": serializers.DateTimeField().to_representation(step.at) if step.at else None,
            "applied_at": serializers.DateTimeField().to_representation(step.applied_at) if step.applied_at else None,
        }


_METRICS_HELP = "One of " + ", ".join(f"`{m.value}`" for m in Metric) + "."


class ExperimentFieldsSerializer(serializers.Serializer):
    """The experiment's own fields, shared by create (required ones required) and update (all optional)."""

    name = serializers.SlugField(max_length=64, help_text="Shown in x-llmhub-experiment: `experiment:variant`.")
    description = serializers.CharField(required=False, allow_blank=True, validators=[_printable])
    starts_at = serializers.DateTimeField(required=False, allow_null=True, help_text="Empty: from when it starts.")
    ends_at = serializers.DateTimeField(required=False, allow_null=True, help_text="Empty: until it is concluded.")
    primary_metric = serializers.ChoiceField(choices=Metric.choices, required=False, help_text=_METRICS_HELP)
    guardrail_metrics = serializers.ListField(
        child=serializers.ChoiceField(choices=Metric.choices),
        required=False,
        help_text="Metrics that must not get worse for a variant to win.",
    )
    alpha = serializers.DecimalField(
        max_digits=4,
        decimal_places=3,
        min_value=Decimal("0.001"),
        max_value=Decimal("0.2"),
        required=False,
        help_text="The error rate verdicts hold to, however often results are looked at (default 0.05).",
    )

    def validate_guardrail_metrics(self, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        starts, ends = attrs.get("starts_at"), attrs.get("ends_at")
        instance = getattr(self, "instance", None)
        if instance is not None:
            starts = attrs.get("starts_at", instance.starts_at)
            ends = attrs.get("ends_at", instance.ends_at)
        if starts is not None and ends is not None and ends <= starts:
            raise serializers.ValidationError({"ends_at": "ends_at must be after starts_at."})
        return attrs


def _allocation_total_check(allocations: dict[str, Decimal], field: str) -> None:
    total = sum(allocations.values(), Decimal(0))
    if total > HUNDRED:
        raise serializers.ValidationError({field: f"The allocations add up to {total} %, more than 100 %."})


def variants_resolve(model: CatalogModel, variants: list[dict[str, Any]], field: str = "variants") -> list[dict]:
    """Names to rows for each variant's ``deployment``, ``target_model`` and ``prompt_version``; a 400
    naming ``variants.<i>.<field>`` for anything that does not fit."""
    resolved = []
    for index, data in enumerate(variants):
        where = f"{field}.{index}"
        data = dict(data)
        if data.get("deployment") is not None and data.get("target_model") is not None:
            raise serializers.ValidationError(
                {f"{where}.target_model": "A variant is served by a deployment or by another model, not both."}
            )
        if data.get("deployment") is not None:
            deployment = Deployment.objects.filter(model=model, name=data["deployment"]).first()
            if deployment is None:
                raise serializers.ValidationError(
                    {f"{where}.deployment": f"{model.name} has no deployment named {data['deployment']!r}."}
                )
            data["deployment"] = deployment
        if data.get("target_model") is not None:
            target = CatalogModel.objects.filter(name=data["target_model"]).first()
            if target is None:
                raise serializers.ValidationError(
                    {f"{where}.target_model": f"No model named {data['target_model']!r}."}
                )
            if target.pk == model.pk:
                raise serializers.ValidationError(
                    {f"{where}.target_model": "That is the experiment's own model: leave target_model empty."}
                )
            data["target_model"] = target
        if data.get("prompt_version") is not None:
            version = PromptVersion.objects.filter(pk=data["prompt_version"]).first()
            if version is None:
                raise serializers.ValidationError(
                    {f"{where}.prompt_version": f"No prompt version with id {data['prompt_version']}."}
                )
            data["prompt_version"] = version
        resolved.append(data)
    return resolved


class ExperimentCreateSerializer(ExperimentFieldsSerializer):
    model = serializers.CharField(max_length=128, help_text="The public model whose traffic the experiment splits.")
    variants = VariantSerializer(many=True, help_text="At least two, exactly one of them the control.")
    steps = StepSerializer(
        many=True, required=False, default=list, help_text="A gradual rollout: allocations applied in order."
    )

    def validate_model(self, value: str) -> CatalogModel:
        _printable(value)
        model = CatalogModel.objects.filter(name=value).first()
        if model is None:
            raise serializers.ValidationError(f"No model named {value!r}.")
        return model

    def validate_name(self, value: str) -> str:
        if Experiment.objects.filter(name=value).exists():
            raise serializers.ValidationError(f"An experiment named {value!r} exists already.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        variants = attrs["variants"]
        if len(variants) < 2:
            raise serializers.ValidationError({"variants": "An experiment needs at least two variants."})
        names = [v["name"] for v in variants]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise serializers.ValidationError({"variants": f"Two variants are named {duplicate!r}."})
        controls = sum(1 for v in variants if v["is_control"])
        if controls != 1:
            raise serializers.ValidationError(
                {"variants": f"Exactly one variant must be the control (now {controls})."}
            )
        _allocation_total_check({v["name"]: v["allocation"] for v in variants}, "variants")
        attrs["variants"] = variants_resolve(attrs["model"], variants)
        steps_check(attrs.get("steps") or [], {v["name"]: v["allocation"] for v in variants})
        return attrs


def steps_check(steps: list[dict[str, Any]], start: dict[str, Decimal], field: str = "steps") -> None:
    """``rollout_steps_check`` (the rule's home, which the admin uses too) as a 400 naming the step."""
    try:
        rollout_steps_check(steps=steps, start=start, field=field)
    except DjangoValidationError as exc:
        raise serializers.ValidationError(exc.message_dict) from None


class ExperimentUpdateSerializer(ExperimentFieldsSerializer):
    name = serializers.SlugField(max_length=64, required=False)
    variants = VariantSerializer(
        many=True,
        required=False,
        help_text=(
            "By name: a known variant's fields change (on an experiment that has started, only `allocation`); "
            "a new name adds a variant (to a draft only). Variants not listed stay as they are."
        ),
    )
    steps = StepSerializer(many=True, required=False, help_text="Replaces the rollout steps not yet applied.")

    def validate_name(self, value: str) -> str:
        if Experiment.objects.filter(name=value).exclude(pk=self.instance.pk).exists():
            raise serializers.ValidationError(f"An experiment named {value!r} exists already.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """A field PATCH does not change is a 400, not a 200 that silently kept the old value; the answer's
        read-only fields may come back as they were (a client that PATCHes what it read)."""
        experiment = self.instance
        current = {
            "model": experiment.model.name,
            "status": experiment.status,
            "promoted_variant": experiment.promoted_variant.name if experiment.promoted_variant_id else None,
        }
        how = {
            "model": "an experiment's model is settled when it is created: create a new experiment on the other model.",
            "status": "the status changes through POST /api/experiments/{id}/start/, pause/ and conclude/.",
            "promoted_variant": 'a variant is promoted through POST /api/experiments/{id}/promote/ {"variant": …}.',
        }
        for name in self.initial_data if isinstance(self.initial_data, dict) else ():
            if name in self.fields:
                continue
            if name in how:
                if self.initial_data[name] != current[name]:
                    raise serializers.ValidationError({name: f"PATCH does not change it: {how[name]}"})
            elif name not in ExperimentOutputSerializer.READ_ONLY:
                known = ", ".join(sorted(self.fields))
                raise serializers.ValidationError({name: f"Unknown field {name!r}: PATCH changes {known}."})
        return super().validate(attrs)


@extend_schema_serializer(component_name="Experiment")
class ExperimentOutputSerializer(serializers.Serializer):
    # What an answer holds that no request sets.
    READ_ONLY = frozenset({"id", "untouched", "results_url", "created_at", "updated_at"})

    id = serializers.IntegerField()
    name = serializers.CharField()
    description = serializers.CharField()
    model = serializers.CharField(source="model.name", help_text="The public model whose traffic it splits.")
    status = serializers.CharField(help_text="`draft`, `running`, `paused` or `concluded`.")
    starts_at = serializers.DateTimeField(allow_null=True)
    ends_at = serializers.DateTimeField(allow_null=True)
    primary_metric = serializers.CharField()
    guardrail_metrics = serializers.ListField(child=serializers.CharField())
    alpha = serializers.DecimalField(max_digits=4, decimal_places=3)
    untouched = serializers.SerializerMethodField(help_text="The share no variant takes: served as without it.")
    promoted_variant = serializers.SerializerMethodField(help_text="The variant promoted to 100 %, if any.")
    variants = VariantSerializer(many=True)
    steps = StepSerializer(many=True)
    results_url = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()

    def get_untouched(self, experiment: Experiment) -> str:
        return f"{HUNDRED - sum((v.allocation for v in experiment.variants.all()), Decimal(0))}"

    def get_promoted_variant(self, experiment: Experiment) -> str | None:
        return experiment.promoted_variant.name if experiment.promoted_variant_id else None

    def get_results_url(self, experiment: Experiment) -> str:
        return f"/api/experiments/{experiment.pk}/results/"

    def to_representation(self, experiment: Experiment) -> dict[str, Any]:
        data = super().to_representation(experiment)
        data["variants"] = [VariantSerializer().to_representation(v) for v in experiment.variants.all()]
        data["steps"] = [StepSerializer().to_representation(s) for s in experiment.steps.all()]
        return data
