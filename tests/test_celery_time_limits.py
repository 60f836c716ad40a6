"""Celery's Redis broker hands a message it has not seen acknowledged after ``visibility_timeout`` to another
worker. With ``acks_late`` a message is acknowledged when its task ends, so a task that may run longer than
that timeout runs twice. Each scheduled task must therefore be cut (its hard time limit) before the timeout.

The configured app is read in a subprocess with production's settings and a Redis broker, as a worker loads it.
"""

from __future__ import annotations

import json

from chat.management.commands.setupschedules import SCHEDULES
from tests.test_project import manage, production_env

READ_APP = """
import json
from llmhub.celery import app
app.loader.import_default_modules()
app.finalize(auto=True)
conf = app.conf
limits = {
    name: [task.soft_time_limit or conf.task_soft_time_limit, task.time_limit or conf.task_time_limit]
    for name, task in app.tasks.items()
}
print(json.dumps({"visibility_timeout": conf.broker_transport_options.get("visibility_timeout"), "limits": limits}))
"""


def test_every_scheduled_task_is_cut_before_the_broker_would_deliver_it_again():
    result = manage("shell", "-c", READ_APP, env=production_env(REDIS_URL="redis://127.0.0.1:6399/0"))
    assert result.returncode == 0, result.stderr
    app = json.loads(result.stdout.strip().splitlines()[-1])
    visibility = app["visibility_timeout"]
    assert visibility is not None, "the Redis broker's visibility_timeout is kombu's default of one hour"
    for _name, task, _when in SCHEDULES:
        soft, hard = app["limits"][task]
        assert hard is not None and hard < visibility, (task, hard, visibility)
        assert soft is not None and soft < hard, (task, soft, hard)
