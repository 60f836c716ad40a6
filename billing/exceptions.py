"""Errors of admission control, in the OpenAI error vocabulary."""

from __future__ import annotations

from typing import Any

from core.exceptions import ApplicationError


class ModelNotAllowedError(ApplicationError):
    """The plan or the key does not include the model; the message says which and why.

    ``page_message``: the same refusal in a chat user's words, for the chat page (which has a model menu, not
    ``GET /v1/models``); the API's clients get ``message``."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "model_not_allowed"

    def __init__(self, message: str, *, page_message: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.page_message = page_message or message


class OutputUnboundedError(ApplicationError):
    """Under a budget, a model the request may end on has parameter rules that send its deployments no output
    limit (a ``drop``) and no most it writes in the catalog (``max_output_tokens``): nothing bounds what the
    request could cost. The model's configuration is wrong, not the request; the message says which model."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "model_output_unbounded"


# A 429 that no wait of an SDK's lifts says so: both official SDKs retry a 429 twice with back-off unless the
# answer carries ``x-should-retry: false`` (seconds of delay and a rejected ledger row each, for the same refusal).
NO_RETRY = {"x-should-retry": "false"}


class QuotaExceededError(ApplicationError):
    """A budget or token quota cannot pay for the request; nothing was sent upstream. It lasts until the
    period's end or a raise, so the SDKs are told not to retry it."""

    status_code = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.extra.setdefault("headers", {}).update(NO_RETRY)


class RateLimitExceededError(ApplicationError):
    """Requests or tokens per minute exhausted; ``retry_after`` seconds and the x-ratelimit-* headers
    (in ``extra["headers"]``) tell the client when to come back."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        retry_after_ms: int | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after
        self.retry_after_ms = retry_after_ms
        self.extra["headers"] = headers or {}


class BillingMisconfiguredError(ApplicationError):
    """The gateway's own billing configuration is broken (e.g. the default plan does not exist)."""

    status_code = 503
    error_type = "api_error"
    code = "billing_misconfigured"


class BillingUnavailableError(ApplicationError):
    """Budgets and rate limits cannot be checked (Redis is unreachable): refuse rather than run unmetered."""

    status_code = 503
    error_type = "api_error"
    code = "billing_unavailable"
