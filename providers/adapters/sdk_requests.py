"""The SDK clients the adapters call, building each request from the one the SDK built before it.

Both official SDKs build every request from scratch: ``FinalRequestOptions`` merged into a dict of a dozen
headers, normalised into ``httpx2.Headers`` twice (the SDK's, then the HTTP client's merge), the path
joined onto ``base_url`` and the result parsed again, twice. For the calls the adapters make (a JSON body
or none, to a path under the provider's ``base_url``, with the client's own timeout) all of that depends
on nothing but the client and the call's method, path and extra headers, and it was most of what the SDK
call cost llmhub beyond the HTTP exchange (docs/performance.md, "The SDK's request building").

``TemplatedRequests._build_request`` asks the SDK's own ``_build_request`` once per (method, path, extra
headers, retry count): that request, without its body, its length and its cookies, is the template. Each
call then copies the template's URL, headers and extensions and adds the body, encoded by the SDK's own
``openapi_dumps``, and the cookies the HTTP client holds now, exactly as the SDK would. Any call of
another shape (files, a query, ``extra_body``, a per-call timeout, a header to omit) goes to the SDK's
``_build_request`` as before. Everything else stays the SDK's: authentication (the template carries its
headers), retries, the response's handling and its error classes. ``tests/providers/test_sdk_requests.py``
checks, for both SDKs, that each templated request is the one the SDK builds itself.

``TemplatedRequests.post`` does the same for the ``FinalRequestOptions`` the SDK's ``post`` constructs (pydantic's
``construct`` deep-copies eleven defaults a call): a template per (path, extra headers), copied with the
call's body and mutable fields of its own, handed to the SDK's ``request``; other options go to the SDK's
``post``. The same test checks those options equal the SDK's, field by field.

A client's configuration (key, organization, headers, base URL, timeout) must not change after its first
request: the adapters build one client per provider configuration and never change it (a changed
configuration builds a new adapter). Azure OpenAI's client is not templated: with Entra ID its token is
added per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import openai
from anthropic._models import FinalRequestOptions as AnthropicOptions
from anthropic._utils._json import openapi_dumps as _anthropic_dumps
from openai._models import FinalRequestOptions as OpenAIOptions
from openai._utils._json import openapi_dumps as _openai_dumps

# The templates a client keeps: one per (method, path, extra headers, retry count) of the calls it makes,
# which are a handful. Past it, calls are built by the SDK (a client called in ways nobody foresaw).
_TEMPLATES_MAX = 32
# The headers each request has of its own, left out of a template and added last to each request built from it (the
# aiohttp transport decodes the others once per client: ``aiohttp_client.GuardedAiohttpTransport._aiohttp_headers``).
REQUEST_OWN_HEADERS = (b"content-length", b"cookie")
# The options' idempotency key of a client that sends none (``TemplatedRequests._idempotency_key``).
_IDEMPOTENCY_KEY_UNSENT = "stainless-python-retry-unsent"


class TemplatedRequests:
    """Mixin for an SDK client class (before it in the bases): ``post``'s options and ``_build_request``'s
    request, each from a template."""

    _dumps: Callable[[Any], bytes]
    _options_class: Any

    async def post(
        self,
        path: str,
        *,
        cast_to: Any,
        body: Any = None,
        content: Any = None,
        files: Any = None,
        options: Any = None,
        stream: bool = False,
        stream_cls: Any = None,
    ) -> Any:
        """The SDK's ``post``, with its ``FinalRequestOptions`` copied from a template of the call's path and
        options rather than constructed (pydantic's ``construct`` deep-copies eleven defaults a call). The
        options are then the SDK's own: ``request`` sends them as it sends any."""
        options = {} if options is None else options
        key = _options_key(path, options) if content is None and files is None and isinstance(body, dict) else None
        templates: dict[Any, Any] = self.__dict__.setdefault("_options_templates", {})
        template = None if key is None else templates.get(key)
        if template is None and key is not None and len(templates) < _TEMPLATES_MAX:
            template = templates[key] = self._options_class.construct(
                method="post", url=path, json_data=None, content=None, files=None, **options
            )
        if template is None:
            return await super().post(  # type: ignore[misc]
                path,
                cast_to=cast_to,
                body=body,
                content=content,
                files=files,
                options=options,
                stream=stream,
                stream_cls=stream_cls,
            )
        # Its mutable defaults (``params``, ``security``) are the call's own, as a constructed one's are; the
        # fields set are the template's (``json_data`` among them), as the SDK's construction sets them.
        options = template.model_copy()
        fresh = options.__dict__
        for name, value in fresh.items():
            if type(value) in (dict, list):
                fresh[name] = type(value)(value)
        fresh["json_data"] = body
        return await self.request(cast_to, options, stream=stream, stream_cls=stream_cls)  # type: ignore[attr-defined]

    def _build_request(self, options: Any, *, retries_taken: int = 0) -> httpx2.Request:
        template = self._template(options, retries_taken)
        if template is None:
            return super()._build_request(options, retries_taken=retries_taken)  # type: ignore[misc]
        body = options.json_data
        shared = {
            "headers": template.headers,
            "cookies": self._client.cookies or None,  # type: ignore[attr-defined]
            "extensions": template.extensions,
        }
        if body is None:
            return httpx2.Request(template.method, template.url, **shared)
        # The body as a ready stream, as ``Request(content=...)`` would make it, without that path's encoding
        # dispatch and header merge (about 14 µs of CPU a call, 17 against 3): Cookie, then Content-Length, are
        # added in the order the SDK's request has them; ``read()`` keeps the bytes as the request's content.
        content = self._dumps(body)
        request = httpx2.Request(template.method, template.url, stream=httpx2.ByteStream(content), **shared)
        request.headers["Content-Length"] = str(len(content))
        request.read()
        return request

    def _idempotency_key(self) -> str:
        """The SDK makes every request but a GET a key for its ``Idempotency-Key`` header (a UUID4: a read of the
        system's random source and its formatting, 5 µs of CPU in a loop and 20–30 in a request), and sends it only
        when the client has such a header (``_idempotency_header``), which neither SDK's client sets: the key went
        nowhere. Such a client gets the SDK's key; any other a fixed one, which nothing reads."""
        if self._idempotency_header:  # type: ignore[attr-defined]
            return super()._idempotency_key()  # type: ignore[misc]
        return _IDEMPOTENCY_KEY_UNSENT

    def _template(self, options: Any, retries_taken: int) -> httpx2.Request | None:
        """The template for ``options``, made on first use; None when the call is the SDK's to build."""
        key = _template_key(options, retries_taken)
        if key is None:
            return None
        templates: dict[Any, httpx2.Request | None] = self.__dict__.setdefault("_request_templates", {})
        if key not in templates:
            if len(templates) >= _TEMPLATES_MAX:
                return None
            templates[key] = self._request_template(options, retries_taken)
        return templates[key]

    def _request_template(self, options: Any, retries_taken: int) -> httpx2.Request | None:
        """The SDK's own request for ``options`` without a body; None when this client's requests cannot be
        templated (a default query, an auth scheme of its own)."""
        if (
            self.default_query  # type: ignore[attr-defined]
            or self._idempotency_header  # type: ignore[attr-defined]
            or getattr(self, "custom_auth", None) is not None
        ):
            return None
        bodiless = options.model_copy(update={"json_data": None})
        built: httpx2.Request = super()._build_request(bodiless, retries_taken=retries_taken)  # type: ignore[misc]
        if built.url.query:
            return None
        raw = built.headers.raw
        headers = httpx2.Headers([(name, value) for name, value in raw if name.lower() not in REQUEST_OWN_HEADERS])
        # Request() copies a Headers object as it is (no normalising again), and so it keeps the template's.
        return httpx2.Request(built.method, built.url, headers=headers, extensions=built.extensions, stream=_NO_BODY)


def _options_key(path: str, options: Any) -> tuple[Any, ...] | None:
    """What ``post``'s options depend on besides the body: its path and extra headers; None for any other
    option (the SDK constructs those)."""
    if not isinstance(options, dict) or options.keys() - {"headers"}:
        return None
    headers = options.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(value, str) for value in headers.values()):
        return None
    return (path, tuple(headers.items()))


def _template_key(options: Any, retries_taken: int) -> tuple[Any, ...] | None:
    """What the request of ``options`` depends on besides the client and its body; None when it depends on
    more (the call is built by the SDK)."""
    if (
        options.files is not None
        or options.content is not None
        or options.extra_json is not None
        or options.params
        or not isinstance(options.timeout, (openai.NotGiven, anthropic.NotGiven))
        or (options.json_data is not None and not isinstance(options.json_data, dict))
    ):
        return None
    # Which of the client's credentials the call authenticates with (the openai SDK's ``security``).
    security = getattr(options, "security", None)
    if security is not None:
        if not isinstance(security, dict):
            return None
        security = tuple(sorted(security.items()))
    headers = options.headers
    if headers:
        if not all(isinstance(value, str) for value in headers.values()):
            return None  # an Omit, or a value the SDK would refuse
        headers = tuple(headers.items())
    return (options.method, options.url, headers or (), security, retries_taken)


class _NoBody(httpx2.AsyncByteStream):
    """The template's stream: a template is never sent."""

    async def __aiter__(self):  # pragma: no cover - never sent
        raise RuntimeError("a request template is not sent")
        yield b""


_NO_BODY = _NoBody()


class AsyncOpenAI(TemplatedRequests, openai.AsyncOpenAI):
    """``openai.AsyncOpenAI``, building its requests from templates."""

    _dumps = staticmethod(_openai_dumps)
    _options_class = OpenAIOptions


class AsyncAnthropic(TemplatedRequests, anthropic.AsyncAnthropic):
    """``anthropic.AsyncAnthropic``, building its requests from templates."""

    _dumps = staticmethod(_anthropic_dumps)
    _options_class = AnthropicOptions
