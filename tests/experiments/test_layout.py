"""layout_rebalance moves as few buckets as it can, and layout_owner finds each bucket's variant.

Property tests over random sequences of allocation changes (a layout after several changes is fragmented,
as a real one becomes): every bucket's owner is compared before and after, all 10,000 of them."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.layout import (
    bucket_of,
    layout_counts,
    layout_owner,
    layout_owners,
    layout_rebalance,
    layout_starts,
)
from experiments.models import BUCKETS

VARIANTS = (11, 22, 33, 44)


@st.composite
def allocations(draw, variants=VARIANTS, partial: bool = True) -> dict[int, int]:
    """Basis points for some (or all) of ``variants``, adding up to at most BUCKETS."""
    named = draw(st.lists(st.sampled_from(variants), min_size=1, unique=True)) if partial else list(variants)
    cuts = sorted(draw(st.lists(st.integers(0, BUCKETS), min_size=len(named), max_size=len(named))))
    return {v: cut - previous for v, cut, previous in zip(named, cuts, [0, *cuts], strict=False)}


def fits(layout, allocation: dict[int, int]) -> bool:
    kept = sum(n for v, n in layout_counts(layout).items() if v not in allocation)
    return kept + sum(allocation.values()) <= BUCKETS


def well_formed(layout) -> None:
    previous_end = 0
    previous_owner = None
    for start, end, owner in layout:
        assert 0 <= start < end <= BUCKETS
        assert start >= previous_end, "ranges overlap or are out of order"
        assert not (start == previous_end and owner == previous_owner), "adjacent ranges of one variant not merged"
        previous_end, previous_owner = end, owner


@settings(max_examples=150, deadline=None)
@given(history=st.lists(allocations(partial=False), min_size=1, max_size=4), change=allocations())
def test_a_rebalance_moves_exactly_the_change_of_each_variant_and_nothing_else(history, change):
    layout: list = []
    for step in history:
        layout = layout_rebalance(layout, step)
    if not fits(layout, change):
        with pytest.raises(ValueError):
            layout_rebalance(layout, change)
        return
    before = layout_owners(layout)
    after_layout = layout_rebalance(layout, change)
    after = layout_owners(after_layout)
    well_formed(after_layout)

    had, has = layout_counts(layout), layout_counts(after_layout)
    for variant in VARIANTS:
        target = change.get(variant, had.get(variant, 0))
        assert has.get(variant, 0) == target
        owned_before = {b for b, o in enumerate(before) if o == variant}
        owned_after = {b for b, o in enumerate(after) if o == variant}
        # Exactly |Δ| buckets of this variant changed hands: it gained or lost, never swapped.
        assert len(owned_before ^ owned_after) == abs(target - had.get(variant, 0))
        if target >= had.get(variant, 0):
            assert owned_before <= owned_after
        else:
            assert owned_after <= owned_before

    moves = Counter((b, a) for b, a in zip(before, after, strict=True) if b != a)
    # A bucket never moves between two variants whose allocation did not change.
    unchanged = {v for v in VARIANTS if has.get(v, 0) == had.get(v, 0)}
    assert not [m for m in moves if m[0] in unchanged or m[1] in unchanged]
    # A bucket goes straight from one variant to another only as far as the untouched share could not pay.
    growth = sum(max(0, has.get(v, 0) - had.get(v, 0)) for v in VARIANTS)
    direct = sum(n for (b, a), n in moves.items() if b is not None and a is not None)
    assert direct == max(0, growth - before.count(None))


@settings(max_examples=100, deadline=None)
@given(history=st.lists(allocations(partial=False), min_size=1, max_size=5))
def test_layout_owner_bisects_to_every_buckets_owner(history):
    layout: list = []
    for step in history:
        layout = layout_rebalance(layout, step)
    owners = layout_owners(layout)
    starts = layout_starts(layout)
    assert [layout_owner(layout, b, starts) for b in range(BUCKETS)] == owners
    assert [layout_owner(layout, b) for b in range(0, BUCKETS, 97)] == owners[::97]


def test_raising_one_variant_from_10_to_20_percent_takes_only_untouched_buckets():
    layout = layout_rebalance([], {1: 1000, 2: 1000})
    raised = layout_rebalance(layout, {1: 1000, 2: 2000})
    before, after = layout_owners(layout), layout_owners(raised)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert len(moved) == 1000
    assert set(moved) == {(None, 2)}


def test_a_shrinking_variant_gives_back_its_last_buckets_and_a_growing_one_takes_them_last():
    layout = layout_rebalance([], {1: 5000, 2: 4000})  # 1000 untouched
    assert layout == [[0, 5000, 1], [5000, 9000, 2]]
    # 1 shrinks by 3000 (its highest buckets), 2 grows by 3500: 1000 untouched first, then 2500 of 1's.
    assert layout_rebalance(layout, {1: 2000, 2: 7500}) == [[0, 2000, 1], [2000, 4500, 2], [5000, 10000, 2]]


def test_allocations_over_100_percent_or_negative_are_refused():
    layout = layout_rebalance([], {1: 6000})
    with pytest.raises(ValueError, match="more than 100"):
        layout_rebalance(layout, {2: 4001})
    with pytest.raises(ValueError, match="negative"):
        layout_rebalance(layout, {2: -1})


def test_buckets_are_uniform_and_depend_on_the_salt():
    counts = Counter(bucket_of("salt-a", f"user:{n}") // 1000 for n in range(20_000))
    assert all(1700 < counts[decile] < 2300 for decile in range(10))
    same = sum(bucket_of("salt-a", f"user:{n}") == bucket_of("salt-b", f"user:{n}") for n in range(2000))
    assert same < 10
