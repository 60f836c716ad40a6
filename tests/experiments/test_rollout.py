"""The experiment services: start's checks, allocation changes, the gradual rollout (timed steps applied by
``rollout_steps_apply_due`` under a pinned clock, steps an admin advances), promotion; each in the audit log."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from celery.exceptions import SoftTimeLimitExceeded
from django.core.exceptions import ValidationError
from django.db import DatabaseError
from django.db.models.signals import post_save, pre_save

from audit.models import AuditEvent
from billing.models import TaskRun
from experiments.layout import layout_counts, layout_owners
from experiments.models import AllocationStep, Experiment, ExperimentStatus, Variant
from experiments.services import (
    experiment_allocation_set,
    experiment_conclude,
    experiment_promote,
    experiment_rollout_advance,
    experiment_start,
    experiments_conclude_due,
    rollout_steps_apply_due,
)
from experiments.tasks import ExperimentsNotConcludedError, RolloutStepsNotAppliedError, rollout_steps_apply_due_task
from providers.models import ModelMode
from tests.factories import DeploymentFactory, ModelFactory, UserFactory

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def allocations(ab) -> dict[str, Decimal]:
    ab.refresh()
    return {"control": ab.control.allocation, "treatment": ab.treatment.allocation}


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("seq"))


def owned(ab) -> dict[str, set[int]]:
    ab.experiment.refresh_from_db()
    names = {ab.control.pk: "control", ab.treatment.pk: "treatment"}
    buckets: dict[str, set[int]] = {"control": set(), "treatment": set()}
    for bucket, owner in enumerate(layout_owners(ab.experiment.layout)):
        if owner is not None:
            buckets[names[owner]].add(bucket)
    return buckets


@pytest.fixture
def rollout(ab_experiment):
    """5 % each, then 25 % at +1 h, 50 % at +2 h, an admin's go, then treatment alone at 90 % at +3 h."""
    with time_machine.travel(T0, tick=False):
        ab = ab_experiment(control=5, treatment=5)
    for position, (at, control, treatment) in enumerate(
        [
            (T0 + timedelta(hours=1), 25, 25),
            (T0 + timedelta(hours=2), 50, 50),
            (None, 40, 60),
            (T0 + timedelta(hours=3), 10, 90),
        ],
        start=1,
    ):
        AllocationStep.objects.create(
            experiment=ab.experiment,
            position=position,
            at=at,
            allocations={"control": str(control), "treatment": str(treatment)},
        )
    return ab


def test_timed_steps_apply_when_due_in_order_and_wait_for_an_admins_step(rollout):
    ab = rollout
    with time_machine.travel(T0 + timedelta(minutes=59), tick=False):
        assert rollout_steps_apply_due() == []
    assert allocations(ab) == {"control": Decimal("5.00"), "treatment": Decimal("5.00")}
    first = owned(ab)

    with time_machine.travel(T0 + timedelta(hours=1, minutes=1), tick=False):
        assert rollout_steps_apply_due_task() == 1  # the Celery task beat runs every minute
    assert allocations(ab) == {"control": Decimal("25.00"), "treatment": Decimal("25.00")}
    second = owned(ab)
    # Users already in a variant stay there while it grows.
    assert first["control"] <= second["control"] and first["treatment"] <= second["treatment"]
    step = AllocationStep.objects.get(experiment=ab.experiment, position=1)
    assert step.applied_at == T0 + timedelta(hours=1, minutes=1)

    # Hours later: the 50 % step applies; the admin's step holds back the timed one after it.
    with time_machine.travel(T0 + timedelta(hours=5), tick=False):
        assert [s.position for s in rollout_steps_apply_due()] == [2]
        assert rollout_steps_apply_due() == []
    assert allocations(ab) == {"control": Decimal("50.00"), "treatment": Decimal("50.00")}

    with time_machine.travel(T0 + timedelta(hours=5, minutes=3), tick=False):
        assert experiment_rollout_advance(experiment=ab.experiment, actor=UserFactory(username="ops")).position == 3
        assert allocations(ab) == {"control": Decimal("40.00"), "treatment": Decimal("60.00")}
        assert [s.position for s in rollout_steps_apply_due()] == [4]
    assert allocations(ab) == {"control": Decimal("10.00"), "treatment": Decimal("90.00")}
    assert layout_counts(ab.experiment.layout) == {ab.control.pk: 1000, ab.treatment.pk: 9000}

    recorded = events("experiment.allocation")
    assert [e.changes["rollout_step"][1] for e in recorded] == [1, 2, 3, 4]
    assert recorded[0].changes["allocation"] == [
        {"control": "5.00", "treatment": "5.00"},
        {"control": "25.00", "treatment": "25.00"},
    ]
    assert recorded[0].actor_type == "system" and recorded[2].actor_repr == "ops"
    assert AllocationStep.objects.filter(experiment=ab.experiment, applied_at__isnull=True).count() == 0
    with pytest.raises(ValidationError, match="no rollout step left"):
        experiment_rollout_advance(experiment=ab.experiment, actor=None)


def test_a_missed_run_catches_up_step_by_step_each_recorded(rollout):
    with time_machine.travel(T0 + timedelta(hours=2, minutes=30), tick=False):
        assert [s.position for s in rollout_steps_apply_due()] == [1, 2]
    assert allocations(rollout) == {"control": Decimal("50.00"), "treatment": Decimal("50.00")}
    assert len(events("experiment.allocation")) == 2


def test_a_paused_experiments_steps_wait(rollout):
    from experiments.services import experiment_pause

    experiment_pause(experiment=rollout.experiment, actor=None)
    with time_machine.travel(T0 + timedelta(hours=2, minutes=30), tick=False):
        assert rollout_steps_apply_due() == []
    assert allocations(rollout) == {"control": Decimal("5.00"), "treatment": Decimal("5.00")}


def test_promote_gives_the_winner_everyone_records_it_and_ends_the_rollout(rollout):
    ab = rollout
    with time_machine.travel(T0 + timedelta(hours=1, minutes=1), tick=False):
        rollout_steps_apply_due()
    winner_before = owned(ab)["treatment"]
    experiment_promote(experiment=ab.experiment, variant=ab.treatment, actor=UserFactory(username="lead"))
    assert allocations(ab) == {"control": Decimal("0.00"), "treatment": Decimal("100.00")}
    assert ab.experiment.promoted_variant_id == ab.treatment.pk
    assert owned(ab)["treatment"] == set(range(10_000)) and winner_before < owned(ab)["treatment"]
    (event,) = events("experiment.promote")
    assert event.changes["promoted_variant"] == [None, "treatment"]
    assert event.changes["allocation"][1] == {"control": "0.00", "treatment": "100.00"}
    assert event.actor_repr == "lead"
    with time_machine.travel(T0 + timedelta(days=1), tick=False):
        assert rollout_steps_apply_due() == []
    with pytest.raises(ValidationError, match="promoted"):
        experiment_rollout_advance(experiment=ab.experiment, actor=None)
    assert allocations(ab)["treatment"] == Decimal("100.00")


def test_allocation_changes_are_checked_and_recorded_old_to_new(ab_experiment):
    ab = ab_experiment(control=10, treatment=10)
    for wrong, message in [
        ({"treatment": "95"}, "more than 100"),
        ({"treatment": "-1"}, "between 0 and 100"),
        ({"treatment": "12.345"}, "two decimals"),
        ({"treatment": "lots"}, "not a number"),
        ({"nobody": "5"}, "No variant named nobody"),
    ]:
        with pytest.raises(ValidationError, match=message):
            experiment_allocation_set(experiment=ab.experiment, allocations=wrong, actor=None, reason="typo")
    assert allocations(ab) == {"control": Decimal("10.00"), "treatment": Decimal("10.00")}
    assert events("experiment.allocation") == []

    experiment_allocation_set(
        experiment=ab.experiment, allocations={"treatment": Decimal("20")}, actor=None, reason="ramp"
    )
    assert allocations(ab) == {"control": Decimal("10.00"), "treatment": Decimal("20.00")}
    assert layout_counts(ab.experiment.layout) == {ab.control.pk: 1000, ab.treatment.pk: 2000}
    (event,) = events("experiment.allocation")
    assert event.changes == {
        "allocation": [{"control": "10.00", "treatment": "10.00"}, {"control": "10.00", "treatment": "20.00"}],
        "reason": [None, "ramp"],
    }


def draft(ab) -> Experiment:
    experiment = Experiment.objects.create(name="draft-one", model=ab.model)
    Variant.objects.create(experiment=experiment, name="base", is_control=True, allocation=30)
    Variant.objects.create(experiment=experiment, name="alt", deployment=ab.treatment_deployment, allocation=30)
    return experiment


def test_start_checks_the_variants_and_the_one_running_experiment_per_model(ab_experiment):
    ab = ab_experiment(status=ExperimentStatus.DRAFT)
    experiment = draft(ab)
    other_model = ModelFactory(name="elsewhere")
    embedding = ModelFactory(name="embedder", mode=ModelMode.EMBEDDING)

    lone = Experiment.objects.create(name="lone", model=ab.model)
    Variant.objects.create(experiment=lone, name="only", allocation=10)
    with pytest.raises(ValidationError) as failed:
        experiment_start(experiment=lone, actor=None)
    assert "at least two variants" in str(failed.value) and "Exactly one variant must be the control" in str(
        failed.value
    )

    foreign = Variant.objects.create(
        experiment=experiment, name="foreign", deployment=DeploymentFactory(model=other_model), allocation=0
    )
    with pytest.raises(ValidationError, match="not a deployment of ab-model"):
        experiment_start(experiment=experiment, actor=None)
    foreign.delete()
    embed = Variant.objects.create(experiment=experiment, name="embed", target_model=embedding, allocation=0)
    with pytest.raises(ValidationError, match="not a chat model"):
        experiment_start(experiment=experiment, actor=None)
    embed.delete()

    running = ab.experiment
    experiment_start(experiment=running, actor=None)
    with pytest.raises(ValidationError, match="already runs on ab-model"):
        experiment_start(experiment=experiment, actor=None)  # a clear error, not the constraint's IntegrityError
    experiment_conclude(experiment=running, actor=None)

    with time_machine.travel(T0, tick=False):
        started = experiment_start(experiment=experiment, actor=None)
    assert started.status == ExperimentStatus.RUNNING and started.starts_at == T0
    variants = {v.name: v.pk for v in started.variants.all()}
    assert layout_counts(started.layout) == {variants["base"]: 3000, variants["alt"]: 3000}
    assert [e.target_id for e in events("experiment.start")] == [str(running.pk), str(started.pk)]
    with pytest.raises(ValidationError, match="already running"):
        experiment_start(experiment=started, actor=None)


def test_an_experiment_past_its_end_is_concluded_by_the_task(ab_experiment):
    ab = ab_experiment()
    Experiment.objects.filter(pk=ab.experiment.pk).update(ends_at=T0)
    with time_machine.travel(T0 - timedelta(minutes=1), tick=False):
        assert experiments_conclude_due() == []
    with time_machine.travel(T0 + timedelta(minutes=1), tick=False):
        rollout_steps_apply_due_task()
    ab.experiment.refresh_from_db()
    assert ab.experiment.status == ExperimentStatus.CONCLUDED and ab.experiment.ends_at == T0
    assert len(events("experiment.conclude")) == 1


def three_ended(ab_experiment) -> list[Experiment]:
    ended = [ab_experiment(name=f"ended-{n}", model_name=f"model-{n}").experiment for n in range(3)]
    Experiment.objects.filter(pk__in=[e.pk for e in ended]).update(ends_at=T0)
    return ended


def test_an_experiment_an_admin_concludes_while_the_task_runs_is_skipped_and_the_others_concluded(ab_experiment):
    """The task's query finds three experiments past their end; once it has concluded the first, an admin
    concludes one it has not reached yet (the state the race between its query and its lock leaves). That
    one is left as the admin concluded it, and the task goes on to the next."""
    ended = three_ended(ab_experiment)
    admin = UserFactory(username="admin", is_staff=True)
    raced: list[str] = []

    def admin_concludes_another(sender, instance, **kwargs):
        if raced or instance.status != ExperimentStatus.CONCLUDED:
            return
        other = Experiment.objects.filter(status=ExperimentStatus.RUNNING).order_by("pk").first()
        raced.append(other.name)
        experiment_conclude(experiment=other, actor=admin)

    post_save.connect(admin_concludes_another, sender=Experiment)
    try:
        with time_machine.travel(T0 + timedelta(minutes=1), tick=False):
            rollout_steps_apply_due_task()
    finally:
        post_save.disconnect(admin_concludes_another, sender=Experiment)

    assert raced
    assert set(Experiment.objects.filter(pk__in=[e.pk for e in ended]).values_list("status", flat=True)) == {
        ExperimentStatus.CONCLUDED
    }
    by = {e.target_id: e.actor_id for e in events("experiment.conclude")}
    assert len(by) == len(events("experiment.conclude")) == 3  # one conclusion each
    assert by[str(Experiment.objects.get(name=raced[0]).pk)] == str(admin.pk)


def test_an_experiment_that_cannot_be_concluded_is_logged_the_others_are_concluded_and_the_run_fails(
    ab_experiment, caplog
):
    """One ended experiment's conclusion fails in the database: it is logged by name and tried again next minute,
    the others are concluded. The run ended successful, so /ops/ showed the task green while that experiment kept
    running past its end; it now ends failed (``ExperimentsNotConcludedError``, naming it), as a rollout step that
    did not apply does."""
    ended = three_ended(ab_experiment)
    broken = ended[1]

    def database_refuses(sender, instance, **kwargs):
        if instance.pk == broken.pk and instance.status == ExperimentStatus.CONCLUDED:
            raise DatabaseError("the database refused the row")

    pre_save.connect(database_refuses, sender=Experiment)
    try:
        with time_machine.travel(T0 + timedelta(minutes=1), tick=False):
            result = rollout_steps_apply_due_task.apply()
    finally:
        pre_save.disconnect(database_refuses, sender=Experiment)

    assert result.failed() and isinstance(result.result, ExperimentsNotConcludedError)
    assert "ended-1" in str(result.result)
    run = TaskRun.objects.get(task=rollout_steps_apply_due_task.name)  # what /ops/ shows
    assert not run.succeeded and run.error_class == "ExperimentsNotConcludedError"

    statuses = dict(Experiment.objects.filter(pk__in=[e.pk for e in ended]).values_list("name", "status"))
    assert statuses == {
        "ended-0": ExperimentStatus.CONCLUDED,
        "ended-1": ExperimentStatus.RUNNING,  # concluded at the next run
        "ended-2": ExperimentStatus.CONCLUDED,
    }
    [failure] = [r for r in caplog.records if r.levelname == "ERROR" and r.name == "experiments.services"]
    assert "ended-1" in failure.getMessage() and failure.exc_info is not None
    assert len(events("experiment.conclude")) == 2


def test_the_soft_time_limit_inside_one_experiment_stops_the_task_before_the_next(ab_experiment):
    """The soft time limit raised while one experiment is concluded used to be logged as that experiment's
    failure, and the sweep went on until the hard limit killed the worker mid-write. It stops the task there."""
    ended = three_ended(ab_experiment)

    def time_is_up(sender, instance, **kwargs):
        if instance.pk == ended[1].pk and instance.status == ExperimentStatus.CONCLUDED:
            raise SoftTimeLimitExceeded()

    pre_save.connect(time_is_up, sender=Experiment)
    try:
        with time_machine.travel(T0 + timedelta(minutes=1), tick=False), pytest.raises(SoftTimeLimitExceeded):
            rollout_steps_apply_due_task()
    finally:
        pre_save.disconnect(time_is_up, sender=Experiment)

    statuses = dict(Experiment.objects.filter(pk__in=[e.pk for e in ended]).values_list("name", "status"))
    assert statuses == {
        "ended-0": ExperimentStatus.CONCLUDED,
        "ended-1": ExperimentStatus.RUNNING,  # its conclusion rolled back: the next run does it
        "ended-2": ExperimentStatus.RUNNING,  # not reached
    }
    assert len(events("experiment.conclude")) == 1


@pytest.mark.django_db(transaction=True)
def test_two_admins_starting_two_experiments_on_one_model_at_once_get_one_started_and_one_clear_error(
    ab_experiment,
):
    """Each start locks its own experiment, so both may pass the check before either saves: the database's
    one-running-per-model constraint decides, and the loser gets a ValidationError, not an IntegrityError."""
    from django.db import connection

    ab = ab_experiment(status=ExperimentStatus.DRAFT)
    rival = draft(ab)
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def start(experiment: Experiment) -> None:
        try:
            barrier.wait(timeout=10)
            experiment_start(experiment=experiment, actor=None)
            outcomes[experiment.name] = "started"
        except Exception as exc:
            outcomes[experiment.name] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=start, args=(e,)) for e in (ab.experiment, rival)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(o if o == "started" else type(o).__name__ for o in outcomes.values()) == [
        "ValidationError",
        "started",
    ], outcomes
    assert Experiment.objects.filter(model=ab.model, status=ExperimentStatus.RUNNING).count() == 1


def test_start_refuses_a_variant_no_request_could_reach(ab_experiment):
    """A variant whose deployment is on a disabled provider, or whose target model has no enabled deployment,
    would serve nobody: every user of it served as usual, unrecorded, and the experiment run for nothing.
    Start refuses it, as it refuses a disabled deployment."""
    ab = ab_experiment(status=ExperimentStatus.DRAFT, treatment_model=True)
    provider = ab.control_deployment.provider
    provider.enabled = False
    provider.save()
    with pytest.raises(ValidationError, match=f"on provider {provider.name}, which is disabled"):
        experiment_start(experiment=ab.experiment, actor=None)
    provider.enabled = True
    provider.save()

    ab.target_model.deployments.update(enabled=False)
    with pytest.raises(ValidationError, match="has no enabled deployment"):
        experiment_start(experiment=ab.experiment, actor=None)
    ab.target_model.deployments.update(enabled=True)
    assert experiment_start(experiment=ab.experiment, actor=None).status == ExperimentStatus.RUNNING


def test_after_a_beat_outage_a_step_due_after_the_experiments_end_is_not_applied(ab_experiment):
    """Beat down for hours across an experiment's end: its next run applied every step due by then, those due
    after the end too, and only then concluded the experiment. With beat up, the experiment would have been
    concluded at its end with those steps never applied: its final allocations and audit log now end the same
    way whenever the task runs."""
    with time_machine.travel(T0, tick=False):
        ab = ab_experiment(control=5, treatment=5)
    Experiment.objects.filter(pk=ab.experiment.pk).update(ends_at=T0 + timedelta(hours=2))
    for position, (hours, control, treatment) in enumerate([(1, 25, 25), (2, 30, 30), (3, 10, 90)], start=1):
        AllocationStep.objects.create(
            experiment=ab.experiment,
            position=position,
            at=T0 + timedelta(hours=hours),
            allocations={"control": str(control), "treatment": str(treatment)},
        )

    with time_machine.travel(T0 + timedelta(hours=5), tick=False):  # the first run since T0
        assert rollout_steps_apply_due_task() == 2

    ab.experiment.refresh_from_db()
    assert ab.experiment.status == ExperimentStatus.CONCLUDED and ab.experiment.ends_at == T0 + timedelta(hours=2)
    assert allocations(ab) == {"control": Decimal("30.00"), "treatment": Decimal("30.00")}
    assert [e.changes["rollout_step"][1] for e in events("experiment.allocation")] == [1, 2]
    assert AllocationStep.objects.get(experiment=ab.experiment, position=3).applied_at is None


def three_rolling(ab_experiment) -> list[Experiment]:
    """Three running experiments, each with a 25 % step due at T0 + 1 h."""
    with time_machine.travel(T0, tick=False):
        rolling = [
            ab_experiment(name=f"rolling-{n}", model_name=f"rolling-model-{n}", control=5, treatment=5).experiment
            for n in range(3)
        ]
    for experiment in rolling:
        AllocationStep.objects.create(
            experiment=experiment, position=1, at=T0 + timedelta(hours=1), allocations={"treatment": "25"}
        )
    return rolling


def steps_applied(experiments: list[Experiment]) -> dict[str, bool]:
    return {
        e.name: AllocationStep.objects.filter(experiment_id=e.pk, applied_at__isnull=False).exists()
        for e in experiments
        if Experiment.objects.filter(pk=e.pk).exists()
    }


def test_an_experiment_deleted_while_the_task_runs_is_skipped_and_the_others_steps_apply(ab_experiment):
    """The task's query finds three experiments with a step due; while it applies the first one's, an admin deletes
    the last (the state the race between its query and its lock leaves). The task failed on it
    (``Experiment.DoesNotExist``), every minute's run until the query no longer found it, and concluded nothing in
    that run; it goes on to the others now."""
    rolling = three_rolling(ab_experiment)
    ended = ab_experiment(name="ended", model_name="ended-model").experiment
    Experiment.objects.filter(pk=ended.pk).update(ends_at=T0)

    def admin_deletes_the_last(sender, instance, **kwargs):
        if instance.applied_at is not None and instance.experiment_id == rolling[0].pk:
            Experiment.objects.filter(pk=rolling[2].pk).delete()

    pre_save.connect(admin_deletes_the_last, sender=AllocationStep)
    try:
        with time_machine.travel(T0 + timedelta(hours=1, minutes=1), tick=False):
            assert rollout_steps_apply_due_task() == 2
    finally:
        pre_save.disconnect(admin_deletes_the_last, sender=AllocationStep)

    assert steps_applied(rolling) == {"rolling-0": True, "rolling-1": True}
    assert Experiment.objects.get(pk=ended.pk).status == ExperimentStatus.CONCLUDED


def test_a_step_the_database_refuses_is_logged_and_the_other_experiments_go_on(ab_experiment, caplog):
    """One experiment's due step fails in the database (not a step that no longer fits, which is a ValidationError):
    the task failed there, leaving the other experiments' due steps unapplied and the ended experiments running, at
    every run for as long as that one kept failing. It is logged, naming the experiment, and left to the next run;
    its first step, applied in the same transaction, is rolled back and not counted as applied. The run ends failed,
    naming it, once the others are done."""
    rolling = three_rolling(ab_experiment)
    AllocationStep.objects.create(
        experiment=rolling[1], position=2, at=T0 + timedelta(hours=1), allocations={"treatment": "30"}
    )
    ended = ab_experiment(name="ended", model_name="ended-model").experiment
    Experiment.objects.filter(pk=ended.pk).update(ends_at=T0)

    def database_refuses(sender, instance, **kwargs):
        if instance.applied_at is not None and instance.experiment_id == rolling[1].pk and instance.position == 2:
            raise DatabaseError("the database refused the row")

    pre_save.connect(database_refuses, sender=AllocationStep)
    try:
        with time_machine.travel(T0 + timedelta(hours=1, minutes=1), tick=False):
            with pytest.raises(RolloutStepsNotAppliedError, match="rolling-1"):  # failed, for /ops/
                rollout_steps_apply_due_task()
    finally:
        pre_save.disconnect(database_refuses, sender=AllocationStep)

    assert steps_applied(rolling) == {"rolling-0": True, "rolling-1": False, "rolling-2": True}
    assert Experiment.objects.get(pk=ended.pk).status == ExperimentStatus.CONCLUDED
    [failure] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "rolling-1" in failure.getMessage() and failure.exc_info is not None
    # Its step is still due: the next run applies it.
    with time_machine.travel(T0 + timedelta(hours=1, minutes=2), tick=False):
        assert rollout_steps_apply_due_task() == 2
    assert steps_applied(rolling)["rolling-1"]


def test_the_soft_time_limit_inside_one_experiments_step_stops_the_task_before_the_next(ab_experiment):
    rolling = three_rolling(ab_experiment)

    def time_is_up(sender, instance, **kwargs):
        if instance.applied_at is not None and instance.experiment_id == rolling[1].pk:
            raise SoftTimeLimitExceeded()

    pre_save.connect(time_is_up, sender=AllocationStep)
    try:
        with time_machine.travel(T0 + timedelta(hours=1, minutes=1), tick=False), pytest.raises(SoftTimeLimitExceeded):
            rollout_steps_apply_due_task()
    finally:
        pre_save.disconnect(time_is_up, sender=AllocationStep)
    assert steps_applied(rolling) == {"rolling-0": True, "rolling-1": False, "rolling-2": False}


def test_a_step_that_no_longer_fits_fails_the_run_for_ops_and_is_logged_once(ab_experiment, caplog):
    """A due step that no longer fits (its allocations past 100 % since a variant changed) waits for an admin: it was
    logged at ERROR every minute for ever while the task reported success, so /ops/ showed nothing wrong. The run
    now ends failed naming the experiment (the others' steps applied first), and the step is logged once."""
    rolling = three_rolling(ab_experiment)
    AllocationStep.objects.filter(experiment=rolling[1]).update(allocations={"treatment": "200"})

    for minute in (1, 2, 3):
        with time_machine.travel(T0 + timedelta(hours=1, minutes=minute), tick=False):
            with pytest.raises(RolloutStepsNotAppliedError, match="rolling-1"):
                rollout_steps_apply_due_task.apply(throw=True)

    assert steps_applied(rolling) == {"rolling-0": True, "rolling-1": False, "rolling-2": True}
    logged = [r for r in caplog.records if r.name == "experiments.services" and "rolling-1" in r.getMessage()]
    assert [r.levelname for r in logged] == ["ERROR"]
