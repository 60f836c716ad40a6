"""Form pieces for secrets: inputs that never render a stored or typed secret back, only its hint."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from .fields import Secret


class SecretInput(forms.PasswordInput):
    """Renders empty with the stored value's hint as placeholder; empty input keeps the stored value."""

    def __init__(self, attrs: dict[str, Any] | None = None) -> None:
        super().__init__(attrs={"autocomplete": "new-password", **(attrs or {})}, render_value=False)

    def get_context(self, name: str, value: Any, attrs: dict[str, Any] | None) -> dict[str, Any]:
        context = super().get_context(name, None, attrs)
        if isinstance(value, Secret) and value:
            context["widget"]["attrs"]["placeholder"] = f"stored: {value.hint} (leave empty to keep)"
        return context


class SecretFormField(forms.CharField):
    widget = SecretInput

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("max_length", None)
        kwargs["strip"] = True
        # None, not "": ``EncryptedTextField.save_form_data`` skips None, so an empty submission keeps the key.
        kwargs["empty_value"] = None
        super().__init__(*args, **kwargs)

    def has_changed(self, initial: Any, data: Any) -> bool:
        return bool(data)

    def bound_data(self, data: Any, initial: Any) -> Any:
        # An empty submission means "keep what is stored".
        return initial if not data else data

    def clean(self, value: Any) -> Secret | None:
        value = super().clean(value)
        return Secret(value) if value else None


class SecretMappingFormField(forms.Field):
    """A JSON object of names to secret values (``EncryptedMappingField``), shown with each value masked.

    The stored values are rendered as their hints (``{"X-Upstream-Token": "…abcd"}``); a hint left as it
    is keeps the stored value (``EncryptedMappingField.save_form_data``), a typed value replaces it, and a
    name left out drops it. What was typed is never rendered back, even when the form has errors: it may be
    a new credential."""

    widget = forms.Textarea
    default_error_messages = {"invalid": "Give a JSON object of header names to string values."}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("max_length", None)
        # A callable default would add a hidden copy of the initial value, compared instead of the stored one.
        kwargs["show_hidden_initial"] = False
        super().__init__(*args, **kwargs)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, dict):
            masked = {name: item.hint if isinstance(item, Secret) else item for name, item in value.items()}
            # ensure_ascii=False: the hints' "…" as itself, not as \u2026.
            return json.dumps(masked, indent=2, ensure_ascii=False) if masked else "{}"
        return value

    def bound_data(self, data: Any, initial: Any) -> Any:
        return initial

    def to_python(self, value: Any) -> dict[str, Secret]:
        if value in self.empty_values:
            return {}
        try:
            parsed = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            raise ValidationError(self.error_messages["invalid"], code="invalid") from None
        if not isinstance(parsed, dict) or not all(isinstance(item, str) for item in parsed.values()):
            raise ValidationError(self.error_messages["invalid"], code="invalid")
        return {name: Secret(item) for name, item in parsed.items()}

    def has_changed(self, initial: Any, data: Any) -> bool:
        try:
            submitted = self.to_python(data)
        except ValidationError:
            return True
        stored = initial if isinstance(initial, dict) else {}
        if submitted.keys() != stored.keys():
            return True
        return any(
            not isinstance(stored[name], Secret) or value.reveal() not in (stored[name].hint, stored[name].reveal())
            for name, value in submitted.items()
        )


class ModelNamesField(forms.CharField):
    """A list of public model names (a JSON list on the model), typed comma-separated: ``claude-haiku,
    gpt-4o``. The order is kept: it is the order the names are tried in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        super().__init__(*args, **kwargs)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return ", ".join(str(item) for item in value)
        return value

    def to_python(self, value: Any) -> list[str]:
        if isinstance(value, list):
            return value
        if value in self.empty_values:
            return []
        return [name.strip() for name in str(value).replace("\n", ",").split(",") if name.strip()]

    def has_changed(self, initial: Any, data: Any) -> bool:
        return self.to_python(initial or []) != self.to_python(data)
