# A cap is empty (no cap) or at least 1: a 0 would send the deployment nothing (0010 retired the zeros).

import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('providers', '0010_deployment_zero_caps_disabled'),
    ]

    operations = [
        migrations.AlterField(
            model_name='deployment',
            name='rpm_limit',
            field=models.PositiveIntegerField(blank=True, help_text='Requests per minute this deployment takes; at the cap it is skipped. Empty: no cap.', null=True, validators=[django.core.validators.MinValueValidator(1, message='0 would send this deployment nothing: leave it empty for no cap, or untick enabled to stop routing to it.')]),
        ),
        migrations.AlterField(
            model_name='deployment',
            name='tpm_limit',
            field=models.PositiveIntegerField(blank=True, help_text='Tokens per minute this deployment takes; at the cap it is skipped. Empty: no cap.', null=True, validators=[django.core.validators.MinValueValidator(1, message='0 would send this deployment nothing: leave it empty for no cap, or untick enabled to stop routing to it.')]),
        ),
        migrations.AddConstraint(
            model_name='deployment',
            constraint=models.CheckConstraint(condition=models.Q(('rpm_limit__isnull', True), ('rpm_limit__gte', 1), _connector='OR'), name='deployment_rpm_limit_empty_or_positive'),
        ),
        migrations.AddConstraint(
            model_name='deployment',
            constraint=models.CheckConstraint(condition=models.Q(('tpm_limit__isnull', True), ('tpm_limit__gte', 1), _connector='OR'), name='deployment_tpm_limit_empty_or_positive'),
        ),
    ]
