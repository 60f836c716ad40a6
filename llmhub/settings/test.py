"""Settings for the test-suite: fast hashing, in-memory everything unless a test asks for Redis."""

from __future__ import annotations

import os

from cryptography.fernet import Fernet

# A fixed test key so that nothing is written to .local/ by the test-suite.
os.environ.setdefault("FIELD_ENCRYPTION_KEYS", Fernet.generate_key().decode())

# pytest-xdist: the controller loaded these settings before starting its workers, and its metrics directory
# (named for its pid) is in their environment; each worker takes one of its own, so that a scrape in one test
# sums only the gauges of its own process and the servers it starts, not the other workers' requests in flight.
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("LLMHUB_TEST_METRICS_OWNER") != os.environ.get(
    "PYTEST_XDIST_WORKER"
):
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    os.environ["LLMHUB_TEST_METRICS_OWNER"] = os.environ["PYTEST_XDIST_WORKER"]

from .base import *  # noqa: F403
from .base import BASE_DIR, env

DEBUG = False
SECRET_KEY = "test-secret-key-not-used-anywhere-else-0123456789abcdefghijklmnop"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
CELERY_TASK_ALWAYS_EAGER = True
CELERY_BROKER_URL = "memory://"
(BASE_DIR / "var").mkdir(exist_ok=True)
DATABASES = {"default": env.db("TEST_DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'var' / 'test.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # No fsync (synchronous=OFF): a test database need not survive a power cut, and at the default (FULL)
    # every commit waited for the disk, 18 ms a commit on a loaded CI machine, most of a transactional test's
    # setup (each row a factory saves commits on its own, and its audit event with it). The journal stays
    # the rollback journal it was, so the locking the tests see is unchanged (production's is WAL: base.py).
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA synchronous=OFF;",
    }
    # A file, not :memory:, so that live-server subprocesses see the same database; one per test run, so
    # that runs side by side (or pytest-xdist workers, which add their own suffix) never share one.
    DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / "var" / f"test-db-{os.getpid()}.sqlite3")}
# As in base.py: a persistent connection (a TEST_DATABASE_URL with ?conn_max_age=60, as production keeps
# them) is checked before its first use in a request.
DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
# 5 s whatever base.py's default, unless the environment says otherwise: the servers a test starts in processes of
# their own load these settings too, and one that wants them to forget sooner gives them a shorter TTL in their
# environment (tests/gateway/test_database_outage.py).
LLMHUB_LOOKUP_CACHE_TTL = env.float("LLMHUB_LOOKUP_CACHE_TTL", default=5.0)
# The freeze is a server process's (core/gc_tuning.py): a live server run in the test process (LiveServer), or
# the ASGI application driven there past its 100th request, froze whatever the tests held at that moment, and a
# cycle let go of afterwards was never collected. Servers a test starts in processes of their own may be asked for
# it (LLMHUB_GC_FREEZE=true); tests/test_gc_tuning.py turns it on where it tests it.
LLMHUB_GC_FREEZE = env.bool("LLMHUB_GC_FREEZE", default=False)
# Tests add and check many keys as users whose ids the next test reuses, in a cache that outlives a test: the
# bound is tested on its own (tests/providers/test_credentials.py) with a rate of its own.
LLMHUB_PROVIDER_KEY_CHECKS_RATE = "100000/hour"
# A spool of this run's own: a live server the tests start replays the spool at start-up, and must not
# write rows that an earlier run (or `make run`) left there into this run's database. A test that stops a
# server and starts another on the same spool (a restart) names it in the environment.
LLMHUB_LEDGER_SPOOL = env.path(
    "LLMHUB_LEDGER_SPOOL", default=str(BASE_DIR / "var" / f"test-ledger-spool-{os.getpid()}.jsonl")
)
# Users are unrestricted unless a test puts them on a plan (the seeded plans do not survive a flush).
LLMHUB_DEFAULT_PLAN = ""
LOGGING["root"]["level"] = "WARNING"  # noqa: F405
# Short in-flight heartbeats (a Redis the tests empty waits 3 beats before rebuilding a counter); the
# test process itself does not sweep for dead processes (tests that need it run the sweep or a server).
# The TTL is 30 beats: at 1 s (10 beats), a live test process on a loaded machine (four xdist workers on two
# cores, its beat's SQLite write waiting for the lock) went unheard for a second, and a reconcile settled its
# held request as lost (tests/billing/test_key_scopes.py, in CI).
LLMHUB_INFLIGHT_HEARTBEAT_INTERVAL = env.float("LLMHUB_INFLIGHT_HEARTBEAT_INTERVAL", default=0.1)
LLMHUB_INFLIGHT_HEARTBEAT_TTL = env.float("LLMHUB_INFLIGHT_HEARTBEAT_TTL", default=3.0)
LLMHUB_INFLIGHT_SWEEP_INTERVAL = env.float("LLMHUB_INFLIGHT_SWEEP_INTERVAL", default=0)
