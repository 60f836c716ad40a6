"""A variant's overrides with a NUL character in a value (``"stop": "a\\u0000b"``, or inside a ``response_format``'s
schema) are refused in the admin, naming the parameter, as every other value a variant may not set: PostgreSQL's
``jsonb`` cannot hold U+0000, and until 7 December saving them was its ``DataError``, a server error (SQLite stored
them). ``overrides_validate`` is the admin's and the API's one check."""

from __future__ import annotations

import pytest

from experiments.models import ExperimentStatus
from experiments.overrides import overrides_validate
from tests.experiments.test_experiments_admin import (  # noqa: F401  (operator_client is a fixture)
    change_url,
    operator_client,
    post_change,
    variant_prefix,
)

pytestmark = pytest.mark.django_db

SCHEMA_WITH_NUL = '{"response_format": {"type": "json_schema", "json_schema": {"name": "a\\u0000"}}}'


@pytest.mark.parametrize("overrides", ['{"stop": "a\\u0000b"}', '{"stop": ["ok", "\\u0000"]}', SCHEMA_WITH_NUL])
def test_a_variant_override_with_a_nul_is_refused_naming_it(operator_client, ab_experiment, overrides):  # noqa: F811
    ab = ab_experiment(status=ExperimentStatus.DRAFT, control=50, treatment=50)
    page = operator_client.get(change_url(ab.experiment))

    response = post_change(
        operator_client, ab.experiment, **{f"{variant_prefix(page, 'treatment')}-overrides": overrides}
    )

    assert b"errorlist" in response.content and b"NUL" in response.content
    ab.refresh()
    assert ab.treatment.overrides == {}


def test_the_check_names_the_parameter():
    with pytest.raises(Exception) as refused:
        overrides_validate({"temperature": 0.2, "stop": ["fine", "a\x00"]})
    assert list(refused.value.message_dict) == ["stop"]
