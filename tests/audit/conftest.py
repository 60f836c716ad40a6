"""Driving the admin as a user does: read a change form's fields from its HTML, change some, submit it."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from audit.models import AuditEvent

ROOT_PASSWORD = "pw-for-tests-root-123"
AGENT = "audit-tests/1.0"


class _FormFields(HTMLParser):
    """The fields of the admin's model form (``<form id="…_form">``) as a browser would submit them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.data: dict[str, list[str]] = {}
        self._in_form = False
        self._select: tuple[str, bool] | None = None
        self._textarea: str | None = None
        self._text: list[str] = []

    def _add(self, name: str, value: str) -> None:
        self.data.setdefault(name, []).append(value)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if tag == "form":
            self._in_form = attributes.get("id", "").endswith("_form")
        if not self._in_form or "name" not in attributes or "disabled" in attributes:
            if tag == "option" and self._select is not None and "selected" in attributes:
                self._add(self._select[0], attributes.get("value", ""))
            return
        name = attributes["name"]
        if tag == "input":
            kind = attributes.get("type", "text")
            if kind in ("submit", "button", "file", "image", "reset"):
                return
            if kind in ("checkbox", "radio") and "checked" not in attributes:
                return
            self._add(name, attributes.get("value", "on" if kind == "checkbox" else ""))
        elif tag == "select":
            self._select = (name, "multiple" in attributes)
            self.data.setdefault(name, [])
        elif tag == "textarea":
            self._textarea, self._text = name, []

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False
        elif tag == "select":
            self._select = None
        elif tag == "textarea" and self._textarea is not None:
            text = "".join(self._text)
            self._add(self._textarea, text[1:] if text.startswith("\n") else text)
            self._textarea = None

    def handle_data(self, data: str) -> None:
        if self._textarea is not None:
            self._text.append(data)


def form_fields(html: str) -> dict[str, Any]:
    parser = _FormFields()
    parser.feed(html)
    return {name: values if len(values) != 1 else values[0] for name, values in parser.data.items()}


def admin_submit(client: Client, url: str, **changes: Any) -> Any:
    """GET the admin form at ``url``, apply ``changes`` (None removes a field), POST it; the response must
    be the admin's redirect (a re-rendered form means the form refused the data: its errors are shown)."""
    page = client.get(url)
    assert page.status_code == 200, page.status_code
    data = form_fields(page.content.decode())
    for name, value in changes.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    response = client.post(url, data)
    if response.status_code != 302:
        errors = [line for line in response.content.decode().splitlines() if "errorlist" in line or "errornote" in line]
        raise AssertionError(f"the admin refused the form: {errors[:10]}")
    return response


@pytest.fixture
def root(db) -> Any:
    return get_user_model().objects.create_superuser("root", "root@example.com", ROOT_PASSWORD)


@pytest.fixture
def admin_client(root) -> Client:
    client = Client(HTTP_USER_AGENT=AGENT)
    client.force_login(root)
    return client


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("seq"))


def last_event(action: str) -> AuditEvent:
    found = events(action)
    assert found, f"no {action} event"
    return found[-1]
