"""Checking a reply: JSON found in prose and fences, schema errors with their paths, per-field limits and the
brand's words to avoid, and the repair message (issue 12, part 4)."""

from __future__ import annotations

import pytest

from prompts.exceptions import OutputParseError
from prompts.kinds import kind_specs
from prompts.models import BrandProfile, PromptVersion
from prompts.output import output_check, output_parse, repair_prompt


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"headline": "Hi"}', {"headline": "Hi"}),
        ("  [1, 2]\n", [1, 2]),
        ('Here is your copy:\n```json\n{"headline": "Hi"}\n```\nLet me know!', {"headline": "Hi"}),
        ('```\n{"headline": "Hi"}\n```', {"headline": "Hi"}),
        (
            'Sure! {"headline": "Use {braces} and \\"quotes\\"", "n": [1, {"a": 2}]} Hope it helps.',
            {"headline": 'Use {braces} and "quotes"', "n": [1, {"a": 2}]},
        ),
        ('Options [see below]: {"a": 1} and also {"b": 2}', {"a": 1}),
        ('```python\nprint(1)\n```\n```json\n{"a": 1}\n```', {"a": 1}),
    ],
)
def test_json_is_found_whole_in_fences_or_in_prose(reply, expected):
    assert output_parse(reply) == expected


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        ("", "empty"),
        ("I'd rather not answer in JSON today.", "no JSON"),
        ('Here: {"headline": "Hi", }', "does not parse"),
        ('```json\n{"headline": \n```', "does not parse"),
    ],
)
def test_a_reply_without_json_says_what_was_wrong(reply, words):
    with pytest.raises(OutputParseError) as caught:
        output_parse(reply)
    assert words in caught.value.message


def _version(kind_slug: str) -> PromptVersion:
    spec = next(spec for spec in kind_specs() if spec.slug == kind_slug)
    return PromptVersion(
        messages=spec.messages,
        variables=spec.variables,
        output_schema=spec.output_schema,
        field_limits=spec.field_limits,
    )


BRAND = BrandProfile(name="Acme", slug="acme", words_to_avoid=["synergy", "best-in-class", "Game changer"])


def test_an_ad_headline_over_its_limit_is_reported_per_field():
    version = _version("ad-copy-google")
    reply = {
        "headlines": ["Plan Trips in Minutes", "The Trail Planner Hikers Trust Most", "Free for 30 Days"],
        "descriptions": ["Maps, weather and packing lists in one app.", "Start free today; cancel any time."],
    }
    report = output_check(version, reply, brand=None)
    assert report.valid  # the structure is right
    assert not report.ok
    by_field = {check.field: check for check in report.checks}
    long = by_field["headlines[1]"]
    assert (long.length, long.limit, long.ok) == (35, 30, False)
    assert long.problems == ["over its limit of 30 characters by 5"]
    assert by_field["headlines[0]"].ok and by_field["headlines[0]"].limit == 30
    assert by_field["descriptions[0]"].limit == 90 and by_field["descriptions[0]"].ok
    assert report.problems == ["headlines[1]: over its limit of 30 characters by 5"]
    assert report.as_dict()["checks"][1] == {
        "field": "headlines[1]",
        "length": 35,
        "limit": 30,
        "ok": False,
        "problems": ["over its limit of 30 characters by 5"],
    }


def test_a_meta_ad_has_the_meta_limits():
    report = output_check(_version("ad-copy-meta"), {"primary_text": "x" * 126, "headline": "y" * 40}, brand=None)
    by_field = {check.field: check for check in report.checks}
    assert by_field["primary_text"].problems == ["over its limit of 125 characters by 1"]
    assert by_field["headline"].ok


def test_nested_limits_apply_to_each_item():
    version = _version("landing-page")
    reply = {
        "hero": {"headline": "H" * 71, "subheadline": "S"},
        "features": [{"title": "T" * 51, "description": "D"}, {"title": "ok", "description": "D"}],
        "call_to_action": {"text": "Go", "button": "Start"},
    }
    report = output_check(version, reply, brand=None)
    assert report.problems == [
        "hero.headline: over its limit of 70 characters by 1",
        "features[0].title: over its limit of 50 characters by 1",
    ]


def test_words_to_avoid_are_reported_on_word_boundaries_whatever_their_case():
    version = _version("social-post-x")
    report = output_check(
        version,
        {"text": "SYNERGY meets a best-in-class, game changer trail app. (Not synergyless.)", "hashtags": ["#synergy"]},
        brand=BRAND,
    )
    by_field = {check.field: check for check in report.checks}
    assert by_field["text"].problems == [
        "uses 'synergy', which the brand avoids",
        "uses 'best-in-class', which the brand avoids",
        "uses 'Game changer', which the brand avoids",
    ]
    assert by_field["hashtags[0]"].problems == ["uses 'synergy', which the brand avoids"]
    clean = output_check(version, {"text": "Synergyless trails, game-changing views."}, brand=BRAND)
    assert clean.ok, clean.problems


def test_schema_errors_are_reported_with_their_json_path():
    version = _version("ad-copy-google")
    report = output_check(version, {"headlines": ["One", 2], "descriptions": ["Only one"], "extra": True}, brand=None)
    assert not report.valid
    assert "$.headlines[1]: 2 is not of type 'string'" in report.errors
    assert "$.descriptions: ['Only one'] is too short" in report.errors
    assert any(error.startswith("$: Additional properties are not allowed ('extra'") for error in report.errors)


def test_a_schema_maxlength_is_a_limit_too():
    version = PromptVersion(
        messages=[],
        output_schema={"type": "object", "properties": {"title": {"type": "string", "maxLength": 10}}},
        field_limits={"title": 12},
    )
    report = output_check(version, {"title": "x" * 11}, brand=None)
    assert report.checks[0].limit == 10  # the stricter of the two
    assert report.checks[0].problems == ["over its limit of 10 characters by 1"]
    assert report.errors == ["$.title: 'xxxxxxxxxxx' is too long"]


def test_the_repair_prompt_quotes_what_was_wrong_and_asks_for_json_only():
    version = _version("ad-copy-google")
    report = output_check(version, {"headlines": ["A headline that is much too long"], "descriptions": []}, brand=None)
    text = repair_prompt(report)
    assert "$.headlines: ['A headline that is much too long'] is too short" in text
    assert "headlines[0]: over its limit of 30 characters by 2" in text
    assert "corrected JSON only" in text
    with pytest.raises(OutputParseError) as caught:
        output_parse("no json")
    assert "could not be read as JSON" in repair_prompt(caught.value)
    assert "no object or array" in repair_prompt(caught.value)
