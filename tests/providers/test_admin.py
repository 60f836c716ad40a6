"""The providers admin, driven as a superuser through Django's test client."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.contrib import messages
from django.urls import reverse

from llmhub.testing.fake_upstream import EMBEDDING_MODELS, MODELS, FakeUpstream
from providers.models import CatalogModel, Deployment, HealthStatus, Provider, ProviderKind
from tests.conftest import free_port
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory, provider_admin_form

pytestmark = pytest.mark.django_db

KEY = "sk-admin-test-key-0123456789abcdefWXYZ"
WRONG_KEY = "sk-wrong-admin-key-00000000000000000000"


@pytest.fixture(scope="module")
def locked_upstream():
    server = FakeUpstream(api_key="sk-only-this-key-works-111111111111").start()
    yield server
    server.stop()


def change_url(provider: Provider) -> str:
    return reverse("admin:providers_provider_change", args=[provider.pk])


def run_action(client, action: str, *providers: Provider):
    response = client.post(
        reverse("admin:providers_provider_changelist"),
        {"action": action, "_selected_action": [provider.pk for provider in providers]},
        follow=True,
    )
    assert response.status_code == 200
    return response, [(message.level, message.message) for message in response.context["messages"]]


# The write-only key ---------------------------------------------------------------------------------


def test_change_page_never_shows_the_key(admin_client):
    provider = ProviderFactory(api_key=KEY)

    response = admin_client.get(change_url(provider))

    page = response.content.decode()
    assert response.status_code == 200
    assert KEY not in page and KEY[3:-4] not in page
    assert 'type="password"' in page and "stored: sk-…WXYZ (leave empty to keep)" in page
    assert "Clear stored key" in page


def test_empty_key_submission_keeps_the_stored_key(admin_client):
    provider = ProviderFactory(api_key=KEY)

    response = admin_client.post(change_url(provider), provider_admin_form(provider, organization="org-new"))

    assert response.status_code == 302, response.content.decode()[:2000]
    provider.refresh_from_db()
    assert provider.organization == "org-new"
    assert provider.api_key.reveal() == KEY


def test_a_new_key_replaces_the_stored_one(admin_client):
    provider = ProviderFactory(api_key=KEY)

    response = admin_client.post(
        change_url(provider), provider_admin_form(provider, api_key="  sk-replacement-key-999999999  ")
    )

    assert response.status_code == 302
    provider.refresh_from_db()
    assert provider.api_key.reveal() == "sk-replacement-key-999999999"


def test_clear_stored_key(admin_client):
    provider = ProviderFactory(api_key=KEY)

    response = admin_client.post(change_url(provider), provider_admin_form(provider, clear_api_key="on"))

    assert response.status_code == 302
    provider.refresh_from_db()
    assert not provider.api_key


def test_clearing_and_giving_a_key_at_once_is_refused(admin_client):
    provider = ProviderFactory(api_key=KEY)

    response = admin_client.post(
        change_url(provider), provider_admin_form(provider, clear_api_key="on", api_key="sk-another-key-1234567890")
    )

    page = response.content.decode()
    assert response.status_code == 200 and "not both" in page
    assert "sk-another-key-1234567890" not in page and KEY not in page
    provider.refresh_from_db()
    assert provider.api_key.reveal() == KEY


def test_invalid_submission_does_not_echo_the_new_key(admin_client):
    provider = ProviderFactory(api_key=KEY)

    response = admin_client.post(
        change_url(provider),
        provider_admin_form(provider, base_url="ftp://nope.example.com", api_key="sk-typed-in-key-55555555"),
    )

    page = response.content.decode()
    assert response.status_code == 200 and "http(s) URL" in page
    assert "sk-typed-in-key-55555555" not in page and KEY not in page
    provider.refresh_from_db()
    assert provider.api_key.reveal() == KEY


def test_add_provider_with_a_key(admin_client):
    response = admin_client.post(
        reverse("admin:providers_provider_add"),
        {
            "name": "added",
            "kind": ProviderKind.OPENAI_COMPATIBLE,
            "enabled": "on",
            "base_url": "http://127.0.0.1:9/v1",
            "api_key": KEY,
            "organization": "",
            "extra_headers": "{}",
            "timeout_seconds": "30",
            "byok": "disabled",
        },
    )

    assert response.status_code == 302
    assert Provider.objects.get(name="added").api_key.reveal() == KEY


# Extra headers: names shown, values masked ---------------------------------------------------------

HEADER_TOKEN = "upstream-token-0123456789-abcdEFGH"


def stored_headers(provider: Provider) -> dict[str, str]:
    provider.refresh_from_db()
    return {name: value.reveal() for name, value in provider.extra_headers.items()}


def test_change_page_shows_header_names_with_masked_values(admin_client):
    provider = ProviderFactory(extra_headers={"X-Upstream-Token": HEADER_TOKEN, "X-Team": "research"})

    page = admin_client.get(change_url(provider)).content.decode()

    assert HEADER_TOKEN not in page and HEADER_TOKEN[:-4] not in page and "research" not in page
    assert "&quot;X-Upstream-Token&quot;: &quot;…EFGH&quot;" in page
    assert "&quot;X-Team&quot;: &quot;…ch&quot;" in page  # short values show two characters at most


def test_masked_header_values_are_kept_typed_ones_replace_and_left_out_names_drop(admin_client):
    provider = ProviderFactory(
        extra_headers={"X-Upstream-Token": HEADER_TOKEN, "X-Team": "research", "X-Old": "to-be-dropped"}
    )
    submitted = {"X-Upstream-Token": "…EFGH", "X-Team": "platform", "X-New": "added"}

    response = admin_client.post(
        change_url(provider), provider_admin_form(provider, extra_headers=json.dumps(submitted))
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    assert stored_headers(provider) == {"X-Upstream-Token": HEADER_TOKEN, "X-Team": "platform", "X-New": "added"}


def test_the_headers_help_says_which_are_not_sent_with_a_users_own_key(admin_client):
    help_text = admin_client.get(change_url(ProviderFactory())).context["adminform"].form["extra_headers"].help_text

    assert "With a user's own key" in help_text and "Authorization" in help_text and "HTTP-Referer" in help_text


def test_an_unchanged_form_keeps_every_header(admin_client):
    provider = ProviderFactory(extra_headers={"X-Upstream-Token": HEADER_TOKEN})
    shown = admin_client.get(change_url(provider)).context["adminform"].form["extra_headers"].value()

    response = admin_client.post(
        change_url(provider), provider_admin_form(provider, organization="org-2", extra_headers=shown)
    )

    assert response.status_code == 302
    assert stored_headers(provider) == {"X-Upstream-Token": HEADER_TOKEN}


def test_a_masked_value_under_another_name_is_refused_and_nothing_typed_is_echoed(admin_client):
    provider = ProviderFactory(extra_headers={"X-Upstream-Token": HEADER_TOKEN})
    submitted = {"X-Renamed-Token": "…EFGH", "X-Fresh-Secret": "typed-secret-value-7777"}

    response = admin_client.post(
        change_url(provider), provider_admin_form(provider, extra_headers=json.dumps(submitted))
    )

    page = response.content.decode()
    assert response.status_code == 200 and "keeps only the value stored under the same name" in page
    assert "typed-secret-value-7777" not in page and HEADER_TOKEN not in page
    assert stored_headers(provider) == {"X-Upstream-Token": HEADER_TOKEN}


def test_add_provider_with_a_credential_header(admin_client):
    response = admin_client.post(
        reverse("admin:providers_provider_add"),
        {
            "name": "with-header",
            "kind": ProviderKind.OPENAI_COMPATIBLE,
            "enabled": "on",
            "base_url": "http://127.0.0.1:9/v1",
            "api_key": "",
            "organization": "",
            "extra_headers": json.dumps({"X-Upstream-Token": HEADER_TOKEN}),
            "timeout_seconds": "30",
            "byok": "disabled",
        },
    )

    assert response.status_code == 302
    assert stored_headers(Provider.objects.get(name="with-header")) == {"X-Upstream-Token": HEADER_TOKEN}


# Lists ----------------------------------------------------------------------------------------------


def test_provider_list_shows_endpoint_health_and_deployment_count(admin_client, fake_upstream):
    checked = ProviderFactory(name="checked", base_url=fake_upstream.base_url + "/v1", api_key=KEY)
    ModelFactory.create_batch(2, provider=checked)
    ProviderFactory(name="default-endpoint", kind=ProviderKind.OPENAI, base_url="")
    run_action(admin_client, "test_connection", checked)

    response = admin_client.get(reverse("admin:providers_provider_changelist"))

    page = response.content.decode()
    assert response.status_code == 200 and KEY not in page
    assert "https://api.openai.com/v1" in page  # the kind's default, for an empty base URL
    assert "never checked" in page
    row = next(line for line in page.split("<tr") if ">checked<" in line)
    assert "OK, " in row and " ms, " in row and ">2<" in row


def test_model_list_filters_search_and_edits_enabled(admin_client):
    provider = ProviderFactory(name="listing")
    ModelFactory(name="visible-model", provider=provider, upstream_id="up-visible", input_per_mtok=Decimal("1.25"))
    hidden = ModelFactory(name="other-model", provider=provider, upstream_id="up-other", enabled=False)
    changelist = reverse("admin:providers_catalogmodel_changelist")

    page = admin_client.get(changelist, {"q": "up-visible"}).content.decode()
    assert "visible-model" in page and "other-model" not in page and "1.25" in page
    page = admin_client.get(
        changelist, {"enabled__exact": "0", "deployments__provider__id__exact": provider.pk}
    ).content.decode()
    assert "other-model" in page and "visible-model" not in page
    assert admin_client.get(changelist, {"supports_vision__exact": "1"}).status_code == 200

    models = list(CatalogModel.objects.order_by("name"))
    response = admin_client.post(
        changelist,
        {
            "form-TOTAL_FORMS": str(len(models)),
            "form-INITIAL_FORMS": str(len(models)),
            **{f"form-{i}-id": str(model.pk) for i, model in enumerate(models)},
            **{f"form-{i}-enabled": "on" for i, _ in enumerate(models)},
            "_save": "Save",
        },
    )
    assert response.status_code == 302
    hidden.refresh_from_db()
    assert hidden.enabled


def test_model_change_page_has_the_fieldsets(admin_client):
    model = ModelFactory()

    page = admin_client.get(reverse("admin:providers_catalogmodel_change", args=[model.pk])).content.decode()

    for heading in ("Identity", "Routing", "Limits", "Capabilities", "Parameter rules", "Deployments"):
        assert heading in page


# Actions --------------------------------------------------------------------------------------------


def test_test_connection_success(admin_client, fake_upstream):
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1", api_key=KEY)

    response, shown = run_action(admin_client, "test_connection", provider)

    [(level, text)] = shown
    assert level == messages.SUCCESS and text.startswith(f"{provider.name}: OK in ")
    assert f"{len(MODELS + EMBEDDING_MODELS)} models listed" in text
    provider.refresh_from_db()
    assert provider.last_health_status == HealthStatus.OK and provider.last_health_at is not None
    assert KEY not in response.content.decode()


def test_test_connection_with_a_refused_key(admin_client, locked_upstream):
    provider = ProviderFactory(base_url=locked_upstream.base_url + "/v1", api_key=WRONG_KEY)

    response, shown = run_action(admin_client, "test_connection", provider)

    [(level, text)] = shown
    assert level == messages.ERROR
    assert "refused the gateway's credentials" in text and "update the provider's API key" in text
    assert WRONG_KEY not in response.content.decode()
    provider.refresh_from_db()
    assert provider.last_health_status == HealthStatus.FAILING
    assert "refused the gateway's credentials" in provider.last_health_error
    assert provider.last_health_latency_ms is not None and provider.last_health_at is not None


def test_test_connection_to_an_unreachable_port(admin_client, fake_upstream):
    down = ProviderFactory(name="down", base_url=f"http://127.0.0.1:{free_port()}/v1")
    up = ProviderFactory(name="up", base_url=fake_upstream.base_url + "/v1")

    _, shown = run_action(admin_client, "test_connection", down, up)

    levels = {text.split(":")[0]: level for level, text in shown}
    assert levels == {"down": messages.ERROR, "up": messages.SUCCESS}
    assert any("could not reach" in text for _, text in shown)
    down.refresh_from_db()
    assert down.last_health_status == HealthStatus.FAILING and "could not reach" in down.last_health_error


def test_import_models_action(admin_client, fake_upstream):
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")

    _, shown = run_action(admin_client, "import_models", provider)

    [(level, text)] = shown
    assert level == messages.SUCCESS and f"{len(MODELS + EMBEDDING_MODELS)} model(s) added" in text
    assert sorted(Deployment.objects.filter(provider=provider).values_list("upstream_id", flat=True)) == sorted(
        model_id for model_id, _ in MODELS + EMBEDDING_MODELS
    )
    assert not CatalogModel.objects.filter(enabled=True).exists()

    _, shown = run_action(admin_client, "import_models", provider)
    assert f"0 model(s) added; {len(MODELS + EMBEDDING_MODELS)} already in the catalog" in shown[0][1]


def test_import_models_action_reports_a_refusal(admin_client, locked_upstream):
    provider = ProviderFactory(base_url=locked_upstream.base_url + "/v1", api_key=WRONG_KEY)

    response, shown = run_action(admin_client, "import_models", provider)

    [(level, text)] = shown
    assert level == messages.ERROR and "import failed" in text and "refused the gateway's credentials" in text
    assert WRONG_KEY not in response.content.decode()
    assert not CatalogModel.objects.exists()


# Public models with their deployments ----------------------------------------------------------------


def model_form(name: str, deployments: list[dict[str, object]], **overrides: object) -> dict[str, object]:
    """The add/change form of a public model as the admin page posts it, deployments inline."""
    data: dict[str, object] = {
        "name": name,
        "label": "",
        "mode": "chat",
        "enabled": "on",
        "strategy": "weighted",
        "retries": "2",
        "fallbacks": "",
        "context_window_fallbacks": "",
        "context_window": "128000",
        "supports_streaming": "on",
        "supports_tools": "on",
        "supports_json_mode": "on",
        "parameter_rules": "{}",
        "deployments-TOTAL_FORMS": str(len(deployments)),
        "deployments-INITIAL_FORMS": str(sum(1 for row in deployments if "id" in row)),
        "deployments-MIN_NUM_FORMS": "0",
        "deployments-MAX_NUM_FORMS": "1000",
    }
    for index, row in enumerate(deployments):
        fields = {"weight": "1", "priority": "0", "enabled": "on", "input_per_mtok": "0", "output_per_mtok": "0"}
        fields.update(row)
        data.update({f"deployments-{index}-{key}": value for key, value in fields.items()})
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def test_add_a_model_with_two_deployments_inline(admin_client):
    east = ProviderFactory(name="east", api_key=KEY)
    west = ProviderFactory(name="west", api_key=KEY)
    add_url = reverse("admin:providers_catalogmodel_add")
    page = admin_client.get(add_url).content.decode()
    assert "deployments-TOTAL_FORMS" in page and KEY not in page  # one row to fill in, no key anywhere

    response = admin_client.post(
        add_url,
        model_form(
            "gpt-4o-mini",
            [
                {
                    "provider": east.pk,
                    "upstream_id": "gpt-4o-mini",
                    "weight": "3",
                    "input_per_mtok": "0.15",
                    "output_per_mtok": "0.60",
                    "rpm_limit": "600",
                    "quality": "0.9",
                },
                {
                    "provider": west.pk,
                    "upstream_id": "gpt-4o-mini-west",
                    "input_per_mtok": "0.30",
                    "output_per_mtok": "1.20",
                    "priority": "1",
                    "breaker_override": "open",
                },
            ],
            strategy="priority",
        ),
    )

    assert response.status_code == 302, response.content.decode()[:3000]
    model = CatalogModel.objects.get(name="gpt-4o-mini")
    assert model.strategy == "priority"
    rows = {d.name: d for d in model.deployments.select_related("provider")}
    assert set(rows) == {"east", "west"}  # blank names: the providers'
    assert (rows["east"].weight, rows["east"].rpm_limit, rows["east"].quality) == (3, 600, Decimal("0.9"))
    assert rows["west"].upstream_id == "gpt-4o-mini-west" and rows["west"].breaker_override == "open"

    changelist = admin_client.get(reverse("admin:providers_catalogmodel_changelist")).content.decode()
    results = changelist.split('id="result_list"', 1)[1]
    row = next(line for line in results.split("<tr") if ">gpt-4o-mini<" in line)
    assert ">2<" in row and "0.15–0.3 · 0.6–1.2" in row
    change = admin_client.get(reverse("admin:providers_catalogmodel_change", args=[model.pk])).content.decode()
    assert "gpt-4o-mini-west" in change and KEY not in change
    providers = admin_client.get(reverse("admin:providers_provider_changelist")).content.decode()
    results = providers.split('id="result_list"', 1)[1]
    assert KEY not in providers and ">1<" in next(line for line in results.split("<tr") if ">east<" in line)


def test_two_unnamed_deployments_on_one_provider_get_distinct_names(admin_client):
    east = ProviderFactory(name="east")
    rows = [{"provider": east.pk, "upstream_id": "a"}, {"provider": east.pk, "upstream_id": "b"}]

    response = admin_client.post(reverse("admin:providers_catalogmodel_add"), model_form("twice", rows))

    assert response.status_code == 302, response.content.decode()[:3000]
    assert sorted(Deployment.objects.values_list("name", flat=True)) == ["east", "east-2"]


def test_an_enabled_model_without_deployments_is_refused_with_a_clear_message(admin_client):
    response = admin_client.post(reverse("admin:providers_catalogmodel_add"), model_form("bare", []))

    assert response.status_code == 200
    assert "An enabled model needs at least one deployment" in response.content.decode()
    assert not CatalogModel.objects.exists()

    # Disabled, it may wait for its deployments (as an imported model does).
    response = admin_client.post(reverse("admin:providers_catalogmodel_add"), model_form("bare", [], enabled=None))
    assert response.status_code == 302 and not CatalogModel.objects.get(name="bare").enabled


def test_an_alias_with_deployments_of_its_own_is_refused(admin_client):
    target = ModelFactory(name="gpt-4o-mini")
    provider = ProviderFactory()
    add_url = reverse("admin:providers_catalogmodel_add")

    response = admin_client.post(
        add_url, model_form("chat-default", [{"provider": provider.pk, "upstream_id": "x"}], alias_of=target.pk)
    )

    assert response.status_code == 200 and "An alias has no deployments of its own" in response.content.decode()
    response = admin_client.post(add_url, model_form("chat-default", [], alias_of=target.pk))
    assert response.status_code == 302
    assert CatalogModel.objects.get(name="chat-default").alias_of == target


def test_fallbacks_must_name_other_models_without_a_cycle(admin_client):
    provider = ProviderFactory()
    haiku = ModelFactory(name="claude-haiku", provider=provider, fallbacks=["gpt-4o-mini"])
    ModelFactory(name="gpt-4o-long", provider=provider)
    ModelFactory(name="chat-default", alias_of=haiku)
    add_url = reverse("admin:providers_catalogmodel_add")
    row = [{"provider": provider.pk, "upstream_id": "gpt-4o-mini"}]

    def refused(**fields: object) -> str:
        response = admin_client.post(add_url, model_form("gpt-4o-mini", row, **fields))
        assert response.status_code == 200
        return response.content.decode()

    assert "claude-opus: no such model in the catalog" in refused(fallbacks="claude-opus")
    assert "cannot fall back to itself" in refused(context_window_fallbacks="gpt-4o-mini")
    page = refused(fallbacks="gpt-4o-long, chat-default")  # the alias stands for claude-haiku
    assert "This makes a cycle: gpt-4o-mini → claude-haiku → gpt-4o-mini." in page
    assert not CatalogModel.objects.filter(name="gpt-4o-mini").exists()

    response = admin_client.post(
        add_url, model_form("gpt-4o-mini", row, fallbacks="gpt-4o-long", context_window_fallbacks="chat-default")
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    model = CatalogModel.objects.get(name="gpt-4o-mini")
    assert model.fallbacks == ["gpt-4o-long"] and model.context_window_fallbacks == ["chat-default"]
    change = admin_client.get(reverse("admin:providers_catalogmodel_change", args=[model.pk])).content.decode()
    assert 'value="gpt-4o-long"' in change  # shown back as typed


def test_a_deployment_row_can_be_deleted_from_the_change_page(admin_client):
    model = ModelFactory(name="two-homes")
    extra = DeploymentFactory(model=model, name="spare", upstream_id="spare-id")
    first = model.deployments.exclude(pk=extra.pk).get()
    rows = [
        {"id": first.pk, "model": model.pk, "provider": first.provider_id, "upstream_id": first.upstream_id},
        {"id": extra.pk, "model": model.pk, "provider": extra.provider_id, "upstream_id": "spare-id", "DELETE": "on"},
    ]

    response = admin_client.post(
        reverse("admin:providers_catalogmodel_change", args=[model.pk]), model_form("two-homes", rows)
    )

    assert response.status_code == 302, response.content.decode()[:3000]
    assert list(model.deployments.values_list("pk", flat=True)) == [first.pk]


@pytest.mark.parametrize(
    ("rules", "most", "warned"),
    [
        ({"drop": ["max_tokens"]}, "", ["`max_tokens`"]),
        (
            {"rename": {"max_tokens": "max_completion_tokens"}, "drop": ["max_completion_tokens"]},
            "",
            ["`max_tokens`", "`max_completion_tokens`"],
        ),
        ({"drop": ["max_completion_tokens"]}, "", ["`max_completion_tokens`"]),
        ({"drop": ["max_tokens"]}, "4096", []),  # what it writes at most is what is reserved
        ({"drop": ["temperature"]}, "", []),
    ],
)
def test_a_rule_dropping_the_output_limit_of_a_model_with_no_most_warns_on_save(admin_client, rules, most, warned):
    """Under a budget such a model's requests are refused (``model_output_unbounded``): the admin who saves it is
    told, and how to mend it. Saved all the same, as without budgets the rule is what the deployment needs."""
    model = ModelFactory(name="dropping")
    deployment = model.deployments.get()
    row = {"id": deployment.pk, "model": model.pk, "provider": deployment.provider_id, "upstream_id": "x"}

    response = admin_client.post(
        reverse("admin:providers_catalogmodel_change", args=[model.pk]),
        model_form("dropping", [row], parameter_rules=json.dumps(rules), max_output_tokens=most),
        follow=True,
    )

    assert response.status_code == 200
    model.refresh_from_db()
    assert model.parameter_rules == rules  # saved
    shown = [(message.level, message.message) for message in response.context["messages"]]
    warnings = [text for level, text in shown if level == messages.WARNING]
    if not warned:
        assert warnings == []
        return
    [text] = warnings
    assert all(name in text for name in warned) and "model_output_unbounded" in text and "max output tokens" in text
    assert "dropping" in text


def test_a_model_that_aliases_name_cannot_become_an_alias_itself(admin_client):
    """Else its aliases would be aliases of an alias: no longer served (404) and gone from /v1/models."""
    target = ModelFactory(name="gpt-4o")
    model = ModelFactory(name="gpt-4o-mini")
    ModelFactory(name="chat-default", alias_of=model)
    rows = [
        {"id": d.pk, "model": model.pk, "provider": d.provider_id, "upstream_id": d.upstream_id, "DELETE": "on"}
        for d in model.deployments.all()
    ]

    response = admin_client.post(
        reverse("admin:providers_catalogmodel_change", args=[model.pk]),
        model_form("gpt-4o-mini", rows, alias_of=target.pk),
    )

    assert response.status_code == 200
    assert "Other aliases name this model (chat-default)" in response.content.decode()
    model.refresh_from_db()
    assert model.alias_of is None and model.deployments.exists()


def test_renaming_a_model_that_others_fall_back_to_is_refused(admin_client):
    """The fallback lists hold names: renamed, the others' fallbacks would silently stop working."""
    provider = ProviderFactory()
    haiku = ModelFactory(name="claude-haiku", provider=provider)
    ModelFactory(name="gpt-4o-mini", provider=provider, fallbacks=["claude-haiku"])
    ModelFactory(name="gpt-4o", provider=provider, context_window_fallbacks=["claude-haiku"])
    rows = [
        {"id": d.pk, "model": haiku.pk, "provider": d.provider_id, "upstream_id": d.upstream_id}
        for d in haiku.deployments.all()
    ]
    url = reverse("admin:providers_catalogmodel_change", args=[haiku.pk])

    response = admin_client.post(url, model_form("claude-3-haiku", rows))

    assert response.status_code == 200
    assert "Other models fall back to this name (gpt-4o, gpt-4o-mini)" in response.content.decode()
    haiku.refresh_from_db()
    assert haiku.name == "claude-haiku"
    response = admin_client.post(url, model_form("claude-haiku", rows, label="Haiku"))
    assert response.status_code == 302, response.content.decode()[:3000]


def test_deleting_a_model_that_others_fall_back_to_is_refused(admin_client):
    """As a rename: deleted, the names in the others' fallback lists would lead nowhere."""
    provider = ProviderFactory()
    haiku = ModelFactory(name="claude-haiku", provider=provider)
    ModelFactory(name="gpt-4o-mini", provider=provider, fallbacks=["claude-haiku"])
    alone = ModelFactory(name="lonely", provider=provider)
    url = reverse("admin:providers_catalogmodel_delete", args=[haiku.pk])

    page = admin_client.get(url).content.decode()
    refused = admin_client.post(url, {"post": "yes"})

    assert "claude-haiku: the fallbacks of gpt-4o-mini name it" in page
    assert refused.status_code == 200 and CatalogModel.objects.filter(pk=haiku.pk).exists()
    # The bulk action refuses it too; a model nobody names is deleted as before.
    changelist = reverse("admin:providers_catalogmodel_changelist")
    admin_client.post(changelist, {"action": "delete_selected", "_selected_action": [haiku.pk], "post": "yes"})
    assert CatalogModel.objects.filter(pk=haiku.pk).exists()
    done = admin_client.post(reverse("admin:providers_catalogmodel_delete", args=[alone.pk]), {"post": "yes"})
    assert done.status_code == 302 and not CatalogModel.objects.filter(pk=alone.pk).exists()


ZERO_CAP = "would send this deployment nothing: leave it empty for no cap, or untick enabled to stop routing to it"


@pytest.mark.parametrize("cap", ["rpm_limit", "tpm_limit"])
def test_a_cap_of_0_is_refused_saying_empty_means_no_cap_and_enabled_stops_traffic(admin_client, cap):
    """A 0 an admin typed for "no cap" would silently send the deployment nothing; refused, in the model's
    deployments inline and on the deployment's own page, with what to do instead."""
    east = ProviderFactory(name="east")
    response = admin_client.post(
        reverse("admin:providers_catalogmodel_add"),
        model_form("capped", [{"provider": east.pk, "upstream_id": "m", cap: "0"}]),
    )
    assert response.status_code == 200
    assert ZERO_CAP in response.content.decode()
    assert not CatalogModel.objects.filter(name="capped").exists()

    deployment = DeploymentFactory(rpm_limit=600, tpm_limit=90_000)
    data = {
        "model": deployment.model_id,
        "name": deployment.name,
        "provider": deployment.provider_id,
        "upstream_id": deployment.upstream_id,
        "enabled": "on",
        "input_per_mtok": "0",
        "output_per_mtok": "0",
        "cached_input_per_mtok": "",
        "weight": "1",
        "priority": "0",
        "rpm_limit": "600",
        "tpm_limit": "90000",
        "quality": "",
        "breaker_override": "",
        "health_checks-TOTAL_FORMS": "0",
        "health_checks-INITIAL_FORMS": "0",
        "health_checks-MIN_NUM_FORMS": "0",
        "health_checks-MAX_NUM_FORMS": "1000",
        cap: "0",
    }
    url = reverse("admin:providers_deployment_change", args=[deployment.pk])
    response = admin_client.post(url, data)
    assert response.status_code == 200
    assert ZERO_CAP in response.content.decode()
    deployment.refresh_from_db()
    assert (deployment.rpm_limit, deployment.tpm_limit) == (600, 90_000)

    # Empty is no cap.
    response = admin_client.post(url, {**data, cap: ""})
    assert response.status_code == 302, response.content.decode()[:2000]
    deployment.refresh_from_db()
    assert getattr(deployment, cap) is None


# A price beyond the token prices: the add form's prices (the priced one among them), and what it is once emptied.
EXTRA_PRICES = {
    # Prompt-cache writes: left empty, the deployment has none (priced as input).
    "cache-write": ("cache_write_per_mtok", {"cache_write_per_mtok": "3.75"}, None),
    # Anthropic's 1-hour cache writes (2x input) beside the 5-minute ones' (1.25x): left empty, priced as those.
    "cache-write-1h": (
        "cache_write_1h_per_mtok",
        {"cache_write_per_mtok": "3.75", "cache_write_1h_per_mtok": "6"},
        None,
    ),
    # Anthropic's web searches, per 1,000 beside the tokens: left empty, free.
    "web-search": ("web_search_per_1k", {"web_search_per_1k": "10"}, Decimal(0)),
    # OpenAI's service tiers, a factor of every token price: left empty, the tier costs the standard prices.
    "priority-factor": ("priority_price_factor", {"priority_price_factor": "2"}, None),
    "flex-factor": ("flex_price_factor", {"flex_price_factor": "0.5"}, None),
}


@pytest.mark.parametrize(("field", "prices", "emptied"), EXTRA_PRICES.values(), ids=EXTRA_PRICES.keys())
def test_a_price_beyond_the_tokens_is_set_inline_and_on_the_deployment_page_and_may_be_emptied(
    admin_client, field, prices, emptied
):
    """An admin sets each of the deployment's other prices where the token prices are: in the model's deployments
    inline and on the deployment's own page, under its prices; a negative one is refused, and left empty it is
    what ``EXTRA_PRICES`` says."""
    east = ProviderFactory(name="east")
    add_url = reverse("admin:providers_catalogmodel_add")
    assert f'name="deployments-0-{field}"' in admin_client.get(add_url).content.decode()
    deployment_form = {"provider": east.pk, "upstream_id": "claude-sonnet-4-5", "input_per_mtok": "3", **prices}
    response = admin_client.post(add_url, model_form("claude-sonnet", [deployment_form]))
    assert response.status_code == 302, response.content.decode()[:2000]
    deployment = Deployment.objects.get(model__name="claude-sonnet")
    assert {name: getattr(deployment, name) for name in prices} == {name: Decimal(v) for name, v in prices.items()}

    url = reverse("admin:providers_deployment_change", args=[deployment.pk])
    page = admin_client.get(url).content.decode()
    places = Deployment._meta.get_field(field).decimal_places
    assert f'name="{field}"' in page and f'value="{Decimal(prices[field]):.{places}f}"' in page
    data = {
        "model": deployment.model_id,
        "name": deployment.name,
        "provider": east.pk,
        "upstream_id": deployment.upstream_id,
        "enabled": "on",
        "input_per_mtok": "3",
        "output_per_mtok": "15",
        **prices,
        field: "",
        "weight": "1",
        "priority": "0",
        "health_checks-TOTAL_FORMS": "0",
        "health_checks-INITIAL_FORMS": "0",
        "health_checks-MIN_NUM_FORMS": "0",
        "health_checks-MAX_NUM_FORMS": "1000",
    }
    assert admin_client.post(url, {**data, field: "-1"}).status_code == 200  # refused
    response = admin_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:2000]
    deployment.refresh_from_db()
    assert getattr(deployment, field) == emptied


# Moving a provider that holds keys -----------------------------------------------------------------

ELSEWHERE = "https://collector.example.com/v1"


def _operator_client():
    from django.test import Client

    from accounts.roles import Role, role_set
    from tests.factories import UserFactory

    user = UserFactory(username="an-operator")
    role_set(user, Role.OPERATOR)
    client = Client()
    client.force_login(user)
    return client


def test_an_operator_cannot_point_a_provider_at_another_server_and_have_its_stored_key_sent_there():
    """The key is never shown to an operator, but it goes wherever the base URL points: moving the provider
    takes the key typed again, which an operator who could not see it cannot do."""
    provider = ProviderFactory(api_key=KEY, base_url="https://api.openai.com/v1")
    client = _operator_client()

    moved = client.post(change_url(provider), provider_admin_form(provider, base_url=ELSEWHERE))

    assert moved.status_code == 200 and "enter the key again" in moved.content.decode()
    provider.refresh_from_db()
    assert provider.base_url == "https://api.openai.com/v1" and provider.api_key.reveal() == KEY

    with_key = client.post(change_url(provider), provider_admin_form(provider, base_url=ELSEWHERE, api_key=WRONG_KEY))
    assert with_key.status_code == 302, "their own key, typed in the same save, may go there"
    provider.refresh_from_db()
    assert provider.base_url == ELSEWHERE and provider.api_key.reveal() == WRONG_KEY


def test_stored_header_values_must_be_typed_again_to_move_a_provider():
    provider = ProviderFactory(base_url="https://api.openai.com/v1", extra_headers={"X-Upstream-Token": HEADER_TOKEN})
    client = _operator_client()
    shown = client.get(change_url(provider)).context["adminform"].form["extra_headers"].value()

    moved = client.post(change_url(provider), provider_admin_form(provider, base_url=ELSEWHERE, extra_headers=shown))

    assert moved.status_code == 200 and "X-Upstream-Token" in moved.content.decode()
    assert HEADER_TOKEN not in moved.content.decode()
    provider.refresh_from_db()
    assert provider.base_url == "https://api.openai.com/v1"


def test_a_provider_holding_users_own_keys_is_moved_by_an_admin_only(admin_client):
    """Users gave their keys for the provider at its address: an operator may not send them elsewhere, even
    typing the provider's own key again."""
    from providers.fields import Secret
    from providers.models import ProviderCredential
    from tests.factories import UserFactory

    provider = ProviderFactory(api_key=KEY, base_url="https://api.openai.com/v1", byok="optional")
    ProviderCredential.objects.create(
        owner=UserFactory(username="keyholder"), provider=provider, api_key=Secret("sk-users-own-0123456789abcd")
    )

    refused = _operator_client().post(
        change_url(provider), provider_admin_form(provider, base_url=ELSEWHERE, api_key=WRONG_KEY)
    )
    assert refused.status_code == 200 and "only an admin may" in refused.content.decode()
    provider.refresh_from_db()
    assert provider.base_url == "https://api.openai.com/v1" and provider.api_key.reveal() == KEY

    moved = admin_client.post(change_url(provider), provider_admin_form(provider, base_url=ELSEWHERE))
    assert moved.status_code == 302


def test_an_operator_may_still_edit_the_rest_and_an_admin_may_move_it(admin_client):
    provider = ProviderFactory(api_key=KEY, base_url="https://api.openai.com/v1")

    renamed = _operator_client().post(change_url(provider), provider_admin_form(provider, organization="org-9"))
    assert renamed.status_code == 302

    moved = admin_client.post(change_url(provider), provider_admin_form(provider, base_url=ELSEWHERE))
    assert moved.status_code == 302
    provider.refresh_from_db()
    assert provider.base_url == ELSEWHERE and provider.api_key.reveal() == KEY


def test_an_admin_says_whether_a_deployment_searches_on_every_request(admin_client):
    """In the model's deployments inline and on the deployment's page, beside the web search price: left empty, the
    upstream id decides (OpenAI's search models search on every request); an admin sets always or never."""
    east = ProviderFactory(name="east")
    add_url = reverse("admin:providers_catalogmodel_add")
    assert 'name="deployments-0-searches_every_request"' in admin_client.get(add_url).content.decode()
    deployment_form = {"provider": east.pk, "upstream_id": "gpt-4o-search-preview", "input_per_mtok": "2.5"}
    response = admin_client.post(add_url, model_form("gpt-search", [deployment_form]))
    assert response.status_code == 302, response.content.decode()[:2000]
    deployment = Deployment.objects.get(model__name="gpt-search")
    assert (deployment.searches_every_request, deployment.searches_on_every_request) == ("", True)

    url = reverse("admin:providers_deployment_change", args=[deployment.pk])
    assert 'name="searches_every_request"' in admin_client.get(url).content.decode()
    data = {
        "model": deployment.model_id,
        "name": deployment.name,
        "provider": east.pk,
        "upstream_id": deployment.upstream_id,
        "enabled": "on",
        "input_per_mtok": "2.5",
        "output_per_mtok": "10",
        "web_search_per_1k": "25",
        "searches_every_request": "never",
        "weight": "1",
        "priority": "0",
        "health_checks-TOTAL_FORMS": "0",
        "health_checks-INITIAL_FORMS": "0",
        "health_checks-MIN_NUM_FORMS": "0",
        "health_checks-MAX_NUM_FORMS": "1000",
    }
    response = admin_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:2000]
    deployment.refresh_from_db()
    assert (deployment.searches_every_request, deployment.searches_on_every_request) == ("never", False)


@pytest.mark.parametrize("kind", ["anthropic", "gemini", "cohere", "ollama"])
def test_a_deployment_not_on_openais_protocol_cannot_search_on_every_request(admin_client, kind):
    """``always`` on a provider whose adapter counts no such search (Claude, Gemini, Cohere, Ollama: only OpenAI's
    protocol has search models, ``BaseAdapter.web_searches``) would reserve a search at admission that no request is
    charged: refused on the field, in the model's inline and on the deployment's page, naming the kind; ``never`` and
    empty are taken. Before, it was saved and silently meant a held reservation."""
    other = ProviderFactory(name="other", kind=kind)
    add_url = reverse("admin:providers_catalogmodel_add")
    row = {"provider": other.pk, "upstream_id": "sonar-pro", "input_per_mtok": "1", "searches_every_request": "always"}
    response = admin_client.post(add_url, model_form("searching", [row]))
    assert response.status_code == 200
    formset = next(f for f in response.context["inline_admin_formsets"] if f.formset.model is Deployment)
    error = " ".join(formset.formset.forms[0].errors["searches_every_request"])
    assert f"kind {kind}" in error and "openai_compatible" in error
    assert not CatalogModel.objects.filter(name="searching").exists()
    response = admin_client.post(add_url, model_form("searching", [{**row, "searches_every_request": "never"}]))
    assert response.status_code == 302, response.content.decode()[:2000]

    deployment = Deployment.objects.get(model__name="searching")
    url = reverse("admin:providers_deployment_change", args=[deployment.pk])
    data = {
        "model": deployment.model_id,
        "name": deployment.name,
        "provider": other.pk,
        "upstream_id": deployment.upstream_id,
        "enabled": "on",
        "input_per_mtok": "1",
        "output_per_mtok": "0",
        "searches_every_request": "always",
        "weight": "1",
        "priority": "0",
        "health_checks-TOTAL_FORMS": "0",
        "health_checks-INITIAL_FORMS": "0",
        "health_checks-MIN_NUM_FORMS": "0",
        "health_checks-MAX_NUM_FORMS": "1000",
    }
    response = admin_client.post(url, data)
    assert response.status_code == 200
    assert f"kind {kind}" in " ".join(response.context["adminform"].form.errors["searches_every_request"])
    deployment.refresh_from_db()
    assert deployment.searches_every_request == "never"
    # Moved to a provider of OpenAI's protocol, the same deployment may search on every request.
    openai_compatible = ProviderFactory(name="sonar", kind=ProviderKind.OPENAI_COMPATIBLE)
    response = admin_client.post(url, {**data, "provider": openai_compatible.pk})
    assert response.status_code == 302, response.content.decode()[:2000]
    deployment.refresh_from_db()
    assert (deployment.searches_every_request, deployment.searches_on_every_request) == ("always", True)
