"""Errors of the providers layer (subclasses of ``core.exceptions.ApplicationError``).

Adapters translate every SDK exception into one of these, so nothing above ``providers`` ever sees
an ``openai.*`` or ``anthropic.*`` exception. Each class carries the HTTP status and the OpenAI
error ``type``/``code`` our own API answers with; messages never contain a credential.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.exceptions import ApplicationError

if TYPE_CHECKING:
    from .types import ResolvedDeployment, ResolvedModel


class ModelNotFoundError(ApplicationError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


def model_not_found(name: str) -> ModelNotFoundError:
    """The answer, in OpenAI's words, for a model name the caller cannot use: one that does not exist and one the
    caller may not use are told apart by no one but the ledger (another answer would tell a key which models exist)."""
    return ModelNotFoundError(f"The model `{name}` does not exist or you do not have access to it.", param="model")


@dataclass(frozen=True, slots=True)
class AnsweredCalls:
    """The calls of a request split into several (embeddings above a provider's batch limit) that the provider
    answered before another of them failed: each was paid for upstream, whatever became of the request.
    ``inputs`` are the inputs they took; ``tokens`` the provider's count of them, None when one went uncounted."""

    inputs: tuple[Any, ...]
    tokens: int | None


class ProviderError(ApplicationError):
    """The upstream provider failed; ``retry_after`` is in seconds when the provider said so. ``answered``: what
    the provider answered (and billed) of the request before this failure, when it was split into calls."""

    status_code = 502
    error_type = "api_error"
    code = "upstream_error"
    answered: AnsweredCalls | None = None
    # The provider answered something that is no reply of its protocol (``ProviderMalformedReplyError``).
    malformed = False

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        upstream_status: int | None = None,
        retry_after: float | None = None,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, status_code=status_code)
        self.provider = provider
        self.upstream_status = upstream_status
        self.retry_after = retry_after

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.message!r}, provider={self.provider!r}, upstream_status={self.upstream_status})"


class ProviderAuthenticationError(ProviderError):
    """The provider refused our credentials: the gateway's problem, so 502, never the client's 401."""

    status_code = 502
    code = "upstream_authentication_failed"


class ProviderRateLimitError(ProviderError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "upstream_rate_limited"


class ProviderTimeoutError(ProviderError):
    status_code = 504
    error_type = "timeout_error"
    code = "upstream_timeout"


class ProviderUnavailableError(ProviderError):
    status_code = 503
    error_type = "api_error"
    code = "upstream_unavailable"


class ProviderOverloadedError(ProviderUnavailableError):
    code = "upstream_overloaded"


class ProviderStreamInterruptedError(ProviderUnavailableError):
    """The stream ended without its finish (connection cut, or an error event after a 200)."""

    status_code = 502
    code = "upstream_stream_interrupted"


class ProviderStreamOverloadedError(ProviderStreamInterruptedError):
    """A stream the provider ended with its own overload after a 200 (Anthropic's in-band ``overloaded_error``): an
    interruption like any other, said as the overload it is, which a Messages client reads as Anthropic's
    ``overloaded_error`` (``core.errors``), as it reads the 529 before a stream."""

    code = "upstream_overloaded"


class ProviderMalformedReplyError(ProviderError):
    """The provider answered a 200 that is no reply of its protocol: a body that is not JSON, or a reply of types
    no fill can mend, or with nothing to answer (``openai_shape.MalformedReply``). The same deployment, asked
    again at once, answers the same: routing moves on to the next without trying it again (``chat.pipeline``)."""

    malformed = True


class ProviderMalformedStreamError(ProviderStreamInterruptedError):
    """A stream that broke on a chunk that is no chunk of its protocol (not JSON, or of types no fill can mend);
    before its first chunk, routing judges it as ``ProviderMalformedReplyError``."""

    malformed = True


class ProviderBadRequestError(ProviderError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "upstream_bad_request"


class ProviderContextLengthError(ProviderBadRequestError):
    code = "context_length_exceeded"


class ProviderNotFoundError(ProviderError):
    """The provider does not know the model id the catalog maps to: a catalog mistake, so 502."""

    status_code = 502
    code = "upstream_model_not_found"


class UpstreamModelMissingError(ProviderNotFoundError):
    """The provider does not serve the deployment's upstream id, as the health round found
    (``Deployment.upstream_model_missing_since``): the catalog's mistake, shown to the administrators in the
    deployments admin, whichever key the request went out with, so never a refusal of a user's own key. The same
    status and code as any unknown upstream model."""


def upstream_model_missing_error(
    model_name: str, deployments: Sequence[ResolvedDeployment], *, upstream_status: int | None = None
) -> UpstreamModelMissingError:
    """The error for ``model_name`` served by ``deployments``, each of which its provider lacks."""
    where = ", ".join(
        f"{d.provider.name} does not serve the model id {d.upstream_id!r} (missing from its model list since "
        f"{d.upstream_model_missing_since:%Y-%m-%d %H:%M} UTC)"
        for d in deployments
        if d.upstream_model_missing_since is not None
    )
    return UpstreamModelMissingError(
        f"The model `{model_name}` is unavailable at its provider: {where}. This is a catalog problem the "
        "administrators have been told of, not your request or your own API key; use another model, or retry once "
        "it is fixed.",
        provider=deployments[0].provider.name if deployments else "",
        upstream_status=upstream_status,
    )


def upstream_model_missing(target: ResolvedModel, exc: ProviderError) -> ProviderError:
    """``exc``, met on ``target`` (bound to a deployment), as ``UpstreamModelMissingError`` when it is the
    provider's 404 for an upstream id the health round found missing: on a user's own key too, where a 404 would
    otherwise be taken for their account's lack of access (``byok.byok_refused``). Anything else unchanged."""
    deployment = target.deployment
    if (
        deployment is None
        or deployment.upstream_model_missing_since is None
        or not isinstance(exc, ProviderNotFoundError)
        or isinstance(exc, UpstreamModelMissingError)
        or exc.upstream_status != 404
    ):
        return exc
    return upstream_model_missing_error(target.name, [deployment], upstream_status=exc.upstream_status)


class ProviderQuotaExhaustedError(ProviderRateLimitError):
    """The provider's account behind the key has no quota left (OpenAI's 429 ``insufficient_quota``): not a
    passing rate limit, so no wait helps the same key."""

    code = "upstream_quota_exhausted"


class UserKeyQuotaExhaustedError(ProviderError):
    """The account behind the user's own key has no quota left: theirs to fix, in OpenAI's own terms."""

    status_code = 429
    error_type = "insufficient_quota"
    code = "user_key_quota_exhausted"


class UserKeyRefusedError(ProviderAuthenticationError):
    """The provider refused the user's own key (bring your own key): the user's to fix, so a 401 that names
    the key by its hint, not a 502 asking an administrator to act."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "user_key_refused"


class OwnKeyRequiredError(ApplicationError):
    """Every deployment that could serve the request needs the user's own key for its provider."""

    status_code = 403
    error_type = "permission_error"
    code = "own_key_required"
