"""Prompt templates run through the pipeline: ``/v1/chat/completions`` with ``{"prompt": {...}}`` in place of
``messages``, and ``POST /api/prompts/{slug}/run`` (output parsed, validated, repaired once).

(Being written in this wave: see issue 12.)"""

from __future__ import annotations

from typing import Any

from core.exceptions import ApplicationError


def prompt_requested(body: Any) -> bool:
    """The request names a prompt template (``prompt``) instead of giving ``messages``."""
    return isinstance(body, dict) and "prompt" in body and "messages" not in body


async def prompt_messages_render(body: dict[str, Any], *, version_id: int | None = None) -> None:
    """Replace ``body["prompt"]`` by the ``messages`` it renders to. ``version_id``: an experiment's variant
    runs this version of the template instead of the one asked for (when it is the same template)."""
    raise ApplicationError("Prompt templates are not available on this server yet.", param="prompt")
