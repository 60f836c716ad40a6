"""Passed on from ``core`` (issue 10, point 8): the error renderers live in ``core.errors``, DRF's exception
handler and the /api/ 404 in ``core.exception_handlers``. ``chat.api_openai`` and ``chat.api_anthropic``,
being rewritten, still import these names from here; this module goes once they import ``core.errors``."""

from __future__ import annotations

from core.errors import anthropic_error_body
from core.errors import anthropic_error_for as anthropic_error
from core.errors import openai_error_body as error_body
from core.errors import openai_error_body_for as application_error_body

__all__ = ["anthropic_error", "anthropic_error_body", "application_error_body", "error_body"]
