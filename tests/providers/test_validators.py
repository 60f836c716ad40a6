"""The SSRF guard on provider base URLs."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings

from providers.models import Provider, ProviderKind
from providers.validators import validate_provider_url


def rejection(url: str) -> str:
    with pytest.raises(ValidationError) as excinfo:
        validate_provider_url(url)
    return " ".join(excinfo.value.message_dict["base_url"])


@pytest.mark.parametrize(
    "url",
    ["ftp://files.example.com/v1", "file:///etc/passwd", "gopher://127.0.0.1:70/", "https://", "http://[::1/v1", "x"],
)
def test_rejects_other_schemes_and_malformed_urls(url):
    assert "http(s) URL" in rejection(url)


def test_rejects_credentials_in_the_url():
    assert "API key field" in rejection("https://user:sk-secret@93.184.216.34/v1")
    assert "API key field" in rejection("https://sk-secret@93.184.216.34/v1")


@pytest.mark.parametrize("allow_private", [True, False])
@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",  # the same address, written as IPv6
        "http://[fe80::1]/v1",
        "http://0.0.0.0:8000/v1",
    ],
)
def test_rejects_metadata_and_link_local_addresses_always(url, allow_private):
    with override_settings(LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS=allow_private):
        assert "link-local or unspecified" in rejection(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:11434/v1",
        "http://localhost:8000/v1",  # resolved: a name is judged by its addresses
        "http://10.1.2.3/v1",
        "http://172.16.0.5/v1",
        "http://192.168.1.20:8000/v1",
        "http://100.64.0.1/v1",  # shared address space: not routable on the internet either
        "http://[::1]:8000/v1",
        "http://[fd00::1]/v1",
        "http://[::ffff:10.0.0.1]/v1",
    ],
)
def test_private_addresses_depend_on_the_setting(url):
    with override_settings(LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS=False):
        assert "private address" in rejection(url)
    with override_settings(LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS=True):
        validate_provider_url(url)


@override_settings(LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS=False)
def test_accepts_public_addresses():
    validate_provider_url("https://93.184.216.34/v1")
    validate_provider_url("http://[2606:4700:4700::1111]:8443/v1")


@override_settings(LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS=False)
def test_provider_clean_checks_the_effective_url():
    with pytest.raises(ValidationError) as excinfo:
        Provider(name="local", kind=ProviderKind.OLLAMA).clean()  # empty base_url: Ollama's default is loopback
    assert "private address" in str(excinfo.value.message_dict["base_url"])
    with pytest.raises(ValidationError) as excinfo:
        Provider(name="custom", kind=ProviderKind.OPENAI_COMPATIBLE).clean()
    assert "no default endpoint" in str(excinfo.value.message_dict["base_url"])
