"""The catalog as a YAML file: ``loadproviders`` and ``dumpproviders``."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.exceptions import ValidationError
from django.db import models, transaction

from ..exceptions import ApplicationError
from ..models import CatalogModel as Model
from ..models import Provider

# YAML load and dump -------------------------------------------------------------------------------

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Header names whose values are credentials: written to a dump as ${...} references, like the API key.
_SENSITIVE_HEADER = re.compile(r"auth|key|token|secret|cookie|password", re.IGNORECASE)
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
        "max_retries",
        "enabled",
        "models",
    }
)
_MODEL_KEYS = frozenset(
    {
        "name",
        "upstream",
        "mode",
        "input_per_mtok",
        "output_per_mtok",
        "cached_input_per_mtok",
        "context_window",
        "max_output_tokens",
        "capabilities",
        "parameter_rules",
        "enabled",
    }
)
_CAPABILITIES = {
    "streaming": "supports_streaming",
    "tools": "supports_tools",
    "vision": "supports_vision",
    "json_mode": "supports_json_mode",
}
_PROVIDER_COMPARED = (
    "kind",
    "base_url",
    "api_key",
    "organization",
    "api_version",
    "extra_headers",
    "timeout_seconds",
    "max_retries",
    "enabled",
)
_MODEL_COMPARED = (
    "provider_id",
    "upstream_id",
    "mode",
    "input_per_mtok",
    "output_per_mtok",
    "cached_input_per_mtok",
    "context_window",
    "max_output_tokens",
    *_CAPABILITIES.values(),
    "parameter_rules",
    "enabled",
)


@dataclass(frozen=True, slots=True)
class LoadedRow:
    entity: str  # "provider" or "model"
    name: str
    action: str  # "created", "updated" or "unchanged"
    note: str = ""  # what happened to the key ("key set", "key kept", ...), never the key

    def __str__(self) -> str:
        return f"{self.entity} {self.name}: {self.action}" + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True, slots=True)
class LoadResult:
    rows: tuple[LoadedRow, ...]

    def count(self, action: str) -> int:
        return sum(1 for row in self.rows if row.action == action)


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


def _field_default(model: type[models.Model], name: str) -> Any:
    return model._meta.get_field(name).get_default()


def _snapshot(instance: models.Model, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(instance, name) for name in names}


def _provider_load(entry: _Entry) -> tuple[Provider, LoadedRow]:
    name = entry.text("name")
    provider = Provider.objects.select_for_update().filter(name=name).first()
    created = provider is None
    if provider is None:
        provider = Provider(name=name)
    before = _snapshot(provider, _PROVIDER_COMPARED)

    provider.kind = entry.text("kind")
    provider.base_url = entry.text("base_url", "")
    provider.organization = entry.text("organization", "")
    provider.api_version = entry.text("api_version", "")
    provider.extra_headers = entry.mapping("extra_headers")
    provider.timeout_seconds = entry.decimal("timeout", _field_default(Provider, "timeout_seconds"))
    provider.max_retries = entry.integer("max_retries", _field_default(Provider, "max_retries"))
    provider.enabled = entry.boolean("enabled", _field_default(Provider, "enabled"))
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

    try:
        provider.full_clean()
    except ValidationError as exc:
        raise ApplicationError(f"{entry.where}: {_describe(exc)}") from None
    if created:
        action = "created"
    elif _snapshot(provider, _PROVIDER_COMPARED) != before:
        action = "updated"
    else:
        action = "unchanged"
    if action != "unchanged":
        provider.save()
    return provider, LoadedRow("provider", name, action, note)


def _model_load(entry: _Entry, provider: Provider) -> LoadedRow:
    name = entry.text("name")
    model = Model.objects.select_for_update().filter(name=name).first()
    created = model is None
    if model is None:
        model = Model(name=name)
    before = _snapshot(model, _MODEL_COMPARED)

    model.provider = provider
    model.upstream_id = entry.text("upstream")
    model.mode = entry.text("mode", _field_default(Model, "mode"))  # full_clean refuses an unknown mode
    model.input_per_mtok = entry.decimal("input_per_mtok", None, required=True)
    model.output_per_mtok = entry.decimal("output_per_mtok", None, required=True)
    model.cached_input_per_mtok = entry.decimal("cached_input_per_mtok", None)
    model.context_window = entry.integer("context_window", _field_default(Model, "context_window"))
    model.max_output_tokens = entry.integer("max_output_tokens", None)
    capabilities = _Entry(entry.mapping("capabilities"), f"{entry.where}, capabilities", frozenset(_CAPABILITIES))
    for key, attname in _CAPABILITIES.items():
        setattr(model, attname, capabilities.boolean(key, _field_default(Model, attname)))
    model.parameter_rules = entry.mapping("parameter_rules")
    model.enabled = entry.boolean("enabled", _field_default(Model, "enabled"))

    try:
        model.full_clean()
    except ValidationError as exc:
        raise ApplicationError(f"{entry.where}: {_describe(exc)}") from None
    if created:
        action = "created"
    elif _snapshot(model, _MODEL_COMPARED) != before:
        action = "updated"
    else:
        action = "unchanged"
    if action != "unchanged":
        model.save()
    return LoadedRow("model", name, action)


def _unique_names(entries: Sequence[_Entry], what: str) -> None:
    seen: set[str] = set()
    for entry in entries:
        name = entry.text("name")
        if name in seen:
            raise ApplicationError(f"{what} {name} appears more than once in the file.")
        seen.add(name)


@transaction.atomic
def providers_load(*, data: Any, env: Mapping[str, str]) -> LoadResult:
    """Create or update the providers and models ``data`` describes (the ``loadproviders`` format).

    ``${VAR}`` in any string is replaced from ``env``. Rows are matched by name; a field the file leaves
    out takes the model's default, except ``api_key``, which is then kept as stored. Rows the file does
    not name are left alone. Any error raises ``ApplicationError`` naming the provider or model, and
    nothing is written. Rows whose values did not change are not saved, so loading twice is a no-op."""
    top = _Entry(data, "file", frozenset({"providers"}))
    raw_providers = top.data.get("providers")
    if not isinstance(raw_providers, list):
        raise ApplicationError("file: providers must be a list.")

    plans: list[tuple[_Entry, list[_Entry]]] = []
    for index, raw in enumerate(raw_providers):
        where = f"provider #{index + 1}"
        if isinstance(raw, dict) and isinstance(raw.get("name"), str) and raw["name"]:
            where = f"provider {raw['name']}"
        entry = _Entry(_resolve_env(raw, env, where), where, _PROVIDER_KEYS)
        raw_models = entry.data.get("models") or []
        if not isinstance(raw_models, list):
            raise ApplicationError(f"{where}: models must be a list.")
        model_entries = []
        for position, raw_model in enumerate(raw_models):
            label = f"model #{position + 1}"
            if isinstance(raw_model, dict) and isinstance(raw_model.get("name"), str) and raw_model["name"]:
                label = f"model {raw_model['name']}"
            model_entries.append(_Entry(raw_model, f"{where}, {label}", _MODEL_KEYS))
        plans.append((entry, model_entries))
    _unique_names([entry for entry, _ in plans], "provider")
    _unique_names([model for _, model_entries in plans for model in model_entries], "model")

    rows: list[LoadedRow] = []
    for entry, model_entries in plans:
        provider, row = _provider_load(entry)
        rows.append(row)
        rows.extend(_model_load(model_entry, provider) for model_entry in model_entries)
    return LoadResult(rows=tuple(rows))


def _plain_decimal(value: Decimal) -> str:
    # Strings, not YAML floats: a float would round-trip through binary and could change a price.
    return format(value.normalize(), "f")


def _plain_number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def _dumped_headers(provider: Provider) -> dict[str, str]:
    return {
        header: "${" + env_name_for(provider.name, "HEADER_" + re.sub(r"[^A-Za-z0-9]+", "_", header).upper()) + "}"
        if _SENSITIVE_HEADER.search(header)
        else value.reveal()
        for header, value in sorted((provider.extra_headers or {}).items())
    }


def providers_dump() -> dict[str, Any]:
    """Every provider and model in the ``loadproviders`` format, without secrets: a stored key (and any
    header that looks like a credential) is written as a ``${VAR}`` reference to set on the machine that
    loads the file."""
    providers: list[dict[str, Any]] = []
    for provider in Provider.objects.prefetch_related("models").order_by("name"):
        entry: dict[str, Any] = {"name": provider.name, "kind": provider.kind, "base_url": provider.base_url}
        if provider.api_key:
            entry["api_key"] = "${" + env_name_for(provider.name) + "}"
        entry.update(
            organization=provider.organization,
            api_version=provider.api_version,
            extra_headers=_dumped_headers(provider),
            timeout=_plain_number(provider.timeout_seconds),
            max_retries=provider.max_retries,
            enabled=provider.enabled,
            models=[_model_dump(model) for model in sorted(provider.models.all(), key=lambda m: m.name)],
        )
        providers.append(entry)
    return {"providers": providers}


def _model_dump(model: Model) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": model.name,
        "upstream": model.upstream_id,
        "mode": model.mode,
        "input_per_mtok": _plain_decimal(model.input_per_mtok),
        "output_per_mtok": _plain_decimal(model.output_per_mtok),
    }
    if model.cached_input_per_mtok is not None:
        entry["cached_input_per_mtok"] = _plain_decimal(model.cached_input_per_mtok)
    entry["context_window"] = model.context_window
    if model.max_output_tokens is not None:
        entry["max_output_tokens"] = model.max_output_tokens
    entry["capabilities"] = {key: getattr(model, attname) for key, attname in _CAPABILITIES.items()}
    entry["parameter_rules"] = model.parameter_rules or {}
    entry["enabled"] = model.enabled
    return entry
