"""Experiments in the admin: an experiment with its variants and rollout steps, the lifecycle as admin
actions (start, pause, conclude, advance the rollout), and feedback read-only.

What serves a variant and the experiment's identity (model, salt, metrics) are settled before it starts:
once it has run, those fields are read-only, variants can no longer be added or removed, and a change of
allocation in the variants' rows goes through ``experiment_allocation_set`` (which moves as few users as it
can and records the change in the audit log), never straight into the rows. Every action goes through
``experiments.services``, which checks it and records it."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Q, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from accounts.admin_search import UserSearch
from core.exceptions import ApplicationError
from core.paginators import EstimatedCountPaginator
from prompts.models import PromptVersion
from providers.models import Deployment

from . import services
from .models import AllocationStep, Experiment, ExperimentStatus, Feedback, FeedbackMetric, Metric, Variant

# Settled when the experiment starts: changing them afterwards would reshuffle users or change what a
# variant means halfway through its results.
EXPERIMENT_FIXED_ONCE_STARTED = ("name", "model", "salt", "primary_metric", "guardrail_metrics", "alpha", "starts_at")
VARIANT_FIXED_ONCE_STARTED = (
    "name",
    "is_control",
    "deployment",
    "target_model",
    "prompt_version",
    "overrides",
    "position",
)


def _started(experiment: Experiment | None) -> bool:
    return experiment is not None and experiment.pk is not None and experiment.status != ExperimentStatus.DRAFT


def _concluded(experiment: Experiment | None) -> bool:
    return experiment is not None and experiment.status == ExperimentStatus.CONCLUDED


def _failure_text(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    if isinstance(exc, ApplicationError):
        return exc.message
    return str(exc)


class VariantFormSet(BaseInlineFormSet):
    """The variants' allocations together leave a share (maybe none) untouched: at most 100 %; and each can serve
    the callers who fall in it (``services.variants_serving_problems``)."""

    def clean(self) -> None:
        super().clean()
        if any(self.errors):
            return
        kept = [f for f in self.forms if getattr(f, "cleaned_data", None) and not f.cleaned_data.get("DELETE")]
        total = sum((f.cleaned_data.get("allocation", f.instance.allocation) for f in kept), Decimal(0))
        if total > 100:
            raise ValidationError(f"The variants' allocations add up to {total} %, more than 100 %.")
        if getattr(self.instance, "model_id", None) is None:
            return  # the experiment's own form has the error
        # A variant that could not serve the callers in it (``variants_serving_problems``): its field's error.
        forms_of = {id(f.instance): f for f in kept}
        problems = services.variants_serving_problems(self.instance.model, [f.instance for f in kept])
        for variant, field, problem in problems:
            form = forms_of[id(variant)]
            form.add_error(field if field in form.fields else None, problem)


class VariantInline(admin.TabularInline):
    model = Variant
    formset = VariantFormSet
    fields = (
        "name",
        "is_control",
        "deployment",
        "target_model",
        "prompt_version",
        "overrides",
        "allocation",
        "position",
    )
    extra = 0

    def get_extra(self, request: HttpRequest, obj: Experiment | None = None, **kwargs: Any) -> int:
        return 2 if obj is None else 0  # a new experiment starts with a control and a treatment to fill in

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        # An option's label names the deployment's model ("model/name") and the version's template ("slug vN"):
        # read with the choices, or each option of each row's select costs a query.
        if db_field.name == "deployment":
            kwargs["queryset"] = Deployment.objects.select_related("model")
        elif db_field.name == "prompt_version":
            kwargs["queryset"] = PromptVersion.objects.select_related("template")
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj: Experiment | None = None) -> tuple[str, ...]:
        if _concluded(obj):
            return self.fields
        if _started(obj):
            return VARIANT_FIXED_ONCE_STARTED
        return ()

    def has_add_permission(self, request: HttpRequest, obj: Experiment | None = None) -> bool:
        return not _started(obj) and super().has_add_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Experiment | None = None) -> bool:
        return not _started(obj) and super().has_delete_permission(request, obj)


class AllocationStepFormSet(BaseInlineFormSet):
    """A step already applied is history: it may not be changed or removed. The steps still to apply must be
    able to (``services.rollout_steps_check``, as the REST API checks them), counted from the allocations
    the same form gives the variants (``variant_formset``, set by ``ExperimentAdmin``), else the saved ones."""

    variant_formset: VariantFormSet | None = None

    def clean(self) -> None:
        super().clean()
        for form in self.forms:
            step = form.instance
            if step.pk is None or step.applied_at is None or not getattr(form, "cleaned_data", None):
                continue
            if form.cleaned_data.get("DELETE") or form.has_changed():
                raise ValidationError(
                    f"Step {step.position} was applied on {step.applied_at:%Y-%m-%d %H:%M} UTC: it stays."
                )
        if any(self.errors):
            return
        start = self._allocations_before_steps()
        if start is None:
            return  # the variants' rows are refused: their errors say why
        pending = sorted(
            (
                (form.cleaned_data.get("position", form.instance.position), index, form)
                for index, form in enumerate(self.forms)
                if getattr(form, "cleaned_data", None)
                and not form.cleaned_data.get("DELETE")
                and form.instance.applied_at is None
                and "allocations" in form.cleaned_data
            ),
            key=lambda item: item[:2],
        )
        forms = [form for _, _, form in pending]
        try:
            services.rollout_steps_check(steps=[form.cleaned_data for form in forms], start=start)
        except ValidationError as exc:
            where, problems = next(iter(exc.message_dict.items()))
            form = forms[int(where.split(".")[1])]
            form.add_error("allocations", problems)

    def _allocations_before_steps(self) -> dict[str, Decimal] | None:
        """Every variant with its allocation as this form saves it (a started experiment's steps already
        applied are in it), or None when the variants' rows are invalid."""
        variants = self.variant_formset
        if variants is None:
            return {v.name: v.allocation for v in Variant.objects.filter(experiment=self.instance)}
        if not variants.is_valid():
            return None
        return {
            form.cleaned_data.get("name", form.instance.name): form.cleaned_data.get(
                "allocation", form.instance.allocation
            )
            for form in variants.forms
            if getattr(form, "cleaned_data", None) and not form.cleaned_data.get("DELETE")
        }


class AllocationStepInline(admin.TabularInline):
    model = AllocationStep
    formset = AllocationStepFormSet
    fields = ("position", "allocations", "at", "applied_at")
    readonly_fields = ("applied_at",)
    extra = 0

    def get_readonly_fields(self, request: HttpRequest, obj: Experiment | None = None) -> tuple[str, ...]:
        return self.fields if _concluded(obj) else self.readonly_fields


class ExperimentAdminForm(forms.ModelForm):
    """No Meta: ``ExperimentAdmin`` builds the form for its fieldsets."""

    def clean_guardrail_metrics(self) -> list[str]:
        value = self.cleaned_data.get("guardrail_metrics") or []
        if not isinstance(value, list) or any(item not in Metric.values for item in value):
            raise ValidationError(f"A list of metrics among: {', '.join(Metric.values)}.")
        return value


@admin.register(Experiment)
class ExperimentAdmin(admin.ModelAdmin):
    form = ExperimentAdminForm
    inlines = (VariantInline, AllocationStepInline)
    list_display = ("name", "status", "model", "allocation_summary", "starts_at", "ends_at", "results_link")
    list_filter = ("status", ("model", admin.RelatedOnlyFieldListFilter))
    list_select_related = ("model",)
    search_fields = ("name", "description", "model__name")
    actions = ("start", "pause", "conclude", "advance_rollout")
    fieldsets = (
        (None, {"fields": ("name", "description", "model", "status", "results_link")}),
        ("Schedule", {"fields": ("starts_at", "ends_at")}),
        ("Statistics", {"fields": ("primary_metric", "guardrail_metrics", "alpha")}),
        ("Assignment", {"fields": ("salt", "layout_summary", "promoted_variant"), "classes": ("collapse",)}),
        ("History", {"fields": ("created_at", "updated_at"), "classes": ("collapse",)}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Experiment]:
        return super().get_queryset(request).prefetch_related("variants")

    def get_readonly_fields(self, request: HttpRequest, obj: Experiment | None = None) -> tuple[str, ...]:
        always = ("status", "results_link", "layout_summary", "promoted_variant", "created_at", "updated_at")
        if _concluded(obj):
            return (*always, *EXPERIMENT_FIXED_ONCE_STARTED, "description", "ends_at")
        if _started(obj):
            return (*always, *EXPERIMENT_FIXED_ONCE_STARTED)
        return always

    def _create_formsets(self, request: HttpRequest, obj: Experiment, change: bool) -> tuple[list, list]:
        # The rollout steps are checked against the allocations the variants' rows of the same form give
        # (a draft's variants change with its steps): the steps' formset is handed the variants'.
        formsets, inline_instances = super()._create_formsets(request, obj, change)
        variants = next((f for f in formsets if f.model is Variant), None)
        for formset in formsets:
            if isinstance(formset, AllocationStepFormSet):
                formset.variant_formset = variants
        return formsets, inline_instances

    # Allocations of a started experiment: through the service, never saved raw into the rows.

    def save_formset(self, request: HttpRequest, form: forms.ModelForm, formset: Any, change: bool) -> None:
        experiment: Experiment = form.instance
        if formset.model is not Variant or not _started(experiment):
            super().save_formset(request, form, formset, change)
            return
        formset.save(commit=False)  # what changed, for the admin's history; the rows are saved by the service
        before = {v.name: v.allocation for v in Variant.objects.filter(experiment=experiment)}
        wanted = {
            f.instance.name: f.cleaned_data["allocation"]
            for f in formset.forms
            if f.instance.pk is not None and "allocation" in f.changed_data
        }
        if not wanted:
            return
        try:
            services.experiment_allocation_set(
                experiment=experiment, allocations=wanted, actor=request.user, reason="admin"
            )
        except ValidationError as exc:
            self.message_user(request, f"Allocation not changed: {_failure_text(exc)}", messages.ERROR)
            return
        changed = ", ".join(f"{name} {before[name]} % → {value} %" for name, value in sorted(wanted.items()))
        self.message_user(request, f"Allocation changed through the rollout service: {changed}.", messages.SUCCESS)

    # Columns

    @admin.display(description="allocation")
    def allocation_summary(self, experiment: Experiment) -> str:
        variants = list(experiment.variants.all())
        if not variants:
            return "—"
        parts = [f"{v.name}{' (control)' if v.is_control else ''} {v.allocation.normalize():f} %" for v in variants]
        untouched = Decimal(100) - sum((v.allocation for v in variants), Decimal(0))
        if untouched > 0:
            parts.append(f"untouched {untouched.normalize():f} %")
        return " · ".join(parts)

    @admin.display(description="results")
    def results_link(self, experiment: Experiment) -> str:
        if experiment.pk is None:
            return "—"
        return format_html('<a href="{}">Results</a>', reverse("experiment-results-page", args=[experiment.pk]))

    @admin.display(description="buckets")
    def layout_summary(self, experiment: Experiment) -> str:
        names = {v.pk: v.name for v in experiment.variants.all()}
        owned: dict[str, int] = {}
        for start, end, variant_id in experiment.layout or ():
            name = names.get(variant_id, f"#{variant_id}")
            owned[name] = owned.get(name, 0) + (end - start)
        if not owned:
            return "none assigned (not started)"
        return ", ".join(f"{name}: {count:,}" for name, count in owned.items()) + " of 10,000"

    # Actions: each through its service, which checks and records it.

    def _each(self, request: HttpRequest, queryset: QuerySet[Experiment], verb: str, call: Any) -> None:
        for experiment in queryset:
            try:
                call(experiment)
            except (ValidationError, ApplicationError) as exc:
                self.message_user(request, f"{experiment}: not {verb}: {_failure_text(exc)}", messages.ERROR)
            else:
                self.message_user(request, f"{experiment}: {verb}.", messages.SUCCESS)

    @admin.action(description="Start the selected experiments", permissions=("change",))
    def start(self, request: HttpRequest, queryset: QuerySet[Experiment]) -> None:
        self._each(request, queryset, "started", lambda e: services.experiment_start(experiment=e, actor=request.user))

    @admin.action(description="Pause the selected experiments", permissions=("change",))
    def pause(self, request: HttpRequest, queryset: QuerySet[Experiment]) -> None:
        self._each(request, queryset, "paused", lambda e: services.experiment_pause(experiment=e, actor=request.user))

    @admin.action(description="Conclude the selected experiments", permissions=("change",))
    def conclude(self, request: HttpRequest, queryset: QuerySet[Experiment]) -> None:
        self._each(
            request, queryset, "concluded", lambda e: services.experiment_conclude(experiment=e, actor=request.user)
        )

    @admin.action(description="Advance the rollout to its next step", permissions=("change",))
    def advance_rollout(self, request: HttpRequest, queryset: QuerySet[Experiment]) -> None:
        self._each(
            request,
            queryset,
            "advanced to its next rollout step",
            lambda e: services.experiment_rollout_advance(experiment=e, actor=request.user),
        )


class FeedbackMetricFilter(admin.SimpleListFilter):
    """The built-in metrics, named here: Django's filter of a field without choices lists its values with a
    SELECT DISTINCT over every rating at each view of the list. A named score is filtered in the address
    (``?metric=helpfulness``)."""

    title = "metric"
    parameter_name = "metric"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return list(FeedbackMetric.choices)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Feedback]) -> QuerySet[Feedback]:
        return queryset.filter(metric=self.value()) if self.value() else queryset


@admin.register(Feedback)
class FeedbackAdmin(UserSearch, admin.ModelAdmin):
    """Read-only: feedback is written by its callers (``POST /v1/feedback``, the chat page's thumbs). A rating a
    request at most, so as the messages' list (docs/ledger.md, "The admin at scale"): newest first off the primary
    key (the model's order, by an unindexed ``updated_at``, sorted every rating), one count, days by the date
    filter (the date hierarchy read every rating's bounds and days), the metrics named."""

    list_display = ("request_id", "metric", "value", "user", "source", "updated_at")
    list_filter = (FeedbackMetricFilter, "source", "updated_at")
    search_help_text = "A request id, or the rater's username or email, written out exactly."
    list_select_related = ("user",)
    ordering = ("-id",)
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    fields = ("request_id", "user", "metric", "value", "comment", "source", "created_at", "updated_at")
    readonly_fields = fields

    def also_q(self, term: str) -> Q:
        # The request id, whole, first in the (request id, metric) unique index; the comments are not searched
        # (LIKE '%term%' on them, the request ids and the joined usernames read every rating and every user).
        return Q(request_id=term)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Feedback | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Feedback | None = None) -> bool:
        return False
