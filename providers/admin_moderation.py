"""Admin for moderation policies: a block-list is vetted when it is saved (``blocklist_problems``), so that a
pattern that does not compile or could backtrack for ever never reaches the request path."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from .models import CatalogModel, ModerationChecker, ModerationPolicy
from .moderation import blocklist_problems, blocklist_unmatchable


class ModerationPolicyForm(forms.ModelForm):
    class Meta:
        model = ModerationPolicy
        fields = (
            "name",
            "enabled",
            "checker",
            "action",
            "check_input",
            "check_output",
            "stream_interval_chars",
            "blocklist",
            "moderation_provider",
            "moderation_model",
            "categories",
            "timeout_seconds",
            "fail_open",
        )
        widgets = {"blocklist": forms.Textarea(attrs={"rows": 12, "cols": 60, "spellcheck": "false"})}

    def clean_blocklist(self) -> str:
        text = self.cleaned_data.get("blocklist") or ""
        problems = blocklist_problems(text)
        if problems:
            raise ValidationError(problems)
        return text

    def clean_categories(self) -> list[str]:
        categories = self.cleaned_data.get("categories") or []
        if not isinstance(categories, list) or not all(isinstance(c, str) and c for c in categories):
            raise ValidationError('A list of category names, e.g. ["violence", "self-harm"].')
        return categories

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        checker = cleaned.get("checker")
        if checker == ModerationChecker.OPENAI and not cleaned.get("moderation_provider"):
            self.add_error("moderation_provider", "The OpenAI checker calls this provider's /v1/moderations.")
        if checker == ModerationChecker.BLOCKLIST and not (cleaned.get("blocklist") or "").strip():
            self.add_error("blocklist", "The block-list checker needs at least one entry.")
        if not cleaned.get("check_input") and not cleaned.get("check_output"):
            self.add_error("check_input", "Check the input, the output, or both.")
        timeout = cleaned.get("timeout_seconds")
        if timeout is not None and timeout <= 0:
            self.add_error("timeout_seconds", "More than zero seconds.")
        return cleaned


@admin.register(ModerationPolicy)
class ModerationPolicyAdmin(admin.ModelAdmin):
    form = ModerationPolicyForm
    list_display = (
        "name",
        "checker",
        "action",
        "check_input",
        "check_output",
        "fail_open",
        "models_using",
        "unmatchable_count",
        "enabled",
    )
    list_filter = ("checker", "action", "enabled", "fail_open")
    search_fields = ("name",)
    readonly_fields = ("unmatchable_patterns", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "enabled", "checker", "action")}),
        ("What is checked", {"fields": ("check_input", "check_output", "stream_interval_chars")}),
        (
            "Block-list",
            {
                "description": "One entry a line: a word or phrase (whole words, any case), or re:<pattern>. "
                "Lines starting with # are comments.",
                "fields": ("blocklist",),
            },
        ),
        (
            "OpenAI moderation",
            {"fields": ("moderation_provider", "moderation_model", "categories", "timeout_seconds", "fail_open")},
        ),
        ("History", {"fields": ("updated_at",), "classes": ("collapse",)}),
    )

    def get_fieldsets(self, request: HttpRequest, obj: ModerationPolicy | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or not blocklist_unmatchable(obj.blocklist):
            return fieldsets
        # A policy with patterns that cannot match says so under its block-list (and only such a policy).
        return [
            (title, {**options, "fields": (*options["fields"], "unmatchable_patterns")})
            if "blocklist" in options["fields"]
            else (title, options)
            for title, options in fieldsets
        ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ModerationPolicy]:
        # The models' count in the list's one query (the foreign key has no reverse name to annotate through).
        using = (
            CatalogModel.objects.filter(moderation_policy=OuterRef("pk"))
            .order_by()
            .values("moderation_policy")
            .annotate(total=Count("pk"))
            .values("total")
        )
        return super().get_queryset(request).annotate(models_total=Coalesce(Subquery(using), 0))

    @admin.display(description="models", ordering="models_total")
    def models_using(self, obj: ModerationPolicy) -> int:
        return obj.models_total

    @admin.display(description="block-list")
    def unmatchable_count(self, obj: ModerationPolicy) -> SafeString | str:
        stale = len(blocklist_unmatchable(obj.blocklist))
        if not stale:
            return "—"
        return format_html("<strong>{} pattern{} cannot match</strong>", stale, "s" * (stale > 1))

    @admin.display(description="patterns that cannot match")
    def unmatchable_patterns(self, obj: ModerationPolicy) -> SafeString:
        """Patterns saved before the plain form dropped accents, folded ß and read look-alikes in a Latin word as Latin
        letters: the text they meet has none of them."""
        return format_html(
            '<ul class="errorlist">{}</ul>The text a pattern meets is in its plain form (without accents and other '
            "marks added to letters, ß as ss, a Cyrillic or Greek letter drawn like a Latin one read as it in a word "
            "with Latin letters): save the policy with each written in that form.",
            format_html_join(
                "",
                "<li>Line {}: re:{} cannot match; write it in the plain form: re:{}</li>",
                blocklist_unmatchable(obj.blocklist),
            ),
        )
