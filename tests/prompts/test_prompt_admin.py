"""The prompts admin through Django's test client as a superuser: editing a template makes a new version and
leaves the old one byte-identical, versions are read-only, labels move through the service, the diff view
renders, brands are edited (issue 12, part 4)."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from accounts.roles import Role, role_set
from audit.models import AuditEvent
from prompts.models import BrandProfile, PromptLabel, PromptTemplate, PromptVersion
from prompts.services import prompt_label_set, prompt_version_create
from tests.audit.conftest import admin_submit, form_fields
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

MESSAGES = [
    {"role": "system", "content": "You write posts for {{ platform }}."},
    {"role": "user", "content": "Write about {{ topic }}.\nKeep it short."},
]
VARIABLES = [
    {"name": "topic", "type": "string", "example": "boots"},
    {"name": "platform", "type": "string", "default": "X"},
]


@pytest.fixture
def template(root) -> PromptTemplate:
    template = PromptTemplate.objects.create(slug="post", description="A post")
    version = prompt_version_create(
        template=template,
        messages=MESSAGES,
        variables=VARIABLES,
        output_schema={"type": "object", "properties": {"text": {"type": "string"}}},
        field_limits={"text": 280},
        note="first",
    )
    prompt_label_set(template=template, name="production", version=version)
    return template


def change_url(template: PromptTemplate) -> str:
    return reverse("admin:prompts_prompttemplate_change", args=[template.pk])


def stored(version: PromptVersion) -> tuple:
    row = PromptVersion.objects.filter(pk=version.pk).values().get()
    return tuple((key, json.dumps(value, sort_keys=True, default=str)) for key, value in sorted(row.items()))


def test_the_change_page_is_prefilled_from_the_newest_version(admin_client, template):
    fields = form_fields(admin_client.get(change_url(template)).content.decode())
    assert fields["messages"] == (
        "### system\nYou write posts for {{ platform }}.\n\n### user\nWrite about {{ topic }}.\nKeep it short."
    )
    assert json.loads(fields["variables"]) == VARIABLES
    assert json.loads(fields["field_limits"]) == {"text": 280}


def test_editing_makes_a_new_version_and_leaves_the_old_one_byte_identical(admin_client, root, template):
    first = template.versions.get()
    before = stored(first)
    new_messages = "### system\nYou write posts for {{ platform }}. Be brief.\n\n### user\nWrite about {{ topic }}."
    admin_submit(
        admin_client, change_url(template), messages=new_messages, field_limits='{"text": 200}', note="shorter"
    )
    assert stored(first) == before
    second = template.versions.get(number=2)
    assert second.messages == [
        {"role": "system", "content": "You write posts for {{ platform }}. Be brief."},
        {"role": "user", "content": "Write about {{ topic }}."},
    ]
    assert second.field_limits == {"text": 200}
    assert (second.note, second.created_by) == ("shorter", root)
    assert PromptLabel.objects.get(name="production").version == first  # labels move only when asked
    event = AuditEvent.objects.filter(action="prompt.version_create").latest("seq")
    assert event.actor_id == str(root.pk) and event.changes["number"] == [1, 2]


def test_saving_unchanged_makes_no_version(admin_client, template):
    admin_submit(admin_client, change_url(template), description="A post, edited")
    assert template.versions.count() == 1
    assert PromptTemplate.objects.get(pk=template.pk).description == "A post, edited"


def test_a_new_version_can_take_labels_on_save(admin_client, template):
    admin_submit(
        admin_client,
        change_url(template),
        messages="### user\nWrite about {{ topic }} on {{ platform }}.",
        labels_to_new="production, staging",
    )
    assert {label.name: label.version.number for label in PromptLabel.objects.all()} == {"production": 2, "staging": 2}


def test_a_version_that_does_not_render_is_refused_on_the_form(admin_client, template):
    page = admin_client.get(change_url(template))
    data = form_fields(page.content.decode())
    data["messages"] = "### user\n{{ ''.__class__ }}"
    response = admin_client.post(change_url(template), data)
    assert response.status_code == 200
    assert "sandbox refuses" in response.content.decode()
    data["messages"] = "### user\nAbout {{ topic }}.{% if platform == 'LinkedIn' %} For {{ audiance }}.{% endif %}"
    refused = admin_client.post(change_url(template), data).content.decode()
    assert "reads `audiance`, which is not a declared variable" in refused
    data["messages"] = "no heading"
    assert "Start each message with a heading line" in admin_client.post(change_url(template), data).content.decode()
    # A macro calling itself for ever: Python's stack ends it (a RecursionError, which was a 500 page).
    data["messages"] = "### user\n{% macro again() %}{{ again() }}{% endmacro %}{{ again() }}"
    refused = admin_client.post(change_url(template), data)
    assert refused.status_code == 200 and "recurses too deep" in refused.content.decode()
    # Loops that print nothing, run by the save check in the admin's web worker: bounded, a form error.
    data["messages"] = "### user\n{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}Hi"
    refused = admin_client.post(change_url(template), data)
    assert refused.status_code == 200 and "loops run more than 100,000 times" in refused.content.decode()
    assert template.versions.count() == 1


def test_a_new_template_gets_version_1(admin_client):
    admin_submit(
        admin_client,
        reverse("admin:prompts_prompttemplate_add"),
        slug="fresh",
        kind="custom",
        messages="### user\nHello {{ name }}",
        variables='[{"name": "name", "type": "string"}]',
        output_schema="",
        field_limits="{}",
    )
    version = PromptTemplate.objects.get(slug="fresh").versions.get()
    assert version.number == 1 and version.output_schema is None


def test_labels_are_edited_inline_through_the_service(admin_client, template):
    second = prompt_version_create(
        template=template, messages=[{"role": "user", "content": "v2 {{ topic }}"}], variables=VARIABLES
    )
    page = form_fields(admin_client.get(change_url(template)).content.decode())
    production = PromptLabel.objects.get(name="production")
    index = next(i for i in range(5) if page.get(f"labels-{i}-id") == str(production.pk))
    admin_submit(admin_client, change_url(template), **{f"labels-{index}-version": str(second.pk)})
    assert PromptLabel.objects.get(name="production").version == second
    assert AuditEvent.objects.filter(action="prompt.label_set").latest("seq").changes["version"] == [1, 2]


def test_versions_are_read_only_in_the_admin(admin_client, template):
    version = template.versions.get()
    url = reverse("admin:prompts_promptversion_change", args=[version.pk])
    page = admin_client.get(url).content.decode()
    assert "You write posts for {{ platform }}." in page
    assert 'name="_save"' not in page
    before = stored(version)
    admin_client.post(url, {"messages": "[]", "note": "tampered"})
    assert stored(version) == before
    assert admin_client.get(reverse("admin:prompts_promptversion_add")).status_code == 403
    assert admin_client.get(reverse("admin:prompts_promptversion_delete", args=[version.pk])).status_code == 403


def test_the_diff_view_shows_what_changed_between_two_versions(admin_client, template):
    prompt_version_create(
        template=template,
        messages=[MESSAGES[0], {"role": "user", "content": "Write about {{ topic }} <b>today</b>.\nKeep it short."}],
        variables=VARIABLES,
        output_schema={"type": "object", "properties": {"text": {"type": "string"}}},
        field_limits={"text": 250},
        note="today",
    )
    change_page = admin_client.get(change_url(template)).content.decode()
    compare = reverse("admin:prompts_prompttemplate_compare", args=[template.pk])
    assert f'href="{compare}?a=1&amp;b=2"' in change_page
    assert "compare v1 with v2" in change_page

    side = admin_client.get(compare, {"a": 1, "b": 2}).content.decode()
    assert "v1 (first) → v2 (today)" in side
    assert "Messages — unchanged" not in side and "Variables — unchanged" in side
    assert "Field limits — unchanged" not in side
    assert "&lt;b&gt;today&lt;/b&gt;" in side and "<b>today</b>" not in side  # escaped, never markup
    assert 'class="diff"' in side

    unified = admin_client.get(compare, {"a": 1, "b": 2, "view": "unified"}).content.decode()
    assert '<span class="diff-del">-Write about {{ topic }}.</span>' in unified
    assert '<span class="diff-add">+Write about {{ topic }} &lt;b&gt;today&lt;/b&gt;.</span>' in unified
    assert '<span class="diff-del">-  &quot;text&quot;: 280</span>' in unified
    assert '<span class="diff-add">+  &quot;text&quot;: 250</span>' in unified


def test_the_template_pages_read_no_more_versions_content_than_they_show(admin_client, template):
    # It shows each template's newest version number and its labels, and read every version of every
    # template of the page (100 a page), content and all, and each labelled version again.
    big = [{"role": "system", "content": "Keep it short. " * 4_000}, {"role": "user", "content": "{{ topic }}"}]
    for _ in range(10):
        prompt_version_create(template=template, messages=big, variables=VARIABLES)
    prompt_label_set(template=template, name="staging", version=template.versions.get(number=4))

    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(reverse("admin:prompts_prompttemplate_changelist")).content.decode()

    assert "v11" in page and "production → v1, staging → v4" in page
    assert content_rows_read(queries) == 0

    # The versions' list shows their names, numbers and notes: no content.
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(reverse("admin:prompts_promptversion_changelist")).content.decode()
    assert "post v11" in page and "post v1<" in page
    assert content_rows_read(queries) == 0

    # Its page shows the newest version's content and lists the versions: one version's content read.
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(change_url(template)).content.decode()
    assert "compare v10 with v11" in page
    assert content_rows_read(queries) == 1


def content_rows_read(queries: CaptureQueriesContext) -> int:
    """How many rows the captured queries read with a version's messages (run again to count them)."""
    read = [q["sql"] for q in queries.captured_queries if '"messages"' in q["sql"]]
    with connection.cursor() as cursor:
        return sum(len(cursor.execute(sql).fetchall()) for sql in read)


def test_a_large_rewrite_is_compared_unified_not_side_by_side(admin_client, template):
    # difflib's side-by-side table pairs every changed line with every other of its block to mark what
    # changed within them: 54 s for a rewritten block of 500 lines, 145 s for 1,000, the page's worker held.
    def lines(word: str) -> str:
        return "\n".join(f"{word} line {n}: {' '.join(word[::-1] * (n % 5 + 1) for _ in range(6))}" for n in range(60))

    old = prompt_version_create(
        template=template, messages=[{"role": "system", "content": lines("keep")}], output_schema={"type": "object"}
    )
    new = prompt_version_create(
        template=template, messages=[{"role": "system", "content": lines("swap")}], output_schema={"type": "array"}
    )
    compare = reverse("admin:prompts_prompttemplate_compare", args=[template.pk])

    page = admin_client.get(compare, {"a": old.number, "b": new.number}).content.decode()

    messages = page[page.index('id="diff-messages"') : page.index('id="diff-variables"')]
    assert "too many lines changed together to set side by side" in messages
    assert '<span class="diff-del">-keep line 0: ' in messages and '<span class="diff-add">+swap line 0: ' in messages
    assert 'class="diff"' not in messages
    schema = page[page.index('id="diff-output_schema"') : page.index('id="diff-field_limits"')]
    assert 'class="diff"' in schema  # a small change is still set side by side


@pytest.mark.parametrize(("role", "expected"), [(Role.OPERATOR, 200), (Role.MEMBER, 302), (Role.VIEWER, 302)])
def test_operators_edit_prompts_and_members_are_sent_to_the_login(template, role, expected):
    user = UserFactory(username=f"{role.value}-user")
    role_set(user, role)
    client = Client()
    client.force_login(user)
    compare = reverse("admin:prompts_prompttemplate_compare", args=[template.pk])
    for url in (change_url(template), compare, reverse("admin:prompts_brandprofile_add")):
        assert client.get(url).status_code == expected, url
    if role is Role.OPERATOR:
        admin_submit(client, change_url(template), messages="### user\nOnly {{ topic }} on {{ platform }}")
        assert template.versions.get(number=2).created_by == user


def test_the_prompts_admin_is_for_staff_only(template):
    client = Client()
    client.force_login(UserFactory())
    compare = reverse("admin:prompts_prompttemplate_compare", args=[template.pk])
    for url in (change_url(template), compare, reverse("admin:prompts_brandprofile_changelist")):
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"]


def test_a_brand_is_edited_with_words_to_avoid_one_a_line(admin_client):
    admin_submit(
        admin_client,
        reverse("admin:prompts_brandprofile_add"),
        name="Acme Outdoors",
        slug="acme",
        voice="A trail guide",
        tone="warm",
        words_to_avoid="synergy\n Best-in-class \n\nsynergy",
    )
    brand = BrandProfile.objects.get(slug="acme")
    assert brand.words_to_avoid == ["synergy", "Best-in-class"]
    assert AuditEvent.objects.filter(action="prompt.brand_create").exists()
    url = reverse("admin:prompts_brandprofile_change", args=[brand.pk])
    assert form_fields(admin_client.get(url).content.decode())["words_to_avoid"] == "synergy\nBest-in-class"
    admin_submit(admin_client, url, tone="warmer")
    change = AuditEvent.objects.filter(action="prompt.brand_change").latest("seq")
    assert change.changes == {"tone": ["warm", "warmer"]}


def test_a_templates_page_costs_the_same_queries_however_many_versions_it_lists(admin_client, root, template):
    """Each version's row names who made it: read with the versions, not a query a version (a template edited
    daily for a year lists hundreds)."""
    alice = UserFactory(username="alice")

    def page() -> tuple[int, str]:
        with CaptureQueriesContext(connection) as queries:
            answer = admin_client.get(change_url(template))
        assert answer.status_code == 200
        return len(queries), answer.content.decode()

    prompt_version_create(template=template, messages=MESSAGES, variables=VARIABLES, created_by=root, note="2")
    page()  # the first view fills Django's caches: not counted
    few, _ = page()
    for n in range(20):
        by = alice if n % 2 else root
        prompt_version_create(template=template, messages=MESSAGES, variables=VARIABLES, created_by=by, note=f"n{n}")
    many, shown = page()

    assert many == few
    assert shown.count(">alice<") == 10
