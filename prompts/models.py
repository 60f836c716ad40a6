"""Prompt templates with immutable numbered versions, labels that point at a version, and brand profiles.

A template's messages are Jinja2 templates rendered in a sandbox (``prompts.rendering``); its variables are
declared with a type and a default; its output may be held to a JSON schema and per-field character limits
(``prompts.output``). Editing a template in the admin creates a new version: a version is never changed in
place (``PromptVersion.save`` refuses), so a ledger row, an experiment's variant or a label that names a
version always means the same text."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models


class PromptKind(models.TextChoices):
    """The ready-made kinds (``prompts.kinds``: their messages, variables, output schema and limits)."""

    SOCIAL_POST = "social_post", "Social post"
    EMAIL = "email", "Email"
    AD_COPY = "ad_copy", "Ad copy"
    LANDING_PAGE = "landing_page", "Landing page"
    CAMPAIGN_PLAN = "campaign_plan", "Campaign plan"
    CUSTOM = "custom", "Custom"


class BrandProfile(models.Model):
    """How a brand speaks: any template run can take one, and its system message then carries it."""

    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=64, unique=True)
    voice = models.TextField(blank=True, help_text="Who the brand sounds like, e.g. 'a friendly expert'.")
    tone = models.CharField(max_length=200, blank=True, help_text="e.g. 'warm, confident, never pushy'.")
    audience = models.TextField(blank=True)
    style_rules = models.TextField(blank=True, help_text="One rule a line.")
    words_to_avoid = models.JSONField(default=list, blank=True, help_text="Words and phrases the copy must not use.")
    example_copy = models.TextField(blank=True, help_text="Copy that sounds right, for the model to imitate.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if not isinstance(self.words_to_avoid, list) or not all(isinstance(w, str) for w in self.words_to_avoid):
            raise ValidationError({"words_to_avoid": "A list of words or phrases."})


class PromptTemplate(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    kind = models.CharField(max_length=32, choices=PromptKind.choices, default=PromptKind.CUSTOM)
    # For a social post or an ad: the platform whose limits apply (``prompts.kinds.PLATFORM_LIMITS``).
    platform = models.CharField(max_length=32, blank=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class PromptVersion(models.Model):
    """One immutable version of a template.

    ``messages``: ``[{"role": "system"|"user"|"assistant", "content": "<Jinja2 template>"}]``.
    ``variables``: ``[{"name", "type": "string"|"integer"|"number"|"boolean"|"array"|"object", "default"?,
    "required"?, "description"?}]``. ``output_schema``: a JSON schema the reply must satisfy, or None for
    free text. ``field_limits``: ``{"field": max_characters}`` checked on the parsed output (dotted paths
    for nested fields, ``[]`` for each item of a list, e.g. ``"features[].title"``)."""

    template = models.ForeignKey(PromptTemplate, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    messages = models.JSONField(default=list)
    variables = models.JSONField(default=list, blank=True)
    output_schema = models.JSONField(null=True, blank=True)
    field_limits = models.JSONField(default=dict, blank=True)
    note = models.CharField(max_length=300, blank=True, help_text="What changed in this version.")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["template", "-number"]
        constraints = [models.UniqueConstraint(fields=["template", "number"], name="prompts_version_number_unique")]

    def __str__(self) -> str:
        return f"{self.template.slug} v{self.number}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and PromptVersion.objects.filter(pk=self.pk).exists():
            raise ValidationError("A prompt version is never changed in place: create a new version.")
        super().save(*args, **kwargs)


class PromptLabel(models.Model):
    """A name such as ``production`` or ``staging`` that points at one version of a template."""

    template = models.ForeignKey(PromptTemplate, on_delete=models.CASCADE, related_name="labels")
    name = models.SlugField(max_length=32)
    version = models.ForeignKey(PromptVersion, on_delete=models.PROTECT, related_name="labels")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["template", "name"]
        constraints = [models.UniqueConstraint(fields=["template", "name"], name="prompts_label_unique")]

    def __str__(self) -> str:
        return f"{self.template.slug}@{self.name}"

    def clean(self) -> None:
        same = self.version_id is None or self.template_id is None or self.version.template_id == self.template_id
        if not same:
            raise ValidationError({"version": "The version must be one of this template's."})
