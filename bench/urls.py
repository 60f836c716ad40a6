"""llmhub's routes plus the bare view that sets the ceiling llmhub is measured against."""

from __future__ import annotations

from django.urls import path

from llmhub.urls import urlpatterns as llmhub_urlpatterns

from . import bare

urlpatterns = [
    path("bare/v1/chat/completions", bare.chat_completions, name="bench-bare"),
    path("bare-aiohttp/v1/chat/completions", bare.chat_completions_aiohttp, name="bench-bare-aiohttp"),
    *llmhub_urlpatterns,
]
