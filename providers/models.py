from __future__ import annotations

import re
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models

from .fields import EncryptedMappingField, EncryptedTextField, Secret


class ProviderKind(models.TextChoices):
    OPENAI = "openai", "OpenAI"
    ANTHROPIC = "anthropic", "Anthropic"
    OPENROUTER = "openrouter", "OpenRouter"
    OLLAMA = "ollama", "Ollama"
    VLLM = "vllm", "vLLM"
    OPENAI_COMPATIBLE = "openai_compatible", "OpenAI-compatible server"
    AZURE_OPENAI = "azure_openai", "Azure OpenAI"
    MISTRAL = "mistral", "Mistral"
    GEMINI = "gemini", "Google Gemini"
    COHERE = "cohere", "Cohere"


# Where each kind lives when the admin leaves the base URL empty.
DEFAULT_BASE_URLS: dict[str, str] = {
    ProviderKind.OPENAI: "https://api.openai.com/v1",
    ProviderKind.ANTHROPIC: "https://api.anthropic.com",
    ProviderKind.OPENROUTER: "https://openrouter.ai/api/v1",
    ProviderKind.OLLAMA: "http://127.0.0.1:11434/v1",
    ProviderKind.VLLM: "http://127.0.0.1:8000/v1",
    ProviderKind.OPENAI_COMPATIBLE: "",
    ProviderKind.AZURE_OPENAI: "",  # https://<resource>.openai.azure.com: every resource has its own
    ProviderKind.MISTRAL: "https://api.mistral.ai/v1",
    ProviderKind.GEMINI: "https://generativelanguage.googleapis.com",
    ProviderKind.COHERE: "https://api.cohere.com",
}


# RFC 9110: a name is a token; a value is visible ASCII, spaces and tabs (no CR or LF, which would split it).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


class HealthStatus(models.TextChoices):
    UNKNOWN = "unknown", "Unknown"
    OK = "ok", "OK"
    FAILING = "failing", "Failing"


class Provider(models.Model):
    name = models.SlugField(max_length=64, unique=True, help_text="Shown to clients as owned_by.")
    kind = models.CharField(max_length=32, choices=ProviderKind.choices)
    base_url = models.URLField(max_length=500, blank=True, help_text="Leave empty for the kind's default endpoint.")
    api_key = EncryptedTextField(blank=True, default="", help_text="Encrypted at rest; never shown back.")
    organization = models.CharField(max_length=128, blank=True)
    api_version = models.CharField(
        max_length=32, blank=True, help_text="Azure OpenAI's api-version (e.g. 2024-10-21); other kinds ignore it."
    )
    extra_headers = EncryptedMappingField(
        default=dict,
        blank=True,
        help_text=(
            "Sent with every upstream request. Values are encrypted at rest and shown masked (…abcd): leave a "
            "masked value as it is to keep it, type a new value to replace it, remove the name to drop it."
        ),
    )
    timeout_seconds = models.DecimalField(
        max_digits=6, decimal_places=1, default=Decimal("60.0"), validators=[MinValueValidator(Decimal("0.1"))]
    )
    max_retries = models.PositiveSmallIntegerField(default=2)
    enabled = models.BooleanField(default=True)

    last_health_status = models.CharField(max_length=16, choices=HealthStatus.choices, default=HealthStatus.UNKNOWN)
    last_health_latency_ms = models.PositiveIntegerField(null=True, blank=True)
    last_health_error = models.CharField(max_length=500, blank=True)
    last_health_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def effective_base_url(self) -> str:
        return self.base_url or DEFAULT_BASE_URLS.get(self.kind, "")

    def clean(self) -> None:
        from .validators import validate_provider_url

        if not self.effective_base_url:
            raise ValidationError({"base_url": "This kind of provider has no default endpoint: give a base URL."})
        validate_provider_url(self.effective_base_url, field="base_url")
        if self.kind == ProviderKind.AZURE_OPENAI and not self.api_version.strip():
            raise ValidationError({"api_version": "Azure OpenAI needs an api-version (e.g. 2024-10-21)."})
        headers = self.extra_headers
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, Secret) for k, v in headers.items()
        ):
            raise ValidationError({"extra_headers": "Give a JSON object of header names to string values."})
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValidationError({"extra_headers": f"{name!r} is not a valid header name."})
            # HTTP clients send header values as ASCII. The message names the header, never the value.
            if not _HEADER_VALUE.fullmatch(value.reveal()):
                raise ValidationError(
                    {
                        "extra_headers": f"The value of {name} is not a valid header value (printable ASCII). "
                        "A masked value (…) keeps only the value stored under the same name: type the whole value."
                    }
                )


class ModelMode(models.TextChoices):
    CHAT = "chat", "Chat"
    EMBEDDING = "embedding", "Embedding"


class Model(models.Model):
    """A model in the catalog, under the public name clients send."""

    name = models.CharField(max_length=128, unique=True, help_text="The public name clients send as `model`.")
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="models")
    upstream_id = models.CharField(max_length=200, help_text="The provider's own model id.")
    input_per_mtok = models.DecimalField(
        "input $/Mtok", max_digits=12, decimal_places=6, default=Decimal("0"), validators=[MinValueValidator(0)]
    )
    output_per_mtok = models.DecimalField(
        "output $/Mtok", max_digits=12, decimal_places=6, default=Decimal("0"), validators=[MinValueValidator(0)]
    )
    cached_input_per_mtok = models.DecimalField(
        "cached input $/Mtok",
        max_digits=12,
        decimal_places=6,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="Empty: cached input tokens are priced as input tokens.",
    )
    mode = models.CharField(
        max_length=16,
        choices=ModelMode.choices,
        default=ModelMode.CHAT,
        help_text="What the model does: chat models answer /v1/chat/completions and /v1/messages and appear "
        "in the chat picker; embedding models answer /v1/embeddings only.",
    )
    context_window = models.PositiveIntegerField(default=128_000)
    max_output_tokens = models.PositiveIntegerField(null=True, blank=True)
    supports_streaming = models.BooleanField(default=True)
    supports_tools = models.BooleanField(default=True)
    supports_vision = models.BooleanField(default=False)
    supports_json_mode = models.BooleanField(default=True)
    parameter_rules = models.JSONField(
        default=dict,
        blank=True,
        help_text=(
            'Request rewrites for this model, e.g. {"fixed": {"temperature": 1}, '
            '"rename": {"max_tokens": "max_completion_tokens"}, "drop": ["presence_penalty"]}.'
        ),
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from .rules import validate_parameter_rules

        validate_parameter_rules(self.parameter_rules)
