"""Who is calling: the ``Caller`` every entry point builds from its credentials (a gateway key, a signed-in
user) before it runs the pipeline, and the models that caller may use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from billing.services.admission import models_allowed
from billing.services.keys import api_key_authenticate
from providers.models import ModelMode
from providers.types import ResolvedModel


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: int
    username: str
    api_key_id: int | None = None
    key_allowed_model_ids: frozenset[int] | None = None


def caller_from_user(user: Any) -> Caller:
    return Caller(user_id=user.pk, username=user.get_username())


async def caller_from_api_key(raw: str | None) -> Caller:
    principal = await api_key_authenticate(raw)
    return Caller(
        user_id=principal.user_id,
        username=principal.username,
        api_key_id=principal.key_id,
        key_allowed_model_ids=principal.allowed_model_ids,
    )


async def models_for_caller(caller: Caller, *, mode: str | None = ModelMode.CHAT) -> list[ResolvedModel]:
    """The models ``caller`` may use, of one ``mode`` (chat: the picker's), or of every mode (None)."""
    return await models_allowed(user_id=caller.user_id, key_allowed_model_ids=caller.key_allowed_model_ids, mode=mode)
