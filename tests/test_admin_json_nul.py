"""JSON an admin types with a NUL character in a string or a name (``\\u0000``) is that field's error on the form,
never a server error: PostgreSQL's ``jsonb`` refuses it (``DataError``: "unsupported Unicode escape sequence"), and
until 7 December a model's parameter rules, a prompt template's output schema, field limits or variables so typed
were a 500 there (SQLite stored them). This module runs on PostgreSQL too (the Makefile's ``POSTGRES_TESTS``)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from prompts.models import PromptTemplate
from prompts.services import prompt_version_create
from providers.models import CatalogModel
from tests.audit.conftest import form_fields
from tests.factories import ModelFactory

pytestmark = pytest.mark.django_db

NUL_RULES = '{"fixed": {"user": "a\\u0000b"}}'


def test_a_models_parameter_rules_with_a_nul_are_the_fields_error(admin_client):
    model = ModelFactory(name="mini", parameter_rules={"fixed": {"user": "llmhub"}})
    url = reverse("admin:providers_catalogmodel_change", args=[model.pk])
    data = form_fields(admin_client.get(url).content.decode())

    response = admin_client.post(url, {**data, "parameter_rules": NUL_RULES})

    assert response.status_code == 200
    assert list(response.context["adminform"].form.errors) == ["parameter_rules"]
    assert "NUL" in response.content.decode()
    assert CatalogModel.objects.get(pk=model.pk).parameter_rules == {"fixed": {"user": "llmhub"}}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("output_schema", '{"type": "object", "properties": {"a\\u0000": {"type": "string"}}}'),
        ("field_limits", '{"text\\u0000": 280}'),
        ("variables", '[{"name": "topic", "type": "string", "example": "boo\\u0000ts"}]'),
    ],
)
def test_a_templates_json_with_a_nul_is_the_fields_error(admin_client, field, value):
    template = PromptTemplate.objects.create(slug="post")
    prompt_version_create(
        template=template,
        messages=[{"role": "user", "content": "Write about {{ topic }}."}],
        variables=[{"name": "topic", "type": "string"}],
        output_schema=None,
        field_limits={},
        note="first",
    )
    url = reverse("admin:prompts_prompttemplate_change", args=[template.pk])
    data = form_fields(admin_client.get(url).content.decode())

    response = admin_client.post(url, {**data, field: value})

    assert response.status_code == 200
    assert list(response.context["adminform"].form.errors) == [field]
    assert template.versions.count() == 1
