"""Admin for providers and the model catalog (public models, each with its deployments inline). Actions call
services; the API key is write-only."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import models
from django.db.models import Count, Max, Min, Q, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.timesince import timesince

from core.admin_delete import BoundedDeleteConfirmation
from core.exceptions import ApplicationError
from core.text import validate_json_storable

from .admin_deployments import DeploymentForm
from .fallbacks import FALLBACK_FIELDS, fallback_graph, fallback_problem, fallback_referrers
from .fields import Secret
from .forms import ModelNamesField
from .models import ByokMode, CatalogModel, Deployment, HealthStatus, ModelMode, Provider
from .rules import output_limits_dropped
from .services.breakers import deployment_upstream_changed
from .services.credentials import provider_host_change_record, providers_delete
from .services.health import providers_health_check
from .services.model_import import provider_import_models
from .signals import catalog_models_delete_refusals
from .types import HealthResult

logger = logging.getLogger(__name__)


def _failure_text(exc: Exception) -> str:
    """What an admin may read about an exception: our own messages are written to be shown; for anything
    else only its type, since its text may carry what a provider sent back (the traceback is logged)."""
    if isinstance(exc, ApplicationError):
        return exc.message
    if isinstance(exc, ImproperlyConfigured):
        return str(exc)
    return f"unexpected {type(exc).__name__}; see the server log"


class ProviderAdminForm(forms.ModelForm):
    """No Meta: ``ProviderAdmin`` builds the form for its fieldsets (with its ``formfield_overrides``)."""

    clear_api_key = forms.BooleanField(required=False, label="Clear stored key", help_text="Remove the stored API key.")
    # Who saves the form (set by ``ProviderAdmin.get_form``): whether they may move a provider's keys.
    may_change_address = False

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if cleaned.get("clear_api_key"):
            if cleaned.get("api_key"):
                self.add_error("api_key", "Give a new key or tick “Clear stored key”, not both.")
            else:
                # An empty Secret, not None: None is the key field's "keep what is stored".
                cleaned["api_key"] = Secret("")
        self._address_change_check(cleaned)
        return cleaned

    def _address_change_check(self, cleaned: dict[str, Any]) -> None:
        """A provider's stored key, and its users' own keys, go wherever its base URL points: whoever may edit
        a provider but not see its keys could otherwise point it at a server of their own and read them off
        the requests. Moving a provider that holds keys takes the ``move_provider`` permission
        (admins); without it, its own key must be given again (or cleared) in the same save, and a provider
        holding users' own keys stays where the users gave them."""
        provider = self.instance
        moved = [name for name in ("base_url", "kind") if name in self.changed_data]
        if provider.pk is None or not moved or self.may_change_address:
            return
        field = moved[0]
        if provider.credentials.exists():
            self.add_error(
                field,
                "Users have given their own keys for this provider at its current address: only an admin may "
                "change where it sends them.",
            )
            return
        if provider.api_key and not cleaned.get("api_key") and not cleaned.get("clear_api_key"):
            self.add_error(
                field,
                "Changing where this provider sends requests would send its stored key there: enter the key "
                "again (or tick “Clear stored key”) in the same save.",
            )
        stored = provider.extra_headers if isinstance(provider.extra_headers, dict) else {}
        given = cleaned.get("extra_headers") if isinstance(cleaned.get("extra_headers"), dict) else {}
        kept = sorted(name for name, value in given.items() if name in stored and value == stored[name])
        if kept:
            self.add_error(
                field,
                f"Changing where this provider sends requests would send its stored header values there "
                f"({', '.join(kept)}): type them again in the same save.",
            )


@admin.register(Provider)
class ProviderAdmin(BoundedDeleteConfirmation, admin.ModelAdmin):
    form = ProviderAdminForm
    # What an admin types without a scheme is an API host: https (Django 6's default, set before it).
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    list_display = ("name", "kind", "effective_base_url", "enabled", "own_keys", "last_health", "deployments_count")
    list_filter = ("kind", "enabled", "byok", "last_health_status")
    search_fields = ("name", "base_url")
    actions = ("test_connection", "import_models")
    readonly_fields = ("last_health_status", "last_health_latency_ms", "last_health_error", "last_health_at")
    fieldsets = (
        (None, {"fields": ("name", "kind", "enabled")}),
        (
            "Endpoint",
            {"fields": ("base_url", "api_key", "clear_api_key", "organization", "api_version", "extra_headers")},
        ),
        ("Client", {"fields": ("timeout_seconds",)}),
        ("Users' own keys", {"fields": ("byok",)}),
        ("Last health check", {"fields": readonly_fields}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Provider]:
        return super().get_queryset(request).annotate(deployments_total=Count("deployments"))

    def get_form(self, request: HttpRequest, obj: Provider | None = None, change: bool = False, **kwargs: Any) -> Any:
        form = super().get_form(request, obj, change=change, **kwargs)
        form.may_change_address = request.user.has_perm("providers.move_provider")
        if obj is not None and "base_url" in form.base_fields:
            agreed = obj.credentials.filter(confirmed_origin=obj.origin).count()
            if agreed:
                # Said before saving: a move to another host pauses every one of these keys.
                field = form.base_fields["base_url"]
                field.help_text = (
                    f"{field.help_text} Warning: {agreed} user(s) gave their own key for {obj.origin}. Moving the "
                    "provider to another host (scheme, host or port; a path is fine) pauses those keys until each "
                    "user confirms the new host; they are emailed."
                )
        return form

    def save_model(self, request: HttpRequest, obj: Provider, form: Any, change: bool) -> None:
        old_origin = Provider.objects.get(pk=obj.pk).origin if change else ""
        super().save_model(request, obj, form, change)
        if not change or obj.origin == old_origin:
            return
        moved = provider_host_change_record(provider=obj, old_origin=old_origin)
        if moved.paused or moved.resumed:
            self.message_user(
                request,
                f"{obj.name} moved from {old_origin} to {obj.origin}: {moved.paused} user(s)' own key(s) paused "
                f"until their owners confirm the new host (they are emailed); {moved.resumed} key(s) given for "
                f"{obj.origin} are used again.",
                messages.WARNING,
            )

    # Deleting goes through the service, which records each user's own key the delete takes with it.
    def delete_model(self, request: HttpRequest, obj: Provider) -> None:
        providers_delete(provider_ids=[obj.pk])

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        providers_delete(provider_ids=queryset.values_list("pk", flat=True))

    @admin.display(description="users' own keys", ordering="byok")
    def own_keys(self, obj: Provider) -> str:
        """The mode's one word (disabled, optional, required); its label, a sentence, is the tooltip."""
        return format_html('<span title="{}">{}</span>', ByokMode(obj.byok).label, obj.byok)

    @admin.display(description="base URL")
    def effective_base_url(self, obj: Provider) -> str:
        return obj.effective_base_url

    @admin.display(description="deployments", ordering="deployments_total")
    def deployments_count(self, obj: Provider) -> int:
        """How many model deployments this provider serves (a model served twice by it counts twice)."""
        return obj.deployments_total

    @admin.display(description="last health", ordering="last_health_at")
    def last_health(self, obj: Provider) -> str:
        if obj.last_health_at is None:
            return "never checked"
        latency = "" if obj.last_health_latency_ms is None else f", {obj.last_health_latency_ms} ms"
        return format_html(
            '<span title="{}">{}{}, {} ago</span>',
            obj.last_health_error,
            HealthStatus(obj.last_health_status).label,
            latency,
            timesince(obj.last_health_at),
        )

    @admin.action(description="Test connection", permissions=["change"])
    def test_connection(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        providers = list(queryset)
        for provider, outcome in zip(providers, providers_health_check(providers=providers), strict=True):
            if isinstance(outcome, HealthResult) and outcome.ok:
                seen = "" if outcome.models_seen is None else f", {outcome.models_seen} models listed"
                self.message_user(request, f"{provider}: OK in {outcome.latency_ms} ms{seen}.", messages.SUCCESS)
            elif isinstance(outcome, HealthResult):
                self.message_user(
                    request, f"{provider}: failed after {outcome.latency_ms} ms: {outcome.error}", messages.ERROR
                )
            else:
                logger.error("health check of provider %s could not run", provider.name, exc_info=outcome)
                self.message_user(request, f"{provider}: check could not run: {_failure_text(outcome)}", messages.ERROR)

    @admin.action(description="Import models", permissions=["change"])
    def import_models(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        for provider in queryset:
            try:
                result = provider_import_models(provider=provider)
            except Exception as exc:
                if not isinstance(exc, ApplicationError | ImproperlyConfigured):
                    logger.exception("model import from provider %s failed", provider.name)
                self.message_user(request, f"{provider}: import failed: {_failure_text(exc)}", messages.ERROR)
                continue
            text = f"{provider}: {len(result.created)} model(s) added"
            if result.created:
                text += f" (disabled until priced: {', '.join(result.created)})"
            text += f"; {result.already_known} already in the catalog."
            if result.skipped:
                text += f" No free public name for: {', '.join(result.skipped)}."
            self.message_user(request, text, messages.SUCCESS if not result.skipped else messages.WARNING)


class DeploymentInlineForm(DeploymentForm):
    """No Meta: ``DeploymentInline`` builds the form for its fields (checked as on the deployment's page)."""

    def clean_name(self) -> str | None:
        # Blank: ``Deployment.save`` names it after its provider (with a suffix when that name is taken).
        # None rather than "", so that two blank names in one submission are not read as duplicates.
        return self.cleaned_data.get("name") or None


class DeploymentFormSet(BaseInlineFormSet):
    """The deployments submitted with a model, checked against what the model form says it is."""

    def clean(self) -> None:
        super().clean()
        if any(self.errors):
            return
        kept = [form for form in self.forms if form.cleaned_data and not form.cleaned_data.get("DELETE")]
        model: CatalogModel = self.instance
        if model.alias_of_id is not None and kept:
            raise ValidationError(
                "An alias has no deployments of its own: requests for it go to its model's. "
                "Delete these deployments, or clear “alias of”."
            )
        if model.alias_of_id is None and model.enabled and not kept:
            raise ValidationError(
                "An enabled model needs at least one deployment (a provider and its model id): "
                "add one, make the model an alias, or untick “enabled”."
            )


# The deployments inline has a column for every setting, so that a new model is added with its deployments in
# one go. "enabled" comes up beside the deployment's identity: the switch an operator flips most stays in view
# without scrolling the table sideways (its stylesheet makes it scroll inside its fieldset, not the page).
_INLINE_FIRST = ("name", "provider", "upstream_id", "enabled")


class DeploymentInline(admin.TabularInline):
    model = Deployment
    form = DeploymentInlineForm
    formset = DeploymentFormSet
    fields = (*_INLINE_FIRST, *(name for name in Deployment.SETTINGS if name not in _INLINE_FIRST))

    class Media:
        css = {"all": ("providers/admin_deployments_inline.css",)}

    def get_extra(self, request: HttpRequest, obj: CatalogModel | None = None, **kwargs: Any) -> int:
        return 1 if obj is None else 0  # a new model starts with one deployment row to fill in

    def get_queryset(self, request: HttpRequest) -> QuerySet[Deployment]:
        # A row names itself after its model ("model/name"): read with the rows, not one query a row.
        return super().get_queryset(request).select_related("model")

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        field = super().formfield_for_foreignkey(db_field, request, **kwargs)
        if db_field.name == "provider" and field is not None:
            # The providers are read once for the page: each row's select copies the field, and a copy with
            # a queryset for its choices reads it again (one query a deployment).
            field.choices = list(field.choices)
        return field


class CatalogModelAdminForm(forms.ModelForm):
    """No Meta: ``CatalogModelAdmin`` builds the form for its fieldsets."""

    fallbacks = ModelNamesField(
        help_text="Other public models tried in order when every deployment of this one failed, comma-separated."
    )
    context_window_fallbacks = ModelNamesField(
        help_text="Public models tried in order when the prompt is too long for this one, comma-separated."
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "alias_of" in self.fields:
            # An alias names a model, never another alias (nor itself).
            targets = CatalogModel.objects.filter(alias_of__isnull=True)
            if self.instance.pk is not None:
                targets = targets.exclude(pk=self.instance.pk)
            self.fields["alias_of"].queryset = targets

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        name = cleaned.get("name") or self.instance.name
        alias_of = cleaned.get("alias_of")
        known = set(CatalogModel.objects.values_list("name", flat=True)) | {name}
        if self.instance.pk is not None and name != self.instance.name:
            # Fallback lists hold names: renamed, this model would silently drop out of them.
            referrers = fallback_referrers(self.instance.name)
            if referrers:
                self.add_error(
                    "name",
                    f"Other models fall back to this name ({', '.join(referrers)}): take it out of their "
                    "fallbacks first, then rename it and add the new name back.",
                )
        for field in FALLBACK_FIELDS:
            names = cleaned.get(field)
            if not names:
                continue
            if alias_of is not None:
                self.add_error(field, "An alias is routed as its model is: set the fallbacks there.")
                continue
            exclude = [self.instance.name] if self.instance.pk is not None else []
            edges, aliases = fallback_graph(field=field, exclude=exclude)
            problem = fallback_problem(name=name, names=names, known=known, edges=edges, aliases=aliases)
            if problem:
                self.add_error(field, problem)
        return cleaned


def _price_span(low: Decimal | None, high: Decimal | None) -> str:
    if low is None or high is None:
        return "—"
    low_text, high_text = (format(value.normalize(), "f") for value in (low, high))
    return low_text if low == high else f"{low_text}–{high_text}"


@admin.register(CatalogModel)
class CatalogModelAdmin(BoundedDeleteConfirmation, admin.ModelAdmin):
    form = CatalogModelAdminForm
    # The parameter rules as typed: a NUL in them is the field's error, not PostgreSQL's DataError.
    formfield_overrides = {models.JSONField: {"validators": [validate_json_storable]}}

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> tuple[Any, Any, Any, list[str]]:
        """Django's, with a model that other models fall back to (by name, in either list) shown as protected:
        deleted, their fallbacks would silently stop working, as a rename would (``CatalogModelAdminForm``).
        So is one that is all a gateway key may use (``catalog_models_delete_refusals``): an empty list means every
        model. The delete page (and the bulk action) then refuses it, naming them."""
        deleted, counts, permissions_needed, protected = super().get_deleted_objects(objs, request)
        going = {obj.name for obj in objs}
        for obj in objs:
            referrers = [name for name in fallback_referrers(obj.name) if name not in going]
            if referrers:
                protected = [*protected, f"{obj.name}: the fallbacks of {', '.join(referrers)} name it"]
        # The rows of the apps above whose meaning the delete would change (a gateway key left with no model).
        ids = [obj.pk for obj in objs]
        taken = list(CatalogModel.objects.filter(Q(pk__in=ids) | Q(alias_of__in=ids)).values_list("pk", flat=True))
        for _receiver, refusals in catalog_models_delete_refusals.send(sender=CatalogModel, model_ids=taken):
            protected = [*protected, *refusals]
        return deleted, counts, permissions_needed, protected

    inlines = (DeploymentInline,)
    list_display = ("name", "alias_of", "mode", "strategy", "deployments_count", "price_range", "enabled")
    list_editable = ("enabled",)
    list_filter = (
        "mode",
        "strategy",
        "enabled",
        ("deployments__provider", admin.RelatedOnlyFieldListFilter),
        "supports_streaming",
        "supports_tools",
        "supports_vision",
        "supports_json_mode",
        "supports_reasoning",
    )
    list_select_related = ("alias_of",)
    search_fields = ("name", "label", "deployments__upstream_id")
    readonly_fields = ("created_at", "updated_at")
    fieldsets = (
        ("Identity", {"fields": ("name", "label", "alias_of", "mode", "enabled")}),
        (
            "Routing",
            {
                "description": "How a request picks among the deployments below, and what happens when they fail.",
                "fields": (
                    "strategy",
                    "retries",
                    "fallbacks",
                    "context_window_fallbacks",
                    "resume_on_failure",
                    "stream_idle_timeout_seconds",
                ),
            },
        ),
        ("Limits", {"fields": ("context_window", "max_output_tokens")}),
        (
            "Capabilities",
            {
                "fields": (
                    "supports_streaming",
                    "supports_tools",
                    "supports_vision",
                    "supports_json_mode",
                    "supports_reasoning",
                )
            },
        ),
        ("Parameter rules", {"fields": ("parameter_rules",)}),
        ("Moderation", {"fields": ("moderation_policy",)}),
        ("History", {"fields": ("created_at", "updated_at"), "classes": ("collapse",)}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[CatalogModel]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                deployments_total=Count("deployments", distinct=True),
                input_low=Min("deployments__input_per_mtok"),
                input_high=Max("deployments__input_per_mtok"),
                output_low=Min("deployments__output_per_mtok"),
                output_high=Max("deployments__output_per_mtok"),
            )
        )

    def save_model(self, request: HttpRequest, obj: CatalogModel, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        dropped = output_limits_dropped(obj.parameter_rules) if obj.mode != ModelMode.EMBEDDING else []
        if dropped and not obj.max_output_tokens:
            # Saved all the same: without a budget the rule is right, and it is the admin's call which to fix.
            names = " or ".join(f"`{name}`" for name in dropped)
            self.message_user(
                request,
                f"The model {obj.name} was saved, but its parameter rules drop the output limit ({names}) and its "
                "max output tokens is empty: nothing bounds what such a request may cost, so every request to it "
                f"(or to a model falling back to it) that would send it {names} under a budget or a daily token "
                "quota is refused (400 model_output_unbounded). Set max output tokens to the most the model writes, "
                "or take the limit out of the rules' drop.",
                messages.WARNING,
            )

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        super().save_formset(request, form, formset, change)
        if formset.model is Deployment:
            for deployment_form in formset.initial_forms:
                deployment = deployment_form.instance
                previous = deployment_form.initial.get("upstream_id", deployment.upstream_id)
                deployment_upstream_changed(deployment=deployment, previous_upstream_id=previous)

    @admin.display(description="deployments", ordering="deployments_total")
    def deployments_count(self, obj: CatalogModel) -> int | str:
        return "alias" if obj.alias_of_id is not None else obj.deployments_total

    @admin.display(description="$/Mtok in · out", ordering="input_low")
    def price_range(self, obj: CatalogModel) -> str:
        if obj.deployments_total == 0:
            return "—"
        return f"{_price_span(obj.input_low, obj.input_high)} · {_price_span(obj.output_low, obj.output_high)}"


from . import admin_credentials, admin_health  # noqa: E402, F401  (register ProviderCredentialAdmin, IncidentAdmin)
from .admin_deployments import DeploymentAdmin  # noqa: E402, F401  (registers it)
from .admin_encryption import EncryptionRotationAdmin  # noqa: E402, F401  (registers it)
from .admin_moderation import ModerationPolicyAdmin  # noqa: E402, F401  (registers it)
