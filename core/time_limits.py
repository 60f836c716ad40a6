"""A Celery task's soft time limit, kept from the sweeps that catch ``Exception`` per item.

The soft limit (``CELERY_TASK_SOFT_TIME_LIMIT``, a minute before the hard one: ``docs/reliability.md``) raises
``SoftTimeLimitExceeded`` wherever the task happens to be, most often inside one item of a sweep. A sweep
catches ``Exception`` per item so that one bad item does not stop the others; caught there, the limit was
logged as that item's failure and the sweep went on, until the hard limit killed the worker child mid-write.
"""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded


def time_limit_reraise(exc: BaseException) -> None:
    """Raise ``exc`` again when it is the task's soft time limit, so that the task stops between items; any
    other failure is the item's own, for the caller's handler. Call it first in a per-item ``except``."""
    if isinstance(exc, SoftTimeLimitExceeded):
        raise exc
