"""Indexes of the users' ``UPPER(username)`` and ``UPPER(email)``: the admin's searches name a user whole, in any
case (``accounts.selectors.users_named_q``), which Django compares as ``UPPER(column) = UPPER(term)``; the
columns' own indexes cannot answer that, and each search read every user. The user model is Django's
(``auth``), whose migrations are not ours: the indexes are added here, through the schema editor."""

from django.conf import settings
from django.db import migrations, models
from django.db.models.functions import Upper

INDEXES = (
    models.Index(Upper("username"), name="auth_user_username_upper"),
    models.Index(Upper("email"), name="auth_user_email_upper"),
)


def indexes_add(apps, schema_editor):
    user = apps.get_model(*settings.AUTH_USER_MODEL.split("."))
    for index in INDEXES:
        schema_editor.add_index(user, index)


def indexes_remove(apps, schema_editor):
    user = apps.get_model(*settings.AUTH_USER_MODEL.split("."))
    for index in INDEXES:
        schema_editor.remove_index(user, index)


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0002_role_groups"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [migrations.RunPython(indexes_add, indexes_remove)]
