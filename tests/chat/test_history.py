"""The context-trimming rule of ``chat.history`` (pure arithmetic, no database)."""

from __future__ import annotations

import pytest

from chat.history import DEFAULT_OUTPUT_RESERVE, Turn, estimate_tokens, history_trim, output_reserve


def turns(*contents: str) -> list[Turn]:
    """Alternating turns ending with the user's new message."""
    last = len(contents) - 1
    return [Turn("user" if (last - i) % 2 == 0 else "assistant", c) for i, c in enumerate(contents)]


def test_estimate_is_a_quarter_of_the_characters_rounded_up_plus_framing():
    assert estimate_tokens("") == 4
    assert estimate_tokens("abcd") == 5
    assert estimate_tokens("abcde") == 6
    assert estimate_tokens("x" * 400) == 104


def test_reserve_is_max_output_tokens_or_a_capped_quarter_of_the_window():
    assert output_reserve(context_window=8_000, max_output_tokens=500) == 500
    assert output_reserve(context_window=8_000, max_output_tokens=None) == 2_000
    assert output_reserve(context_window=200_000, max_output_tokens=None) == DEFAULT_OUTPUT_RESERVE


def test_everything_is_kept_when_it_fits():
    history = turns("one", "two", "three")
    assert history_trim(turns=history, system_prompt="Be brief.", context_window=1_000) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]


def test_oldest_turns_go_first_and_the_system_prompt_stays():
    # Each 40-char message costs 14 tokens; budget = 100 - 50 = 50 → system (14) + newest (14) + one more (14).
    history = turns(*[f"{i}" * 40 for i in range(6)])
    kept = history_trim(turns=history, system_prompt="s" * 40, context_window=100, max_output_tokens=50)
    assert [m["content"][0] for m in kept] == ["s", "4", "5"]
    assert kept[0]["role"] == "system"


def test_the_walk_stops_at_the_first_turn_that_does_not_fit():
    # A big middle turn ends the walk even though an older, small one would still fit: no holes.
    history = turns("old", "x" * 400, "new")
    kept = history_trim(turns=history, context_window=100, max_output_tokens=50)
    assert kept == [{"role": "user", "content": "new"}]


def test_the_newest_turn_is_kept_even_when_it_alone_is_over_budget():
    history = turns("small", "y" * 10_000)
    assert history_trim(turns=history, system_prompt="sys", context_window=100, max_output_tokens=50) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "y" * 10_000},
    ]


def test_exact_fit_is_kept():
    # budget 28 = two 14-token turns exactly.
    history = turns("a" * 40, "b" * 40)
    assert len(history_trim(turns=history, context_window=56, max_output_tokens=28)) == 2
    assert len(history_trim(turns=history, context_window=55, max_output_tokens=28)) == 1


def test_no_turns_is_a_programming_error():
    with pytest.raises(ValueError):
        history_trim(turns=[], context_window=100)
