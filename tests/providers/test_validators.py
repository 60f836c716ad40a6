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
        "http://[::]/v1",
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # NAT64 form of the metadata address
        "http://[2002:a9fe:a9fe::1]/v1",  # 6to4 form
        "http://[::169.254.169.254]/v1",  # IPv4-compatible form
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/v1",  # Teredo
        "http://224.0.0.1/v1",
        "http://[fd00:ec2::254]/latest/meta-data/",  # AWS metadata over IPv6
    ],
)
def test_rejects_metadata_and_link_local_addresses_always(url, allow_private):
    with override_settings(LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS=allow_private):
        assert "never connects to" in rejection(url)


@pytest.mark.parametrize("allow_private", [True, False])
@pytest.mark.parametrize("url", ["http://metadata.google.internal/computeMetadata/v1", "http://METADATA.GOOG./v1"])
def test_rejects_metadata_host_names_that_do_not_resolve_here(url, allow_private):
    # They resolve only inside their cloud: refused by name, since there is no address to judge.
    with override_settings(LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS=allow_private):
        assert "cloud metadata host" in rejection(url)


@override_settings(LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS=False)
def test_accepts_a_name_that_does_not_resolve_now():
    # Judged when a connection is opened (tests/providers/test_outbound.py).
    validate_provider_url("https://llm.invalid/v1")


@override_settings(LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS=False, LLMHUB_OUTBOUND_ALLOWED_NETWORKS=["10.8.0.0/16"])
def test_allowed_networks_admit_their_private_addresses_only():
    validate_provider_url("http://10.8.1.2:8000/v1")
    assert "private address" in rejection("http://10.9.1.2:8000/v1")


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
        "http://[64:ff9b::7f00:1]/v1",  # NAT64 form of 127.0.0.1
        "http://[2002:c0a8:0101::1]/v1",  # 6to4 form of 192.168.1.1
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
