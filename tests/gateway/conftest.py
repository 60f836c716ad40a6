"""A live llmhub with a catalog pointing at the fake upstream, a user and a gateway key."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import openai
import pytest

from billing.services.keys import api_key_create
from providers.models import ModelMode, Provider, ProviderKind
from tests.attachments import pdf_counts  # noqa: F401  (a fixture)
from tests.factories import ModelFactory, ProviderFactory, UserFactory

# A conversation in which the model had refused: OpenAI's spec types an assistant message's parts as text or
# ``refusal``, and each translation sends the refusal on as text, in its place (REFUSED_TURN_TEXTS, the texts in order).
REFUSED_TURN_TEXTS = ["Here is the first half. ", "Not the second."]
REFUSED_TURN = [
    {"role": "user", "content": "Write me something bad."},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": REFUSED_TURN_TEXTS[0]},
            {"type": "refusal", "refusal": REFUSED_TURN_TEXTS[1]},
        ],
    },
    {"role": "user", "content": "Why not?"},
]


def reply_text(response, stream: bool) -> str:
    """The text of a chat completion from the openai SDK, whole or streamed."""
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices)
    return response.choices[0].message.content


@dataclass
class Gateway:
    url: str
    key: str
    user: object
    api_key: object
    upstream: object

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1",
            api_key=kwargs.pop("api_key", self.key),
            max_retries=0,
            timeout=kwargs.pop("timeout", 20),
            **kwargs,
        )

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.url + "/v1",
            api_key=kwargs.pop("api_key", self.key),
            max_retries=0,
            timeout=kwargs.pop("timeout", 20),
            **kwargs,
        )


def make_catalog(upstream) -> dict:
    openai_provider = ProviderFactory(name="fake-openai", base_url=upstream.base_url + "/v1")
    anthropic_provider = ProviderFactory(name="fake-anthropic", kind=ProviderKind.ANTHROPIC, base_url=upstream.base_url)
    return {
        "gpt": ModelFactory(
            name="gpt-test",
            provider=openai_provider,
            upstream_id="fake-gpt-4o-mini",
            input_per_mtok=Decimal("0.15"),
            output_per_mtok=Decimal("0.60"),
            cached_input_per_mtok=Decimal("0.075"),
        ),
        "claude": ModelFactory(
            name="claude-test",
            provider=anthropic_provider,
            upstream_id="fake-claude-haiku",
            input_per_mtok=Decimal("0.80"),
            output_per_mtok=Decimal("4.00"),
        ),
        "broken": ModelFactory(name="broken", provider=openai_provider, upstream_id="fault-500"),
        "limited": ModelFactory(name="limited", provider=openai_provider, upstream_id="fault-429"),
        "disabled": ModelFactory(name="disabled-model", provider=openai_provider, enabled=False),
    }


@pytest.fixture
def gateway(llmhub_server, fake_upstream) -> Gateway:
    make_catalog(fake_upstream)
    user = UserFactory(username="alice")
    created = api_key_create(user=user, name="tests")
    return Gateway(
        url=llmhub_server.url, key=created.secret, user=user, api_key=created.api_key, upstream=fake_upstream
    )


# What ``embedder``'s model costs per million input tokens.
EMBEDDING_INPUT_PRICE = Decimal("0.02")


@pytest.fixture
def embedder(gateway) -> Gateway:
    """``embed-test``: an embedding model on the OpenAI-protocol provider, ``EMBEDDING_INPUT_PRICE`` per million input
    tokens."""
    ModelFactory(
        name="embed-test",
        provider=Provider.objects.get(name="fake-openai"),
        upstream_id="fake-embedding-small",
        mode=ModelMode.EMBEDDING,
        input_per_mtok=EMBEDDING_INPUT_PRICE,
        output_per_mtok=Decimal(0),
        context_window=8192,
    )
    return gateway
