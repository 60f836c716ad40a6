"""The experiments admin, driven through Django's test client: the list, the change page of a draft and of
a running experiment (what is read-only once it runs; allocations through ``experiment_allocation_set``),
the lifecycle actions (each recorded in the audit log) and feedback read-only."""

from __future__ import annotations

from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

import pytest
from django.contrib import messages
from django.contrib.admin.widgets import AdminSplitDateTime
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from accounts.roles import Role, role_set
from audit.models import AuditEvent
from experiments.layout import bucket_of, layout_owner
from experiments.models import AllocationStep, Experiment, ExperimentStatus, Feedback, Variant
from prompts.models import PromptTemplate
from prompts.services import prompt_version_create
from tests.admin_pages import changelist_page
from tests.experiments.conftest import operator_signed_in, tagline_versions
from tests.factories import DeploymentFactory, ModelFactory, UserFactory

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:experiments_experiment_changelist"


def change_url(experiment: Experiment) -> str:
    return reverse("admin:experiments_experiment_change", args=[experiment.pk])


def form_data(response) -> dict[str, Any]:
    """The change form as a browser would post it back unchanged: the main form and every inline."""
    data: dict[str, Any] = {}

    def put(form, prefix_name) -> None:
        for name, field in form.fields.items():
            key = prefix_name(name)
            value = form[name].value()  # as the widget shows it (a pk for a choice, JSON text for JSON)
            if isinstance(field.widget, AdminSplitDateTime):
                if isinstance(value, datetime):
                    data[key + "_0"], data[key + "_1"] = value.date().isoformat(), value.time().isoformat()
                else:
                    data[key + "_0"] = data[key + "_1"] = ""
                continue
            if isinstance(value, bool):
                if value:
                    data[key] = "on"
                continue
            if isinstance(value, date | time):
                value = value.isoformat()
            data[key] = "" if value is None else value

    form = response.context["adminform"].form
    put(form, lambda name: name)
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        for name in formset.management_form.fields:
            data[f"{formset.prefix}-{name}"] = formset.management_form[name].value()
        for child in formset.forms:
            put(child, child.add_prefix)
    return data


def post_change(client: Client, experiment: Experiment, **changes: Any):
    data = form_data(client.get(change_url(experiment)))
    data.update(changes)
    return client.post(change_url(experiment), data, follow=True)


def run_action(client: Client, action: str, *experiments: Experiment) -> list[tuple[int, str]]:
    response = client.post(
        reverse(CHANGELIST), {"action": action, "_selected_action": [e.pk for e in experiments]}, follow=True
    )
    assert response.status_code == 200
    return [(message.level, message.message) for message in response.context["messages"]]


def variant_prefix(response, name: str) -> str:
    for inline in response.context["inline_admin_formsets"]:
        for child in inline.formset.forms:
            if getattr(child.instance, "name", None) == name and isinstance(child.instance, Variant):
                return child.prefix
    raise AssertionError(f"no variant row {name}")


@pytest.fixture
def operator_client() -> Client:
    return operator_signed_in()


def test_the_list_shows_status_model_allocation_and_a_results_link(operator_client, ab_experiment):
    ab = ab_experiment(name="tone-test", control=45, treatment=40)

    response = operator_client.get(reverse(CHANGELIST))

    assert response.status_code == 200
    html = response.content.decode()
    assert "tone-test" in html and "Running" in html and "ab-model" in html
    assert "control (control) 45 % · treatment 40 % · untouched 15 %" in html
    assert f'href="/experiments/{ab.experiment.pk}/results/"' in html


def test_members_and_viewers_have_no_experiments_admin(ab_experiment):
    ab = ab_experiment()
    for role in (Role.MEMBER, Role.VIEWER):
        user = UserFactory(username=f"not-staff-{role}")
        role_set(user, role)
        client = Client()
        client.force_login(user)
        assert client.get(change_url(ab.experiment)).status_code == 302  # the admin's login: not staff


def test_a_running_experiment_keeps_what_serves_its_variants(operator_client, ab_experiment, fake_upstream):
    ab = ab_experiment()
    response = operator_client.get(change_url(ab.experiment))
    form = response.context["adminform"].form
    for name in ("model", "salt", "name", "primary_metric", "alpha", "status"):
        assert name not in form.fields, name
    variants = next(i for i in response.context["inline_admin_formsets"] if i.formset.model is Variant)
    child = variants.formset.forms[0]
    assert "allocation" in child.fields and "deployment" not in child.fields and "name" not in child.fields
    assert not variants.has_add_permission and not variants.has_delete_permission

    # A forged post naming another deployment and another model changes neither.
    other = ab.treatment_deployment
    data = form_data(response)
    data[f"{variant_prefix(response, 'control')}-deployment"] = other.pk
    data["model"] = ab.model.pk + 1000
    operator_client.post(change_url(ab.experiment), data, follow=True)
    ab.refresh()
    assert ab.control.deployment == ab.control_deployment and ab.experiment.model == ab.model


def test_an_allocation_change_of_a_running_experiment_goes_through_the_service(operator_client, ab_experiment):
    ab = ab_experiment(control=10, treatment=10)
    units = [f"user:{n}" for n in range(2000)]
    before = {u: layout_owner(ab.experiment.layout, bucket_of(ab.experiment.salt, u)) for u in units}
    page = operator_client.get(change_url(ab.experiment))

    response = post_change(operator_client, ab.experiment, **{f"{variant_prefix(page, 'treatment')}-allocation": "20"})

    assert response.status_code == 200
    shown = [(m.level, m.message) for m in response.context["messages"]]
    assert (messages.SUCCESS, "Allocation changed through the rollout service: treatment 10.00 % → 20 %.") in shown
    ab.refresh()
    assert ab.treatment.allocation == Decimal("20") and ab.control.allocation == Decimal("10")
    # The layout was rebalanced as the service does it: users only move into the raised variant.
    after = {u: layout_owner(ab.experiment.layout, bucket_of(ab.experiment.salt, u)) for u in units}
    moved = {u for u in units if before[u] != after[u]}
    assert moved and all(after[u] == ab.treatment.pk and before[u] is None for u in moved)
    event = AuditEvent.objects.get(action="experiment.allocation")
    assert event.actor_repr == "olga"
    assert event.changes["allocation"] == [
        {"control": "10.00", "treatment": "10.00"},
        {"control": "10.00", "treatment": "20.00"},
    ]


def test_allocations_over_100_percent_are_refused(operator_client, ab_experiment):
    ab = ab_experiment(control=50, treatment=40)
    page = operator_client.get(change_url(ab.experiment))

    response = post_change(operator_client, ab.experiment, **{f"{variant_prefix(page, 'treatment')}-allocation": "60"})

    assert "add up to 110.00 %, more than 100 %" in response.content.decode()
    ab.refresh()
    assert ab.treatment.allocation == Decimal("40")
    assert not AuditEvent.objects.filter(action="experiment.allocation").exists()


def test_a_draft_is_edited_freely_and_started_by_the_action(operator_client, ab_experiment):
    ab = ab_experiment(status=ExperimentStatus.DRAFT, control=50, treatment=50)
    page = operator_client.get(change_url(ab.experiment))
    assert "model" in page.context["adminform"].form.fields
    variants = next(i for i in page.context["inline_admin_formsets"] if i.formset.model is Variant)
    assert "deployment" in variants.formset.forms[0].fields and variants.has_add_permission

    post_change(operator_client, ab.experiment, **{f"{variant_prefix(page, 'treatment')}-allocation": "25"})
    ab.refresh()
    assert ab.treatment.allocation == Decimal("25")  # a draft's rows are its own: no layout yet
    assert not AuditEvent.objects.filter(action="experiment.allocation").exists()

    shown = run_action(operator_client, "start", ab.experiment)

    assert shown == [(messages.SUCCESS, "ab-test: started.")]
    ab.refresh()
    assert ab.experiment.status == ExperimentStatus.RUNNING and ab.experiment.starts_at is not None
    owned = sum(end - start for start, end, vid in ab.experiment.layout if vid == ab.treatment.pk)
    assert owned == 2500
    assert AuditEvent.objects.get(action="experiment.start").actor_repr == "olga"


def test_pause_advance_and_conclude_actions_are_recorded(operator_client, ab_experiment):
    ab = ab_experiment(control=5, treatment=5)
    AllocationStep.objects.create(
        experiment=ab.experiment, position=1, allocations={"treatment": "25", "control": "25"}
    )

    assert run_action(operator_client, "advance_rollout", ab.experiment) == [
        (messages.SUCCESS, "ab-test: advanced to its next rollout step.")
    ]
    ab.refresh()
    assert (ab.control.allocation, ab.treatment.allocation) == (Decimal("25"), Decimal("25"))
    assert AllocationStep.objects.get().applied_at is not None
    # No step left: said, not an error page.
    [(level, text)] = run_action(operator_client, "advance_rollout", ab.experiment)
    assert level == messages.ERROR and "no rollout step left" in text

    assert run_action(operator_client, "pause", ab.experiment) == [(messages.SUCCESS, "ab-test: paused.")]
    [(level, text)] = run_action(operator_client, "pause", ab.experiment)
    assert level == messages.ERROR and "not running" in text
    assert run_action(operator_client, "conclude", ab.experiment) == [(messages.SUCCESS, "ab-test: concluded.")]
    ab.refresh()
    assert ab.experiment.status == ExperimentStatus.CONCLUDED

    recorded = list(
        AuditEvent.objects.filter(action__startswith="experiment.")
        .order_by("seq")
        .values_list("action", "actor_repr", "target_id")
    )
    assert [a for a, *_ in recorded] == ["experiment.allocation", "experiment.pause", "experiment.conclude"]
    assert {(who, target) for _, who, target in recorded} == {("olga", str(ab.experiment.pk))}

    # Concluded: everything is read-only, allocations too.
    page = operator_client.get(change_url(ab.experiment))
    assert (
        "allocation"
        not in next(i for i in page.context["inline_admin_formsets"] if i.formset.model is Variant)
        .formset.forms[0]
        .fields
    )


def test_an_applied_rollout_step_stays(operator_client, ab_experiment):
    ab = ab_experiment(control=5, treatment=5)
    AllocationStep.objects.create(experiment=ab.experiment, position=1, allocations={"treatment": "10"})
    run_action(operator_client, "advance_rollout", ab.experiment)
    page = operator_client.get(change_url(ab.experiment))
    steps = next(i for i in page.context["inline_admin_formsets"] if i.formset.model is AllocationStep)
    prefix = steps.formset.forms[0].prefix

    response = post_change(operator_client, ab.experiment, **{f"{prefix}-allocations": '{"treatment": "50"}'})

    assert "was applied on" in response.content.decode()
    assert AllocationStep.objects.get().allocations == {"treatment": "10"}


def test_feedback_is_read_only_and_found_by_request_id(operator_client):
    user = UserFactory(username="rater")
    Feedback.objects.create(request_id="req-abc-123", user=user, metric="thumbs", value=1, comment="great")
    Feedback.objects.create(request_id="req-other-9", user=user, metric="score", value=3.5)
    changelist = reverse("admin:experiments_feedback_changelist")

    html = operator_client.get(changelist, {"q": "req-abc-123"}).content.decode()

    assert "req-abc-123" in html and "req-other-9" not in html
    # Whole values, through indexes (docs/ledger.md, "The admin at scale"): a rater by name, not a part of an id.
    assert len(operator_client.get(changelist, {"q": "RATER"}).context["cl"].result_list) == 2
    assert not operator_client.get(changelist, {"q": "req-abc"}).context["cl"].result_list
    feedback = Feedback.objects.get(request_id="req-abc-123")
    page = operator_client.get(reverse("admin:experiments_feedback_change", args=[feedback.pk]))
    assert page.status_code == 200 and not page.context["adminform"].form.fields  # nothing editable
    assert operator_client.get(reverse("admin:experiments_feedback_add")).status_code == 403
    operator_client.post(reverse("admin:experiments_feedback_change", args=[feedback.pk]), {"value": "-1"})
    feedback.refresh_from_db()
    assert feedback.value == 1


def test_an_experiment_is_created_with_its_variants_as_a_draft(operator_client, ab_experiment):
    ab = ab_experiment(status=ExperimentStatus.CONCLUDED)  # a model with two deployments to choose from
    add = reverse("admin:experiments_experiment_add")
    page = operator_client.get(add)
    assert page.status_code == 200
    data = form_data(page)
    data.update({"name": "new-test", "model": ab.model.pk, "primary_metric": "positive_rate", "alpha": "0.05"})
    data["guardrail_metrics"] = '["error_rate"]'
    variants = next(i for i in page.context["inline_admin_formsets"] if i.formset.model is Variant).formset
    assert len(variants.forms) == 2  # a control and a treatment to fill in
    for form, (name, deployment, control) in zip(
        variants.forms, (("a", ab.control_deployment, True), ("b", ab.treatment_deployment, False)), strict=True
    ):
        data.update({form.add_prefix("name"): name, form.add_prefix("deployment"): deployment.pk})
        data.update({form.add_prefix("allocation"): "50", form.add_prefix("position"): "0"})
        data[form.add_prefix("overrides")] = "{}"
        if control:
            data[form.add_prefix("is_control")] = "on"

    response = operator_client.post(add, data, follow=True)

    assert response.status_code == 200
    created = Experiment.objects.get(name="new-test")
    assert created.status == ExperimentStatus.DRAFT and created.guardrail_metrics == ["error_rate"]
    assert [(v.name, v.is_control, v.allocation) for v in created.variants.order_by("name")] == [
        ("a", True, Decimal("50")),
        ("b", False, Decimal("50")),
    ]
    data["name"], data["guardrail_metrics"] = "bad-metrics", '["speed"]'
    refused = operator_client.post(add, data)
    assert "A list of metrics among" in refused.content.decode()
    assert not Experiment.objects.filter(name="bad-metrics").exists()


def test_a_variant_override_the_pipeline_must_not_take_is_refused_in_the_admin(operator_client, ab_experiment):
    """The admin checks a variant's overrides as the API does (``experiments.overrides``): ``stream`` would
    change a request after it was validated, and a temperature of 5 no provider takes."""
    ab = ab_experiment(status=ExperimentStatus.DRAFT, control=50, treatment=50)
    page = operator_client.get(change_url(ab.experiment))
    prefix = variant_prefix(page, "treatment")

    for overrides in ('{"stream": true}', '{"temperature": 5}', "[1, 2]"):
        response = post_change(operator_client, ab.experiment, **{f"{prefix}-overrides": overrides})
        assert b"errorlist" in response.content, overrides
        ab.refresh()
        assert ab.treatment.overrides == {}

    post_change(operator_client, ab.experiment, **{f"{prefix}-overrides": '{"temperature": 0.2}'})
    ab.refresh()
    assert ab.treatment.overrides == {"temperature": 0.2}


def with_new_steps(data: dict[str, Any], *steps: str) -> dict[str, Any]:
    """``data`` with rollout-step rows added to the steps inline, as its "Add another" would post them."""
    prefix = "steps"
    total = int(data[f"{prefix}-TOTAL_FORMS"])
    for index, allocations in enumerate(steps, start=total):
        data.update(
            {
                f"{prefix}-{index}-position": str(index + 1),
                f"{prefix}-{index}-allocations": allocations,
                f"{prefix}-{index}-at_0": "",
                f"{prefix}-{index}-at_1": "",
            }
        )
    data[f"{prefix}-TOTAL_FORMS"] = str(total + len(steps))
    return data


def test_rollout_steps_passing_100_percent_in_order_are_refused_in_the_admin_against_the_forms_variants(
    operator_client, ab_experiment
):
    """The API's rule, applied to the admin's inline: each step within 100 % alone, not with the variants it
    leaves as they were; counted from the allocations the same form gives the variants."""
    ab = ab_experiment(status=ExperimentStatus.DRAFT, control=10, treatment=10)
    page = operator_client.get(change_url(ab.experiment))
    data = with_new_steps(form_data(page), '{"treatment": "50"}', '{"treatment": "95"}')

    response = operator_client.post(change_url(ab.experiment), data, follow=True)

    assert "would add up to 105.00 %, more than 100 %" in response.content.decode()
    assert not AllocationStep.objects.exists()

    # 75 % fits beside the control's 10 %, not beside the 30 % this same form gives it.
    data = with_new_steps(form_data(page), '{"treatment": "75"}')
    data[f"{variant_prefix(page, 'control')}-allocation"] = "30"
    response = operator_client.post(change_url(ab.experiment), data, follow=True)
    assert "would add up to 105.00 %, more than 100 %" in response.content.decode()
    assert not AllocationStep.objects.exists()
    ab.refresh()
    assert ab.control.allocation == Decimal("10")

    data = with_new_steps(form_data(page), '{"treatment": "50"}', '{"treatment": "85", "control": "5"}')
    operator_client.post(change_url(ab.experiment), data, follow=True)
    assert [s.allocations for s in AllocationStep.objects.order_by("position")] == [
        {"treatment": "50"},
        {"treatment": "85", "control": "5"},
    ]


def test_a_running_experiments_new_rollout_step_is_checked_from_its_allocations_now(operator_client, ab_experiment):
    ab = ab_experiment(control=5, treatment=5)
    AllocationStep.objects.create(experiment=ab.experiment, position=1, allocations={"treatment": "40"})
    run_action(operator_client, "advance_rollout", ab.experiment)  # treatment 40 %, control 5 %
    page = operator_client.get(change_url(ab.experiment))

    for allocations, shown in [
        ('{"treatment": "96"}', "would add up to 101.00 %, more than 100 %"),
        ('{"purple": "5"}', "No variant named purple"),
        ('{"treatment": "12.345"}', "at most two decimals"),
        ('["treatment", 5]', "variant-name"),
    ]:
        data = with_new_steps(form_data(page), allocations)
        response = operator_client.post(change_url(ab.experiment), data, follow=True)
        assert shown in response.content.decode(), allocations
        assert AllocationStep.objects.count() == 1


def test_a_drafts_change_page_costs_the_same_queries_however_big_the_catalog(operator_client, ab_experiment):
    """The variants' selects list every deployment ("model/name") and every prompt version ("slug vN"): their
    labels are read with the choices, not one query an option."""
    ab = ab_experiment(status=ExperimentStatus.DRAFT)

    def queries() -> tuple[int, str]:
        with CaptureQueriesContext(connection) as captured:
            response = operator_client.get(change_url(ab.experiment))
        assert response.status_code == 200
        return len(captured), response.content.decode()

    template = PromptTemplate.objects.create(slug="ad-copy")
    prompt_version_create(template=template, messages=[{"role": "user", "content": "hi"}])
    # The change form reads the experiment's content type (the history link, ModelAdmin.render_change_form) through
    # ContentType's cache, kept per process and emptied by every flush's post_migrate (create_contenttypes): cold,
    # the page paid one query more. Whether an earlier test of the worker had left it warm decided which measure
    # paid it (21 against 20 alone, 20 against 20 after a change page). A serving process has it warm after its
    # first page: both measures are taken so.
    ContentType.objects.get_for_model(Experiment)
    few, _ = queries()
    for n in range(8):
        DeploymentFactory(model=ModelFactory(name=f"other-{n}"), name=f"east-{n}")
        prompt_version_create(template=template, messages=[{"role": "user", "content": f"hi {n}"}])
    many, page = queries()

    assert many == few
    assert ">other-7/east-7</option>" in page
    assert ">ad-copy v9</option>" in page


def test_the_feedback_list_reads_no_more_ratings_than_it_shows_and_counts_them_once(operator_client):
    """A rating a request at most: each view of the list sorted every rating by an unindexed date, counted them
    twice, and read every one for the date hierarchy's bounds and days and the metric filter's values (five passes
    over the table). Newest first off the primary key, one count, no pass for the filters; they still filter."""
    user = UserFactory(username="rater")
    old = Feedback.objects.create(request_id="req-1", user=user, metric="thumbs", value=1)
    scored = Feedback.objects.create(request_id="req-2", user=user, metric="score", value=3.5)
    named = Feedback.objects.create(request_id="req-3", user=user, metric="helpfulness", value=4)
    Feedback.objects.filter(pk=old.pk).update(comment="rated again")  # updated last: not first for it
    changelist = reverse("admin:experiments_feedback_changelist")

    page = changelist_page(operator_client, changelist, "experiments_feedback")

    assert page.rows == [named, scored, old]
    assert len(page.reads) == 2, page.reads  # the page's rows and their one count
    assert 'ORDER BY "experiments_feedback"."id" DESC' in next(sql for sql in page.reads if "ORDER BY" in sql)
    assert 'href="?metric=score"' in page.html
    for metric, expected in (("thumbs", [old]), ("score", [scored]), ("helpfulness", [named])):
        assert list(operator_client.get(changelist, {"metric": metric}).context["cl"].result_list) == expected


def test_a_variant_that_could_not_serve_its_callers_is_refused_in_the_admin(operator_client, ab_experiment):
    """An override past what the variant's model writes at most, or a prompt version whose required variables are
    not those of the version it competes with, would answer every caller in the variant a 400 naming a field they
    never sent: the form refuses it, naming the variant and the field."""
    ab = ab_experiment(status=ExperimentStatus.DRAFT, control=50, treatment=50)
    ab.model.max_output_tokens = 1000
    ab.model.save()
    v1, v2 = tagline_versions()
    page = operator_client.get(change_url(ab.experiment))
    control, treatment = variant_prefix(page, "control"), variant_prefix(page, "treatment")

    response = post_change(operator_client, ab.experiment, **{f"{treatment}-overrides": '{"max_tokens": 4000}'})
    assert b"errorlist" in response.content
    assert "treatment sets max_tokens to 4000" in response.content.decode()
    response = post_change(
        operator_client,
        ab.experiment,
        **{f"{control}-prompt_version": str(v1.pk), f"{treatment}-prompt_version": str(v2.pk)},
    )
    assert b"errorlist" in response.content
    assert "treatment runs version 2" in response.content.decode()
    ab.refresh()
    assert (ab.treatment.overrides, ab.control.prompt_version, ab.treatment.prompt_version) == ({}, None, None)

    post_change(operator_client, ab.experiment, **{f"{treatment}-overrides": '{"max_tokens": 1000}'})
    ab.refresh()
    assert ab.treatment.overrides == {"max_tokens": 1000}
