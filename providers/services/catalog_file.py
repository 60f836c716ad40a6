"""The catalog as a YAML file: ``loadproviders`` and ``dumpproviders``.

The file has two sections. ``providers:`` lists the upstream accounts; ``models:`` lists the public models,
each with the ``deployments:`` that serve it (a provider, its model id, prices and routing weights) or, for
an alias, the model it names (``alias_of``). The older shape, a ``models:`` list under each provider whose
entries carry ``upstream`` and prices, still loads: each such entry is a model with one deployment on that
provider."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml
from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.db.models import Prefetch

from core.exceptions import ApplicationError

from ..adapters import every_request_search_refusal
from ..fallbacks import FALLBACK_FIELDS, fallback_graph, fallback_problem
from ..models import ByokMode, CatalogModel, Deployment, EveryRequestSearch, Provider
from ..types import credential_header
from .breakers import deployment_upstream_changed
from .credentials import provider_host_change_record

# YAML load and dump -------------------------------------------------------------------------------

_FILE = "file"  # where the top level of the file is, in messages
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A reference that is a whole unquoted value. In a flow mapping (``{name: east, api_key: ${EAST_KEY}}``, as
# the catalog's documentation writes providers) YAML reads its braces as the mapping's own and the file
# does not parse; quoted, it means what its author meant.
_BARE_REFERENCE = re.compile(r"(?<=[\s\[,{:])(\$\{[A-Za-z_][A-Za-z0-9_]*\})(?=\s*(?:[,}\]]|$))", re.MULTILINE)
_PROVIDER_KEYS = frozenset(
    {
        "name",
        "kind",
        "base_url",
        "api_key",
        "organization",
        "api_version",
        "extra_headers",
        "timeout",
        "max_retries",  # accepted and ignored (with a warning): retries are a model's setting now
        "enabled",
        "byok",  # whether users may bring their own key: disabled (the default), optional or required
        "models",  # the older shape: one deployment on this provider per entry
    }
)
# What a model entry of the older shape (under a provider) says about its deployment.
_LEGACY_DEPLOYMENT_KEYS = (
    "upstream",
    "input_per_mtok",
    "output_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
    "cache_write_1h_per_mtok",
    "web_search_per_1k",
    "priority_price_factor",
    "flex_price_factor",
)
_COMMON_MODEL_KEYS = frozenset(
    {"name", "mode", "context_window", "max_output_tokens", "capabilities", "parameter_rules", "enabled"}
)
_LEGACY_MODEL_KEYS = _COMMON_MODEL_KEYS | frozenset(_LEGACY_DEPLOYMENT_KEYS)
_MODEL_KEYS = _COMMON_MODEL_KEYS | frozenset(
    {
        "label",
        "alias_of",
        "strategy",
        "retries",
        "fallbacks",
        "context_window_fallbacks",
        "resume_on_failure",
        "stream_idle_timeout",
        "deployments",
    }
)
# An alias is only a second name: everything else is its target's.
_ALIAS_KEYS = frozenset({"name", "label", "alias_of", "enabled"})
_DEPLOYMENT_KEYS = frozenset({"name", "upstream"} | set(Deployment.SETTINGS) - {"upstream_id"})
_CAPABILITIES = {
    "streaming": "supports_streaming",
    "tools": "supports_tools",
    "vision": "supports_vision",
    "json_mode": "supports_json_mode",
    "reasoning": "supports_reasoning",
}
_PROVIDER_COMPARED = (
    "kind",
    "base_url",
    "api_key",
    "organization",
    "api_version",
    "extra_headers",
    "timeout_seconds",
    "enabled",
    "byok",
)
_MODEL_COMPARED = (
    "label",
    "alias_of_id",
    "mode",
    "context_window",
    "max_output_tokens",
    *_CAPABILITIES.values(),
    "parameter_rules",
    "strategy",
    "retries",
    "fallbacks",
    "context_window_fallbacks",
    "resume_on_failure",
    "stream_idle_timeout_seconds",
    "enabled",
)
_DEPLOYMENT_COMPARED = tuple(Deployment._meta.get_field(name).attname for name in Deployment.SETTINGS)


@dataclass(frozen=True, slots=True)
class LoadedRow:
    entity: str  # "provider", "model" or "deployment" (named model/deployment)
    name: str
    action: str  # "created", "updated", "unchanged" or "removed" (a deployment the file no longer lists)
    note: str = ""  # what happened to the key ("key set", "key kept", ...), never the key

    def __str__(self) -> str:
        return f"{self.entity} {self.name}: {self.action}" + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True, slots=True)
class LoadResult:
    rows: tuple[LoadedRow, ...]
    warnings: tuple[str, ...] = field(default=())  # accepted but ignored settings, each with its place

    def count(self, action: str) -> int:
        return sum(1 for row in self.rows if row.action == action)


def catalog_yaml_parse(text: str) -> Any:
    """The catalog file's YAML. A file that does not parse is read again with each bare ``${VAR}`` value
    quoted (see ``_BARE_REFERENCE``); a file that parses as it is is never rewritten. Raises the first
    ``yaml.YAMLError`` when neither parses."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        quoted = _BARE_REFERENCE.sub(r'"\1"', text)
        if quoted == text:
            raise
        try:
            return yaml.safe_load(quoted)
        except yaml.YAMLError:
            raise error from None


def env_name_for(provider_name: str, suffix: str = "API_KEY") -> str:
    """``local-openai`` → ``LOCAL_OPENAI_API_KEY``: the variable a dump refers to for that provider's key."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", provider_name).strip("_").upper()
    if not stem or stem[0].isdigit():
        stem = f"PROVIDER_{stem}"
    return f"{stem}_{suffix}"


def _resolve_env(value: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> str:
            try:
                return env[match.group(1)]
            except KeyError:
                raise ApplicationError(f"{where}: environment variable {match.group(1)} is not set.") from None

        return _ENV_REFERENCE.sub(lookup, value)
    if isinstance(value, dict):
        return {key: _resolve_env(item, env, where) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve_env(item, env, where) for item in value]
    return value


def _describe(exc: ValidationError) -> str:
    if hasattr(exc, "error_dict"):
        return "; ".join(
            " ".join(messages) if field == "__all__" else f"{field}: {' '.join(messages)}"
            for field, messages in exc.message_dict.items()
        )
    return " ".join(exc.messages)


class _Entry:
    """One mapping of the file, read with type checks whose errors say where they are."""

    def __init__(self, data: Any, where: str, allowed: frozenset[str]) -> None:
        if not isinstance(data, dict):
            raise ApplicationError(f"{where}: expected a mapping of keys to values.")
        unknown = sorted(str(key) for key in set(data) - allowed)
        if unknown:
            raise ApplicationError(f"{where}: unknown key(s) {', '.join(unknown)}.")
        self.data = data
        self.where = where

    def has(self, key: str) -> bool:
        return key in self.data

    def _fail(self, key: str, expected: str) -> ApplicationError:
        return ApplicationError(f"{self.where}: {key} must be {expected}.")

    def text(self, key: str, default: str | None = None) -> str:
        value = self.data.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, str) or (default is None and not value):
            raise self._fail(key, "a non-empty string" if default is None else "a string")
        return value

    def choice(self, key: str, choices: type[models.TextChoices], default: str) -> str:
        value = self.data.get(key, default)
        if value not in choices.values:
            raise self._fail(key, f"one of {', '.join(choices.values)}, not {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false")
        return value

    def integer(self, key: str, default: int | None) -> int | None:
        value = self.data.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self._fail(key, "a whole number")
        return value

    def decimal(self, key: str, default: Decimal | None, *, required: bool = False) -> Decimal | None:
        if required and key not in self.data:
            raise self._fail(key, "given")
        value = self.data.get(key, default)
        if value is None or isinstance(value, Decimal):
            return value
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise self._fail(key, "a number")
        try:
            # str() first: a YAML float such as 0.15 becomes Decimal("0.15"), not its binary approximation.
            return Decimal(str(value))
        except InvalidOperation:
            raise self._fail(key, "a number") from None

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._fail(key, "a mapping")
        return value

    def names(self, key: str) -> list[str]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise self._fail(key, "a list of model names")
        return value

    def entries(
        self, key: str, what: str, allowed: frozenset[str], env: Mapping[str, str] | None = None
    ) -> list[_Entry]:
        """A list of mappings, each an ``_Entry`` named after its ``name`` (else its position), with its
        ``${VAR}`` references resolved from ``env`` when given."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self._fail(key, "a list")
        found = []
        for position, raw in enumerate(value):
            label = _label(raw, what, position)
            where = label if self.where == _FILE else f"{self.where}, {label}"
            found.append(_Entry(raw if env is None else _resolve_env(raw, env, where), where, allowed))
        return found


def _label(raw: Any, what: str, position: int) -> str:
    if not isinstance(raw, dict):
        return f"{what} #{position + 1}"
    if isinstance(raw.get("name"), str) and raw["name"]:
        return f"{what} {raw['name']}"
    if isinstance(raw.get("provider"), str) and raw["provider"]:  # a deployment named after its provider
        return f"{what} #{position + 1} ({raw['provider']})"
    return f"{what} #{position + 1}"


def _field_default(model: type[models.Model], name: str) -> Any:
    return model._meta.get_field(name).get_default()


def _snapshot(instance: models.Model, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(instance, name) for name in names}


def _checked_save(instance: models.Model, where: str, before: dict[str, Any], compared: Sequence[str]) -> str:
    """Validate ``instance`` as the admin would, save it if anything changed, and say what happened."""
    try:
        instance.full_clean()
    except ValidationError as exc:
        raise ApplicationError(f"{where}: {_describe(exc)}") from None
    if instance.pk is None:
        action = "created"
    elif _snapshot(instance, compared) != before:
        action = "updated"
    else:
        return "unchanged"
    instance.save()
    return action


def _provider_load(entry: _Entry, warnings: list[str]) -> tuple[Provider, LoadedRow]:
    name = entry.text("name")
    provider = Provider.objects.select_for_update().filter(name=name).first()
    if provider is None:
        provider = Provider(name=name)
    created = provider.pk is None
    before = _snapshot(provider, _PROVIDER_COMPARED)
    old_origin = "" if created else provider.origin

    provider.kind = entry.text("kind")
    provider.base_url = entry.text("base_url", "")
    provider.organization = entry.text("organization", "")
    provider.api_version = entry.text("api_version", "")
    provider.extra_headers = entry.mapping("extra_headers")
    provider.timeout_seconds = entry.decimal("timeout", _field_default(Provider, "timeout_seconds"))
    provider.enabled = entry.boolean("enabled", _field_default(Provider, "enabled"))
    provider.byok = entry.choice("byok", ByokMode, _field_default(Provider, "byok"))
    if entry.has("max_retries"):
        entry.integer("max_retries", None)
        warnings.append(f"{entry.where}: max_retries is ignored: retries are set per model now (a model's retries).")
    # An absent api_key keeps the stored one (keys are often set in the admin, not in files);
    # api_key: "" clears it.
    if entry.has("api_key"):
        provider.api_key = entry.text("api_key", "")
    if not provider.api_key:
        note = "key cleared" if before["api_key"] else "no key"
    elif created or not before["api_key"]:
        note = "key set"
    else:
        note = "key changed" if provider.api_key != before["api_key"] else "key kept"

    action = _checked_save(provider, entry.where, before, _PROVIDER_COMPARED)
    if not created and provider.origin != old_origin:
        # The same as the admin's move: users' keys given for the former host are paused; their owners are told.
        moved = provider_host_change_record(provider=provider, old_origin=old_origin)
        if moved.paused or moved.resumed:
            note += (
                f"; moved from {old_origin} to {provider.origin}: {moved.paused} user(s)' own key(s) paused until "
                f"their owners confirm the new host (they are emailed), {moved.resumed} used again"
            )
    return provider, LoadedRow("provider", name, action, note)


@dataclass(slots=True)
class _ModelPlan:
    entry: _Entry  # the model's own keys (an entry of the older shape also holds its deployment's)
    deployments: list[_Entry]
    alias_of: str | None = None


def _legacy_plans(provider_entry: _Entry) -> list[_ModelPlan]:
    """A provider's ``models:`` of the older shape: each a model with one deployment on that provider."""
    plans = []
    for entry in provider_entry.entries("models", "model", _LEGACY_MODEL_KEYS):
        spec = {"provider": provider_entry.text("name")}
        spec.update({key: entry.data[key] for key in _LEGACY_DEPLOYMENT_KEYS if key in entry.data})
        plans.append(_ModelPlan(entry, [_Entry(spec, entry.where, _DEPLOYMENT_KEYS)]))
    return plans


def _model_plans(top: _Entry, env: Mapping[str, str]) -> list[_ModelPlan]:
    plans = []
    for entry in top.entries("models", "model", _MODEL_KEYS, env):
        if entry.has("alias_of"):
            extra = sorted(set(entry.data) - _ALIAS_KEYS)
            if "deployments" in extra:
                raise ApplicationError(f"{entry.where}: an alias has no deployments of its own.")
            if extra:
                raise ApplicationError(
                    f"{entry.where}: an alias takes only name, label, alias_of and enabled, not {', '.join(extra)}."
                )
            plans.append(_ModelPlan(entry, [], alias_of=entry.text("alias_of")))
            continue
        deployments = entry.entries("deployments", "deployment", _DEPLOYMENT_KEYS)
        plans.append(_ModelPlan(entry, deployments))
    return plans


def _unique_names(entries: Sequence[_Entry], what: str) -> None:
    seen: set[str] = set()
    for entry in entries:
        name = entry.text("name")
        if name in seen:
            raise ApplicationError(f"{what} {name} appears more than once in the file.")
        seen.add(name)


def _model_load(plan: _ModelPlan) -> tuple[CatalogModel, LoadedRow]:
    entry = plan.entry
    name = entry.text("name")
    model = CatalogModel.objects.select_for_update().filter(name=name).first()
    if model is None:
        model = CatalogModel(name=name)
    before = _snapshot(model, _MODEL_COMPARED)

    model.label = entry.text("label", "")
    model.enabled = entry.boolean("enabled", _field_default(CatalogModel, "enabled"))
    if plan.alias_of is not None:
        # Only the alias's own keys: the rest of the row is its target's business and is left as it is.
        target = CatalogModel.objects.filter(name=plan.alias_of).first()
        if target is None:
            raise ApplicationError(f"{entry.where}: alias_of names no model of the file or the catalog.")
        if model.pk is not None and CatalogModel.objects.filter(alias_of=model).exists():
            raise ApplicationError(f"{entry.where}: other aliases name this model, so it cannot become an alias.")
        model.alias_of = target
    else:
        if not plan.deployments and model.enabled:
            raise ApplicationError(f"{entry.where}: an enabled model needs at least one deployment (or alias_of).")
        model.alias_of = None
        model.mode = entry.text("mode", _field_default(CatalogModel, "mode"))  # full_clean refuses an unknown one
        model.context_window = entry.integer("context_window", _field_default(CatalogModel, "context_window"))
        model.max_output_tokens = entry.integer("max_output_tokens", None)
        capabilities = _Entry(entry.mapping("capabilities"), f"{entry.where}, capabilities", frozenset(_CAPABILITIES))
        for key, attname in _CAPABILITIES.items():
            setattr(model, attname, capabilities.boolean(key, _field_default(CatalogModel, attname)))
        model.parameter_rules = entry.mapping("parameter_rules")
        model.strategy = entry.text("strategy", _field_default(CatalogModel, "strategy"))
        model.retries = entry.integer("retries", _field_default(CatalogModel, "retries"))
        model.fallbacks = entry.names("fallbacks")
        model.context_window_fallbacks = entry.names("context_window_fallbacks")
        model.resume_on_failure = entry.boolean("resume_on_failure", _field_default(CatalogModel, "resume_on_failure"))
        model.stream_idle_timeout_seconds = entry.decimal("stream_idle_timeout", None)
    action = _checked_save(model, entry.where, before, _MODEL_COMPARED)
    return model, LoadedRow("model", name, action)


def _deployment_load(entry: _Entry, model: CatalogModel, providers: Mapping[str, Provider]) -> tuple[str, LoadedRow]:
    provider_name = entry.text("provider")
    provider = providers.get(provider_name) or Provider.objects.filter(name=provider_name).first()
    if provider is None:
        raise ApplicationError(f"{entry.where}: provider {provider_name} is in neither the file nor the catalog.")
    name = entry.text("name", "") or provider.name
    deployment = Deployment.objects.select_for_update().filter(model=model, name=name).first()
    if deployment is None:
        deployment = Deployment(model=model, name=name)
    before = _snapshot(deployment, _DEPLOYMENT_COMPARED)
    previous_upstream_id = deployment.upstream_id

    deployment.provider = provider
    deployment.upstream_id = entry.text("upstream")
    deployment.input_per_mtok = entry.decimal("input_per_mtok", None, required=True)
    deployment.output_per_mtok = entry.decimal("output_per_mtok", None, required=True)
    deployment.cached_input_per_mtok = entry.decimal("cached_input_per_mtok", None)
    deployment.cache_write_per_mtok = entry.decimal("cache_write_per_mtok", None)
    deployment.cache_write_1h_per_mtok = entry.decimal("cache_write_1h_per_mtok", None)
    deployment.web_search_per_1k = entry.decimal("web_search_per_1k", _field_default(Deployment, "web_search_per_1k"))
    # "always" or "never"; left out, the upstream id decides.
    deployment.searches_every_request = entry.choice("searches_every_request", EveryRequestSearch, "")
    deployment.priority_price_factor = entry.decimal("priority_price_factor", None)
    deployment.flex_price_factor = entry.decimal("flex_price_factor", None)
    refusal = (
        every_request_search_refusal(provider.kind)
        if deployment.searches_every_request == EveryRequestSearch.ALWAYS
        else ""
    )
    if refusal:
        raise ApplicationError(f"{entry.where}: searches_every_request: {refusal}")
    deployment.weight = entry.integer("weight", _field_default(Deployment, "weight"))
    deployment.priority = entry.integer("priority", _field_default(Deployment, "priority"))
    deployment.rpm_limit = entry.integer("rpm_limit", None)
    deployment.tpm_limit = entry.integer("tpm_limit", None)
    deployment.quality = entry.decimal("quality", None)
    deployment.breaker_override = entry.text("breaker_override", "")
    deployment.paid_health_probe = entry.boolean("paid_health_probe", False)
    deployment.enabled = entry.boolean("enabled", _field_default(Deployment, "enabled"))
    action = _checked_save(deployment, entry.where, before, _DEPLOYMENT_COMPARED)
    if action == "updated":
        deployment_upstream_changed(deployment=deployment, previous_upstream_id=previous_upstream_id)
    return name, LoadedRow("deployment", f"{model.name}/{name}", action)


def _deployments_load(plan: _ModelPlan, model: CatalogModel, providers: Mapping[str, Provider]) -> list[LoadedRow]:
    """The model's deployments become those the file lists (matched by name): others are removed."""
    rows: list[LoadedRow] = []
    names: set[str] = set()
    for entry in plan.deployments:
        name, row = _deployment_load(entry, model, providers)
        if name in names:
            raise ApplicationError(
                f"{entry.where}: deployment {name} appears more than once in the model: give each a name."
            )
        names.add(name)
        rows.append(row)
    for gone in model.deployments.exclude(name__in=names).order_by("name"):
        gone.delete()
        rows.append(LoadedRow("deployment", f"{model.name}/{gone.name}", "removed"))
    return rows


def _fallbacks_check(plans: Sequence[_ModelPlan]) -> None:
    """Once every row is written: each fallback names a model of the catalog, and none makes a cycle."""
    known = set(CatalogModel.objects.values_list("name", flat=True))
    for field_name in FALLBACK_FIELDS:
        edges, aliases = fallback_graph(field=field_name)
        for plan in plans:
            if plan.alias_of is not None:
                continue
            name = plan.entry.text("name")
            names = plan.entry.names(field_name)
            others = {source: targets for source, targets in edges.items() if source != name}
            problem = fallback_problem(name=name, names=names, known=known, edges=others, aliases=aliases)
            if problem:
                raise ApplicationError(f"{plan.entry.where}: {field_name}: {problem}")


@transaction.atomic
def providers_load(*, data: Any, env: Mapping[str, str]) -> LoadResult:
    """Create or update the providers and models ``data`` describes (the ``loadproviders`` format).

    ``${VAR}`` in any string is replaced from ``env``. Providers and models are matched by name, a model's
    deployments by name within it (a deployment's name defaults to its provider's); a field the file leaves
    out takes the model's default, except ``api_key``, which is then kept as stored. Providers and models
    the file does not name are left alone; a model it names gets exactly the deployments it lists. Any
    error raises ``ApplicationError`` naming the entry, and nothing is written. Rows whose values did not
    change are not saved, so loading twice is a no-op."""
    top = _Entry(data, _FILE, frozenset({"providers", "models"}))
    if not isinstance(top.data.get("providers", []), list):
        raise ApplicationError("file: providers must be a list.")
    provider_entries = top.entries("providers", "provider", _PROVIDER_KEYS, env)
    plans = [plan for entry in provider_entries for plan in _legacy_plans(entry)]
    plans += _model_plans(top, env)
    _unique_names(provider_entries, "provider")
    _unique_names([plan.entry for plan in plans], "model")

    rows: list[LoadedRow] = []
    warnings: list[str] = []
    providers: dict[str, Provider] = {}
    for entry in provider_entries:
        provider, row = _provider_load(entry, warnings)
        providers[provider.name] = provider
        rows.append(row)
    # Models before aliases, so that an alias may name a model that comes later in the file.
    for plan in sorted(plans, key=lambda plan: plan.alias_of is not None):
        model, row = _model_load(plan)
        rows.append(row)
        rows.extend(_deployments_load(plan, model, providers))
    _fallbacks_check(plans)
    return LoadResult(rows=tuple(rows), warnings=tuple(warnings))


def _plain_decimal(value: Decimal) -> str:
    # Strings, not YAML floats: a float would round-trip through binary and could change a price.
    return format(value.normalize(), "f")


def _plain_number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def _dumped_headers(provider: Provider) -> dict[str, str]:
    return {
        header: "${" + env_name_for(provider.name, "HEADER_" + re.sub(r"[^A-Za-z0-9]+", "_", header).upper()) + "}"
        if credential_header(header)  # a credential: written as a ${...} reference, like the API key
        else value.reveal()
        for header, value in sorted((provider.extra_headers or {}).items())
    }


def providers_dump() -> dict[str, Any]:
    """Every provider and model in the ``loadproviders`` format, without secrets: a stored key (and any
    header that looks like a credential) is written as a ``${VAR}`` reference to set on the machine that
    loads the file."""
    providers: list[dict[str, Any]] = []
    for provider in Provider.objects.order_by("name"):
        entry: dict[str, Any] = {"name": provider.name, "kind": provider.kind, "base_url": provider.base_url}
        if provider.api_key:
            entry["api_key"] = "${" + env_name_for(provider.name) + "}"
        entry.update(
            organization=provider.organization,
            api_version=provider.api_version,
            extra_headers=_dumped_headers(provider),
            timeout=_plain_number(provider.timeout_seconds),
            enabled=provider.enabled,
            byok=provider.byok,
        )
        providers.append(entry)
    rows = (
        CatalogModel.objects.select_related("alias_of")
        .prefetch_related(Prefetch("deployments", queryset=Deployment.objects.select_related("provider")))
        .order_by("name")
    )
    return {"providers": providers, "models": [_model_dump(model) for model in rows]}


def _model_dump(model: CatalogModel) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": model.name}
    if model.label:
        entry["label"] = model.label
    if model.alias_of is not None:
        entry["alias_of"] = model.alias_of.name
        if not model.enabled:
            entry["enabled"] = False
        return entry
    entry.update(mode=model.mode, context_window=model.context_window)
    if model.max_output_tokens is not None:
        entry["max_output_tokens"] = model.max_output_tokens
    entry["capabilities"] = {key: getattr(model, attname) for key, attname in _CAPABILITIES.items()}
    entry["parameter_rules"] = model.parameter_rules or {}
    entry.update(
        strategy=model.strategy,
        retries=model.retries,
        fallbacks=list(model.fallbacks or []),
        context_window_fallbacks=list(model.context_window_fallbacks or []),
        resume_on_failure=model.resume_on_failure,
    )
    if model.stream_idle_timeout_seconds is not None:
        entry["stream_idle_timeout"] = _plain_number(model.stream_idle_timeout_seconds)
    entry["enabled"] = model.enabled
    deployments = sorted(model.deployments.all(), key=lambda deployment: (deployment.priority, deployment.name))
    entry["deployments"] = [_deployment_dump(deployment) for deployment in deployments]
    return entry


def _deployment_dump(deployment: Deployment) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if deployment.name != deployment.provider.name:
        entry["name"] = deployment.name
    entry.update(
        provider=deployment.provider.name,
        upstream=deployment.upstream_id,
        input_per_mtok=_plain_decimal(deployment.input_per_mtok),
        output_per_mtok=_plain_decimal(deployment.output_per_mtok),
    )
    if deployment.cached_input_per_mtok is not None:
        entry["cached_input_per_mtok"] = _plain_decimal(deployment.cached_input_per_mtok)
    if deployment.cache_write_per_mtok is not None:
        entry["cache_write_per_mtok"] = _plain_decimal(deployment.cache_write_per_mtok)
    if deployment.cache_write_1h_per_mtok is not None:
        entry["cache_write_1h_per_mtok"] = _plain_decimal(deployment.cache_write_1h_per_mtok)
    if deployment.web_search_per_1k:
        entry["web_search_per_1k"] = _plain_decimal(deployment.web_search_per_1k)
    if deployment.searches_every_request:
        entry["searches_every_request"] = deployment.searches_every_request
    for key in ("priority_price_factor", "flex_price_factor"):
        if getattr(deployment, key) is not None:
            entry[key] = _plain_decimal(getattr(deployment, key))
    entry.update(weight=deployment.weight, priority=deployment.priority)
    for key in ("rpm_limit", "tpm_limit"):
        if getattr(deployment, key) is not None:
            entry[key] = getattr(deployment, key)
    if deployment.quality is not None:
        entry["quality"] = _plain_decimal(deployment.quality)
    if deployment.breaker_override:
        entry["breaker_override"] = deployment.breaker_override
    if deployment.paid_health_probe:
        entry["paid_health_probe"] = True
    entry["enabled"] = deployment.enabled
    return entry
