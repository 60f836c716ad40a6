"""Prompt templates run through the pipeline: ``/v1/chat/completions`` with ``{"prompt": {...}}`` in place of
``messages``, and ``POST /api/prompts/{slug}/run`` (output parsed, validated, repaired once).

Both go through ``completion_start`` like any chat request (the same admission, budgets, experiment
assignment and ledger row): the pipeline resolves the model and assigns the experiment's variant first, then
calls ``prompt_messages_render``, which turns the ``prompt`` field into the ``messages`` the model gets (a
variant that carries a version of the same template runs that version). The upstream never sees ``prompt``.

``prompt_run`` is the template run of the REST API: one chat completion, and when the version holds its
output to a JSON schema, the reply's JSON found (``prompts.output.output_parse``: in code fences or prose),
checked (schema, per-field character limits, the brand's words to avoid) and, when it fails, asked for once
more with what was wrong (``repair_prompt``): a second request, priced and ledgered like the first."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from billing.models import Endpoint
from core.exceptions import ApplicationError
from prompts import output as prompt_output
from prompts.exceptions import OutputParseError, PromptNotFoundError, PromptVariablesError
from prompts.rendering import render_messages, variables_resolve
from prompts.selectors import brand_get, prompt_version_by_id, prompt_version_get

from .validation import InvalidRequestError

if TYPE_CHECKING:
    from prompts.models import BrandProfile, PromptVersion
    from prompts.output import OutputReport

    from .callers import Caller
    from .pipeline import CompletionRun

# What ``prompt`` may hold: a typo in a field name is a 400, not a silently ignored label or brand.
PROMPT_FIELDS = ("slug", "version", "label", "variables", "brand")


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """What a templated request ran: the version (template selected), the brand, the messages, and the variables
    as the caller gave them (what the input check reads: the template's own text is the admin's)."""

    version: PromptVersion
    brand: BrandProfile | None
    messages: list[dict[str, Any]]
    variables: dict[str, Any] = field(default_factory=dict)
    # The experiment variant's version does not take the caller's variables: the version asked for ran instead,
    # and the caller is left out of the experiment.
    variant_left_out: bool = False

    @property
    def slug(self) -> str:
        return self.version.template.slug

    @property
    def header(self) -> str:
        """The value of ``x-llmhub-prompt``: ``slug:vN``."""
        return f"{self.slug}:v{self.version.number}"


def prompt_requested(body: Any) -> bool:
    """The request names a prompt template (``prompt``); with ``messages`` too it is refused when rendered."""
    return isinstance(body, dict) and "prompt" in body


def _invalid(message: str, param: str, code: str = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def _prompt_spec(body: dict[str, Any]) -> dict[str, Any]:
    """``body["prompt"]`` checked for shape, with OpenAI-style errors naming ``prompt.<field>``."""
    if "messages" in body:
        raise _invalid("Send `messages` or a prompt template (`prompt`), not both.", "prompt")
    spec = body.get("prompt")
    if not isinstance(spec, dict):
        raise _invalid(
            "Invalid type for 'prompt': expected an object {slug, version | label, variables, brand}.",
            "prompt",
            "invalid_type",
        )
    unknown = [name for name in spec if name not in PROMPT_FIELDS]
    if unknown:
        raise _invalid(
            f"Unknown parameter 'prompt.{unknown[0]}': a prompt takes {', '.join(PROMPT_FIELDS)}.",
            f"prompt.{unknown[0]}",
            "unknown_parameter",
        )
    slug = spec.get("slug")
    if not isinstance(slug, str) or not slug:
        raise _invalid("Missing required parameter: 'prompt.slug'.", "prompt.slug", "missing_required_parameter")
    for name in ("slug", "label", "brand"):
        # No name holds a NUL, and PostgreSQL refuses one in a query (a 500): a 400 before the lookup.
        if isinstance(spec.get(name), str) and "\x00" in spec[name]:
            raise _invalid(
                f"Invalid 'prompt.{name}': it contains a NUL character, which no name has.",
                f"prompt.{name}",
            )
    version, label = spec.get("version"), spec.get("label")
    if version is not None and label is not None:
        raise _invalid("Give 'prompt.version' or 'prompt.label', not both.", "prompt.label")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise _invalid("Invalid 'prompt.version': a version number (1, 2, ...).", "prompt.version", "invalid_type")
    if label is not None and (not isinstance(label, str) or not label):
        raise _invalid("Invalid 'prompt.label': a label name such as 'production'.", "prompt.label", "invalid_type")
    variables = spec.get("variables")
    if variables is not None and not isinstance(variables, dict):
        raise _invalid(
            "Invalid type for 'prompt.variables': expected an object of name: value.",
            "prompt.variables",
            "invalid_type",
        )
    brand = spec.get("brand")
    if brand is not None and (not isinstance(brand, str) or not brand):
        raise _invalid("Invalid 'prompt.brand': a brand's slug.", "prompt.brand", "invalid_type")
    return spec


async def _version_for(spec: dict[str, Any], version_id: int | None) -> tuple[PromptVersion, PromptVersion]:
    """The version to run and the one asked for: the experiment variant's (``version_id``) when that is a version
    of the same template, else the one asked for. A variant whose version has gone, or is another template's,
    leaves the request as asked."""
    asked = await prompt_version_get(spec["slug"], version=spec.get("version"), label=spec.get("label"))
    if version_id is None or version_id == asked.pk:
        return asked, asked
    try:
        variant = await prompt_version_by_id(version_id)
    except PromptNotFoundError:
        return asked, asked
    return (variant if variant.template_id == asked.template_id else asked), asked


async def prompt_messages_render(body: dict[str, Any], *, version_id: int | None = None) -> RenderedPrompt:
    """Replace ``body["prompt"]`` by the ``messages`` it renders to, and say what ran. ``version_id``: an
    experiment's variant runs this version of the template instead of the one asked for (when it is the same
    template). Errors are ``ApplicationError``s whose ``param`` is ``prompt.<field>`` (400, 404 for an unknown
    template, version, label or brand)."""
    spec = _prompt_spec(body)
    left_out = False
    try:
        version, asked = await _version_for(spec, version_id)
        brand = await brand_get(spec["brand"]) if spec.get("brand") is not None else None
        try:
            variables = variables_resolve(version, spec.get("variables"))
        except PromptVariablesError:
            if version is asked:
                raise
            # The variant's version takes other variables than the one the caller wrote theirs for: a 400 would
            # name a variable they were never told of. The version they asked for runs, out of the experiment.
            version, left_out = asked, True
            variables = variables_resolve(version, spec.get("variables"))
        messages = render_messages(version, variables, brand)
    except ApplicationError as exc:
        # The prompts layer names its own fields (``variables.topic``, ``brand``); here they sit under ``prompt``.
        if exc.param and exc.param != "prompt" and not exc.param.startswith("prompt."):
            exc.param = f"prompt.{exc.param}"
        raise
    del body["prompt"]
    body["messages"] = messages
    return RenderedPrompt(
        version=version,
        brand=brand,
        messages=messages,
        variables=spec.get("variables") or {},
        variant_left_out=left_out,
    )


# THE REST API'S TEMPLATE RUN


@dataclass(slots=True)
class PromptRunResult:
    """What ``POST /api/prompts/{slug}/run`` answers (``as_dict``).

    ``output``: the parsed JSON (a version with an output schema) or the reply's text; ``raw``: the reply's
    text as it came; ``valid``: the output satisfies the schema; ``ok``: valid, and no field over its limit or
    using a word the brand avoids; ``errors``/``checks``: why not, per field; ``repaired``: the first reply
    failed and the model was asked once more; ``attempts``: requests made (each has its ledger row, listed in
    ``request_ids``)."""

    output: Any
    raw: str
    valid: bool
    ok: bool
    errors: list[str]
    checks: list[dict[str, Any]]
    repaired: bool
    attempts: int
    request_ids: list[str]
    template: str
    version: int
    model: str
    usage: dict[str, int]
    cost: Decimal
    experiment: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "raw": self.raw,
            "valid": self.valid,
            "ok": self.ok,
            "errors": list(self.errors),
            "checks": list(self.checks),
            "repaired": self.repaired,
            "attempts": self.attempts,
            "request_ids": list(self.request_ids),
            "template": self.template,
            "version": self.version,
            "model": self.model,
            "usage": dict(self.usage),
            "cost": str(self.cost),
            "experiment": self.experiment,
        }


@dataclass(slots=True)
class _Attempt:
    raw: str
    output: Any
    report: OutputReport | None  # None: free text with nothing to check
    parse_error: OutputParseError | None = None

    @property
    def passed(self) -> bool:
        return self.parse_error is None and (self.report is None or self.report.ok)


async def _reply_text(run: CompletionRun, *, stream: bool) -> str:
    """The reply's text; streamed from the upstream when asked (its time to first token is then measured),
    but reported whole either way, since the output is checked as a whole."""
    if not stream:
        response = await run.complete()
        choices = response.get("choices") or [{}]
        content = (choices[0].get("message") or {}).get("content")
        return content if isinstance(content, str) else ""
    parts: list[str] = []
    chunks = await run.stream_open()
    try:
        async for chunk in chunks:
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if isinstance(piece, str) and choice.get("index", 0) == 0:
                    parts.append(piece)
    finally:
        await chunks.aclose()
    return "".join(parts)


def _judge(rendered: RenderedPrompt, raw: str) -> _Attempt:
    version = rendered.version
    if version.output_schema:
        try:
            data = prompt_output.output_parse(raw)
        except OutputParseError as exc:
            return _Attempt(raw=raw, output=None, report=None, parse_error=exc)
        return _Attempt(raw=raw, output=data, report=prompt_output.output_check(version, data, brand=rendered.brand))
    if version.field_limits or (rendered.brand is not None and rendered.brand.words_to_avoid):
        return _Attempt(raw=raw, output=raw, report=prompt_output.output_check(version, raw, brand=rendered.brand))
    return _Attempt(raw=raw, output=raw, report=None)


async def _attempt_start(
    *,
    caller: Caller,
    body: dict[str, Any],
    endpoint: str,
    request_id: str,
    stream: bool,
    new_input: list[dict[str, Any]] | None = None,
) -> CompletionRun:
    """The request admitted (nothing sent yet); its reply is read by ``_reply_text``, apart, so that a run
    whose reading fails after tokens were billed is still at hand for the result's usage and cost."""
    from .pipeline import completion_start  # the pipeline imports this module for the /v1 extension

    if stream:
        body["stream"] = True  # what the ledger row says, and the pipeline's check that the model can stream
    return await completion_start(
        caller=caller, body=body, endpoint=endpoint, request_id=request_id, new_input=new_input
    )


async def prompt_run(
    *,
    caller: Caller,
    slug: str,
    version: int | None = None,
    label: str | None = None,
    variables: dict[str, Any] | None,
    brand: str | None = None,
    model: str,
    endpoint: str = Endpoint.REST,
    stream: bool = False,
) -> PromptRunResult:
    """Run a template version for ``caller`` on ``model``: render, complete through the pipeline, and for a
    version with an output schema check the reply and repair it once when it fails (free text is checked
    against its limits and the brand's words to avoid, and reported as it came). Raises the
    pipeline's ``ApplicationError``s (400, 403, 404, 402/429, 5xx from the upstream) for the first request;
    a repair request that fails is reported in ``errors``, with the first reply kept."""
    from .pipeline import new_request_id

    spec: dict[str, Any] = {"slug": slug, "variables": variables if variables is not None else {}}
    for name, value in (("version", version), ("label", label), ("brand", brand)):
        if value is not None:
            spec[name] = value
    request_ids = [new_request_id()]
    try:
        run = await _attempt_start(
            caller=caller,
            body={"model": model, "prompt": spec},
            endpoint=endpoint,
            request_id=request_ids[0],
            stream=stream,
        )
        raw = await _reply_text(run, stream=stream)
    except ApplicationError as exc:
        # The refusal names its request, whose ledger row (rejected, or the upstream's error) says the rest.
        exc.extra["headers"] = {**(exc.extra.get("headers") or {}), "x-request-id": request_ids[0]}
        raise
    rendered = run.prompt
    assert rendered is not None  # a templated request always renders before it is admitted
    runs = [run]
    answered = run  # the run whose reply is reported
    attempt = _judge(rendered, raw)
    repair_failure: ApplicationError | None = None
    if not attempt.passed and rendered.version.output_schema:
        # Only a JSON output is asked for again: free text is reported with its checks as it came.
        conversation = [
            *rendered.messages,
            {"role": "assistant", "content": raw},
            {"role": "user", "content": prompt_output.repair_prompt(attempt.parse_error or attempt.report)},
        ]
        request_ids.append(new_request_id())
        try:
            repair = await _attempt_start(
                caller=caller,
                body={"model": model, "messages": conversation},
                endpoint=endpoint,
                request_id=request_ids[1],
                stream=stream,
                # Nothing here is the client's new text, for the input check: the rendered messages were read by
                # the first request's, the reply is the model's own, and the repair prompt is ours (it quotes it).
                new_input=[],
            )
            runs.append(repair)
            repaired_raw = await _reply_text(repair, stream=stream)
        except ApplicationError as exc:
            # Refused (a budget spent by the first reply) or failed upstream, perhaps after tokens it is billed
            # for (its run, if admitted, counts in the usage and cost): its ledger row says so, and the first
            # reply, paid for, is still worth reporting.
            repair_failure = exc
        else:
            answered = repair
            attempt = _judge(rendered, repaired_raw)
    return _result(rendered, runs, answered, request_ids, attempt, repair_failure)


def _result(
    rendered: RenderedPrompt,
    runs: list[CompletionRun],
    answered: CompletionRun,
    request_ids: list[str],
    attempt: _Attempt,
    repair_failure: ApplicationError | None,
) -> PromptRunResult:
    """``runs``: every request admitted, each counted in the usage and cost as its ledger row is;
    ``answered``: the one whose reply is reported (the repair's, when it answered)."""
    report = attempt.report
    errors: list[str] = []
    if attempt.parse_error is not None:
        errors.append(attempt.parse_error.message)
    if report is not None:
        errors.extend(report.errors)
    if repair_failure is not None:
        errors.append(f"The repair request failed: {repair_failure.message}")
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    cost = Decimal(0)
    for run in runs:
        if run.result is not None:
            usage["prompt_tokens"] += run.result.prompt_tokens
            usage["completion_tokens"] += run.result.completion_tokens
            cost += run.result.cost
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return PromptRunResult(
        output=attempt.output,
        raw=attempt.raw,
        valid=attempt.parse_error is None and (report is None or report.valid),
        ok=attempt.passed,
        errors=errors,
        checks=report.as_dict()["checks"] if report is not None else [],
        repaired=answered is not runs[0],
        attempts=len(request_ids),
        request_ids=request_ids,
        template=rendered.slug,
        version=rendered.version.number,
        model=answered.answered_by.name,
        usage=usage,
        cost=cost,
        experiment=answered.assignment.header if answered.assignment is not None else None,
        # A repair is sent as plain messages, so its own headers name no template: the run's does.
        headers={**answered.response_headers, "x-llmhub-prompt": rendered.header},
    )
