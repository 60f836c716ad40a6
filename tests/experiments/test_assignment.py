"""Assignment: sticky, deterministic, cached per model, and only while an experiment runs."""

from __future__ import annotations

from collections import Counter

import pytest
from asgiref.sync import async_to_sync

from experiments.assignment import experiment_assign

pytestmark = pytest.mark.django_db


def assign_many(model_id: int, n: int) -> Counter[str | None]:
    assign = async_to_sync(experiment_assign)
    counts: Counter[str | None] = Counter()
    for user in range(n):
        assignment = assign(model_id=model_id, unit=f"user:{user}")
        counts[assignment.header if assignment is not None else None] += 1
    return counts


def test_a_running_experiment_splits_users_by_allocation(ab_experiment):
    ab = ab_experiment(control=30, treatment=20)
    counts = assign_many(ab.model.pk, 4000)
    assert set(counts) == {"ab-test:control", "ab-test:treatment", None}
    assert 0.26 < counts["ab-test:control"] / 4000 < 0.34
    assert 0.16 < counts["ab-test:treatment"] / 4000 < 0.24
