"""A logprob JSON has not is answered as a finite one (``openai_shape.logprob_finite``), a Gemini model's too: proto3
JSON spells such a float as a string (``"-Infinity"``), which Google's SDK reads as that float, and its translation
(``translate_gemini._token_logprob``) relayed it, ``NaN`` or an infinity in the answer, until 7 December."""

from __future__ import annotations

import pytest

from providers.adapters.openai_shape import LOGPROB_FLOOR, logprob_finite
from providers.adapters.translate_gemini import _choice_logprobs


@pytest.mark.parametrize(
    ("given", "answered"),
    [(float("nan"), LOGPROB_FLOOR), (float("-inf"), LOGPROB_FLOOR), (float("inf"), 0.0), (-0.25, -0.25), (None, None)],
)
def test_a_logprob_json_has_not_is_a_finite_one(given, answered):
    assert logprob_finite(given) == answered


def test_a_gemini_logprob_json_has_not_is_a_finite_one():
    def candidate(token: str, logprob: float) -> dict:
        return {"token": token, "log_probability": logprob}

    result = {
        "chosen_candidates": [candidate("one", float("-inf")), candidate(" two", float("nan"))],
        "top_candidates": [{"candidates": [candidate("one", float("inf"))]}, {"candidates": []}],
    }
    logprobs = _choice_logprobs({"logprobs_result": result})
    assert [token["logprob"] for token in logprobs["content"]] == [LOGPROB_FLOOR, LOGPROB_FLOOR]
    assert logprobs["content"][0]["top_logprobs"][0]["logprob"] == 0.0
