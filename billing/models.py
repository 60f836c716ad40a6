from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import models
from django.utils import timezone


class ApiKey(models.Model):
    """A gateway key. Only a SHA-256 of the secret is kept; the secret is shown once, at creation."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, default="default")
    prefix = models.CharField(max_length=32, unique=True, editable=False, help_text="The visible start of the key.")
    secret_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    allowed_models = models.ManyToManyField(
        "providers.Model", blank=True, related_name="+", help_text="Empty: every model the owner's plan allows."
    )

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > timezone.now())


class Endpoint(models.TextChoices):
    REST = "rest", "REST"
    WEBSOCKET = "websocket", "WebSocket"


class UsageStatus(models.TextChoices):
    OK = "ok", "OK"
    CLIENT_DISCONNECTED = "client_disconnected", "Client disconnected"
    CANCELLED = "cancelled", "Cancelled"
    UPSTREAM_ERROR = "upstream_error", "Upstream error"
    REJECTED = "rejected", "Rejected"


class UsageRecord(models.Model):
    """The ledger: one row per request, the source of truth for spend."""

    request_id = models.CharField(max_length=64, unique=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage")
    provider = models.ForeignKey("providers.Provider", null=True, on_delete=models.SET_NULL, related_name="+")
    model = models.ForeignKey("providers.Model", null=True, on_delete=models.SET_NULL, related_name="+")
    # Names are copied so that the ledger still reads right after a catalog row is renamed or deleted.
    provider_name = models.CharField(max_length=64, blank=True)
    model_name = models.CharField(max_length=128, blank=True)
    endpoint = models.CharField(max_length=16, choices=Endpoint.choices)
    stream = models.BooleanField(default=False)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=20, decimal_places=10, default=Decimal("0"))
    usage_estimated = models.BooleanField(default=False, help_text="The provider sent no usage; tokens were counted.")
    upstream_latency_ms = models.PositiveIntegerField(null=True, blank=True)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True, help_text="Time to first token.")
    duration_ms = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=24, choices=UsageStatus.choices)
    error_type = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["user", "created_at"]),
            models.Index(fields=["api_key", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.model_name} {self.status}"
