"""``POST /v1/feedback``: a caller rates one of their own requests, by the id its answer carried in
``x-request-id``: thumbs up or down, or a score (``"metric"`` names one of several), with a comment.

A plain async view on the lean handler like the rest of /v1 (``chat.api_openai``): a gateway key or a JWT,
OpenAI's error shape. A person (JWT) rates any of their requests; a gateway key only those made by itself or
by a key created under it (``experiments.services_feedback.request_is_users``). A request id out of the
caller's reach, another user's, another key's or one that does not exist, answers the same 404. The rating
makes no model call, so like ``/v1/models`` it gets no ledger row: the ledger holds priced calls, and a row per
rating would count as requests in every usage figure."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse

from billing.authentication import key_from_headers
from core.errors import json_response, openai_error_response
from core.exceptions import ApplicationError
from core.text import has_lone_surrogate
from experiments.models import Feedback, FeedbackMetric, FeedbackSource
from experiments.services_feedback import feedback_set, request_is_users

from .api_openai import method_not_allowed, openai_endpoint, parse_body, response_stamp
from .callers import caller_from_api_key
from .pipeline import new_request_id
from .validation import _fail, _is_number

COMMENT_MAX_LENGTH = 2000  # as the chat page's thumbs take
REQUEST_ID_MAX_LENGTH = 64
THUMBS = {"up": 1.0, "down": -1.0}
# A score's name: what results group scores by; "thumbs" is the thumbs' own.
_METRIC_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
_FIELDS = frozenset({"request_id", "thumbs", "score", "metric", "comment"})


class RequestNotFoundError(ApplicationError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


@dataclass(frozen=True, slots=True)
class FeedbackInput:
    request_id: str
    metric: str
    value: float
    comment: str


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        _fail(f"Invalid type for '{param}': expected a string.", param, "invalid_type")
    # PostgreSQL cannot store NUL, and UTF-8 cannot encode a lone surrogate (JSON's \ud800 escape).
    if "\x00" in value or has_lone_surrogate(value):
        _fail(f"Invalid value for '{param}': it contains a character that cannot be stored.", param)
    return value


def feedback_input(body: Any) -> FeedbackInput:
    """The rating a body asks for, or an ``InvalidRequestError`` naming the parameter at fault."""
    if not isinstance(body, dict):
        _fail("The request body must be a JSON object.", None, "invalid_type")
    for name in body:
        if name not in _FIELDS:
            _fail(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
    if "request_id" not in body:
        _fail("Missing required parameter: 'request_id'.", "request_id", "missing_required_parameter")
    request_id = _text(body["request_id"], "request_id")
    if not request_id or len(request_id) > REQUEST_ID_MAX_LENGTH:
        _fail(
            f"Invalid value for 'request_id': give the x-request-id of one of your requests "
            f"(1 to {REQUEST_ID_MAX_LENGTH} characters).",
            "request_id",
        )
    comment = body.get("comment")
    comment = "" if comment is None else _text(comment, "comment")
    if len(comment) > COMMENT_MAX_LENGTH:
        _fail(
            f"Invalid 'comment': string too long. Expected a string with maximum length {COMMENT_MAX_LENGTH}, "
            f"but got a string with length {len(comment)} instead.",
            "comment",
            "string_above_max_length",
        )
    if "thumbs" in body and "score" in body:
        _fail("Give either 'thumbs' or 'score', not both.", "score")
    if "thumbs" in body:
        thumbs = body["thumbs"]
        if not isinstance(thumbs, str) or thumbs not in THUMBS:
            _fail("Invalid value for 'thumbs': expected 'up' or 'down'.", "thumbs")
        if body.get("metric", FeedbackMetric.THUMBS) != FeedbackMetric.THUMBS:
            _fail("'metric' names a score; thumbs are recorded under 'thumbs'.", "metric")
        return FeedbackInput(request_id, FeedbackMetric.THUMBS, THUMBS[thumbs], comment)
    if "score" not in body:
        _fail(
            "Missing required parameter: give 'thumbs' ('up' or 'down') or 'score' (a number).",
            "thumbs",
            "missing_required_parameter",
        )
    score = body["score"]
    if not _is_number(score):
        _fail("Invalid type for 'score': expected a number.", "score", "invalid_type")
    try:
        score = float(score)
    except OverflowError:  # an integer beyond any float
        score = math.inf
    if not math.isfinite(score):
        _fail("Invalid value for 'score': expected a finite number.", "score")
    metric = body.get("metric", FeedbackMetric.SCORE)
    if not isinstance(metric, str) or not _METRIC_NAME.fullmatch(metric) or metric == FeedbackMetric.THUMBS:
        _fail(
            "Invalid value for 'metric': a score's name is 1 to 32 lowercase letters, digits, '_', '.' or '-', "
            "other than 'thumbs'.",
            "metric",
        )
    return FeedbackInput(request_id, metric, score, comment)


def feedback_payload(feedback: Feedback) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "object": "feedback",
        "request_id": feedback.request_id,
        "metric": feedback.metric,
        "value": feedback.value,
    }
    if feedback.metric == FeedbackMetric.THUMBS:
        payload["thumbs"] = "up" if feedback.value > 0 else "down"
    else:
        payload["score"] = feedback.value
    payload["comment"] = feedback.comment
    payload["created_at"] = int(feedback.created_at.timestamp())
    payload["updated_at"] = int(feedback.updated_at.timestamp())
    return payload


@openai_endpoint
async def feedback_create(request: HttpRequest) -> HttpResponse:
    """201 with the new record, 200 with the record a second rating replaced."""
    started = time.perf_counter()
    request_id = new_request_id()
    if request.method != "POST":
        return response_stamp(await method_not_allowed(request, "POST", request_id), request_id, started)
    try:
        caller = await caller_from_api_key(key_from_headers(request.headers))
        given = feedback_input(parse_body(request))
        if not await request_is_users(
            request_id=given.request_id, user_id=caller.user_id, api_key_id=caller.api_key_id
        ):
            raise RequestNotFoundError(
                f"No request '{given.request_id}' of yours was found (one that has just ended may take a "
                "moment to be recorded: retry shortly).",
                param="request_id",
                code="not_found",
            )
        feedback, created = await sync_to_async(feedback_set)(
            request_id=given.request_id,
            user_id=caller.user_id,
            metric=given.metric,
            value=given.value,
            comment=given.comment,
            source=FeedbackSource.API,
        )
    except ApplicationError as exc:
        return response_stamp(openai_error_response(exc), request_id, started)
    return response_stamp(
        json_response(feedback_payload(feedback), status=201 if created else 200), request_id, started
    )
