"""Form pieces for secrets: a write-only input that never renders the stored value back."""

from __future__ import annotations

from typing import Any

from django import forms

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
