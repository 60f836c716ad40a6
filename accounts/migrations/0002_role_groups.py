"""The four role groups and their default permissions (accounts.roles).

Permissions are normally created after the last migration (post_migrate); they are created here first,
for every app as it stands at this point, so that the groups get them on a fresh database too."""

from django.apps import apps as global_apps
from django.contrib.auth.management import create_permissions
from django.db import migrations


def role_groups_create(apps, schema_editor):
    from accounts.roles import roles_ensure

    for app_config in global_apps.get_app_configs():
        create_permissions(app_config, verbosity=0, apps=apps, using=schema_editor.connection.alias)
    roles_ensure(apps=apps, using=schema_editor.connection.alias)


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("providers", "0006_byok_credentials_moderation"),
        ("billing", "0009_key_rotation_billing_source_moderation"),
        ("audit", "0001_initial"),
        ("chat", "0001_initial"),
    ]

    operations = [migrations.RunPython(role_groups_create, migrations.RunPython.noop)]
