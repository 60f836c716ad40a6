"""Admin for prompt templates, their versions and brand profiles (staff only, as every admin page).

A template's change page edits its newest version's messages, variables, schema and limits: saving them makes a
new version (``prompt_version_create``), never an update, so what a label, an experiment or a ledger row names
stays as it was. Versions are listed read-only, with links comparing each to the one before (``compare_view``,
a ``difflib`` diff of messages, variables, schema and limits); labels are edited inline and saved through
``prompt_label_set``."""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import OuterRef, Prefetch, QuerySet, Subquery
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from core.text import validate_json_storable

from .exceptions import PromptVersionInvalidError
from .models import BrandProfile, PromptLabel, PromptTemplate, PromptVersion
from .services import (
    ROLES,
    brand_save,
    prompt_label_remove,
    prompt_label_set,
    prompt_version_create,
    version_fields_checked,
)

VERSION_FIELDS = ("messages", "variables", "output_schema", "field_limits")
# The most pairs of lines one changed block may make for the side-by-side diff: difflib's table compares each
# line of a replaced block with each of the other side's to mark what changed within them, 0.4 s for 50 by 50
# lines, 54 s for 500 by 500. A part past it is shown as a unified diff (milliseconds) instead.
SIDE_BY_SIDE_MAX_PAIRS = 2_500
_HEADING = re.compile(rf"^### ({'|'.join(ROLES)})\s*$", re.MULTILINE)


# MESSAGES AS TEXT: "### system" / "### user" headings, each followed by that message's template.


def messages_as_text(messages: list[dict[str, Any]] | None) -> str:
    blocks = []
    for message in messages or []:
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
        blocks.append(f"### {message.get('role', 'user')}\n{content or ''}")
    return "\n\n".join(blocks)


def messages_from_text(text: str) -> list[dict[str, str]]:
    text = (text or "").replace("\r\n", "\n")
    headings = list(_HEADING.finditer(text))
    if not headings or text[: headings[0].start()].strip():
        raise forms.ValidationError(
            f"Start each message with a heading line: ### {' / ### '.join(ROLES)}, then its text on the lines below."
        )
    found = []
    for index, heading in enumerate(headings):
        end = headings[index + 1].start() if index + 1 < len(headings) else len(text)
        found.append({"role": heading.group(1), "content": text[heading.end() : end].strip("\n").rstrip()})
    return found


class MessagesField(forms.CharField):
    widget = forms.Textarea(attrs={"rows": 18, "cols": 100, "class": "vLargeTextField", "spellcheck": "false"})

    def prepare_value(self, value: Any) -> Any:
        return messages_as_text(value) if isinstance(value, list) else value

    def to_python(self, value: Any) -> Any:
        return messages_from_text(super().to_python(value))


def _json_widget(rows: int) -> forms.Textarea:
    return forms.Textarea(attrs={"rows": rows, "cols": 100, "class": "vLargeTextField", "spellcheck": "false"})


class PrettyJSONField(forms.JSONField):
    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return value
        return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


class PromptTemplateForm(forms.ModelForm):
    """The template's own fields, and its newest version's content to edit into a new version."""

    messages = MessagesField(
        help_text="Each message starts with a line <code>### system</code>, <code>### user</code> or "
        "<code>### assistant</code>. Jinja2 in a sandbox: <code>{{ variable }}</code>; "
        "<code>{{ brand.section }}</code> places the brand yourself (otherwise it ends the system message); "
        "<code>{{ output_schema }}</code> and <code>field_limits</code> are given too.",
    )
    variables = PrettyJSONField(
        required=False,
        validators=[validate_json_storable],
        widget=_json_widget(12),
        help_text='A list of {"name", "type": string|integer|number|boolean|array|object, "default"?, '
        '"required"?, "example"?, "description"?}.',
    )
    output_schema = PrettyJSONField(
        required=False,
        validators=[validate_json_storable],
        widget=_json_widget(16),
        help_text="A JSON schema (Draft 2020-12) the reply must satisfy, or empty.",
    )
    field_limits = PrettyJSONField(
        required=False,
        validators=[validate_json_storable],
        widget=_json_widget(6),
        help_text='Characters per field: {"headline": 30, "features[].title": 50} ([] for each item of a list).',
    )
    note = forms.CharField(required=False, max_length=300, help_text="What this new version changes.")
    labels_to_new = forms.CharField(
        required=False,
        label="Labels for the new version",
        help_text="Comma-separated labels (e.g. production, staging) to point at the version this save creates.",
    )

    class Meta:
        model = PromptTemplate
        fields = ("slug", "kind", "platform", "description")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.latest = self.instance.versions.order_by("-number").first() if self.instance.pk else None
        if self.latest is not None:
            for name in VERSION_FIELDS:
                self.initial.setdefault(name, getattr(self.latest, name))

    def version_content(self) -> dict[str, Any]:
        return {name: self.cleaned_data.get(name) for name in VERSION_FIELDS}

    def makes_version(self) -> bool:
        """Saving makes a new version when there is none yet or the content differs from the newest one's."""
        if self.latest is None:
            return True
        content = version_fields_checked(**self.version_content())
        # The newest version as this form shows it (messages pass through their text form), so opening the page
        # and saving it unchanged makes no version.
        shown = {name: getattr(self.latest, name) for name in VERSION_FIELDS}
        shown["messages"] = messages_from_text(messages_as_text(self.latest.messages))
        return any(content[name] != shown[name] for name in VERSION_FIELDS)

    def clean_labels_to_new(self) -> list[str]:
        names = [name.strip() for name in (self.cleaned_data.get("labels_to_new") or "").split(",") if name.strip()]
        bad = [name for name in names if not re.match(r"^[-a-zA-Z0-9_]{1,32}$", name)]
        if bad:
            raise forms.ValidationError(f"Not a label name: {bad[0]}")
        return names

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.errors:
            return cleaned
        try:
            version_fields_checked(**self.version_content(), render=True)
        except PromptVersionInvalidError as exc:
            self.add_error(exc.param if exc.param in VERSION_FIELDS else None, exc.message)
            return cleaned
        if cleaned.get("labels_to_new") and not self.makes_version():
            self.add_error(
                "labels_to_new", "Nothing changed, so no new version is made: edit the labels below instead."
            )
        return cleaned


class VersionInline(admin.TabularInline):
    model = PromptVersion
    extra = 0
    can_delete = False
    show_change_link = True
    fields = ("number", "note", "created_by", "created_at", "labels_here", "compare")
    readonly_fields = fields
    ordering = ("-number",)
    verbose_name_plural = "Versions (read-only: saving the content above makes a new one)"

    def get_queryset(self, request: HttpRequest) -> QuerySet[PromptVersion]:
        # Listed by number, note and labels: not each version's content, which the form above shows the newest of.
        # Who made each and its name ("slug vN", the change link's) read with the rows: a query a version else.
        versions = super().get_queryset(request).defer(*VERSION_FIELDS).prefetch_related("labels")
        return versions.select_related("template", "created_by")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="labels")
    def labels_here(self, version: PromptVersion) -> str:
        return ", ".join(label.name for label in version.labels.all()) or "—"

    @admin.display(description="compare")
    def compare(self, version: PromptVersion) -> str:
        if version.number <= 1:
            return "—"
        url = reverse("admin:prompts_prompttemplate_compare", args=[version.template_id])
        return format_html(
            '<a href="{}?a={}&amp;b={}">compare v{} with v{}</a>',
            url,
            version.number - 1,
            version.number,
            version.number - 1,
            version.number,
        )


class LabelFormSet(BaseInlineFormSet):
    """Saved through ``prompt_label_set``/``prompt_label_remove`` (the audit log records each move)."""

    def save(self, commit: bool = True) -> list[PromptLabel]:
        request = self.request  # type: ignore[attr-defined]
        # What the admin's change message reads (``construct_change_message``).
        self.new_objects, self.changed_objects, self.deleted_objects = [], [], []
        saved = []
        for form in self.forms:
            if not form.has_changed() and form.instance.pk is None:
                continue
            if self.can_delete and self._should_delete_form(form):
                if form.instance.pk is not None:
                    self.deleted_objects.append(form.instance)
                    prompt_label_remove(label=form.instance, actor=request.user)
                continue
            if form.has_changed():
                old_name = form.initial.get("name")
                name, version = form.cleaned_data["name"], form.cleaned_data["version"]
                if form.instance.pk is not None and old_name and old_name != name:
                    prompt_label_remove(label=PromptLabel.objects.get(pk=form.instance.pk), actor=request.user)
                is_new = form.instance.pk is None
                label = prompt_label_set(template=self.instance, name=name, version=version, actor=request.user)
                if is_new:
                    self.new_objects.append(label)
                else:
                    self.changed_objects.append((label, form.changed_data))
                saved.append(label)
        return saved


class LabelInline(admin.TabularInline):
    model = PromptLabel
    formset = LabelFormSet
    extra = 1
    fields = ("name", "version", "updated_at")
    readonly_fields = ("updated_at",)

    def get_formset(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> Any:
        formset = super().get_formset(request, obj, **kwargs)
        formset.request = request
        return formset

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "version":
            object_id = request.resolver_match.kwargs.get("object_id") if request.resolver_match else None
            # Each label's choice of version shows its name ("slug vN"), not its content.
            kwargs["queryset"] = (
                PromptVersion.objects.filter(template_id=object_id).select_related("template").defer(*VERSION_FIELDS)
            )
        return super().formfield_for_foreignkey(db_field, request, **kwargs)


@admin.register(PromptTemplate)
class PromptTemplateAdmin(admin.ModelAdmin):
    form = PromptTemplateForm
    list_display = ("slug", "kind", "platform", "newest_version", "label_list", "updated_at")
    list_filter = ("kind", "platform")
    search_fields = ("slug", "description")
    inlines = (LabelInline, VersionInline)
    fieldsets = (
        (None, {"fields": ("slug", "kind", "platform", "description")}),
        (
            "Content (saving a change makes a new version)",
            {"fields": ("messages", "variables", "output_schema", "field_limits", "note", "labels_to_new")},
        ),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[PromptTemplate]:
        # The newest version's number and the labels' numbers, not the versions themselves: a template edited
        # 30 times holds 30, each with its whole content.
        newest = PromptVersion.objects.filter(template=OuterRef("pk")).order_by("-number").values("number")[:1]
        labels = PromptLabel.objects.select_related("version").only("name", "template", "version__number")
        return (
            super()
            .get_queryset(request)
            .annotate(newest_number=Subquery(newest))
            .prefetch_related(Prefetch("labels", queryset=labels))
        )

    @admin.display(description="newest version", ordering="newest_number")
    def newest_version(self, template: PromptTemplate) -> str:
        return f"v{template.newest_number}" if template.newest_number else "—"

    @admin.display(description="labels")
    def label_list(self, template: PromptTemplate) -> str:
        return ", ".join(f"{label.name} → v{label.version.number}" for label in template.labels.all()) or "—"

    def has_delete_permission(self, request: HttpRequest, obj: PromptTemplate | None = None) -> bool:
        # Its versions are named by ledger rows, experiments and labels: a template that has any is kept.
        if obj is not None and obj.versions.exists():
            return False
        return super().has_delete_permission(request, obj)

    @transaction.atomic
    def save_model(self, request: HttpRequest, obj: PromptTemplate, form: PromptTemplateForm, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if not form.makes_version():
            return
        version = prompt_version_create(
            template=obj, **form.version_content(), note=form.cleaned_data.get("note", ""), created_by=request.user
        )
        for name in form.cleaned_data.get("labels_to_new") or []:
            prompt_label_set(template=obj, name=name, version=version, actor=request.user)
        messages.info(request, f"Saved as version {version.number} of {obj.slug}.")

    def get_urls(self) -> list[Any]:
        compare = path(
            "<int:template_id>/compare/",
            self.admin_site.admin_view(self.compare_view),
            name="prompts_prompttemplate_compare",
        )
        return [compare, *super().get_urls()]

    def compare_view(self, request: HttpRequest, template_id: int) -> HttpResponse:
        """Two versions of a template side by side (``?a=2&b=3``; ``&view=unified`` for a unified diff)."""
        template = get_object_or_404(PromptTemplate, pk=template_id)
        if not self.has_view_permission(request, template):
            raise PermissionDenied
        versions = list(template.versions.order_by("number"))
        by_number = {version.number: version for version in versions}
        if len(versions) < 2:
            a = b = versions[0] if versions else None
        else:
            a = by_number.get(_int(request.GET.get("a"))) or versions[-2]
            b = by_number.get(_int(request.GET.get("b"))) or versions[-1]
        unified = request.GET.get("view") == "unified"
        sections = [] if a is None else version_diff(a, b, unified=unified)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Compare versions of {template.slug}",
            "template_obj": template,
            "versions": versions,
            "a": a,
            "b": b,
            "unified": unified,
            "sections": sections,
            "changed": any(section["changed"] for section in sections),
        }
        return TemplateResponse(request, "admin/prompts/prompttemplate/compare.html", context)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _section_lines(version: PromptVersion, name: str) -> list[str]:
    if name == "messages":
        return messages_as_text(version.messages).splitlines()
    return json.dumps(getattr(version, name), indent=2, ensure_ascii=False, sort_keys=True).splitlines()


def version_diff(a: PromptVersion, b: PromptVersion, *, unified: bool = False) -> list[dict[str, Any]]:
    """Per part (messages, variables, schema, limits): whether it changed, and its diff as HTML (difflib's
    side-by-side table, or a unified diff with added and removed lines marked). difflib escapes the text of
    its table; the unified lines are escaped by ``format_html``."""
    titles = {
        "messages": "Messages",
        "variables": "Variables",
        "output_schema": "Output schema",
        "field_limits": "Field limits",
    }
    sections = []
    for name, title in titles.items():
        old, new = _section_lines(a, name), _section_lines(b, name)
        too_large = not unified and _largest_block(old, new) > SIDE_BY_SIDE_MAX_PAIRS
        if unified or too_large:
            lines = list(difflib.unified_diff(old, new, f"v{a.number}", f"v{b.number}", lineterm="", n=3))
            # No newline between the lines: each span is a block of its own (one line, coloured full width).
            html = format_html_join(
                "",
                '<span class="{}">{}</span>',
                ((_line_class(line), line) for line in lines),
            )
        else:
            html = mark_safe(  # noqa: S308 - HtmlDiff escapes &, < and > in every line it writes
                difflib.HtmlDiff(wrapcolumn=60).make_table(
                    old, new, f"v{a.number}", f"v{b.number}", context=True, numlines=3
                )
            )
        sections.append({"name": name, "title": title, "changed": old != new, "html": html, "unified": too_large})
    return sections


def _largest_block(old: list[str], new: list[str]) -> int:
    """Lines times lines of the largest block of lines replaced between ``old`` and ``new``."""
    opcodes = difflib.SequenceMatcher(None, old, new).get_opcodes()  # as difflib.Differ pairs them
    return max(((i2 - i1) * (j2 - j1) for tag, i1, i2, j1, j2 in opcodes if tag == "replace"), default=0)


def _line_class(line: str) -> str:
    if line.startswith(("+++", "---")):
        return "diff-file"
    if line.startswith("@@"):
        return "diff-hunk"
    if line.startswith("+"):
        return "diff-add"
    if line.startswith("-"):
        return "diff-del"
    return "diff-same"


@admin.register(PromptVersion)
class PromptVersionAdmin(admin.ModelAdmin):
    """Read-only: a version is made from its template's page and never changed or deleted."""

    list_display = ("__str__", "template", "number", "note", "created_by", "created_at")
    list_filter = ("template",)
    list_select_related = ("template", "created_by")
    fields = (
        "template",
        "number",
        "note",
        "created_by",
        "created_at",
        "messages_text",
        "variables_json",
        "schema_json",
        "limits_json",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[PromptVersion]:
        queryset = super().get_queryset(request)
        if request.resolver_match is not None and request.resolver_match.url_name.endswith("_changelist"):
            # The list shows names, numbers and notes; a version's own page shows its content.
            return queryset.defer(*VERSION_FIELDS)
        return queryset

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="messages")
    def messages_text(self, version: PromptVersion) -> str:
        return format_html("<pre>{}</pre>", messages_as_text(version.messages))

    @admin.display(description="variables")
    def variables_json(self, version: PromptVersion) -> str:
        return format_html("<pre>{}</pre>", json.dumps(version.variables, indent=2, ensure_ascii=False))

    @admin.display(description="output schema")
    def schema_json(self, version: PromptVersion) -> str:
        return format_html("<pre>{}</pre>", json.dumps(version.output_schema, indent=2, ensure_ascii=False))

    @admin.display(description="field limits")
    def limits_json(self, version: PromptVersion) -> str:
        return format_html("<pre>{}</pre>", json.dumps(version.field_limits, indent=2, ensure_ascii=False))


class BrandProfileForm(forms.ModelForm):
    words_to_avoid = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 5}),
        help_text="One word or phrase a line; matched case-insensitively as whole words in generated copy.",
    )

    class Meta:
        model = BrandProfile
        fields = ("name", "slug", "voice", "tone", "audience", "style_rules", "words_to_avoid", "example_copy")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.initial.get("words_to_avoid"), list):
            self.initial["words_to_avoid"] = "\n".join(self.initial["words_to_avoid"])

    def clean_words_to_avoid(self) -> list[str]:
        lines = (self.cleaned_data.get("words_to_avoid") or "").splitlines()
        return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


@admin.register(BrandProfile)
class BrandProfileAdmin(admin.ModelAdmin):
    form = BrandProfileForm
    list_display = ("name", "slug", "tone", "updated_at")
    search_fields = ("name", "slug")
    prepopulated_fields = {"slug": ("name",)}

    def save_model(self, request: HttpRequest, obj: BrandProfile, form: Any, change: bool) -> None:
        brand_save(brand=obj, actor=request.user)
