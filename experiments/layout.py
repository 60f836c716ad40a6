"""Sticky bucketing: which bucket a unit falls in, and which variant owns each bucket.

A layout is a list of ``(start, end, variant_id)`` ranges over ``BUCKETS`` buckets (end exclusive); the
buckets no range covers are the untouched share. ``layout_rebalance`` turns one allocation into another
moving as few buckets as it can: a variant that grows takes buckets from the untouched share first (then
from variants that shrink), a variant that shrinks gives back its last ones, and every other bucket stays
where it was."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

from .models import BUCKETS

Layout = Sequence[Sequence[int]]


def bucket_of(salt: str, unit: str) -> int:
    """The unit's bucket in ``[0, BUCKETS)``: the first 8 bytes of SHA-256(salt:unit), modulo BUCKETS
    (the bias of the modulo is below 1e-15)."""
    digest = hashlib.sha256(f"{salt}:{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def layout_owner(layout: Layout, bucket: int) -> int | None:
    """The variant id owning ``bucket``, or None (untouched). ``layout`` is sorted by start."""
    starts = [r[0] for r in layout]
    index = bisect.bisect_right(starts, bucket) - 1
    if index >= 0 and layout[index][0] <= bucket < layout[index][1]:
        return int(layout[index][2])
    return None
