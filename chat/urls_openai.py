"""Routes of the OpenAI-compatible API, mounted at /v1/.

A route that takes the rest of the path matches any character, a newline too (``(?s:…)``): a client's ``%0A`` is
decoded into the path, a regular expression's ``.`` does not match it, and such a path matched no route here, not
even the catch-all, for Django's HTML 404 (``tests/gateway/test_paths_with_newlines.py``)."""

from __future__ import annotations

from django.urls import path, re_path

from . import api_anthropic, api_feedback, api_models, api_openai, api_responses

urlpatterns = [
    path("chat/completions", api_openai.chat_completions, name="v1-chat-completions"),
    path("completions", api_openai.completions, name="v1-completions"),
    path("embeddings", api_openai.embeddings, name="v1-embeddings"),
    path("responses", api_responses.responses_create, name="v1-responses"),
    re_path(r"^responses/(?P<path>(?s:.+))$", api_responses.responses_stored),
    path("messages", api_anthropic.messages, name="v1-messages"),
    path("messages/count_tokens", api_anthropic.count_tokens, name="v1-messages-count-tokens"),
    re_path(r"^messages/(?P<path>(?s:.*))$", api_anthropic.not_found),
    path("feedback", api_feedback.feedback_create, name="v1-feedback"),
    path("models", api_models.models_list, name="v1-models"),
    re_path(r"^models/(?P<model>(?s:.+))$", api_models.model_retrieve, name="v1-model"),
    re_path(r"^(?P<path>(?s:.*))$", api_models.not_found),
]
