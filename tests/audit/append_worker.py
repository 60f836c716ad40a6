"""One of two processes appending audit events at the same time (test_chain).

Run as ``python -m tests.audit.append_worker '{"tag": …, "count": n, "start_at": monotonic}'`` with
DJANGO_SETTINGS_MODULE and TEST_DATABASE_URL set. Each event is its own transaction, as in a server.
"""

from __future__ import annotations

import json
import os
import sys
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings.test")
django.setup()

from audit.services import audit_record  # noqa: E402


def main(job: dict) -> None:
    # Both start together, on the monotonic clock (the same in every process of the machine).
    time.sleep(max(0.0, job["start_at"] - time.monotonic()))
    for index in range(job["count"]):
        audit_record("test.append", target_type="worker", target_id=f"{job['tag']}-{index}", actor=None)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
