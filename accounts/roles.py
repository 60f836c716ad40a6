"""Roles: four Django groups (``admin``, ``operator``, ``member``, ``viewer``) and what each may do.

What a role may do in the admin is the group's model permissions (seeded by ``roles_ensure``, editable
in the admin like any group's); what it may do outside the admin (chat, manage its own keys, read
everyone's usage) is a capability of the role, below. A superuser is an ``admin``; a user in several role
groups has the most powerful of them. A user in no role group keeps what they could do before roles
existed: a ``member``, or an ``operator`` if they are staff (the staff usage page stays theirs).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from functools import partial
from typing import Any

from django.db import transaction

from core.cache import TTLCache, forget_now_and_after_commit


class Role(enum.StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    MEMBER = "member"
    VIEWER = "viewer"


# Most powerful first: the role of a user in several role groups is the first of these it holds.
ROLES_BY_POWER: tuple[Role, ...] = (Role.ADMIN, Role.OPERATOR, Role.MEMBER, Role.VIEWER)
# Roles whose users are staff (may open the admin, where their group's permissions decide what they see).
STAFF_ROLES = frozenset({Role.ADMIN, Role.OPERATOR})


class Capability(enum.StrEnum):
    CHAT = "chat"  # /v1/*, the WebSocket, conversations
    MANAGE_OWN_KEYS = "manage_own_keys"  # gateway keys and provider keys of one's own
    VIEW_OWN_USAGE = "view_own_usage"
    VIEW_ALL_USAGE = "view_all_usage"  # ?user= on /api/usage/, the staff usage page
    MANAGE_EXPERIMENTS = "manage_experiments"  # /api/experiments/, the results pages, promoting a winner


CAPABILITIES: dict[Role, frozenset[Capability]] = {
    Role.ADMIN: frozenset(Capability),
    Role.OPERATOR: frozenset(Capability),
    Role.MEMBER: frozenset({Capability.CHAT, Capability.MANAGE_OWN_KEYS, Capability.VIEW_OWN_USAGE}),
    Role.VIEWER: frozenset({Capability.VIEW_OWN_USAGE}),
}

ALL = "*"
# The model permissions each role group is given: (app label, model name or ALL, actions). The admin group
# gets every permission there is. An app that does not exist (yet) is skipped: ``experiments`` is listed so
# that its models reach the operators as soon as it lands.
ROLE_PERMISSIONS: dict[Role, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    Role.OPERATOR: (
        ("providers", "provider", ("view", "add", "change", "delete")),
        ("providers", "catalogmodel", ("view", "add", "change", "delete")),
        ("providers", "deployment", ("view", "add", "change", "delete")),
        ("providers", "moderationpolicy", ("view", "add", "change", "delete")),
        ("providers", "healthcheck", ("view",)),
        ("providers", "incident", ("view", "change")),
        ("experiments", ALL, ("view", "add", "change", "delete")),
        ("prompts", ALL, ("view", "add", "change", "delete")),
        ("billing", "usagerecord", ("view",)),
        ("billing", "dailyusage", ("view",)),
        ("billing", "dailystaffusage", ("view",)),
        ("billing", "dailyuserusage", ("view",)),
        ("billing", "budgetalert", ("view",)),
        ("billing", "plan", ("view",)),
        ("audit", "auditevent", ("view",)),
    ),
    Role.MEMBER: (),
    Role.VIEWER: (),
}


def role_parse(value: Any) -> Role | None:
    """A role named by ``value`` (any case), or None for anything else."""
    if isinstance(value, str):
        try:
            return Role(value.strip().lower())
        except ValueError:
            return None
    return None


def role_strongest(roles: Iterable[Role]) -> Role | None:
    held = set(roles)
    return next((role for role in ROLES_BY_POWER if role in held), None)


def role_from_groups(names: Iterable[str], *, is_superuser: bool, is_staff: bool) -> Role:
    if is_superuser:
        return Role.ADMIN
    return role_strongest(filter(None, map(role_parse, names))) or (Role.OPERATOR if is_staff else Role.MEMBER)


def role_of(user: Any) -> Role:
    """The role of ``user``; computed once per user object, so once per request."""
    if user is None or not getattr(user, "is_authenticated", False):
        return Role.VIEWER
    cached = getattr(user, "_llmhub_role", None)
    if cached is None:
        names = user.groups.filter(name__in=[r.value for r in Role]).values_list("name", flat=True)
        cached = role_from_groups(names, is_superuser=user.is_superuser, is_staff=user.is_staff)
        user._llmhub_role = cached
    return cached


def role_can(user: Any, capability: Capability) -> bool:
    return capability in CAPABILITIES[role_of(user)]


# The hot path (/v1, the WebSocket) knows a user only by id; its role is looked up once per TTL per process.
role_cache: TTLCache[Role] = TTLCache("roles")


def role_cache_forget(user_id: int | None = None) -> None:
    """Drop this process's cached role of ``user_id`` (None: of everyone) now and again after commit: a request
    that reads the role in between still sees the old one, and would keep it for the TTL."""
    forget_now_and_after_commit(partial(role_cache.invalidate, user_id))


async def _role_load(user_id: int) -> Role:
    from django.contrib.auth import get_user_model

    row = await get_user_model().objects.filter(pk=user_id).values("is_superuser", "is_staff").afirst()
    if row is None:
        return Role.VIEWER
    names = [name async for name in _groups_of(user_id)]
    return role_from_groups(names, is_superuser=row["is_superuser"], is_staff=row["is_staff"])


def _groups_of(user_id: int):
    from django.contrib.auth.models import Group

    return Group.objects.filter(user__pk=user_id, name__in=[r.value for r in Role]).values_list("name", flat=True)


async def role_for_user_id(user_id: int) -> Role:
    return await role_cache.get_or_load(user_id, lambda: _role_load(user_id))


async def request_role(request: Any, user: Any) -> Role:
    """The role of a page's user, for an async view: kept on the request for its template's navigation
    (``accounts.context_processors``), which may not query while it renders."""
    request.llmhub_role = await role_for_user_id(user.pk)
    return request.llmhub_role


@transaction.atomic
def role_set(user: Any, role: Role) -> bool:
    """Put ``user`` in ``role``'s group (and no other role group) and make them staff or not as the role
    says (a superuser stays staff). True if anything changed. A missing group is created with its default
    permissions.

    The audit log's ``role.change`` event comes from the group membership change itself (audit app)."""
    from django.contrib.auth.models import Group, Permission

    group, created = Group.objects.get_or_create(name=role.value)
    if created:  # a database emptied since migrate (a test's flush): the group comes back with its defaults
        _role_permissions_grant(group, role, Permission=Permission)
    others = list(user.groups.filter(name__in=[r.value for r in Role]).exclude(pk=group.pk))
    changed = False
    if others:
        user.groups.remove(*others)
        changed = True
    if not user.groups.filter(pk=group.pk).exists():
        user.groups.add(group)
        changed = True
    is_staff = role in STAFF_ROLES or user.is_superuser
    if user.is_staff != is_staff:
        user.is_staff = is_staff
        user.save(update_fields=["is_staff"])
        changed = True
    user.__dict__.pop("_llmhub_role", None)
    role_cache_forget(user.pk)
    return changed


def role_staff_sync(user: Any, *, staff_role_dropped: bool = False) -> None:
    """After a user's groups changed outside ``role_set`` (the admin's user form, a group's ``user_set``):
    staff if and only if their role is admin or operator, so that putting someone in a role group is all it
    takes. ``staff_role_dropped``: the change took them out of the admin or operator group; left in no role
    group they are then a member, not an operator by the fallback for staff from before roles (which would
    keep the role the admin just took away). Saved (only ``is_staff``), not updated in bulk, so that the
    audit log records the flip as ``auth.user.change``."""
    user.__dict__.pop("_llmhub_role", None)
    if staff_role_dropped:
        names = user.groups.filter(name__in=[r.value for r in Role]).values_list("name", flat=True)
        role = role_from_groups(names, is_superuser=user.is_superuser, is_staff=False)
    else:
        role = role_of(user)
    is_staff = role in STAFF_ROLES or user.is_superuser
    if user.is_staff != is_staff:
        user.is_staff = is_staff
        user.save(update_fields=["is_staff"])
    user.__dict__.pop("_llmhub_role", None)
    role_cache_forget(user.pk)


def roles_ensure(*, apps: Any = None, using: str = "default") -> None:
    """Create the role groups that are missing and give each its default permissions (adds, never takes
    away: a permission an administrator added to a group stays). Run by the data migration and after
    every ``migrate``, so the models of apps that arrive later reach their roles."""
    if apps is None:
        from django.apps import apps as global_apps

        apps = global_apps
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    with transaction.atomic(using=using):
        for role in ROLES_BY_POWER:
            group, _ = Group.objects.using(using).get_or_create(name=role.value)
            _role_permissions_grant(group, role, Permission=Permission, using=using)


def _role_permissions_grant(group: Any, role: Role, *, Permission: Any, using: str = "default") -> None:
    if role == Role.ADMIN:
        wanted = Permission.objects.using(using).all()
    else:
        wanted = Permission.objects.using(using).none()
        for app_label, model, actions in ROLE_PERMISSIONS[role]:
            codenames = Permission.objects.using(using).filter(content_type__app_label=app_label)
            if model != ALL:
                codenames = codenames.filter(content_type__model=model)
            wanted = wanted | codenames.filter(codename__regex=rf"^({'|'.join(actions)})_")
    missing = wanted.exclude(pk__in=group.permissions.values_list("pk", flat=True))
    if missing.exists():
        group.permissions.add(*missing)
