"""Admin for plans, users' plans, budget counters, alerts and the daily rollups. Imported by ``admin.py``.

Counters, alerts and rollups are derived from the ledger: they are read-only here, and their actions
(reconcile, rebuild) call the services that recompute them from the ledger.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest

from accounts.admin_search import UserSearch
from core.outbox import deliveries_send_again, send_again_report
from core.paginators import EstimatedCountPaginator
from providers.admin_filters import CatalogModelNameFilter, ProviderNameFilter

from .models import BudgetAlert, BudgetCounter, DailyStaffUsage, DailyUsage, DailyUserUsage, Plan, UserPlan
from .services.alert_sweep import budget_alert_deliveries
from .services.budgets import THRESHOLDS
from .services.plans import user_plans_overrides_clear
from .services.rollups import daily_usage_rebuild
from .tasks import reservations_reconcile


class _ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object | None = None) -> bool:
        return False


# What a limit of 0 does, said where it is typed: each is a deliberate "none" (a plan that admits nothing until raised),
# which admission answers with a 429 that says so and that the SDKs do not retry, not an "unlimited".
_ZERO_HELP = {
    "daily_token_quota": "Tokens a day, prompts and replies. 0: no request is admitted.",
    "monthly_budget_usd": "0: only models that cost nothing.",
    "rpm": "0: no request is admitted.",
    "tpm": "Prompt and reply tokens a minute. 0: no request is admitted.",
}


class PlanForm(forms.ModelForm):
    class Meta:
        model = Plan
        fields = (
            "name",
            "description",
            "allow_all_models",
            "allowed_models",
            "max_output_price_per_mtok",
            *_ZERO_HELP,
            "moderation_policy",
        )
        help_texts = {name: f"Empty: unlimited. {text}" for name, text in _ZERO_HELP.items()}


class UserPlanForm(forms.ModelForm):
    class Meta:
        model = UserPlan
        fields = ("user", "plan", *_ZERO_HELP)
        help_texts = {name: f"Empty: as the plan says. {text}" for name, text in _ZERO_HELP.items()}


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    form = PlanForm
    list_display = (
        "name",
        "allow_all_models",
        "max_output_price_per_mtok",
        "daily_token_quota",
        "monthly_budget_usd",
        "rpm",
        "tpm",
        "users",
    )
    search_fields = ("name",)
    filter_horizontal = ("allowed_models",)
    fieldsets = (
        (None, {"fields": ("name", "description")}),
        ("Models", {"fields": ("allow_all_models", "allowed_models", "max_output_price_per_mtok")}),
        ("Limits (empty: unlimited; 0: none)", {"fields": ("daily_token_quota", "monthly_budget_usd", "rpm", "tpm")}),
        ("Moderation", {"fields": ("moderation_policy",)}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Plan]:
        return super().get_queryset(request).annotate(user_count=Count("subscriptions"))

    @admin.display(description="users", ordering="user_count")
    def users(self, obj: Plan) -> int:
        return obj.user_count


@admin.register(UserPlan)
class UserPlanAdmin(UserSearch, admin.ModelAdmin):
    form = UserPlanForm
    list_display = ("user", "plan", "daily_token_quota", "monthly_budget_usd", "rpm", "tpm", "updated_at")
    list_filter = ("plan",)
    list_select_related = ("user", "plan")
    show_full_result_count = False  # a row a user: one count a view
    autocomplete_fields = ("user",)
    actions = ("clear_overrides",)
    fieldsets = (
        (None, {"fields": ("user", "plan")}),
        (
            "The user's own limits (empty: as the plan says; 0: none, whatever the plan says)",
            {"fields": ("daily_token_quota", "monthly_budget_usd", "rpm", "tpm")},
        ),
    )

    @admin.action(description="Clear the selected users' own limits (use their plan's)", permissions=["change"])
    def clear_overrides(self, request: HttpRequest, queryset: QuerySet[UserPlan]) -> None:
        user_plans_overrides_clear(user_plan_ids=queryset.values_list("pk", flat=True))
        self.message_user(request, f"Cleared the own limits of {queryset.count()} user(s).", messages.SUCCESS)


@admin.register(BudgetCounter)
class BudgetCounterAdmin(_ReadOnlyAdmin):
    """The database store's counters (with Redis configured, the counters live in Redis)."""

    list_display = (
        "key",
        "scope_kind",
        "scope_id",
        "metric",
        "period",
        "period_start",
        "spent",
        "reserved",
        "updated_at",
    )
    list_filter = ("scope_kind", "metric", "period")
    search_fields = ("key",)  # see get_search_results
    search_help_text = "The start of a counter's key, as written (llmhub:bud:user:17: for a user's)."
    # A few a user, key or plan and period: one count a view (the estimate past 100,000 rows), newest first off the
    # primary key (the model's order, by period and key, which no index leads with, sorted every counter).
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    ordering = ("-id",)
    actions = ("reconcile",)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[BudgetCounter], search_term: str
    ) -> tuple[QuerySet[BudgetCounter], bool]:
        # The key's start, as written: its unique index answers it (LIKE 'term%' in its pattern index on
        # PostgreSQL); Django's LIKE '%term%' in any case read every counter.
        term = search_term.strip()
        return (queryset.filter(key__startswith=term) if term else queryset), False

    @admin.action(description="Reconcile every budget counter with the ledger")
    def reconcile(self, request: HttpRequest, queryset: QuerySet[BudgetCounter]) -> None:
        """Queued for a worker: the reconcile recomputes each counter from the ledger (about 8 queries a counter,
        8,812 for 1,100 of them), too long for a web request; its task (every 5 minutes) is the same recompute."""
        try:
            reservations_reconcile.delay()
        except Exception as exc:  # kombu's OperationalError, or whatever else the publish met; its text may name hosts
            self.message_user(
                request,
                f"The reconcile could not be queued (the task broker did not answer: {type(exc).__name__}); it runs "
                "every 5 minutes once the broker answers.",
                messages.ERROR,
            )
            return
        self.message_user(
            request,
            "Queued: a worker reconciles every budget counter with the ledger in a moment (the reconcile task, which "
            "also runs every 5 minutes); refresh this page to see the counters put back.",
            messages.SUCCESS,
        )


class BudgetAlertThresholdFilter(admin.SimpleListFilter):
    """The thresholds an alert is raised at (``services.budgets.THRESHOLDS``), named here: Django's filter of the
    field lists them with a SELECT DISTINCT over every alert, unindexed, at each view of the list."""

    title = "threshold"
    parameter_name = "threshold"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(str(threshold), f"{threshold} %") for threshold in THRESHOLDS]

    def queryset(self, request: HttpRequest, queryset: QuerySet[BudgetAlert]) -> QuerySet[BudgetAlert]:
        value = self.value()
        return queryset.filter(threshold=int(value)) if value and value.isdigit() else queryset


@admin.register(BudgetAlert)
class BudgetAlertAdmin(UserSearch, _ReadOnlyAdmin):
    """A few alerts a user, key or plan and period: hundreds of thousands in a year. As the ledger's list
    (docs/ledger.md, "The admin at scale"): one count (the estimate past 100,000 rows), days by the date filter
    (the date hierarchy read every alert's bounds and days), the thresholds named."""

    list_display = (
        "created_at",
        "scope_kind",
        "scope_id",
        "user",
        "metric",
        "threshold",
        "period_start",
        "spent",
        "limit",
        "sent_at",
        "channels",
        "delivery",  # what is not delivered yet: being sent, failed (with the error), queued again by the sweep
    )
    list_filter = (BudgetAlertThresholdFilter, "metric", "scope_kind", "period", "created_at")
    list_select_related = ("user",)
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    actions = ("send_again",)

    @admin.action(description="Send their undelivered email and webhook again")
    def send_again(self, request: HttpRequest, queryset: QuerySet[BudgetAlert]) -> None:
        """For a delivery whose retries ran out (the mail server or the webhook was down for hours), or older
        than the sweep's cut-off: queued now, with its rounds counted afresh."""
        deliveries = (d for alert in queryset for d in budget_alert_deliveries(alert))
        self.message_user(request, *send_again_report(*deliveries_send_again(deliveries)))


class _RollupAdmin(_ReadOnlyAdmin):
    """The daily rollups' lists: the figures of each row, one count (the estimate past 100,000 rows), and the
    rebuild action (``daily_usage_rebuild``, which writes a day's ``DailyUsage`` and derives the other two from it).
    Days by the date filter's ranges, not a date hierarchy, whose levels read the distinct months (or days of a
    month) of the whole table at every view (docs/ledger.md, "The admin at scale")."""

    figures = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost")
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    actions = ("rebuild",)

    @admin.action(description="Rebuild the selected days from the ledger")
    def rebuild(self, request: HttpRequest, queryset: QuerySet) -> None:
        # The days, from the database: the rows selected across the list are thousands a day.
        days = list(queryset.order_by("day").values_list("day", flat=True).distinct())
        for day in days:
            daily_usage_rebuild(day=day)
        self.message_user(request, f"Rebuilt {len(days)} day(s) from the ledger.", messages.SUCCESS)


@admin.register(DailyUsage)
class DailyUsageAdmin(UserSearch, _RollupAdmin):
    list_display = (
        "day",
        "user",
        "api_key",
        "provider_name",
        "model_name",
        "operation",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cost",
    )
    # Thousands of rows a day (docs/ledger.md, "The admin at scale"): the provider and model offered from the
    # catalog, days by the date filter's ranges, one count, and a user looked up whole.
    list_filter = (("day", admin.DateFieldListFilter), ProviderNameFilter, CatalogModelNameFilter, "operation")
    list_select_related = ("user", "api_key")


@admin.register(DailyStaffUsage)
class DailyStaffUsageAdmin(_RollupAdmin):
    """Everyone's figures per day, provider, model and operation: what the staff usage page reads."""

    list_display = ("day", "provider_name", "model_name", "operation", *_RollupAdmin.figures)
    list_filter = (("day", admin.DateFieldListFilter), ProviderNameFilter, CatalogModelNameFilter, "operation")


@admin.register(DailyUserUsage)
class DailyUserUsageAdmin(UserSearch, _RollupAdmin):
    """Each user's figures per day: what the staff page's spend by user and a user's own 30 days read."""

    list_display = ("day", "user", *_RollupAdmin.figures)
    list_filter = (("day", admin.DateFieldListFilter),)
    list_select_related = ("user",)
    empty_value_display = "(deleted user)"  # the one column that can be empty: a deleted user's rows are kept
