"""Run a command against a throw-away PostgreSQL server: ``python scripts/with_postgres.py -- CMD ...``.

Production runs PostgreSQL (``docker-compose.yml``), so the tests about money (budgets under
concurrency, row locks, Decimal sums, the ledger) run on it too, not only on SQLite. The server is
``llmhub.testing.postgres.throwaway_postgres``: a private cluster on a free loopback port, removed
afterwards. CMD gets its URL as ``TEST_DATABASE_URL`` (Django's test runner creates its test database
there).

Without a PostgreSQL server installed it says so and exits 0, unless ``CI`` is set (``.ci/run`` installs
``postgresql``), where that is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Importing the llmhub package sets DJANGO_SETTINGS_MODULE (its Celery app does): CMD gets the
# environment as it was before, or pytest would run on the development settings.
ENVIRONMENT = dict(os.environ)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmhub.testing.postgres import PostgresUnavailable, server_bin, throwaway_postgres  # noqa: E402


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    if server_bin() is None and not os.environ.get("CI"):
        print("with_postgres: PostgreSQL is not installed; the PostgreSQL part of the tests is skipped", flush=True)
        return 0
    try:
        with throwaway_postgres() as url:
            print(f"with_postgres: TEST_DATABASE_URL={url}", flush=True)
            return subprocess.run(argv, env={**ENVIRONMENT, "TEST_DATABASE_URL": url}, check=False).returncode
    except PostgresUnavailable as exc:
        print(f"with_postgres: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
