"""What the adapters of every wire protocol share: the pooled HTTP client and the error mapping.

Both official SDKs send through ``httpx2``; each adapter hands its SDK client one explicitly
built ``httpx2.AsyncClient`` so that the connection pool is sized for a gateway (hundreds of
concurrent streams to one provider) rather than for a single application. The mapping from an
upstream failure to our ``ProviderError`` family is decided here once, by HTTP status, so that an
OpenAI-compatible server and Anthropic answer a client the same way for the same failure.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

import httpx2

from ..exceptions import (
    ProviderAuthenticationError,
    ProviderBadRequestError,
    ProviderContextLengthError,
    ProviderError,
    ProviderNotFoundError,
    ProviderOverloadedError,
    ProviderRateLimitError,
    ProviderStreamInterruptedError,
    ProviderTimeoutError,
    ProviderUnavailableError,
)
from ..fields import Secret
from ..types import ProviderConfig

# Enough connections for well over the 128 concurrent streams a busy gateway holds open to one
# provider; idle ones are kept for a while because chat traffic comes in bursts.
POOL_LIMITS = httpx2.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=30.0)
# An error page (HTML from a proxy, say) is cut to this many characters in our message.
_MAX_UPSTREAM_MESSAGE = 500


def http_timeout(config: ProviderConfig) -> httpx2.Timeout:
    """``config.timeout`` bounds every wait: connecting, each read (the gap between two streamed
    chunks), each write; connecting never needs more than 10 seconds."""
    return httpx2.Timeout(config.timeout, connect=min(config.timeout, 10.0))


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait before retrying, from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    if not headers:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def scrub(text: str, secret: Secret) -> str:
    """``text`` without the credential in it: a provider may quote the key it refused."""
    key = secret.reveal()
    if key and key in text:
        text = text.replace(key, secret.hint or "…")
    return text[:_MAX_UPSTREAM_MESSAGE]


def error_for_status(
    config: ProviderConfig,
    status: int,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    param: str | None = None,
    context_exceeded: bool = False,
) -> ProviderError:
    """The error for an upstream HTTP error status; ``message`` is the provider's own, already scrubbed."""
    name = config.name
    kwargs = {"provider": name, "upstream_status": status}
    if status in (401, 403):
        # The client's own key was fine (it got this far): this is the gateway's credential, and
        # the upstream text is left out because it may describe (or partly quote) that credential.
        return ProviderAuthenticationError(
            f"The provider {name!r} refused the gateway's credentials (HTTP {status}); "
            "an administrator must update the provider's API key.",
            **kwargs,
        )
    if status == 429:
        return ProviderRateLimitError(
            f"The provider {name!r} is rate limiting the gateway: {message}",
            retry_after=retry_after_seconds(headers),
            **kwargs,
        )
    if status == 529:
        return ProviderOverloadedError(f"The provider {name!r} is overloaded: {message}", **kwargs)
    if status in (408, 504):
        return ProviderTimeoutError(f"The provider {name!r} timed out (HTTP {status}): {message}", **kwargs)
    if status == 404:
        return ProviderNotFoundError(f"The provider {name!r} answered 404 Not Found: {message}", **kwargs)
    if status in (400, 413, 422):
        if context_exceeded:
            return ProviderContextLengthError(message, param=param or "messages", **kwargs)
        return ProviderBadRequestError(message, param=param, **kwargs)
    if status >= 500:
        return ProviderUnavailableError(f"The provider {name!r} is unavailable (HTTP {status}): {message}", **kwargs)
    return ProviderError(f"The provider {name!r} failed (HTTP {status}): {message}", **kwargs)


def timeout_error(config: ProviderConfig) -> ProviderTimeoutError:
    return ProviderTimeoutError(
        f"The provider {config.name!r} did not answer within {config.timeout:g} seconds.", provider=config.name
    )


def connection_error(config: ProviderConfig) -> ProviderUnavailableError:
    return ProviderUnavailableError(f"The gateway could not reach the provider {config.name!r}.", provider=config.name)


def stream_interrupted(config: ProviderConfig, reason: str) -> ProviderStreamInterruptedError:
    return ProviderStreamInterruptedError(
        f"The stream from the provider {config.name!r} was interrupted: {reason}", provider=config.name
    )


def interruption_reason(exc: BaseException) -> str:
    """Why an open stream broke, in words a client can read (never the exception's own text,
    which for a transport error may quote the request)."""
    if isinstance(exc, httpx2.TimeoutException):
        return "no data arrived in time."
    if isinstance(exc, httpx2.TransportError):
        return "the connection closed before the response was complete."
    return "the provider reported an error."


def is_context_length_message(message: str) -> bool:
    """OpenAI says ``context_length_exceeded`` in ``code``; compatible servers and Anthropic only in words."""
    lowered = message.lower()
    return any(
        marker in lowered
        for marker in ("context length", "context_length", "context window", "maximum context", "prompt is too long")
    )
