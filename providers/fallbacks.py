"""Checks of a model's fallback lists against the rest of the catalog, shared by the admin form and the
catalog file: every name must be another public model, and following fallbacks must never come back to
where it started (the router would otherwise go round until its attempts run out)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .models import CatalogModel

FALLBACK_FIELDS = ("fallbacks", "context_window_fallbacks")


def fallback_graph(*, field: str, exclude: Iterable[str] = ()) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The catalog's ``field`` edges (model name → names it falls back to) and its aliases (alias name →
    target name), leaving out the models named in ``exclude`` (those being edited, whose new lists the
    caller adds)."""
    skipped = set(exclude)
    edges: dict[str, list[str]] = {}
    aliases: dict[str, str] = {}
    for name, target, names in CatalogModel.objects.values_list("name", "alias_of__name", field):
        if name in skipped:
            continue
        if target is not None:
            aliases[name] = target
        edges[name] = [entry for entry in names or [] if isinstance(entry, str)]
    return edges, aliases


def fallback_referrers(name: str) -> list[str]:
    """The models whose fallback lists (either field) name ``name``, sorted."""
    rows = CatalogModel.objects.exclude(name=name).values_list("name", *FALLBACK_FIELDS)
    return sorted(model for model, *lists in rows if any(name in (names or []) for names in lists))


def fallback_problem(
    *,
    name: str,
    names: Sequence[str],
    known: Iterable[str],
    edges: Mapping[str, Sequence[str]],
    aliases: Mapping[str, str],
) -> str | None:
    """Why ``name`` may not fall back to ``names``, or None. ``known``: every public name (aliases
    included); ``edges``: the other models' lists of the same field; ``aliases``: alias → target. An
    alias stands for its target, so falling back to an alias of oneself is falling back to oneself."""
    known = set(known)
    missing = [entry for entry in names if entry not in known]
    if missing:
        return f"{', '.join(missing)}: no such model in the catalog."
    if len(set(names)) != len(names):
        return "A model is named more than once."

    def canonical(entry: str) -> str:
        return aliases.get(entry, entry)

    start = canonical(name)
    if any(canonical(entry) == start for entry in names):
        return "A model cannot fall back to itself (or to an alias of itself)."
    graph = {canonical(source): [canonical(entry) for entry in targets] for source, targets in edges.items()}
    graph[start] = [canonical(entry) for entry in names]
    # Depth-first from this model: reaching it again is a cycle through its new list.
    path: list[str] = [start]
    seen: set[str] = set()

    def walk(node: str) -> list[str] | None:
        for following in graph.get(node, []):
            if following == start:
                return [*path, start]
            if following in seen:
                continue
            seen.add(following)
            path.append(following)
            found = walk(following)
            if found:
                return found
            path.pop()
        return None

    cycle = walk(start)
    if cycle:
        return f"This makes a cycle: {' → '.join(cycle)}."
    return None
