"""A ledger row's cost breakdown in the admin (``UsageRecordAdmin.cost_breakdown``) writes every amount as a plain
decimal, as the ledger holds it (10 places), never in Python's scientific notation: a part that costs nothing (no
cached tokens, no cache writes) or less than a millionth of a dollar, and the recorded cost itself, read ``$0E-10``
and ``$1.500E-7`` until 7 December (``str`` of a Decimal quantized to 10 places)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from tests.factories import ModelFactory, UsageRecordFactory

pytestmark = pytest.mark.django_db


def test_a_rows_small_and_zero_amounts_are_written_out(admin_client):
    model = ModelFactory(name="mini", input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
    record = UsageRecordFactory(
        model=model,
        deployment=model.deployments.get(),
        model_name="mini",
        prompt_tokens=1,
        completion_tokens=0,
        cost=Decimal("0.00000015"),
    )

    page = admin_client.get(reverse("admin:billing_usagerecord_change", args=[record.pk])).content.decode()

    assert "input $0.0000001500 (1 tokens at $0.150000/M)" in page
    assert "cached input $0.0000000000 (0 tokens at $0.150000/M)" in page
    assert "cache write $0.0000000000 (0 tokens at $0.150000/M)" in page
    assert "output $0.0000000000 (0 tokens at $0.600000/M) = $0.0000001500." in page
    assert "the recorded cost, $0.0000001500, is what was charged" in page
    assert "E-" not in page.split('class="readonly"', 1)[1].split("</div>", 1)[0]
