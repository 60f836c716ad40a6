from __future__ import annotations

from django.apps import AppConfig


class ProvidersConfig(AppConfig):
    name = "providers"
    verbose_name = "Providers and model catalog"

    def ready(self) -> None:
        from accounts.jwt import jwks_outbound_use

        from . import signals  # noqa: F401  (cache invalidation on admin saves)
        from .outbound import OutboundRefused, plain_outbound_client

        # The identity provider's JWKS (accounts.jwt) is fetched under the outbound policy like every call.
        jwks_outbound_use(plain_outbound_client, refused=OutboundRefused)
