# A context window or an output limit of 0 tokens is refused (at least 1); a weight of 0 is said to be a standby.

import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('providers', '0032_tasks22b_host_move_notices'),
    ]

    operations = [
        migrations.AlterField(
            model_name='catalogmodel',
            name='context_window',
            field=models.PositiveIntegerField(default=128000, help_text="The most tokens a request's prompt and reply may hold together.", validators=[django.core.validators.MinValueValidator(1, message="A context window of 0 tokens holds no prompt: give the model's context length in tokens.")]),
        ),
        migrations.AlterField(
            model_name='catalogmodel',
            name='max_output_tokens',
            field=models.PositiveIntegerField(blank=True, help_text='The most tokens the model writes in one reply. Empty: not known.', null=True, validators=[django.core.validators.MinValueValidator(1, message='0 would be a model that writes nothing: leave it empty when the most it writes is not known.')]),
        ),
        migrations.AlterField(
            model_name='deployment',
            name='weight',
            field=models.PositiveIntegerField(default=1, help_text='Share of traffic under the weighted strategy; 0: a standby, tried after every deployment with a weight.'),
        ),
    ]
