"""Fuzzing in the suite (issue 9, point 4): no input makes llmhub answer a server error.

- schemathesis generates requests for every operation of ``/api/schema/`` and sends them, with a gateway
  key, to a live llmhub whose catalog points at the fake upstream; every answer must be a non-5xx whose
  status, content type and body the schema documents;
- hypothesis feeds the chat request validator arbitrary JSON and the values that once crashed it: it
  accepts, or refuses with our 400; and what it accepts can be forwarded (encoded as UTF-8 JSON) and
  priced (``providers.tokens.prompt_tokens``).

Both are bounded (examples per operation, no deadline: the 2-core CI machine is shared) and derandomized,
so a run is reproducible and a failure shows the same example again.

The invalid requests' test does not generate the schema's credentials (the gateway key's ``Authorization``
header, the session cookie: ``with_security_parameters=False``): every request carries the fuzz key, which
replaced the generated header, so the 419 of its 960 examples that broke that header alone went out as valid
requests, and the key authenticates before DRF's session authentication is tried, so the cookie decided nothing.
An operation with nothing of its own to break (no body, no query, header or cookie parameter, at most a path
parameter any string fits: ``GET /v1/models``) then has no invalid request: the valid ones, all it ever sent
there, are the other test's.
"""

from __future__ import annotations

import json
import sys

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from billing.models import ApiKey, KeyScope
from billing.services.keys import api_key_create
from chat.validation import MAX_JSON_DEPTH, InvalidRequestError, validate_chat_request
from providers.tokens import prompt_tokens
from tests.factories import UserFactory
from tests.gateway.conftest import make_catalog

# Far above the ids the fuzzer's DELETE /api/keys/{id}/ and POST …/revoke/ will try, so that it revokes
# the keys it created itself, never the one it authenticates with.
FUZZ_KEY_ID = 987_654_321
EXAMPLES_PER_OPERATION = 20
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

BOUNDED = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture
def fuzz_key(llmhub_server, fake_upstream) -> str:
    make_catalog(fake_upstream)
    created = api_key_create(user=UserFactory(username="fuzz"), name="fuzz", scopes=[KeyScope.KEYS_MANAGE])
    ApiKey.objects.filter(pk=created.api_key.pk).update(id=FUZZ_KEY_ID)
    return created.secret


def nothing_to_break(operation) -> bool:
    """No body and no query, header or cookie parameter: an invalid request could only be a path's."""
    return not list(operation.body) and all(
        parameter.location.value == "path" for parameter in operation.iter_parameters()
    )


def operation_failures(schema, *, mode: GenerationMode, checks: list, base_url: str, key: str) -> list[str]:
    """Run every operation's examples; each operation's first failure, shrunk by hypothesis, as text."""
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @BOUNDED
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            case.call_and_validate(
                base_url=base_url, headers={"Authorization": f"Bearer {key}"}, checks=checks, timeout=30
            )

        try:
            run()
        except Unsatisfiable as exc:
            if not (mode is GenerationMode.NEGATIVE and nothing_to_break(operation)):
                failures.append(f"{operation.label} ({mode.value}): {exc}")
        except (Exception, FailureGroup) as exc:  # collected, so that one run reports every operation
            failures.append(f"{operation.label} ({mode.value}): {exc}")
    return failures


# Every operation of the API, 20 examples each, against a live server: minutes, not the suite's 120 s per test.
@pytest.mark.timeout(900)
@pytest.mark.django_db(transaction=True)
def test_no_operation_answers_a_server_error_or_breaks_its_schema(llmhub_server, fuzz_key):
    schema = schemathesis.openapi.from_url(llmhub_server.url + "/api/schema/?format=json")
    assert len(list(schema.get_all_operations())) >= 10
    failures = operation_failures(
        schema, mode=GenerationMode.POSITIVE, checks=CHECKS, base_url=llmhub_server.url, key=fuzz_key
    )
    assert not failures, "\n\n".join(failures)


@pytest.mark.timeout(900)
@pytest.mark.django_db(transaction=True)
def test_no_invalid_request_answers_a_server_error(llmhub_server, fuzz_key):
    """Requests that break the schema on purpose: refused, never a 5xx, always in a documented content type."""
    schema = schemathesis.openapi.from_url(llmhub_server.url + "/api/schema/?format=json")
    # Its credentials are the fuzz key's, never generated (the module's docstring).
    schema.config.generation.update(with_security_parameters=False)
    failures = operation_failures(
        schema,
        mode=GenerationMode.NEGATIVE,
        checks=[not_a_server_error, content_type_conformance],
        base_url=llmhub_server.url,
        key=fuzz_key,
    )
    assert not failures, "\n\n".join(failures)


# The validator -------------------------------------------------------------------------------------

FIELDS = (
    "model",
    "messages",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "stream",
    "stream_options",
    "stop",
    "logprobs",
    "top_logprobs",
    "seed",
    "response_format",
    "tools",
    "tool_choice",
    "user",
    "metadata",
)


def nested(depth: int, leaf=None) -> list:
    """``[[[…leaf…]]]`` built without recursion, ``depth`` arrays deep."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# Built once (a deep list takes milliseconds to build and free) and shared: the validator mutates nothing.
_HUGE_INT = 10**5000
_TOO_DEEP = nested(MAX_JSON_DEPTH + 1)
_DEEPER_THAN_PYTHON = nested(sys.getrecursionlimit() * 2)


def huge_int() -> int:
    return _HUGE_INT


def too_deep() -> list:
    return _TOO_DEEP


def deeper_than_python() -> list:
    return _DEEPER_THAN_PYTHON


# Built by named functions: hypothesis shows a strategy's repr, which a 5000-digit int or a deep list lack.
NASTY = (
    st.builds(huge_int)
    | st.builds(too_deep)
    | st.builds(deeper_than_python)
    | st.sampled_from(
        [
            "\ud800",
            "ok \udfff",
            "\ud83d\ude00",  # a surrogate pair written out: valid once joined, lone here
            "\x00",
            10**30,
            -(10**30),
            2**63,
            -(2**63) - 1,
            float("nan"),
            float("inf"),
            -0.0,
            1e308,
            True,
            {"": None},
            [],
            {},
            "",
        ]
    )
)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | NASTY
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=24,
)
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]) | JSON_VALUES
PARTS = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio", "file", "refusal"]) | JSON_VALUES},
    optional={"text": st.text(max_size=12) | JSON_VALUES, "image_url": JSON_VALUES},
)
MESSAGES = st.fixed_dictionaries(
    {"role": ROLES},
    optional={
        "content": st.text(max_size=20) | st.lists(PARTS, max_size=3) | JSON_VALUES,
        "tool_calls": JSON_VALUES,
        "tool_call_id": st.text(max_size=8) | JSON_VALUES,
    },
)
TOOLS = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "custom"]) | JSON_VALUES},
        optional={"function": st.fixed_dictionaries({"name": st.text(max_size=8) | JSON_VALUES}) | JSON_VALUES},
    ),
    max_size=3,
)
BODIES = (
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.just("gpt-test") | JSON_VALUES,
            "messages": st.lists(MESSAGES, max_size=3) | JSON_VALUES,
            "tools": TOOLS | JSON_VALUES,
            "tool_choice": st.sampled_from(["none", "auto", "required"])
            | st.fixed_dictionaries({"type": st.just("function"), "function": JSON_VALUES})
            | JSON_VALUES,
            **{name: JSON_VALUES for name in FIELDS if name not in ("model", "messages", "tools", "tool_choice")},
        },
    )
    | JSON_VALUES
)


@settings(max_examples=500, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(BODIES)
def test_the_validator_accepts_or_answers_400_and_what_it_accepts_can_be_sent(body):
    try:
        validate_chat_request(body)
    except InvalidRequestError as exc:
        assert exc.status_code == 400 and exc.error_type == "invalid_request_error"
        assert exc.param is None or isinstance(exc.param, str)
        exc.message.encode("utf-8")  # the message itself is safe to send
        return
    json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
    assert prompt_tokens(body, operation="chat", upper_bound=True) >= 0


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": nested(100_000)},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 10**5000},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**30},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")},
        {"model": "m", "messages": [{"role": {"a": 1}, "content": "hi"}]},
        {"model": "m", "messages": [{"role": "user", "content": [{"type": ["text"], "text": "hi"}]}]},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"},
    ],
    ids=["surrogate", "deep", "5000-digits", "max_tokens", "nan", "role-object", "part-type-list", "tool_choice"],
)
def test_the_values_that_once_crashed_are_a_400(body):
    with pytest.raises(InvalidRequestError) as refused:
        validate_chat_request(body)
    assert refused.value.status_code == 400


def test_fields_the_validator_does_not_know_pass_through_whatever_their_name():
    validate_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], "": 1, "x-custom": {"a": []}})
