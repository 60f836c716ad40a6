"""``/api/experiments/`` through the real URL stack: who may use it, creation and its 400s, the lifecycle
endpoints, promotion (recorded in the audit log), a started experiment's variants that cannot be
retargeted, and the results as JSON and CSV."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.test import Client

from accounts.roles import Role, role_set
from audit.models import AuditEvent
from billing.models import KeyScope, UsageRecord
from billing.services.keys import api_key_create
from experiments.models import AllocationStep, Experiment, ExperimentStatus, Feedback
from tests.accounts.conftest import identity_provider_server, idp, jwt_on  # noqa: F401 (fixtures)
from tests.experiments.conftest import tagline_versions
from tests.factories import DeploymentFactory, ModelFactory, UserFactory

pytestmark = pytest.mark.django_db

URL = "/api/experiments/"


def signed_in(client, role: Role):
    user = UserFactory(username=f"{role.value}-user")
    role_set(user, role)
    client.force_login(user)
    return user


@pytest.fixture
def operator(client):
    return signed_in(client, Role.OPERATOR)


@pytest.fixture
def model():
    model = ModelFactory(name="ab-model")
    first = model.deployments.get()
    first.name = "blue"
    first.save()
    DeploymentFactory(model=model, provider=first.provider, name="green", upstream_id="fake-green")
    ModelFactory(name="other-model")
    return model


def body(**overrides):
    data = {
        "name": "tone-test",
        "model": "ab-model",
        "primary_metric": "positive_rate",
        "guardrail_metrics": ["error_rate"],
        "variants": [
            {"name": "control", "is_control": True, "deployment": "blue", "allocation": "10"},
            {"name": "green", "deployment": "green", "overrides": {"temperature": 0.2}, "allocation": 10},
        ],
        "steps": [{"allocations": {"green": "25"}}, {"allocations": {"green": "50"}, "at": "2026-12-24T00:00:00Z"}],
    }
    data.update(overrides)
    return data


def create(client, **overrides):
    response = client.post(URL, body(**overrides), content_type="application/json")
    assert response.status_code == 201, response.json()
    return response.json()


def post(client, path, data=None):
    return client.post(path, data or {}, content_type="application/json")


ENDPOINTS = [
    ("get", "", None),
    ("patch", "", {"description": "x"}),
    ("delete", "", None),
    ("post", "start/", {}),
    ("post", "pause/", {}),
    ("post", "conclude/", {}),
    ("post", "advance/", {}),
    ("post", "promote/", {"variant": "green"}),
    ("get", "results/", None),
    ("get", "results/?format=csv", None),
]


def test_a_member_gets_403_and_an_anonymous_caller_is_refused(client, model):
    assert client.get(URL).status_code in (401, 403)
    signed_in(client, Role.MEMBER)
    response = client.get(URL)
    assert response.status_code == 403
    assert "operators" in response.json()["error"]["message"]
    assert client.post(URL, body(), content_type="application/json").status_code == 403
    assert not Experiment.objects.exists()


@pytest.mark.parametrize("role", [Role.MEMBER, Role.VIEWER])
@pytest.mark.parametrize(("method", "suffix", "data"), ENDPOINTS)
def test_every_endpoint_refuses_members_and_viewers(client, model, role, method, suffix, data):
    signed_in(client, Role.OPERATOR)
    created = create(client)
    client.logout()
    signed_in(client, role)
    response = getattr(client, method)(f"{URL}{created['id']}/{suffix}", data, content_type="application/json")
    assert response.status_code == 403
    experiment = Experiment.objects.get(pk=created["id"])
    assert experiment.status == "draft" and experiment.promoted_variant_id is None and experiment.description == ""


@pytest.mark.parametrize("role", [Role.OPERATOR, Role.ADMIN])
def test_operators_and_admins_may_manage_experiments(client, model, role):
    signed_in(client, role)
    created = create(client)
    assert client.get(URL).json()["results"][0]["id"] == created["id"]
    assert client.get(f"{URL}{created['id']}/results/").status_code == 200


def test_an_operator_with_a_jwt_may_and_a_member_with_one_may_not(client, model, jwt_on):  # noqa: F811
    operator_token = jwt_on.token(sub="op-1", preferred_username="op", role="operator")
    response = client.get(URL, HTTP_AUTHORIZATION=f"Bearer {operator_token}")
    assert response.status_code == 200
    member_token = jwt_on.token(sub="m-1", preferred_username="mem", role="member")
    assert client.get(URL, HTTP_AUTHORIZATION=f"Bearer {member_token}").status_code == 403


def as_key(client, secret: str, method: str, path: str, data=None):
    return getattr(client, method)(path, data, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {secret}")


@pytest.mark.parametrize(("method", "suffix", "data"), ENDPOINTS)
def test_an_operators_key_without_experiments_manage_gets_403_everywhere(client, model, method, suffix, data):
    """A key handed to an app must not run experiments on everyone's traffic, nor read results that sum every
    user's ledger rows, because its owner is an operator: it needs the ``experiments:manage`` scope."""
    operator = signed_in(client, Role.OPERATOR)
    created = create(client)
    client.logout()
    plain = api_key_create(user=operator, name="app", allowed_models=[model]).secret

    response = as_key(client, plain, method, f"{URL}{created['id']}/{suffix}", data)

    assert response.status_code == 403
    assert "experiments:manage" in response.json()["error"]["message"]
    experiment = Experiment.objects.get(pk=created["id"])
    assert experiment.status == "draft" and experiment.promoted_variant_id is None and experiment.description == ""
    for method_, path in (("get", URL), ("post", URL)):
        refused = as_key(client, plain, method_, path, body(name="other") if method_ == "post" else None)
        assert refused.status_code == 403
    assert Experiment.objects.count() == 1


def test_an_operators_key_with_experiments_manage_runs_the_whole_lifecycle(client, model):
    operator = UserFactory(username="ops")
    role_set(operator, Role.OPERATOR)
    secret = api_key_create(user=operator, name="automation", scopes=[KeyScope.EXPERIMENTS_MANAGE]).secret

    created = as_key(client, secret, "post", URL, body())
    assert created.status_code == 201, created.json()
    path = f"{URL}{created.json()['id']}/"
    assert as_key(client, secret, "get", URL).json()["count"] == 1
    assert as_key(client, secret, "post", path + "start/").json()["status"] == "running"
    assert as_key(client, secret, "post", path + "promote/", {"variant": "green"}).status_code == 200
    assert as_key(client, secret, "get", path + "results/").status_code == 200
    assert as_key(client, secret, "post", path + "conclude/").json()["status"] == "concluded"
    assert AuditEvent.objects.filter(action="experiment.promote").exists()


def test_a_secret_replaced_by_a_rotation_may_read_but_not_change_experiments_during_its_grace(client, model):
    """A leaked automation key is rotated by its operator; the leaked secret, in its grace period, goes on
    reading (clients switch over) but may not start, promote, conclude, delete or create experiments, which
    steer every user's traffic: the rule key management already follows (``NotAReplacedSecret``)."""
    from billing.services.keys import api_key_rotate

    operator = UserFactory(username="ops")
    role_set(operator, Role.OPERATOR)
    created_key = api_key_create(user=operator, name="automation", scopes=[KeyScope.EXPERIMENTS_MANAGE])
    created = as_key(client, created_key.secret, "post", URL, body()).json()
    owners = api_key_rotate(api_key=created_key.api_key, grace_seconds=3600)
    path = f"{URL}{created['id']}/"

    for method, suffix, data in (
        ("post", "start/", None),
        ("patch", "", {"description": "taken"}),
        ("delete", "", None),
    ):
        refused = as_key(client, created_key.secret, method, path + suffix, data)
        assert refused.status_code == 403, refused.content
        assert "replaced" in refused.json()["error"]["message"]
    assert as_key(client, created_key.secret, "post", URL, body(name="other")).status_code == 403
    experiment = Experiment.objects.get(pk=created["id"])
    assert (experiment.status, experiment.description, Experiment.objects.count()) == ("draft", "", 1)

    assert as_key(client, created_key.secret, "get", path).status_code == 200
    assert as_key(client, owners.secret, "post", path + "start/").json()["status"] == "running"


def test_a_change_made_with_a_key_is_recorded_as_that_key(client, model):
    """The audit log says which key (which automation) changed an experiment, as for every request made with a
    key (docs/audit.md, "Who and where"); a person's change is recorded as the person."""
    operator = UserFactory(username="ops")
    role_set(operator, Role.OPERATOR)
    created_key = api_key_create(user=operator, name="automation", scopes=[KeyScope.EXPERIMENTS_MANAGE])
    created = as_key(client, created_key.secret, "post", URL, body()).json()
    path = f"{URL}{created['id']}/"
    as_key(client, created_key.secret, "patch", path, {"description": "by the key"})
    as_key(client, created_key.secret, "post", path + "start/")
    as_key(client, created_key.secret, "post", path + "promote/", {"variant": "green"})
    client.force_login(operator)
    post(client, path + "conclude/")

    recorded = {
        event.action: (event.actor_type, event.actor_repr)
        for event in AuditEvent.objects.filter(action__startswith="experiment.")
    }
    by_key = ("key", created_key.api_key.prefix)
    assert recorded["experiment.create"] == by_key
    assert recorded["experiment.change"] == by_key
    assert recorded["experiment.start"] == by_key
    assert recorded["experiment.promote"] == by_key
    assert recorded["experiment.conclude"] == ("user", "ops")


def test_the_scope_gives_a_member_nothing(client, model):
    member = UserFactory(username="member")
    role_set(member, Role.MEMBER)
    secret = api_key_create(user=member, name="automation", scopes=[KeyScope.EXPERIMENTS_MANAGE]).secret

    response = as_key(client, secret, "get", URL)

    assert response.status_code == 403
    assert "operators" in response.json()["error"]["message"]


def test_the_scope_is_offered_and_documented(admin_client):
    page = admin_client.get("/admin/billing/apikey/add/").content.decode()
    assert 'value="experiments:manage"' in page and "Manage experiments" in page
    schema = admin_client.get("/api/schema/", {"format": "json"}).json()
    assert "experiments:manage" in schema["components"]["schemas"]["ScopesEnum"]["enum"]
    operations = [
        operation
        for path, item in schema["paths"].items()
        if path.startswith(URL)
        for operation in item.values()
        if isinstance(operation, dict) and "operationId" in operation
    ]
    assert len(operations) == 11
    assert all("experiments:manage" in operation["description"] for operation in operations)


def test_the_keys_page_offers_the_scope_to_those_who_may_manage_experiments(client):
    signed_in(client, Role.OPERATOR)
    assert 'id="key-experiments"' in client.get("/keys/").content.decode()
    client.logout()
    signed_in(client, Role.MEMBER)
    assert 'id="key-experiments"' not in client.get("/keys/").content.decode()


def test_the_list_filters_by_status_and_model_and_refuses_a_bad_filter(client, operator, model):
    draft = create(client)
    running = create(client, name="running")
    post(client, f"{URL}{running['id']}/start/")
    assert [e["id"] for e in client.get(URL + "?status=running").json()["results"]] == [running["id"]]
    assert [e["id"] for e in client.get(URL + "?status=draft&model=ab-model").json()["results"]] == [draft["id"]]
    assert client.get(URL + "?model=other-model").json()["count"] == 0
    for query, param in [("?status=sleeping", "status"), ("?model=a%00b", "model")]:
        response = client.get(URL + query)
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_create_makes_a_draft_with_its_variants_steps_and_layout(client, operator, model):
    created = create(client)
    assert created["status"] == "draft"
    assert created["model"] == "ab-model"
    assert created["untouched"] == "80.00"
    assert [
        (v["name"], v["is_control"], v["deployment"], v["allocation"], v["overrides"]) for v in created["variants"]
    ] == [
        ("control", True, "blue", "10.00", {}),
        ("green", False, "green", "10.00", {"temperature": 0.2}),
    ]
    assert [(s["position"], s["allocations"], s["at"]) for s in created["steps"]] == [
        (0, {"green": "25.00"}, None),
        (1, {"green": "50.00"}, "2026-12-24T00:00:00Z"),
    ]
    experiment = Experiment.objects.get(pk=created["id"])
    owned = sum(end - start for start, end, _ in experiment.layout)
    assert owned == 2000  # 20 % of 10,000 buckets
    assert AuditEvent.objects.filter(action="experiment.create", target_id=str(experiment.pk)).exists()


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"model": "no-such-model"}, "model"),
        ({"name": "Not a slug!"}, "name"),
        ({"primary_metric": "happiness"}, "primary_metric"),
        ({"guardrail_metrics": ["error_rate", "vibes"]}, "guardrail_metrics.1"),
        ({"alpha": "0.5"}, "alpha"),
        ({"ends_at": "2026-01-01T00:00:00Z", "starts_at": "2026-02-01T00:00:00Z"}, "ends_at"),
        ({"variants": [{"name": "only", "is_control": True}]}, "variants"),
        ({"variants": [{"name": "a", "is_control": True}, {"name": "b", "is_control": True}]}, "variants"),
        ({"variants": [{"name": "a", "is_control": True}, {"name": "a"}]}, "variants"),
        (
            {"variants": [{"name": "a", "is_control": True, "allocation": "60"}, {"name": "b", "allocation": 41}]},
            "variants",
        ),
        (
            {"variants": [{"name": "a", "is_control": True, "allocation": "12.345"}, {"name": "b"}]},
            "variants.0.allocation",
        ),
        (
            {"variants": [{"name": "a", "is_control": True}, {"name": "b", "deployment": "red"}]},
            "variants.1.deployment",
        ),
        (
            {"variants": [{"name": "a", "is_control": True}, {"name": "b", "target_model": "nope"}]},
            "variants.1.target_model",
        ),
        (
            {"variants": [{"name": "a", "is_control": True}, {"name": "b", "target_model": "ab-model"}]},
            "variants.1.target_model",
        ),
        (
            {
                "variants": [
                    {"name": "a", "is_control": True},
                    {"name": "b", "deployment": "green", "target_model": "other-model"},
                ]
            },
            "variants.1.target_model",
        ),
        (
            {"variants": [{"name": "a", "is_control": True}, {"name": "b", "prompt_version": 999}]},
            "variants.1.prompt_version",
        ),
        (
            {"variants": [{"name": "a", "is_control": True}, {"name": "b", "overrides": {"stream": True}}]},
            "variants.1.overrides.stream",
        ),
        (
            {"variants": [{"name": "a", "is_control": True}, {"name": "b", "overrides": {"temperature": 3}}]},
            "variants.1.overrides.temperature",
        ),
        (
            {"variants": [{"name": "a", "is_control": True, "overrides": {"max_tokens": "lots"}}, {"name": "b"}]},
            "variants.0.overrides.max_tokens",
        ),
        ({"steps": [{"allocations": {"purple": "5"}}]}, "steps.0.allocations"),
        ({"steps": [{"allocations": {"green": "101"}}]}, "steps.0.allocations.green"),
        # Each step within 100 % alone, not with the control left at its 10 %: refused when saved, not weeks
        # later when the step comes to apply.
        ({"steps": [{"allocations": {"green": "50"}}, {"allocations": {"green": "95"}}]}, "steps.1.allocations"),
    ],
)
def test_an_invalid_experiment_is_a_400_naming_the_field(client, operator, model, overrides, param):
    response = client.post(URL, body(**overrides), content_type="application/json")
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert not Experiment.objects.exists()


def test_a_name_taken_is_a_400(client, operator, model):
    create(client)
    response = client.post(URL, body(), content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "name"


def test_the_lifecycle_start_advance_pause_resume_conclude(client, operator, model):
    created = create(client)
    detail = f"{URL}{created['id']}/"

    response = post(client, detail + "start/")
    assert response.status_code == 200
    assert response.json()["status"] == "running" and response.json()["starts_at"] is not None

    response = post(client, detail + "start/")
    assert response.status_code == 400 and response.json()["error"]["param"] == "status"

    response = post(client, detail + "advance/")
    assert response.status_code == 200
    green = next(v for v in response.json()["variants"] if v["name"] == "green")
    assert green["allocation"] == "25.00"
    assert response.json()["steps"][0]["applied_at"] is not None

    assert post(client, detail + "pause/").json()["status"] == "paused"
    assert post(client, detail + "start/").json()["status"] == "running"
    concluded = post(client, detail + "conclude/").json()
    assert concluded["status"] == "concluded" and concluded["ends_at"] is not None
    assert post(client, detail + "pause/").status_code == 400

    actions = list(
        AuditEvent.objects.filter(target_id=str(created["id"]), action__startswith="experiment.")
        .order_by("seq")
        .values_list("action", flat=True)
    )
    assert actions == [
        "experiment.create",
        "experiment.start",
        "experiment.allocation",
        "experiment.pause",
        "experiment.start",
        "experiment.conclude",
    ]


def test_starting_an_experiment_whose_end_has_passed_is_a_400(client, operator, model):
    created = create(client, ends_at="2020-01-01T00:00:00Z")
    response = post(client, f"{URL}{created['id']}/start/")
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["param"] == "ends_at"
    assert Experiment.objects.get(pk=created["id"]).status == ExperimentStatus.DRAFT


def test_starting_a_second_experiment_on_a_model_is_a_400(client, operator, model):
    first = create(client)
    second = create(client, name="second")
    assert post(client, f"{URL}{first['id']}/start/").status_code == 200
    response = post(client, f"{URL}{second['id']}/start/")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


def test_advance_without_steps_left_is_a_400(client, operator, model):
    created = create(client, steps=[])
    post(client, f"{URL}{created['id']}/start/")
    response = post(client, f"{URL}{created['id']}/advance/")
    assert response.status_code == 400 and response.json()["error"]["param"] == "steps"


def test_promote_sets_the_winner_to_100_percent_and_is_recorded(client, operator, model):
    created = create(client)
    detail = f"{URL}{created['id']}/"
    post(client, detail + "start/")

    assert post(client, detail + "promote/", {"variant": "purple"}).json()["error"]["param"] == "variant"
    response = post(client, detail + "promote/", {"variant": "green"})
    assert response.status_code == 200
    promoted = response.json()
    assert promoted["promoted_variant"] == "green"
    assert {v["name"]: v["allocation"] for v in promoted["variants"]} == {"control": "0.00", "green": "100.00"}
    assert promoted["untouched"] == "0.00"
    event = AuditEvent.objects.get(action="experiment.promote", target_id=str(created["id"]))
    assert event.changes["promoted_variant"] == [None, "green"]
    assert event.actor_repr == operator.username
    experiment = Experiment.objects.get(pk=created["id"])
    assert experiment.layout == [[0, 10_000, experiment.promoted_variant_id]]


def test_a_started_experiments_variant_cannot_be_retargeted_but_its_allocation_changes(client, operator, model):
    created = create(client)
    detail = f"{URL}{created['id']}/"
    post(client, detail + "start/")
    experiment = Experiment.objects.get(pk=created["id"])
    before = [list(r) for r in experiment.layout]

    for change, param in [
        ({"deployment": "blue"}, "variants.0.deployment"),
        ({"target_model": "other-model"}, "variants.0.target_model"),
        ({"overrides": {"temperature": 1}}, "variants.0.overrides"),
        ({"is_control": True}, "variants.0.is_control"),
    ]:
        response = client.patch(detail, {"variants": [{"name": "green", **change}]}, content_type="application/json")
        assert response.status_code == 400, (change, response.json())
        assert response.json()["error"]["param"] == param
    response = client.patch(detail, {"variants": [{"name": "purple"}]}, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["param"] == "variants.0.name"
    for field, value in [("name", "renamed"), ("primary_metric", "error_rate"), ("alpha", "0.1")]:
        response = client.patch(detail, {field: value}, content_type="application/json")
        assert response.status_code == 400 and response.json()["error"]["param"] == field

    response = client.patch(
        detail,
        {"variants": [{"name": "green", "allocation": "20"}], "description": "greener"},
        content_type="application/json",
    )
    assert response.status_code == 200, response.json()
    assert {v["name"]: v["allocation"] for v in response.json()["variants"]} == {"control": "10.00", "green": "20.00"}
    assert response.json()["description"] == "greener"
    experiment.refresh_from_db()
    green_id = next(v["id"] for v in response.json()["variants"] if v["name"] == "green")
    # Raising green moved nobody out of the buckets they had: every old range is still owned as before.
    owner = {b: vid for s, e, vid in experiment.layout for b in range(s, e)}
    assert all(owner.get(b) == vid for s, e, vid in before for b in range(s, e))
    assert sum(e - s for s, e, vid in experiment.layout if vid == green_id) == 2000
    event = AuditEvent.objects.filter(action="experiment.allocation", target_id=str(experiment.pk)).latest("seq")
    assert event.changes["allocation"][1]["green"] == "20.00"

    response = client.patch(
        detail, {"variants": [{"name": "green", "allocation": "95"}]}, content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "allocations"


def test_a_draft_may_be_retargeted_and_gain_variants_and_steps(client, operator, model):
    created = create(client)
    detail = f"{URL}{created['id']}/"
    response = client.patch(
        detail,
        {
            "variants": [
                {"name": "green", "deployment": None, "target_model": "other-model"},
                {"name": "third", "deployment": "green", "allocation": "5"},
            ],
            "steps": [{"allocations": {"third": "15"}}],
        },
        content_type="application/json",
    )
    assert response.status_code == 200, response.json()
    variants = {v["name"]: v for v in response.json()["variants"]}
    assert variants["green"]["target_model"] == "other-model" and variants["green"]["deployment"] is None
    assert variants["third"]["allocation"] == "5.00" and variants["third"]["deployment"] == "green"
    assert [s["allocations"] for s in response.json()["steps"]] == [{"third": "15.00"}]
    assert AllocationStep.objects.filter(experiment_id=created["id"]).count() == 1


def test_steps_a_patch_sets_are_checked_against_the_allocations_they_start_from(client, operator, model):
    created = create(client)
    detail = f"{URL}{created['id']}/"
    # control 10 % + green 10 %, and a new variant at 5 %: a step taking green to 90 % would make 105 %.
    response = client.patch(
        detail,
        {
            "variants": [{"name": "third", "deployment": "green", "allocation": "5"}],
            "steps": [{"allocations": {"green": "90"}}],
        },
        content_type="application/json",
    )
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert error["param"] == "steps.0.allocations" and "105" in error["message"]
    assert not Experiment.objects.get(pk=created["id"]).variants.filter(name="third").exists()
    # The same step with the control taken down in it fits.
    fitting = client.patch(
        detail, {"steps": [{"allocations": {"green": "85", "control": "5"}}]}, content_type="application/json"
    )
    assert fitting.status_code == 200, fitting.json()


def test_retargeting_a_drafts_variant_to_a_model_while_it_keeps_its_deployment_is_a_400(client, operator, model):
    created = create(client)
    detail = f"{URL}{created['id']}/"
    client.raise_request_exception = False
    response = client.patch(
        detail, {"variants": [{"name": "green", "target_model": "other-model"}]}, content_type="application/json"
    )
    assert response.status_code == 400, response.content[:200]
    assert response.json()["error"]["param"] == "variants.0.target_model"
    assert "deployment" in response.json()["error"]["message"]
    green = Experiment.objects.get(pk=created["id"]).variants.get(name="green")
    assert green.deployment.name == "green" and green.target_model_id is None
    response = client.patch(
        detail,
        {"variants": [{"name": "control", "deployment": "green", "target_model": None}]},
        content_type="application/json",
    )
    assert response.status_code == 200, response.json()


@pytest.mark.parametrize(
    ("change", "param", "hint"),
    [
        ({"model": "other-model"}, "model", "new experiment"),
        ({"status": "running"}, "status", "/start/"),
        ({"promoted_variant": "green"}, "promoted_variant", "/promote/"),
        ({"descripton": "typo"}, "descripton", "description"),
    ],
)
def test_a_field_patch_cannot_change_is_a_400_not_silently_ignored(client, operator, model, change, param, hint):
    created = create(client)

    response = client.patch(f"{URL}{created['id']}/", change, content_type="application/json")

    assert response.status_code == 400, response.json()
    assert response.json()["error"]["param"] == param
    assert hint in response.json()["error"]["message"]
    experiment = Experiment.objects.get(pk=created["id"])
    assert experiment.model.name == "ab-model" and experiment.status == ExperimentStatus.DRAFT
    # What a GET answered may be sent back as it was.
    read = client.get(f"{URL}{created['id']}/").json()
    assert client.patch(f"{URL}{created['id']}/", read, content_type="application/json").status_code == 200


def test_delete_only_a_draft_or_concluded_experiment(client, operator, model):
    created = create(client)
    detail = f"{URL}{created['id']}/"
    post(client, detail + "start/")
    response = client.delete(detail)
    assert response.status_code == 400 and response.json()["error"]["param"] == "status"
    post(client, detail + "conclude/")
    assert client.delete(detail).status_code == 204
    assert client.get(detail).status_code == 404
    assert AuditEvent.objects.filter(action="experiment.delete", target_id=str(created["id"])).exists()


def test_results_as_json_and_csv_agree(client, operator, model):
    created = create(client)
    experiment = Experiment.objects.get(pk=created["id"])
    experiment.status = ExperimentStatus.RUNNING
    experiment.save()
    control, green = experiment.variants.order_by("position")
    rows = []
    for i in range(40):
        variant = control if i % 2 else green
        rows.append(
            UsageRecord(
                request_id=f"r-{i}",
                endpoint="rest",
                status="ok",
                duration_ms=100 + i,
                cost=Decimal("0.002"),
                experiment_id=experiment.pk,
                experiment_variant_id=variant.pk,
                created_at=datetime(2026, 11, 2, tzinfo=UTC),
            )
        )
    UsageRecord.objects.bulk_create(rows)
    Feedback.objects.bulk_create(
        Feedback(request_id=r.request_id, metric="thumbs", value=1 if i % 3 else -1) for i, r in enumerate(rows)
    )
    Feedback.objects.create(request_id="r-1", metric="helpfulness", value=4.5)

    results = client.get(f"{URL}{created['id']}/results/").json()
    assert results["experiment"]["name"] == "tone-test"
    assert [v["requests"] for v in results["variants"]] == [20, 20]

    response = client.get(f"{URL}{created['id']}/results/?format=csv")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"].startswith('attachment; filename="experiment-tone-test-')
    table = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert len(table) == 2 * 7 + 1  # one row per variant and metric, and control's named score
    helpfulness = next(r for r in table if r["metric"] == "scores.helpfulness")
    assert (helpfulness["variant"], helpfulness["value"], helpfulness["n"]) == ("control", "4.5", "1")
    by_key = {(r["variant"], r["metric"]): r for r in table}
    for variant in results["variants"]:
        for key, figure in variant["metrics"].items():
            line = by_key[(variant["name"], key)]
            assert line["value"] == ("" if figure["value"] is None else str(figure["value"]))
            assert line["n"] == str(figure["n"])
            assert line["requests"] == str(variant["requests"])
            comparison = variant["comparisons"].get(key)
            assert line["verdict"] == (comparison["verdict"] if comparison else "")
            if comparison:
                assert line["samples_needed"] == (
                    "" if comparison["samples_needed"] is None else str(comparison["samples_needed"])
                )
    assert by_key[("green", "positive_rate")]["verdict"] in {"better", "worse", "unknown"}


def test_the_csv_errors_stay_json(client, model):
    signed_in(client, Role.MEMBER)
    response = client.get(f"{URL}1/results/?format=csv")
    assert response.status_code == 403
    assert response["Content-Type"].startswith("application/json")
    signed_in(client, Role.OPERATOR)
    response = client.get(f"{URL}12345/results/?format=csv")
    assert response.status_code == 404
    assert response.json()["error"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_by_an_operator_get_no_server_error_and_match_the_schema(llmhub_server, model, mode):
    """schemathesis sends generated requests (valid ones, then invalid ones) to every /api/experiments/
    operation as an operator, on a live server with a draft and a running experiment in place: every answer
    is a non-5xx whose status, content type and (for valid requests) body the schema documents."""
    import httpx
    import schemathesis
    from schemathesis import GenerationMode

    from tests.test_fuzz import CHECKS, operation_failures

    user = UserFactory(username="fuzz-operator")
    role_set(user, Role.OPERATOR)
    key = api_key_create(user=user, name="fuzz", scopes=[KeyScope.EXPERIMENTS_MANAGE]).secret
    client = Client()
    client.force_login(user)
    create(client)
    running = create(client, name="running")
    post(client, f"{URL}{running['id']}/start/")

    # The key the fuzzer sends is an operator's: its requests reach the views, not just the permission check.
    listed = httpx.get(llmhub_server.url + URL, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert listed.status_code == 200 and listed.json()["count"] == 2

    schema = schemathesis.openapi.from_url(llmhub_server.url + "/api/schema/?format=json").include(
        path_regex="^/api/experiments/"
    )
    assert len(list(schema.get_all_operations())) == 11
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    checks = CHECKS if mode == "positive" else CHECKS[:1] + CHECKS[2:3]
    failures = operation_failures(schema, mode=generation, checks=checks, base_url=llmhub_server.url, key=key)
    assert not failures, "\n\n".join(failures)


def test_ids_past_any_row_are_404_or_400_not_server_errors(client, operator, model):
    huge = 10**30
    assert client.get(f"{URL}{huge}/").status_code == 404
    assert client.get(f"{URL}{huge}/results/").status_code == 404
    response = client.post(
        URL,
        body(variants=[{"name": "a", "is_control": True}, {"name": "b", "prompt_version": huge}]),
        content_type="application/json",
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "variants.1.prompt_version"


def test_a_variant_that_could_not_serve_its_callers_is_refused_when_created_changed_or_started(client, operator, model):
    """An output limit among a variant's overrides past what its model writes, or a prompt version whose required
    variables are not those of the version it competes with, would refuse every caller in the variant with a 400
    naming a field they never sent: the API refuses the variant, naming it and the field."""
    model.max_output_tokens = 1000
    model.save()
    v1, v2 = tagline_versions()
    control = {"name": "control", "is_control": True, "deployment": "blue", "allocation": "10"}
    green = {"name": "green", "deployment": "green", "allocation": "10"}

    cases = [
        ([control, {**green, "overrides": {"max_tokens": 4000}}], "variants.1.overrides", "max_tokens"),
        (
            [{**control, "prompt_version": v1.pk}, {**green, "prompt_version": v2.pk}],
            "variants.1.prompt_version",
            "audience",
        ),
    ]
    for variants, param, named in cases:
        response = client.post(URL, body(variants=variants), content_type="application/json")
        assert response.status_code == 400, response.json()
        error = response.json()["error"]
        assert error["param"] == param
        assert "green" in error["message"] and named in error["message"]
    assert not Experiment.objects.exists()

    created = create(client)
    response = client.patch(
        f"{URL}{created['id']}/",
        {"variants": [{"name": "green", "overrides": {"max_completion_tokens": 4000}}]},
        content_type="application/json",
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "variants.0.overrides"
    experiment = Experiment.objects.get()
    assert experiment.variants.get(name="green").overrides == {"temperature": 0.2}

    experiment.variants.filter(name="green").update(overrides={"max_tokens": 4000})  # as an older release saved it
    response = post(client, f"{URL}{created['id']}/start/")
    assert response.status_code == 400
    assert "green" in response.json()["error"]["message"] and "max_tokens" in response.json()["error"]["message"]
    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.DRAFT
