"""Sticky bucketing: which bucket a unit falls in, and which variant owns each bucket.

A layout is a list of ``[start, end, variant_id]`` ranges over ``BUCKETS`` buckets (end exclusive), sorted
by start, never overlapping, adjacent ranges of one variant merged; the buckets no range covers are the
untouched share. ``layout_rebalance`` turns one allocation into another moving as few buckets as it can:
a variant that shrinks gives back its last (highest) buckets to the untouched share; a variant that grows
takes buckets from the untouched share first (lowest first), and only when that is exhausted the buckets
the shrinking variants have just given back; every other bucket stays where it was. A user moved between
two variants has seen both, which spoils both arms' statistics, so moving through the untouched share
first keeps such users to the few an allocation change cannot avoid."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping, Sequence

from .models import BUCKETS

Layout = Sequence[Sequence[int]]


def bucket_of(salt: str, unit: str) -> int:
    """The unit's bucket in ``[0, BUCKETS)``: the first 8 bytes of SHA-256(salt:unit), modulo BUCKETS
    (the bias of the modulo is below 1e-15)."""
    digest = hashlib.sha256(f"{salt}:{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def layout_starts(layout: Layout) -> tuple[int, ...]:
    """The ranges' starts, for ``layout_owner``'s bisect (computed once per layout, not per request)."""
    return tuple(int(r[0]) for r in layout)


def layout_owner(layout: Layout, bucket: int, starts: Sequence[int] | None = None) -> int | None:
    """The variant id owning ``bucket``, or None (untouched): a bisect over the ranges' starts (pass
    ``starts`` from ``layout_starts`` on a hot path)."""
    index = bisect.bisect_right(layout_starts(layout) if starts is None else starts, bucket) - 1
    if index >= 0 and layout[index][0] <= bucket < layout[index][1]:
        return int(layout[index][2])
    return None


def layout_counts(layout: Layout) -> dict[int, int]:
    """How many buckets each variant owns."""
    counts: dict[int, int] = {}
    for start, end, variant_id in layout:
        counts[int(variant_id)] = counts.get(int(variant_id), 0) + int(end) - int(start)
    return counts


def layout_owners(layout: Layout) -> list[int | None]:
    """The owner of every bucket (None: untouched), bucket by bucket."""
    owners: list[int | None] = [None] * BUCKETS
    for start, end, variant_id in layout:
        owners[int(start) : int(end)] = [int(variant_id)] * (int(end) - int(start))
    return owners


def layout_from_owners(owners: Sequence[int | None]) -> list[list[int]]:
    """The merged, sorted ranges of a bucket-by-bucket ownership."""
    layout: list[list[int]] = []
    for bucket, owner in enumerate(owners):
        if owner is None:
            continue
        if layout and layout[-1][1] == bucket and layout[-1][2] == owner:
            layout[-1][1] = bucket + 1
        else:
            layout.append([bucket, bucket + 1, owner])
    return layout


def layout_rebalance(layout: Layout, allocations: Mapping[int, int]) -> list[list[int]]:
    """The layout in which each variant of ``allocations`` (``{variant_id: basis points}``, 1 % = 100
    buckets) owns that many buckets, reached from ``layout`` by moving as few buckets as possible.

    Variants ``allocations`` does not name keep exactly the buckets they own. A shrinking variant gives back
    its highest buckets; a growing one takes the lowest untouched buckets first, then the ones shrinking
    variants gave back (growing variants served in the order of ``allocations``). So each variant gains or
    loses exactly |Δ| buckets, no bucket moves between two variants whose allocation did not change, and a
    bucket goes from one variant to another only when the untouched share cannot pay for the growth.
    Raises ``ValueError`` for a negative allocation or a total over ``BUCKETS``."""
    owners = layout_owners(layout)
    counts = layout_counts(layout)
    targets = {int(v): int(bp) for v, bp in allocations.items()}
    if any(bp < 0 for bp in targets.values()):
        raise ValueError("An allocation cannot be negative.")
    total = sum(targets.values()) + sum(n for v, n in counts.items() if v not in targets)
    if total > BUCKETS:
        raise ValueError(f"The allocations add up to {total / 100:.2f} %, more than 100 %.")

    given_back: list[int] = []
    for variant_id, target in targets.items():
        surplus = counts.get(variant_id, 0) - target
        if surplus <= 0:
            continue
        for bucket in range(BUCKETS - 1, -1, -1):
            if surplus == 0:
                break
            if owners[bucket] == variant_id:
                owners[bucket] = None
                given_back.append(bucket)
                surplus -= 1
    returned = set(given_back)
    untouched = iter([b for b in range(BUCKETS) if owners[b] is None and b not in returned])
    given_back_lowest_first = iter(sorted(given_back))

    for variant_id, target in targets.items():
        need = target - counts.get(variant_id, 0)
        while need > 0:
            bucket = next(untouched, None)
            if bucket is None:
                bucket = next(given_back_lowest_first)
            owners[bucket] = variant_id
            need -= 1
    return layout_from_owners(owners)
