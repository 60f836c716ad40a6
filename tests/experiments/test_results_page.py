"""The staff results page /experiments/<id>/results/ and the index /experiments/: every figure
``experiment_results`` returns is on the page (and the page's figures are the ledger's and the feedback's),
the charts' data is the same figures, only roles that manage experiments get in, and "Promote" works."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from typing import Any

import pytest
import time_machine
from django.test import Client
from django.utils.html import escape

from accounts.roles import Role, role_set
from audit.models import AuditEvent
from billing.models import UsageStatus
from experiments.models import ExperimentStatus, Feedback, FeedbackMetric, Metric
from experiments.results import experiment_results
from experiments.views import charts_data, difference, figure, interval
from tests.experiments.conftest import operator_signed_in
from tests.factories import UsageRecordFactory, UserFactory

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)


class Cells(HTMLParser):
    """Every element with ``data-field``, keyed by (metric section, variant row, field): its ``data-raw``
    and its text; plus the page's scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str, str], dict[str, str]] = {}
        self.scripts: list[dict[str, str | None]] = []
        self._metric = ""
        self._variant = ""
        self._day = ""
        self._open: list[list[Any]] = []  # [key, depth, text parts]
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts.append(a)
        if tag in ("br", "input", "meta", "link", "img"):
            return
        self._depth += 1
        if tag == "section" and "data-metric" in a:
            self._metric = a["data-metric"] or ""
        if tag == "section" and "data-metric" not in a:
            self._metric = ""
        if tag == "tr":
            self._variant = a.get("data-variant") or ""
            self._day = a.get("data-day") or ""
        if "data-field" in a:
            context = self._metric or (f"day:{self._day}" if self._day else "")
            key = (context, a.get("data-variant") or self._variant, a["data-field"] or "")
            self.cells[key] = {"raw": a.get("data-raw") or "", "text": ""}
            self._open.append([key, self._depth])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("br", "input", "meta", "link", "img"):
            return
        while self._open and self._open[-1][1] >= self._depth:
            self._open.pop()
        self._depth -= 1

    def handle_data(self, data: str) -> None:
        for key, _ in self._open:
            self.cells[key]["text"] += data


def parse(html: str) -> Cells:
    parser = Cells()
    parser.feed(html)
    return parser


def text(cells: Cells, metric: str, variant: str, field: str) -> str:
    return " ".join(cells.cells[(metric, variant, field)]["text"].split())


def raw(cells: Cells, metric: str, variant: str, field: str) -> str:
    return cells.cells[(metric, variant, field)]["raw"]


@pytest.fixture
def seeded(ab_experiment):
    """A running 50/50 experiment with a known history, three days old.

    control: 4 served (cost $0.001 each, 100–400 ms), 1 upstream error, 1 rejected; thumbs on 4: 2 up.
    treatment: 4 served (cost $0.002 each, 200–800 ms, streamed: ttft 50–200 ms); thumbs on 4: 3 up; a score of 4.5.
    """
    with time_machine.travel(NOW - timedelta(days=3), tick=False):
        ab = ab_experiment(name="tone-test")
    ab.experiment.starts_at = NOW - timedelta(days=3)
    ab.experiment.save(update_fields=["starts_at"])
    users = [UserFactory(username=f"u{i}") for i in range(6)]
    rows: dict[str, list[Any]] = {"control": [], "treatment": []}

    def row(variant, user, day, **fields):
        record = UsageRecordFactory(
            user=user,
            model_name=ab.model.name,
            experiment_id=ab.experiment.pk,
            experiment_variant_id=variant.pk,
            created_at=NOW - timedelta(days=day, hours=1),
            **fields,
        )
        rows[variant.name].append(record)
        return record

    for i in range(4):
        row(ab.control, users[i % 3], day=i % 2, cost=Decimal("0.001"), duration_ms=100 * (i + 1))
        row(
            ab.treatment,
            users[3 + i % 3],
            day=i % 3,
            cost=Decimal("0.002"),
            duration_ms=200 * (i + 1),
            stream=True,
            ttft_ms=50 * (i + 1),
        )
    row(ab.control, users[0], day=0, status=UsageStatus.UPSTREAM_ERROR, cost=Decimal("0"), duration_ms=50)
    row(ab.control, users[1], day=0, status=UsageStatus.REJECTED, cost=Decimal("0"), duration_ms=1)
    for name, ups in (("control", 2), ("treatment", 3)):
        for index, record in enumerate(rows[name][:4]):
            Feedback.objects.create(
                request_id=record.request_id,
                user=record.user,
                metric=FeedbackMetric.THUMBS,
                value=1 if index < ups else -1,
            )
    Feedback.objects.create(
        request_id=rows["treatment"][0].request_id, user=users[3], metric=FeedbackMetric.SCORE, value=4.5
    )
    return ab


def page_of(client: Client, ab) -> str:
    with time_machine.travel(NOW, tick=False):
        response = client.get(f"/experiments/{ab.experiment.pk}/results/")
    assert response.status_code == 200
    return response.content.decode()


def test_the_page_shows_every_figure_of_the_results_json(seeded):
    """The page and GET /api/experiments/{id}/results/ agree, figure by figure."""
    client = operator_signed_in()
    html = page_of(client, seeded)
    with time_machine.travel(NOW, tick=False):
        response = client.get(f"/api/experiments/{seeded.experiment.pk}/results/")
    assert response.status_code == 200
    results = response.json()
    cells = parse(html)

    shown = 0
    for spec in results["metrics"]:
        key = spec["key"]
        for variant in results["variants"]:
            name = variant["name"]
            figures = variant["metrics"].get(key) or {}
            assert text(cells, key, name, "value") == figure(key, figures.get("value")), (key, name)
            assert text(cells, key, name, "interval") == interval(key, figures.get("interval")), (key, name)
            if figures.get("n") is not None:
                assert raw(cells, key, name, "n") == str(figures["n"])
                assert text(cells, key, name, "n") == f"{figures['n']:,}"
            for percentile in ("p50", "p95"):
                if percentile in figures:
                    assert text(cells, key, name, percentile) == f"P{percentile[1:]} {figure(key, figures[percentile])}"
                    bounds = interval(key, figures.get(f"{percentile}_interval"))
                    assert text(cells, key, name, f"{percentile}_interval") == f"({bounds})"
            comparison = variant["comparisons"].get(key)
            if comparison:
                assert text(cells, key, name, "difference") == difference(key, comparison["difference"])
                assert text(cells, key, name, "difference_interval") == interval(
                    key, comparison["interval"], of_difference=True
                )
                assert raw(cells, key, name, "verdict") == comparison["verdict"]
                if comparison["verdict"] == "unknown" and comparison.get("samples_needed"):
                    assert f"about {comparison['samples_needed']:,} more samples" in text(cells, key, name, "verdict")
                shown += 1
            shown += 1
        assert f'<h2 id="metric-{key}-heading">{spec["label"]}' in html
    assert shown >= 2 * len(Metric)  # a row per variant and metric, and comparisons on top
    for variant in results["variants"]:
        assert raw(cells, "", variant["name"], "requests") == str(variant["requests"])
        assert raw(cells, "", variant["name"], "users") == str(variant["users"])
        for status, count in variant["statuses"].items():
            assert raw(cells, "", variant["name"], f"status-{status}") == str(count)
    for series in results["series"]["variants"]:
        for index, day in enumerate(results["series"]["days"]):
            assert raw(cells, f"day:{day}", series["name"], "requests") == str(series["requests"][index])
            assert raw(cells, f"day:{day}", series["name"], "rated") == str(series["rated"][index])
            rate = series["positive_rate"][index]
            assert text(cells, f"day:{day}", series["name"], "positive_rate") == figure("positive_rate", rate)
    assert escape(results["method"]) in html
    winner = results["winner"]
    assert (f"Winner: <strong>{winner}</strong>" in html) if winner else ("No winner yet" in html)


def test_the_figures_are_the_ledgers_and_the_feedbacks(seeded):
    """Worked out by hand from the rows the fixture wrote, not from the results code."""
    cells = parse(page_of(operator_signed_in(), seeded))

    assert raw(cells, "", "control", "requests") == "6" and raw(cells, "", "treatment", "requests") == "4"
    assert raw(cells, "", "control", "users") == "3" and raw(cells, "", "treatment", "users") == "3"
    assert raw(cells, "", "control", "status-upstream_error") == "1"
    assert raw(cells, "", "control", "status-rejected") == "1"
    assert text(cells, "positive_rate", "control", "value") == "50.0 %"  # 2 thumbs up of 4
    assert text(cells, "positive_rate", "treatment", "value") == "75.0 %"  # 3 of 4
    assert text(cells, "positive_rate", "treatment", "n") == "4"
    assert text(cells, "positive_rate", "treatment", "difference") == "+25.0 pp"
    assert text(cells, "mean_score", "treatment", "value") == "4.50"
    assert text(cells, "error_rate", "control", "value") == "20.0 %"  # 1 upstream error of 5 (rejected: not counted)
    assert text(cells, "error_rate", "treatment", "value") == "0.0 %"
    assert text(cells, "latency_ms", "control", "value") == "250 ms"  # (100 + 200 + 300 + 400) / 4, served only
    assert text(cells, "latency_ms", "treatment", "value") == "500 ms"
    assert text(cells, "ttft_ms", "treatment", "value") == "125 ms"
    assert text(cells, "cost", "treatment", "value") == "$0.002"
    assert text(cells, "cost", "control", "value") == "$0.0008"  # $0.004 over 5 rows (the error cost nothing)
    # The mean price over the positive rate (unrated answers are not counted as negative):
    assert text(cells, "cost_per_positive", "control", "value") == "$0.0016"  # $0.0008 / (2 / 4)
    assert text(cells, "cost_per_positive", "treatment", "value") == "$0.002667"  # $0.002 / (3 / 4)


def test_the_charts_draw_the_same_figures_from_embedded_json_without_inline_script(seeded):
    html = page_of(operator_signed_in(), seeded)
    with time_machine.travel(NOW, tick=False):
        results = experiment_results(seeded.refresh().experiment)

    embedded = re.search(r'<script id="experiment-charts" type="application/json">(.*?)</script>', html, re.S)
    assert embedded is not None
    charts = json.loads(embedded.group(1))
    assert charts == json.loads(json.dumps(charts_data(results)))
    assert charts["primary"]["key"] == "positive_rate"
    assert charts["primary"]["values"] == [0.5, 0.75]
    assert charts["cost_per_positive"]["values"] == [pytest.approx(0.0016), pytest.approx(0.002 / 0.75)]
    assert sum(sum(s["requests"]) for s in charts["daily"]["variants"]) == 10
    for chart_id in ("chart-primary", "chart-cost-per-positive", "chart-daily"):
        assert f'<canvas id="{chart_id}"' in html
    scripts = parse(html).scripts
    assert {"src": "/static/vendor/chartjs/chart.umd.min.js"} in scripts
    assert {"src": "/static/experiments/results.js"} in scripts
    # Every script is a file or data: nothing inline to run, no CDN.
    assert all(s.get("src", "").startswith("/static/") or s.get("type") == "application/json" for s in scripts)
    csv_link = f"/api/experiments/{seeded.experiment.pk}/results/?format=csv"
    assert f'href="{csv_link}"' in html


def test_the_csv_link_downloads_the_results(seeded):
    client = operator_signed_in()
    html = page_of(client, seeded)
    link = re.search(r'id="csv-export"', html) and re.search(r'href="([^"]+)" id="csv-export"', html).group(1)

    response = client.get(link)

    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    body = b"".join(response.streaming_content).decode()
    assert "positive_rate" in body and "treatment" in body and "control" in body


def test_only_roles_that_manage_experiments_get_the_pages(seeded):
    results_url = f"/experiments/{seeded.experiment.pk}/results/"
    promote_url = f"/experiments/{seeded.experiment.pk}/promote/"
    anonymous = Client()
    for url in ("/experiments/", results_url):
        response = anonymous.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    member = UserFactory(username="mia")
    role_set(member, Role.MEMBER)
    client = Client()
    client.force_login(member)
    assert client.get("/experiments/").status_code == 403
    assert client.get(results_url).status_code == 403
    assert client.post(promote_url, {"variant": "treatment"}).status_code == 403
    seeded.treatment.refresh_from_db()
    assert seeded.treatment.allocation == Decimal("50")

    admin = UserFactory(username="ada", is_superuser=True, is_staff=True)
    client.force_login(admin)
    assert client.get(results_url).status_code == 200
    assert operator_signed_in().get("/experiments/").status_code == 200
    assert client.get(f"/experiments/{seeded.experiment.pk + 1000}/results/").status_code == 404


def test_the_index_lists_experiments_with_status_and_links(seeded, ab_experiment):
    draft = ab_experiment(name="draft-one", model_name="other-model", status="draft")
    html = operator_signed_in().get("/experiments/").content.decode()

    assert html.index('data-experiment="draft-one"') < html.index('data-experiment="tone-test"')  # newest first
    for ab, status in ((seeded, "Running"), (draft, "Draft")):
        row = re.search(rf'<tr data-experiment="{ab.experiment.name}">(.*?)</tr>', html, re.S).group(1)
        assert f">{status}<" in row and ab.model.name in row
        assert f'href="/experiments/{ab.experiment.pk}/results/"' in row
        assert f'href="/admin/experiments/experiment/{ab.experiment.pk}/change/"' in row
        assert "control (control) 50 % · treatment 50 %" in row


def test_promote_from_the_page(seeded):
    client = operator_signed_in()
    html = page_of(client, seeded)
    assert 'name="variant" value="treatment"' in html and "Promote treatment" in html
    assert 'data-confirm="Promote treatment?' in html
    assert client.get(f"/experiments/{seeded.experiment.pk}/promote/").status_code == 405

    response = client.post(f"/experiments/{seeded.experiment.pk}/promote/", {"variant": "treatment"}, follow=True)

    assert response.redirect_chain == [(f"/experiments/{seeded.experiment.pk}/results/", 302)]
    page = response.content.decode()
    assert "treatment promoted: it now serves 100 % of ab-model&#x27;s traffic." in page
    assert '<span class="badge">treatment promoted</span>' in page
    seeded.refresh()
    assert seeded.experiment.promoted_variant == seeded.treatment
    assert (seeded.treatment.allocation, seeded.control.allocation) == (Decimal("100"), Decimal("0"))
    event = AuditEvent.objects.get(action="experiment.promote")
    assert event.actor_repr == "olga" and event.target_id == str(seeded.experiment.pk)
    # Another name than a variant's is a 404, and nothing changes.
    assert client.post(f"/experiments/{seeded.experiment.pk}/promote/", {"variant": "nope"}).status_code == 404


def test_promoting_in_a_paused_experiment_says_it_serves_once_resumed_not_now(seeded):
    seeded.experiment.status = ExperimentStatus.PAUSED
    seeded.experiment.save()

    response = operator_signed_in().post(
        f"/experiments/{seeded.experiment.pk}/promote/", {"variant": "treatment"}, follow=True
    )

    page = response.content.decode()
    assert "it now serves" not in page  # a paused experiment assigns nobody
    assert "treatment promoted: it serves 100 % of ab-model&#x27;s traffic once the experiment is resumed" in page
    seeded.refresh()
    assert seeded.experiment.promoted_variant == seeded.treatment


def test_promote_needs_the_csrf_token(seeded):
    user = UserFactory(username="olga2")
    role_set(user, Role.OPERATOR)
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)

    response = client.post(f"/experiments/{seeded.experiment.pk}/promote/", {"variant": "treatment"})

    assert response.status_code == 403
    seeded.refresh()
    assert seeded.experiment.promoted_variant is None


def test_a_draft_without_data_renders_without_figures_or_promote_buttons(ab_experiment):
    draft = ab_experiment(name="not-yet", status="draft")

    html = operator_signed_in().get(f"/experiments/{draft.experiment.pk}/results/").content.decode()

    cells = parse(html)
    assert "No winner yet" in html and "Promote" not in html
    assert raw(cells, "", "control", "requests") == "0"
    assert text(cells, "positive_rate", "treatment", "value") == "—"
    assert text(cells, "positive_rate", "treatment", "verdict") in ("No data to compare", "Not yet known")
    charts = json.loads(
        re.search(r'<script id="experiment-charts" type="application/json">(.*?)</script>', html).group(1)
    )
    assert charts["primary"]["values"] == [None, None] and charts["daily"]["days"] == []
