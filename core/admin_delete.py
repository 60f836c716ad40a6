"""The admin's delete confirmation page at any size: the first rows through Django's own machinery, the rest counted.

Django's page (a change page's delete, the ``delete_selected`` action) collects every row the delete cascades to,
a query per relation and batch of rows, and renders each: a user with 68,000 stored responses, or responses
selected across their list, ran past 120 s on PostgreSQL. ``BoundedDeleteConfirmation`` lists the first
``delete_listed`` rows of the selection and of each relation below them (Django's ``NestedObjects``, its links and
its permission check a row), then counts what the delete takes, one query a model the cascade reaches (each
relation leading there a subquery of the rows above it), and adds "… and N more" for each model past what is
listed. Django's checks stay whole: the permission to delete every model with rows taken, and the protected rows
(``PROTECT``, or ``RESTRICT`` by a row the delete does not take), named, which turn the page into Django's "cannot
delete" (the delete itself would be a ``ProtectedError`` 500)."""

from __future__ import annotations

from typing import Any

from django.contrib.admin.utils import NestedObjects, quote
from django.db import connections, models, router
from django.db.models import Q, QuerySet
from django.db.models.deletion import get_candidate_relations_to_delete
from django.db.models.expressions import RawSQL
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html
from django.utils.text import capfirst

# How deep the counted cascade is followed: deeper than any chain of CASCADE relations the models have, the longest
# a user's keys and the keys below them, 8 levels at most (billing's MAX_KEY_DEPTH; its test in
# tests/billing/test_keys_admin_scale.py).
CASCADE_DEPTH = 12


class _ListedObjects(NestedObjects):
    """Django's collector, reading at most ``listed`` rows of each relation it follows."""

    def __init__(self, *args: Any, listed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listed = listed

    def related_objects(self, related_model: Any, related_fields: Any, objs: Any) -> QuerySet:
        return super().related_objects(related_model, related_fields, objs)[: self.listed]


def _pks(queryset: QuerySet) -> QuerySet:
    return queryset.order_by().values("pk")


def cascade_reach(model: type[models.Model], selection: QuerySet, depth: int = CASCADE_DEPTH) -> dict[str, Any]:
    """What deleting ``selection`` (rows of ``model``) reaches, as querysets to count, none evaluated:
    ``taken`` {model: [querysets of the rows taken]} and ``held`` [(model, queryset of rows referring to a taken
    one through a PROTECT or RESTRICT relation)].

    A model's relation to itself (a key's keys) is followed in one recursive query (``_rows_below``), not a level
    at a time: a level at a time joined the table to itself once more each level, 13 queries of up to 12 joins
    OR-ed in one count, and PostgreSQL plans a query of 12 tables or more by its genetic optimizer, whose plan for
    a key's delete page (158 keys) sometimes ran past 120 s."""
    taken: dict[type[models.Model], list[QuerySet]] = {model: [selection]}
    held: list[tuple[type[models.Model], QuerySet]] = []

    def walk(current: type[models.Model], path: str, level: int, root: QuerySet, closed: frozenset) -> None:
        # ``path``: the lookup from ``current`` up to ``root``, joins rather than nested subqueries (a key's keys
        # 8 levels deep nested 8 subqueries, past SQLite's parser stack).
        for relation in get_candidate_relations_to_delete(current._meta):
            field = relation.field
            on_delete = field.remote_field.on_delete
            related = relation.related_model
            lookup = f"{field.name}__{path}" if path else field.name
            below = related._base_manager.filter(**{f"{lookup}__in": _pks(root)})
            if on_delete is models.CASCADE:
                if related is current and field.remote_field.model is current:
                    if field in closed:
                        continue  # the rows below, at every depth, are taken already
                    tree = _rows_below(related, field, below, depth)
                    taken.setdefault(related, []).append(tree)
                    if level < depth:  # from every row of the tree, what else it takes
                        walk(related, "", level + 1, tree, closed | {field})
                    continue
                taken.setdefault(related, []).append(below)
                if level < depth:
                    walk(related, lookup, level + 1, root, closed)
            elif on_delete in (models.PROTECT, models.RESTRICT):
                held.append((related, below))

    walk(model, "", 1, selection, frozenset())
    return {"taken": taken, "held": held}


def _rows_below(model: type[models.Model], field: models.ForeignKey, start: QuerySet, depth: int) -> QuerySet:
    """The rows of ``start`` and every row under them through ``field`` (``model``'s relation to itself), at most
    ``depth`` levels, as one recursive query (SQLite's and PostgreSQL's ``WITH RECURSIVE``); a loop made by hand
    ends at ``depth``."""
    using = start.db
    quote = connections[using].ops.quote_name
    table, pk, column = quote(model._meta.db_table), quote(model._meta.pk.column), quote(field.column)
    start_sql, start_params = _pks(start).query.get_compiler(using).as_sql()
    # Only quoted names of the models' own tables and columns go into the text; every value is a parameter.
    recursion = f"SELECT under.{pk}, tree.level + 1 FROM {table} under JOIN tree ON under.{column} = tree.id"  # noqa: S608
    first = f"SELECT {pk}, 1 FROM {table} WHERE {pk} IN ({start_sql})"  # noqa: S608
    sql = f"WITH RECURSIVE tree (id, level) AS ({first} UNION {recursion} WHERE tree.level < %s) SELECT id FROM tree"  # noqa: S608
    return model._base_manager.using(using).filter(pk__in=RawSQL(sql, (*start_params, depth)))  # noqa: S611


def _taken_q(querysets: list[QuerySet]) -> Q:
    q = Q(pk__in=_pks(querysets[0]))
    for queryset in querysets[1:]:
        q |= Q(pk__in=_pks(queryset))
    return q


class BoundedDeleteConfirmation:
    """For a ModelAdmin whose delete can cascade widely: its confirmation page costs the same queries however many
    rows are selected or below them. Put it before ``admin.ModelAdmin`` in the bases."""

    delete_listed = 100

    def get_deleted_objects(self, objs: Any, request: Any) -> tuple[list[Any], dict[str, int], set[str], list[Any]]:
        model = self.model  # type: ignore[attr-defined]
        if isinstance(objs, QuerySet):
            selection = objs
            shown = list(objs[: self.delete_listed])
        else:  # a change page's delete: its one row
            shown = list(objs)[: self.delete_listed]
            selection = model._base_manager.filter(pk__in=[obj.pk for obj in shown])
        return self.deleted_objects_bounded(shown, selection, request)

    def deleted_objects_bounded(
        self,
        shown: list[models.Model],
        selection: QuerySet,
        request: Any,
        *,
        totals: dict[type[models.Model], int] | None = None,
    ) -> tuple[list[Any], dict[str, int], set[str], list[Any]]:
        """Django's four answers for ``shown`` (the first rows taken), with the totals, permissions and protected
        rows of everything the delete of ``selection`` takes. ``totals`` overrides a model's counted total (a
        delete that takes more than its cascade: the stored responses')."""
        admin_site = self.admin_site  # type: ignore[attr-defined]
        if not shown:
            return [], {}, set(), []
        model = type(shown[0])
        using = router.db_for_write(model)
        collector = _ListedObjects(using=using, origin=shown, listed=self.delete_listed)
        collector.collect(shown)
        # Django's own formatting and per-row permission check on what is listed; its protected rows are not used:
        # a relation read in part would take a RESTRICT row the delete also takes for protected.
        to_delete, _, perms_needed, _ = get_deleted_objects_from(collector, request, admin_site)

        reach = cascade_reach(model, selection)
        counted: dict[type[models.Model], int] = {}
        for taken_model, querysets in reach["taken"].items():
            if totals is not None and taken_model in totals:
                counted[taken_model] = totals[taken_model]
            else:
                counted[taken_model] = taken_model._base_manager.filter(_taken_q(querysets)).count()
        model_count: dict[str, int] = {}
        for taken_model, count in counted.items():
            if not count:
                continue
            opts = taken_model._meta
            model_count[str(opts.verbose_name_plural)] = count
            if admin_site.is_registered(taken_model):
                if not admin_site.get_model_admin(taken_model).has_delete_permission(request):
                    perms_needed.add(opts.verbose_name)
            more = count - len(collector.model_objs.get(taken_model, ()))
            if more > 0:
                to_delete.append(f"… and {more} more {opts.verbose_name if more == 1 else opts.verbose_name_plural}")

        protected: list[Any] = []
        for held_model, below in reach["held"]:
            if totals is not None and held_model in totals:
                continue  # the override's own delete takes those (a chain's continuations)
            if held_model in reach["taken"]:
                below = below.exclude(_taken_q(reach["taken"][held_model]))
            rows = list(below[: self.delete_listed])
            if rows:
                protected.extend(format_row(row, request, admin_site, perms_needed) for row in rows)
        return to_delete, model_count, perms_needed, protected


def get_deleted_objects_from(
    collector: NestedObjects, request: Any, admin_site: Any
) -> tuple[list[Any], dict[str, int], set[str], list[Any]]:
    """``django.contrib.admin.utils.get_deleted_objects``'s nested list on a collector already filled."""
    perms_needed: set[str] = set()
    return collector.nested(lambda obj: format_row(obj, request, admin_site, perms_needed)), {}, perms_needed, []


def format_row(obj: models.Model, request: Any, admin_site: Any, perms_needed: set[str]) -> Any:
    """A row as Django's confirmation page names it (``get_deleted_objects``' ``format_callback``): its model and
    link, and its model in ``perms_needed`` if the admin may not delete it."""
    opts = obj._meta
    no_edit_link = f"{capfirst(opts.verbose_name)}: {obj}"
    if not admin_site.is_registered(type(obj)):
        return no_edit_link
    if not admin_site.get_model_admin(type(obj)).has_delete_permission(request, obj):
        perms_needed.add(opts.verbose_name)
    try:
        url = reverse(f"{admin_site.name}:{opts.app_label}_{opts.model_name}_change", None, (quote(obj.pk),))
    except NoReverseMatch:
        return no_edit_link
    return format_html('{}: <a href="{}">{}</a>', capfirst(opts.verbose_name), url, obj)
