"""Routes of the prompt templates' API, mounted at /api/prompts/."""

from __future__ import annotations

from django.urls import path

from . import api_prompts

urlpatterns = [
    path("", api_prompts.PromptTemplateListApi.as_view(), name="prompts-list"),
    path("<slug:slug>/run", api_prompts.PromptRunApi.as_view(), name="prompts-run"),
]
