from __future__ import annotations

from django.apps import AppConfig, apps
from django.contrib.auth.signals import user_logged_out
from django.db.models.signals import m2m_changed, post_delete, post_migrate, post_save


def _roles_after_migrate(sender, using="default", plan=None, **kwargs) -> None:
    # post_migrate is sent once per app with models; every app's permissions exist once the last one's is.
    # A flush sends it too (without a plan): the groups then come back one by one as role_set needs them,
    # instead of every test that empties the database paying for all four.
    if (
        plan is not None
        and sender is [config for config in apps.get_app_configs() if config.models_module is not None][-1]
    ):
        from .roles import roles_ensure

        roles_ensure(using=using)


def _role_forget(sender, instance, **kwargs) -> None:
    """A user's groups or superuser flag changed (the admin, role_set): this process's copy of their role
    goes at once and again after commit (other processes' within LLMHUB_LOOKUP_CACHE_TTL), and a user put in
    or out of a role group, from the user's side (the admin's user form) or the group's (``group.user_set``),
    becomes staff or not as ``role_set`` would have made them."""
    pk = getattr(instance, "pk", None)
    if pk is None:
        return
    if kwargs.get("reverse"):
        _role_group_members_changed(instance, **kwargs)
        return
    from .roles import role_cache_forget

    role_cache_forget(pk)
    instance.__dict__.pop("_llmhub_role", None)
    if hasattr(instance, "get_username") and "action" in kwargs:
        _role_groups_changed(instance, **kwargs)


def _role_groups_changed(user, *, action: str, pk_set, **kwargs) -> None:
    from django.contrib.auth.models import Group

    from .roles import STAFF_ROLES, role_staff_sync

    staff_groups = Group.objects.filter(name__in=[r.value for r in STAFF_ROLES])
    if action == "pre_clear":  # which groups go is known only before they have gone
        user.__dict__["_llmhub_staff_groups_cleared"] = user.groups.filter(pk__in=staff_groups).exists()
    elif action == "post_clear":
        role_staff_sync(user, staff_role_dropped=user.__dict__.pop("_llmhub_staff_groups_cleared", False))
    elif action == "post_remove":
        role_staff_sync(user, staff_role_dropped=staff_groups.filter(pk__in=pk_set or ()).exists())
    elif action == "post_add":
        role_staff_sync(user)


def _role_group_members_changed(group, *, action: str, pk_set, model, **kwargs) -> None:
    """``group.user_set.add/remove/clear``: each user it touched, as if changed from their side."""
    from .roles import STAFF_ROLES, role_cache_forget, role_parse, role_staff_sync

    role_cache_forget()  # any of the group's members
    role = role_parse(getattr(group, "name", None))
    if role is None or role.value != group.name:
        return  # not a role group: no one's role changed
    if action == "pre_clear":
        group.__dict__["_llmhub_members_cleared"] = list(model._default_manager.filter(groups=group))
        return
    if action == "post_clear":
        users = group.__dict__.pop("_llmhub_members_cleared", [])
    elif action in ("post_add", "post_remove"):
        users = list(model._default_manager.filter(pk__in=pk_set or ()))
    else:
        return
    dropped = action != "post_add" and role in STAFF_ROLES
    for user in users:
        role_staff_sync(user, staff_role_dropped=dropped)


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts: sign-in and roles"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model

        user_model = get_user_model()
        post_migrate.connect(_roles_after_migrate, dispatch_uid="accounts.roles_ensure")
        m2m_changed.connect(_role_forget, sender=user_model.groups.through, dispatch_uid="accounts.role_forget_m2m")
        post_save.connect(_role_forget, sender=user_model, dispatch_uid="accounts.role_forget_save")
        # An open chat socket's session is asked again at its next send (accounts.sessions).
        from .sessions import session_signed_out, sessions_forget

        post_save.connect(sessions_forget, sender=user_model, dispatch_uid="accounts.sessions_forget_save")
        post_delete.connect(sessions_forget, sender=user_model, dispatch_uid="accounts.sessions_forget_delete")
        user_logged_out.connect(session_signed_out, dispatch_uid="accounts.session_signed_out")
