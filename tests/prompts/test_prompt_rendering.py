"""Rendering a version: variables typed, defaulted and refused; the brand in the system message; the sandbox
refusing internals with a 400 (issue 12, part 4)."""

from __future__ import annotations

import pytest

from core.exceptions import ApplicationError
from prompts.exceptions import PromptTemplateError, PromptVariablesError
from prompts.models import BrandProfile, PromptTemplate, PromptVersion
from prompts.rendering import render_messages, variables_resolve

pytestmark = pytest.mark.django_db


def version(messages, variables=(), **fields) -> PromptVersion:
    template = PromptTemplate.objects.create(slug=f"t-{PromptTemplate.objects.count()}")
    return PromptVersion.objects.create(
        template=template, number=1, messages=messages, variables=list(variables), **fields
    )


@pytest.fixture
def brand() -> BrandProfile:
    return BrandProfile.objects.create(
        name="Acme Outdoors",
        slug="acme",
        voice="A seasoned trail guide who has seen it all and still loves it",
        tone="warm, plain-spoken, never pushy",
        audience="weekend hikers in their thirties",
        style_rules="Short sentences.\n- Say 'you', not 'customers'.",
        words_to_avoid=["synergy", "best-in-class"],
        example_copy="The trail doesn't care about your inbox. Neither do we.",
    )


VARIABLES = [
    {"name": "topic", "type": "string"},
    {"name": "count", "type": "integer", "default": 3},
    {"name": "ratio", "type": "number", "default": 0.5},
    {"name": "formal", "type": "boolean", "default": False},
    {"name": "tags", "type": "array", "default": ["a"]},
    {"name": "meta", "type": "object", "default": {}},
    {"name": "aside", "type": "string", "required": False},
]


def test_variables_get_their_defaults_and_keep_the_given_values():
    v = version([{"role": "user", "content": "{{ topic }}"}], VARIABLES)
    resolved = variables_resolve(v, {"topic": "boots", "count": 5, "ratio": 2})
    assert resolved == {
        "topic": "boots",
        "count": 5,
        "ratio": 2,
        "formal": False,
        "tags": ["a"],
        "meta": {},
        "aside": None,
    }


def test_an_optional_variable_left_out_prints_nothing_not_none():
    # The model would otherwise read "Topic: boots. Aside: None." for a variable the caller did not give.
    v = version(
        [{"role": "user", "content": "Topic: {{ topic }}. Aside: {{ aside }}.{% if aside %} Yes{% endif %}"}], VARIABLES
    )
    assert render_messages(v, variables_resolve(v, {"topic": "boots"}), None)[0]["content"] == "Topic: boots. Aside: ."
    given = variables_resolve(v, {"topic": "boots", "aside": "maps"})
    assert render_messages(v, given, None)[0]["content"] == "Topic: boots. Aside: maps. Yes"


def test_a_default_is_a_copy_so_a_render_cannot_change_the_version():
    v = version([{"role": "user", "content": "{{ topic }}"}], VARIABLES)
    variables_resolve(v, {"topic": "x"})["tags"].append("changed")
    assert variables_resolve(v, {"topic": "x"})["tags"] == ["a"]


@pytest.mark.parametrize(
    ("given", "param", "words"),
    [
        ({}, "variables.topic", "is required"),
        ({"topic": 3}, "variables.topic", "must be a string, not a number"),
        ({"topic": "x", "count": 2.5}, "variables.count", "must be an integer"),
        ({"topic": "x", "count": True}, "variables.count", "must be an integer, not a boolean"),
        ({"topic": "x", "ratio": "1"}, "variables.ratio", "must be a number"),
        ({"topic": "x", "formal": "yes"}, "variables.formal", "must be true or false"),
        ({"topic": "x", "tags": "a"}, "variables.tags", "must be an array"),
        ({"topic": "x", "meta": []}, "variables.meta", "must be an object"),
        ({"topic": "x", "colour": "red"}, "variables.colour", "has no variable `colour`"),
    ],
)
def test_variables_are_typed_and_unknown_ones_refused(given, param, words):
    v = version([{"role": "user", "content": "{{ topic }}"}], VARIABLES)
    with pytest.raises(PromptVariablesError) as caught:
        variables_resolve(v, given)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert words in caught.value.message


def test_variables_must_be_an_object():
    v = version([{"role": "user", "content": "hi"}])
    with pytest.raises(PromptVariablesError) as caught:
        variables_resolve(v, ["topic"])
    assert caught.value.param == "variables"


def test_a_brand_ends_the_system_message(brand):
    v = version(
        [{"role": "system", "content": "You write posts."}, {"role": "user", "content": "About {{ topic }}"}],
        [{"name": "topic", "type": "string"}],
    )
    rendered = render_messages(v, {"topic": "boots"}, brand)
    assert [m["role"] for m in rendered] == ["system", "user"]
    system = rendered[0]["content"]
    assert system.startswith("You write posts.\n\n## Brand: Acme Outdoors")
    assert "Voice: A seasoned trail guide who has seen it all and still loves it" in system
    assert "Tone: warm, plain-spoken, never pushy" in system
    assert "Audience: weekend hikers in their thirties" in system
    assert "- Short sentences.\n- Say 'you', not 'customers'." in system
    assert 'Words to avoid (never use them): "synergy", "best-in-class"' in system
    assert "The trail doesn't care about your inbox." in system
    assert rendered[1] == {"role": "user", "content": "About boots"}


def test_a_brand_is_a_system_message_of_its_own_when_the_template_has_none(brand):
    v = version([{"role": "user", "content": "Hello"}])
    rendered = render_messages(v, {}, brand)
    assert rendered[0]["role"] == "system"
    assert "Voice: A seasoned trail guide" in rendered[0]["content"]
    assert rendered[1] == {"role": "user", "content": "Hello"}


def test_a_template_can_place_the_brand_itself(brand):
    v = version(
        [
            {
                "role": "system",
                "content": "Rules first.{% if brand %} Sound like {{ brand.name }}: {{ brand.tone }}.{% endif %}",
            },
            {"role": "user", "content": "Go"},
        ]
    )
    with_brand = render_messages(v, {}, brand)
    assert with_brand[0]["content"] == "Rules first. Sound like Acme Outdoors: warm, plain-spoken, never pushy."
    assert render_messages(v, {}, None)[0]["content"] == "Rules first."


def test_without_a_brand_the_messages_are_only_the_template():
    v = version(
        [{"role": "system", "content": "S {{ n }}"}, {"role": "user", "content": "U"}],
        [{"name": "n", "type": "integer"}],
    )
    assert render_messages(v, {"n": 2}, None) == [
        {"role": "system", "content": "S 2"},
        {"role": "user", "content": "U"},
    ]


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ topic.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ tags.append('x') }}",
        "{{ 'a' * 100000000 }}",
        # Every other way a short template builds a huge string (100-200 MB each before they were bounded).
        "{{ 'a'|center(200000000) }}",
        "{{ 'a'|indent(200000000) }}",
        "{{ '%200000000s' % 'a' }}",
        "{{ '%.200000000f' % 1 }}",
        "{{ '%*s' % (200000000, 'a') }}",
        "{{ '%200000000s'|format('a') }}",
        "{{ '{:>200000000}'.format('a') }}",
        "{{ '{:{w}}'.format('a', w=200000000) }}",
        "{{ '{0:>200000000}'.format_map({}) }}",
        "{{ 'a'.ljust(200000000) }}",
        "{{ 'a'.rjust(200000000) }}",
        "{{ 'a'.center(200000000) }}",
        "{{ 'a'.zfill(200000000) }}",
        "{{ '\t'.expandtabs(200000000) }}",
        "{{ ('a' * 100000).replace('a', 'b' * 100000) }}",
        "{{ ('a' * 100000).replace('', 'bb') }}",
        "{{ lipsum(20000) }}",
        # A caller's variable passed on as a width.
        "{{ 'a'|center(topic|int) }}",
    ],
)
def test_the_sandbox_refuses_internals_with_a_400(source):
    v = version(
        [{"role": "user", "content": source}], [{"name": "topic", "type": "string"}, {"name": "tags", "type": "array"}]
    )
    with pytest.raises(PromptTemplateError) as caught:
        render_messages(v, {"topic": "200000000", "tags": []}, None)
    assert isinstance(caught.value, ApplicationError)
    assert caught.value.status_code == 400


@pytest.mark.parametrize(
    ("source", "given"),
    [
        # Each a plausible template whose output a caller's values multiply: 10-16 million characters here, and
        # as many gigabytes as a 2.5 MB body can ask for (count 100,000; a topic of a megabyte).
        ("{% for i in range(count) %}{{ topic }}{% endfor %}", {"count": 1_000}),
        ("{% for a in tags %}{% for b in tags %}{{ topic }}{% endfor %}{% endfor %}", {"tags": ["a"] * 40}),
        ("{{ tags|join(topic) }}", {"tags": ["a"] * 1_001}),
        ("{{ topic.join(tags) }}", {"tags": ["a"] * 1_001}),
    ],
)
def test_a_callers_values_cannot_grow_a_message_past_its_bound(source, given):
    v = version(
        [{"role": "user", "content": source}],
        [
            {"name": "topic", "type": "string"},
            {"name": "count", "type": "integer", "default": 1},
            {"name": "tags", "type": "array", "default": []},
        ],
    )
    with pytest.raises(PromptTemplateError) as caught:
        render_messages(v, variables_resolve(v, {"topic": "x" * 10_000, **given}), None)
    assert caught.value.status_code == 400
    assert "more than 8,000,000 characters" in caught.value.message


def test_a_loop_within_the_bound_renders():
    v = version(
        [{"role": "user", "content": "{% for t in tags %}- {{ t }}\n{% endfor %}{{ tags|join(', ') }}"}],
        [{"name": "tags", "type": "array"}],
    )
    rendered = render_messages(v, {"tags": ["a", "b"]}, None)[0]["content"]
    assert rendered == "- a\n- b\na, b"


@pytest.mark.parametrize(
    ("source", "rendered"),
    [
        ("{{ '%5.2f' % 3.14159 }}", " 3.14"),
        ("{{ '%(n)03d' % {'n': 7} }}", "007"),
        ("{{ '%s and %s'|format('a', 'b') }}", "a and b"),
        ("{{ '{:>6}|{:,.1f}'.format('ab', 1234.5) }}", "    ab|1,234.5"),
        ("{{ 'ab'|center(6) }}|{{ 'x'.ljust(3) }}|{{ '7'.zfill(3) }}", "  ab  |x  |007"),
        ("{{ 'a b'|replace(' ', '-') }}", "a-b"),
        ("{{ 'line\nnext'|indent(2) }}", "line\n  next"),
        ("{{ lipsum(2, html=False)|wordcount > 20 }}", "True"),
        # Within the bounds on work: loops, integers and joined strings a prompt uses.
        ("{% for x in ['a', 'b'] %}{{ loop.index }}/{{ loop.length }}{{ x }} {% else %}none{% endfor %}", "1/2a 2/2b "),
        ("{% for x in [] %}x{% else %}none{% endfor %}", "none"),
        ("{% for x in [{'n': 1, 'c': [{'n': 2, 'c': []}]}] recursive %}{{ x.n }}{{ loop(x.c) }}{% endfor %}", "12"),
        (
            "{{ 2 ** 64 }} {{ 12 * 12 }} {{ 'a' ~ 1 }} {{ 'a' + 'b' }} {{ [1] + [2] }}",
            "18446744073709551616 144 a1 ab [1, 2]",
        ),
        # Lists, dicts and namespaces a prompt builds, within the bound on what they print.
        (
            "{% set ns = namespace(n=0, seen=[]) %}{% for x in ['a', 'b'] %}{% set ns.n = ns.n + 1 %}"
            "{% set ns.seen = ns.seen + [x] %}{% endfor %}{{ ns.n }} {{ ns.seen }} {{ {'k': (1, [2])} }} "
            "{{ dict(a=1)|tojson }} {{ [1, 2, 3]|batch(2, 0)|list }}",
            "2 ['a', 'b'] {'k': (1, [2])} {\"a\": 1} [[1, 2], [3, 0]]",
        ),
        (
            "{% macro shown(ns) %}{{ ns.v }}{% endmacro %}{% for i in [1] %}{% set ns = namespace(v=i) %}"
            "{{ shown(ns) }}{% endfor %}",
            "1",
        ),
    ],
)
def test_the_sandbox_still_formats_within_its_bounds(source, rendered):
    v = version([{"role": "user", "content": source}])
    assert render_messages(v, {}, None)[0]["content"] == rendered


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("{{ missing }}", "'missing' is undefined"),
        ("{% for x in %}", "does not compile"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        # Python's stack ends these (a RecursionError, which was a 500).
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses too deep"),
        ("{% for x in [[1]] recursive %}{{ loop([x]) }}{% endfor %}", "recurses too deep"),
        # Work that prints nothing: no bound on the output stops it (a chain of ``**`` ran past a minute).
        ("{{ ((10 ** 100) ** 100) ** 100 }}", "an integer larger than"),
        (
            "{% set ns = namespace(x=10 ** 90) %}{% for i in range(20) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
            "an integer larger than",
        ),
        (
            "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
            "loops run more than 100,000 times",
        ),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(24) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "longer than 8,000,000",
        ),
        (
            "{% set ns = namespace(s=[1]) %}{% for i in range(24) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
            "8,000,000 characters",  # a list of 2,000,000 numbers already prints as more
        ),
        ("{% for i in range(700) %}{% set y = 'a' * 100000 %}{% endfor %}", "builds more than 64,000,000"),
        # A list of the same list twice doubles what it prints each round while holding a few small lists (40
        # rounds: terabytes, when printed or compared): refused when built, past what a message may print. (Printed
        # or compared, 22 rounds: before the bound, tens of megabytes, refused only once printed, or rendered.)
        *(
            (
                f"{{% set ns = namespace(l=[1]) %}}{{% for i in range({rounds}) %}}{{% set ns.l = {doubled} %}}"
                f"{{% endfor %}}{end}",
                "a list, tuple or dict that prints as more than 8,000,000 characters",
            )
            for rounds, doubled, end in [
                (22, "[ns.l, ns.l]", "{{ ns.l }}"),
                (40, "[ns.l, ns.l]", "{{ ns.l|length }}"),
                (40, "(ns.l, ns.l)", ""),
                (40, "{'a': ns.l, 'b': ns.l}", ""),
                (40, "dict(a=ns.l, b=ns.l)", ""),
                (40, "cycler(ns.l, ns.l).items", ""),
                (40, "[ns.l]|batch(2, ns.l)|list", ""),
                (40, "[1, 2]|map(attribute='x', default=ns.l)|list", ""),
                (40, "[ns.l] + [ns.l]", ""),
                (40, "[ns.l] * 2", ""),
            ]
        ),
        (
            "{% set a = namespace(l=[1]) %}{% set b = namespace(l=[1]) %}{% for i in range(22) %}"
            "{% set a.l = [a.l, a.l] %}{% set b.l = [b.l, b.l] %}{% endfor %}{{ a.l == b.l }}",
            "prints as more than 8,000,000 characters",
        ),
        # What a namespace holds changes after the list holding it was weighed.
        ("{% set a = namespace(l=1) %}{% set b = namespace(x=[a, a]) %}", "a namespace inside a list"),
        ("{% set a = namespace(l=1) %}{% set b = namespace() %}{% set b.x = a %}", "a namespace inside"),
        (
            "{% set n = namespace(v=1) %}{% for i in range(40) %}{% set n = namespace(a=n, b=n) %}{% endfor %}",
            "a namespace inside",
        ),
    ],
)
def test_a_template_error_is_a_400_saying_what_went_wrong(source, words):
    v = version([{"role": "system", "content": "fine"}, {"role": "user", "content": source}])
    with pytest.raises(PromptTemplateError) as caught:
        render_messages(v, {}, None)
    assert caught.value.status_code == 400
    assert "message 2" in caught.value.message
    assert words in caught.value.message
