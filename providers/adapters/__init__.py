"""Adapters per wire protocol, and the registry that picks one by provider kind."""

from __future__ import annotations

from .base import BaseAdapter
from .registry import (
    adapter_class_for_kind,
    adapter_for,
    counts_every_request_search,
    every_request_search_refusal,
    sends_service_tier,
)

__all__ = [
    "BaseAdapter",
    "adapter_class_for_kind",
    "adapter_for",
    "counts_every_request_search",
    "every_request_search_refusal",
    "sends_service_tier",
]
