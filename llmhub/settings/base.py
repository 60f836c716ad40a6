"""Settings shared by every environment.

Defaults are chosen so that a fresh checkout runs with nothing configured: SQLite, the in-memory
channel layer, the local-memory cache and a Celery broker on the filesystem. Setting ``REDIS_URL``
moves the cache, the channel layer and the Celery broker to Redis; ``DATABASE_URL`` selects
PostgreSQL (or any database django-environ understands).
"""

from __future__ import annotations

import logging
from pathlib import Path

import environ

from core.metrics import metrics_directory_choose
from llmhub.logging import logging_settings
from llmhub.settings import env_file_read

BASE_DIR = Path(__file__).resolve().parent.parent.parent
LOCAL_DIR = BASE_DIR / ".local"

env = environ.Env()
env_file_read()

# Where llmhub writes what nothing else is configured to hold: the SQLite database (without DATABASE_URL) and the
# folders of kombu's filesystem broker (without REDIS_URL). Unset (a checkout): the project's own db.sqlite3 and
# .local/celery-broker/. The image sets /app/var/data, a volume its app user owns (README, "Running the image
# alone"): its /app is read-only to that user.
DATA_DIR = Path(env("LLMHUB_DATA_DIR")) if env("LLMHUB_DATA_DIR", default="") else None

logger = logging.getLogger("llmhub.settings")

# GENERAL
# https://docs.djangoproject.com/en/5.2/ref/settings/
DEBUG = env.bool("DJANGO_DEBUG", default=True)
SECRET_KEY = env("SECRET_KEY", default="django-insecure-development-only-key-do-not-use-in-production")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
TIME_ZONE = "UTC"
USE_TZ = True
LANGUAGE_CODE = "en-us"
USE_I18N = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = "llmhub.urls"
ASGI_APPLICATION = "llmhub.asgi.application"
WSGI_APPLICATION = None

# APPS
INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    # Swagger UI and ReDoc as static files of a pinned version: the docs render without a CDN.
    "drf_spectacular_sidecar",
    "channels",
    "django_celery_beat",
    "core",
    "audit",
    "accounts",
    "providers",
    "billing",
    "prompts",
    "experiments",
    "chat",
]

# Django's middleware classes run their hooks through sync_to_async under ASGI (two thread hops each),
# so the hot path (/v1/) is served without them: see LLMHUB_MIDDLEWARE_FREE_PREFIXES and llmhub/handlers.py.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Content-Security-Policy on every page (core/csp.py, LLMHUB_CSP below); async-native: no thread hop.
    "core.csp.ContentSecurityPolicyMiddleware",
    # A NUL byte in an admin address's query is a 400, not PostgreSQL's DataError (core/admin_query.py).
    "core.admin_query.AdminNulQueryMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Cache-Control: private, no-store on every answer to a signed-in user, whatever the view (docs/security.md).
    "accounts.middleware.SignedInNoStoreMiddleware",
    # Who acts from where, for the audit log (``audit.context``); after authentication.
    "audit.middleware.AuditContextMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# The Content-Security-Policy of the full stack's answers (core/csp.py, docs/security.md): scripts, styles,
# fonts and images from llmhub's own origin only, nothing inline. Images also as data: URLs (Swagger UI's and
# the admin's icons); a model's Markdown image is shown as a link by chat.js and could not load from another
# host anyway, so a reply cannot send the conversation to a third party in an image URL. connect-src also gets
# the page's own host under ws:/wss: for the chat's WebSocket (core.csp.csp_directives). Views that need more
# say so with core.csp.csp_extend (ReDoc at /api/redoc/).
LLMHUB_CSP = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "font-src": ["'self'"],
    "connect-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'self'"],
    "frame-ancestors": ["'none'"],
    "form-action": ["'self'"],
}

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "accounts.context_processors.capabilities",
            ],
        },
    },
]

STATIC_URL = "static/"
STATIC_ROOT = env("STATIC_ROOT", default=str(BASE_DIR / "var" / "static"))
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").exists() else []

# Messages live in the server-side session, never in a cookie: a newly created API key is shown once
# through a message, and a signed cookie is readable by anyone who holds it.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "login"

# DATABASES
# https://django-environ.readthedocs.io/en/latest/types.html#environ-env-db-url
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{(DATA_DIR or BASE_DIR) / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE transactions take the write lock up front, which is what makes the row-lock budget
    # path safe on SQLite (where SELECT ... FOR UPDATE is a no-op); WAL lets readers run alongside.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("CONN_MAX_AGE", default=0))
# A persistent connection is checked before its first use in each request, so that one the database
# dropped (a restart, a failover) is replaced instead of failing a request after the database is back.
DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", env.bool("CONN_HEALTH_CHECKS", default=True))

PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    "django.contrib.auth.hashers.ScryptPasswordHasher",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# REDIS (optional): one URL moves cache, channel layer and Celery broker to Redis.
REDIS_URL = env("REDIS_URL", default="")
# Every Redis client llmhub builds (billing/services/counters.py, the cache, the channel layer, the
# Celery broker) outlives a Redis restart with dead connections in its pool. A connection idle for this
# many seconds is pinged before use, TCP keepalive finds peers that vanished, and a command that fails
# on a dead connection is retried on a fresh one this many times (after 50 ms, 100 ms, ... at most
# 0.5 s): the commands sent through them are idempotent (docs/reliability.md).
# https://redis.readthedocs.io/en/stable/retry.html
REDIS_HEALTH_CHECK_INTERVAL = env.int("REDIS_HEALTH_CHECK_INTERVAL", default=5)
REDIS_RETRIES = env.int("REDIS_RETRIES", default=3)
# Connections each server process's asyncio Redis client keeps (per event loop): past that, a command waits up
# to REDIS_POOL_TIMEOUT seconds for one to come free instead of failing (redis-py's own pool raises "Too many
# connections" at once: a burst of admissions and settles beyond 100 at once failed requests with 503).
REDIS_MAX_CONNECTIONS = env.int("REDIS_MAX_CONNECTIONS", default=100)
REDIS_POOL_TIMEOUT = env.float("REDIS_POOL_TIMEOUT", default=5.0)


def redis_pool_options(retry_class: type) -> dict:
    """Connection-pool keyword arguments for redis-py; ``retry_class``: ``redis.retry.Retry`` for sync
    clients, ``redis.asyncio.retry.Retry`` for asyncio ones."""
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError, TimeoutError

    return {
        "health_check_interval": REDIS_HEALTH_CHECK_INTERVAL,
        "socket_keepalive": True,
        "socket_connect_timeout": 5,
        "retry": retry_class(ExponentialBackoff(cap=0.5, base=0.05), REDIS_RETRIES),
        "retry_on_error": [ConnectionError, TimeoutError],
    }


# CACHES
# https://docs.djangoproject.com/en/5.2/topics/cache/#redis
if REDIS_URL:
    from redis.retry import Retry as _SyncRetry

    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": redis_pool_options(_SyncRetry),
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "llmhub"}}

# CHANNELS
# https://channels.readthedocs.io/en/stable/topics/channel_layers.html
if REDIS_URL:
    from redis.asyncio.retry import Retry as _AsyncRetry

    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": REDIS_URL, **redis_pool_options(_AsyncRetry)}]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# CELERY
# https://docs.celeryq.dev/en/stable/userguide/configuration.html
CELERY_TIMEZONE = TIME_ZONE
CELERY_TASK_ACKS_LATE = True
# A run whose worker process died (out of memory, SIGKILL) is retried as Task.retry would: counted against the
# task's max_retries (Celery's default 3) and its default_retry_delay, then failed and acknowledged. Requeued at
# once instead (reject_on_worker_lost alone), a task that kills its worker every time was delivered for ever. A
# run lost once (a restart under it) still runs again. reject_on_worker_lost stays as what Celery falls back on
# when the retry cannot be sent. docs/reliability.md, "Celery: a task that kills its worker".
CELERY_TASK_RETRY_ON_WORKER_LOST = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# A run whose whole worker process died (SIGKILL of the main process, a lost host) is not seen ending: the Redis
# broker hands its message out again after visibility_timeout, for ever. Each start of a message is counted
# (llmhub/celery.py, StartCountingTask), and one started this many times without ending is not run again.
LLMHUB_TASK_MAX_STARTS = env.int("LLMHUB_TASK_MAX_STARTS", default=3)
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
# With acks_late a task's message is acknowledged when the task ends, and the Redis broker hands a message
# unacknowledged for visibility_timeout (kombu's default: one hour) to another worker: a task still running
# then runs twice. So every task is cut (its hard time limit) well before the broker's timeout: the long
# jobs below after 3 hours, any other after 30 minutes; the soft limit (SoftTimeLimitExceeded) comes a
# minute earlier. A longer timeout only delays the redelivery of a task whose whole worker died (a child's
# death is retried: retry_on_worker_lost, above). docs/reliability.md, "Celery: time limits".
CELERY_BROKER_VISIBILITY_TIMEOUT = env.int("CELERY_BROKER_VISIBILITY_TIMEOUT", default=4 * 3600)
CELERY_TASK_TIME_LIMIT = 30 * 60
CELERY_TASK_SOFT_TIME_LIMIT = CELERY_TASK_TIME_LIMIT - 60
LLMHUB_LONG_TASK_TIME_LIMIT = 3 * 3600
CELERY_TASK_ANNOTATIONS = {
    task: {"time_limit": LLMHUB_LONG_TASK_TIME_LIMIT, "soft_time_limit": LLMHUB_LONG_TASK_TIME_LIMIT - 60}
    for task in (
        "billing.tasks.ledger_retention",
        "billing.tasks.usage_rollup",
        "providers.tasks.providers_rotate_encryption_task",
        "providers.tasks_credentials.provider_credentials_revalidate_all",
        # an admin's "check again" of hundreds of keys: the daily run's pace and deadline
        "providers.tasks_credentials.provider_credentials_revalidate_selected",
    )
}
if REDIS_URL:
    CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL)
    # kombu reconnects by itself; these find a dead connection sooner. Without a socket timeout (kombu's
    # default is none) a publish to a broker that went silent without closing the connection (a failover, a
    # NAT or firewall dropping it, a paused server) waits forever: an alert raised in the ledger's writer
    # would hold it, and the alert sweep never ran. With it, the publish fails after its retries and the
    # sweep queues the alert later (core/outbox.py). Above kombu's 1 s BRPOP wait, so an idle worker's
    # poll is never cut short.
    # https://docs.celeryq.dev/en/stable/userguide/configuration.html#broker-transport-options
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "health_check_interval": REDIS_HEALTH_CHECK_INTERVAL,
        "socket_keepalive": True,
        "socket_connect_timeout": 5,  # as the app's own Redis clients (core/redis.py)
        "socket_timeout": env.float("CELERY_BROKER_SOCKET_TIMEOUT", default=5.0),
        "visibility_timeout": CELERY_BROKER_VISIBILITY_TIMEOUT,
    }
else:
    # kombu's filesystem transport needs no server: good enough for one machine in development.
    _broker_dir = (DATA_DIR or LOCAL_DIR) / "celery-broker"
    CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="filesystem://")
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "store_processed": False,
        # Broadcasts (remote control, worker events) live here; kombu's default is ./control in the cwd.
        "control_folder": str(_broker_dir / "control"),
    }
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True

# REST FRAMEWORK
# https://www.django-rest-framework.org/api-guide/settings/
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # First: it answers only for a JWT-shaped bearer while JWT sign-in is on, and passes the rest on.
        "accounts.authentication.JwtAuthentication",
        "billing.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "llmhub.schema.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "core.exception_handlers.drf_exception_handler",
}
# A user's own provider keys checked against the provider (added, replaced or checked again), per user: each is
# a live call to the provider, so without a bound the hub would test keys for anyone who signs up. DRF's rate
# syntax ("20/hour", "5/minute").
LLMHUB_PROVIDER_KEY_CHECKS_RATE = env("LLMHUB_PROVIDER_KEY_CHECKS_RATE", default="20/hour")

# DRF-SPECTACULAR
# https://drf-spectacular.readthedocs.io/en/latest/settings.html
SPECTACULAR_SETTINGS = {
    "TITLE": "llmhub API",
    "DESCRIPTION": (
        "OpenAI-compatible gateway and management API of llmhub.\n\n"
        "The same document in [Swagger UI](/api/docs/) and [ReDoc](/api/redoc/); raw: [/api/schema/](/api/schema/)."
    ),
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # The docs pages load their scripts from our static files (drf_spectacular_sidecar), never a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # 3.1 because the /v1/* schemas are copied from OpenAI's spec, which is written in 3.1.
    "OAS_VERSION": "3.1.0",
    # One enum per choice set that several fields share (otherwise named after each field, with a warning).
    "ENUM_NAME_OVERRIDES": {
        "FeedbackEnum": "chat.models.Feedback",
        "ExperimentMetricEnum": "experiments.models.Metric",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "llmhub.schema.document_error_responses",
        "llmhub.schema.add_openai_compatible_paths",
    ],
}

# LLMHUB
# Comma-separated Fernet keys: the first encrypts, all decrypt (rotation: put the new key first).
FIELD_ENCRYPTION_KEYS = env.list("FIELD_ENCRYPTION_KEYS", default=[])
if not FIELD_ENCRYPTION_KEYS:
    from cryptography.fernet import Fernet

    _key_file = LOCAL_DIR / "field-encryption.key"
    if not _key_file.exists():
        import os

        LOCAL_DIR.mkdir(parents=True, exist_ok=True)
        # Created with mode 600 from the start: never readable by others, not even for a moment.
        _fd = os.open(_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(_fd, "w") as _out:
            _out.write(Fernet.generate_key().decode() + "\n")
        logger.warning(
            "FIELD_ENCRYPTION_KEYS is not set: generated a development key in %s. "
            "Set FIELD_ENCRYPTION_KEYS in production and keep it safe.",
            _key_file,
        )
    FIELD_ENCRYPTION_KEYS = [_key_file.read_text().strip()]

# Kinds of provider and the adapter class that speaks each one's wire protocol.
LLMHUB_ADAPTERS = {
    # OpenAI itself: the output limit as max_completion_tokens, which its newest models alone take (openai.py).
    "openai": "providers.adapters.openai.OpenAIPlatformAdapter",
    "openrouter": "providers.adapters.openai.OpenRouterAdapter",
    "ollama": "providers.adapters.ollama.OllamaAdapter",  # answers one choice whatever n says (ollama.py)
    "vllm": "providers.adapters.openai.OpenAIAdapter",
    "openai_compatible": "providers.adapters.openai.OpenAIAdapter",
    # Mistral's API is OpenAI's chat and embeddings API, strict about its fields (mistral.py).
    "mistral": "providers.adapters.mistral.MistralAdapter",
    "azure_openai": "providers.adapters.azure.AzureOpenAIAdapter",
    "anthropic": "providers.adapters.anthropic.AnthropicAdapter",
    "gemini": "providers.adapters.gemini.GeminiAdapter",
    "cohere": "providers.adapters.cohere.CohereAdapter",
}
# Per event loop, at most this many SDK clients for users' own provider keys (bring your own key), the
# least recently used closed first; the providers' own clients are not counted (docs/byok.md).
LLMHUB_ADAPTER_POOL_SIZE = env.int("LLMHUB_ADAPTER_POOL_SIZE", default=256)
# Seconds a user's own provider key may take to be checked live (its model list) when it is saved or
# re-checked; past it the key is not stored (docs/byok.md).
LLMHUB_BYOK_VALIDATION_TIMEOUT_SECONDS = env.float("LLMHUB_BYOK_VALIDATION_TIMEOUT_SECONDS", default=10.0)
# The daily re-check of users' own keys: how many keys are checked at once, and how long a run may start new
# checks; the keys it did not reach are checked first by the next run (docs/byok.md, "Daily re-validation").
LLMHUB_BYOK_REVALIDATION_CONCURRENCY = env.int("LLMHUB_BYOK_REVALIDATION_CONCURRENCY", default=8)
LLMHUB_BYOK_REVALIDATION_MAX_SECONDS = env.float("LLMHUB_BYOK_REVALIDATION_MAX_SECONDS", default=3600.0)
# Seconds an in-process cache of a per-request lookup (API key, model, provider) may be stale in
# another process; the process that made the change invalidates its own copy at once.
LLMHUB_LOOKUP_CACHE_TTL = env.float("LLMHUB_LOOKUP_CACHE_TTL", default=5.0)
# While the database is down, such a lookup is answered from this process's last copy if that copy is
# at most this many seconds past its TTL (stale-if-error), so callers seen lately keep being served
# (docs/reliability.md, "Database outages"); 0 turns this off.
LLMHUB_LOOKUP_STALE_IF_ERROR = env.float("LLMHUB_LOOKUP_STALE_IF_ERROR", default=300.0)
# Rotation (docs/rotation.md): how long a gateway key's replaced secret keeps working by default (0: not at
# all), and how many rows the encryption-key rotation re-encrypts per transaction.
LLMHUB_KEY_ROTATION_GRACE_SECONDS = env.int("LLMHUB_KEY_ROTATION_GRACE_SECONDS", default=86400)
LLMHUB_ENCRYPTION_ROTATION_BATCH_SIZE = env.int("LLMHUB_ENCRYPTION_ROTATION_BATCH_SIZE", default=500)
# The Retry-After (seconds) of the 503 a request gets when the database does not answer.
LLMHUB_DATABASE_RETRY_AFTER = env.int("LLMHUB_DATABASE_RETRY_AFTER", default=2)
# Ledger rows the database refused (or a shutdown cut short) wait here to be replayed: one file shared
# by every process that writes or replays it (in docker-compose.yml, a volume they all mount).
LLMHUB_LEDGER_SPOOL = env.path("LLMHUB_LEDGER_SPOOL", default=str(BASE_DIR / "var" / "ledger-spool.jsonl"))
# While rows wait in the spool, each server process asks the database every this many seconds whether
# it answers again (backing off to 4 times as long), and replays the spool as soon as it does.
LLMHUB_LEDGER_SPOOL_PROBE_SECONDS = env.float("LLMHUB_LEDGER_SPOOL_PROBE_SECONDS", default=0.5)
# A batch of ledger rows waits this many milliseconds (after its first row's reservation is settled) for
# more rows to share its transaction, unless it fills up (500 rows) or a flush or shutdown waits for it: at
# low load a row per transaction cost about 0.85 ms of CPU on SQLite, in batches of ten 0.2 ms a row
# (docs/performance.md). 0: every wake-up writes at once.
LLMHUB_LEDGER_LINGER_MS = env.float("LLMHUB_LEDGER_LINGER_MS", default=20.0)
# The most ledger rows a server process's writer holds waiting for the database. When a
# database writes slower than requests come for longer than a moment, the newest rows beyond half this go
# to the spool (settled and written by its replay, docs/ledger.md) instead of growing the process's memory;
# /readyz then reports the spool growing. A queued row takes about 2 KB (20 MB at the default).
LLMHUB_LEDGER_QUEUE_MAX = env.int("LLMHUB_LEDGER_QUEUE_MAX", default=10_000)
# Raw ledger rows older than this many days are deleted once their day is rolled up (billing.tasks.
# ledger_retention, daily; docs/ledger.md): the usage dashboards read those days from DailyUsage. Never
# the current UTC month's rows (monthly budgets sum them) nor those of keys with a lifetime budget.
# Unset or 0: every row is kept.
LLMHUB_LEDGER_RETENTION_DAYS = env.int("LLMHUB_LEDGER_RETENTION_DAYS", default=0)
# Seconds a stopping server (SIGTERM/SIGINT under uvicorn) gives requests in flight to finish before it
# ends the streams still running with an in-band `server_shutting_down` error (llmhub/lifespan.py). Keep
# grace + 5 s + uvicorn's --timeout-graceful-shutdown + a few seconds of ledger drain below the time the
# orchestrator waits before SIGKILL (docker-compose.yml's stop_grace_period).
LLMHUB_SHUTDOWN_GRACE_SECONDS = env.float("LLMHUB_SHUTDOWN_GRACE_SECONDS", default=20.0)
# Freeze what the server process holds after start-up and its first requests, so that the garbage
# collector's full collections stop walking it (core/gc_tuning.py; a 170-230 ms stall otherwise).
LLMHUB_GC_FREEZE = env.bool("LLMHUB_GC_FREEZE", default=True)
# One deadline per request, across every attempt, retry, backoff and fallback (a stream: until its first
# chunk). Each attempt is also bounded by its provider's own timeout.
LLMHUB_REQUEST_DEADLINE_SECONDS = env.float("LLMHUB_REQUEST_DEADLINE_SECONDS", default=300.0)
# A stream that has begun and then sends nothing for this long is ended with an in-band error (a model's
# own `stream_idle_timeout_seconds` overrides it).
LLMHUB_STREAM_IDLE_TIMEOUT_SECONDS = env.float("LLMHUB_STREAM_IDLE_TIMEOUT_SECONDS", default=60.0)
# Backoff between two attempts: full jitter, uniform in [0, min(cap, base * 2**n)] seconds; a provider's
# Retry-After is honoured before the same deployment is tried again.
LLMHUB_RETRY_BACKOFF_BASE_SECONDS = env.float("LLMHUB_RETRY_BACKOFF_BASE_SECONDS", default=0.05)
LLMHUB_RETRY_BACKOFF_CAP_SECONDS = env.float("LLMHUB_RETRY_BACKOFF_CAP_SECONDS", default=2.0)
# A Retry-After longer than this is not waited for: the client gets the provider's answer (and its
# Retry-After) at once rather than a request held open.
LLMHUB_RETRY_AFTER_MAX_SECONDS = env.float("LLMHUB_RETRY_AFTER_MAX_SECONDS", default=5.0)
# The largest request body /v1 takes, in MB (MiB): a base64 image or PDF makes a request large (Anthropic takes
# requests up to 32 MB, OpenAI images up to 20 MB). A larger one is a 413 `request_too_large`, answered without
# reading the rest. Every other path (the admin, the pages, /api/) keeps Django's DATA_UPLOAD_MAX_MEMORY_SIZE.
LLMHUB_MAX_REQUEST_BYTES = int(env.float("LLMHUB_MAX_REQUEST_MB", default=32) * 2**20)
# The most characters of text a /v1 request may carry (every string but its attachments' base64 and data URLs), checked
# before moderation reads it: 4,000,000 is about a million tokens of English, the largest context windows offered. A
# body of 30 MB of text is a long input check (seconds of CPU) for nothing a model takes. More is a 400
# `context_length_exceeded`, as OpenAI answers an input too long.
LLMHUB_MAX_REQUEST_TEXT_CHARS = env.int("LLMHUB_MAX_REQUEST_TEXT_CHARS", default=4_000_000)
# Paths served by Django without its middleware stack (see llmhub/handlers.py): the hot path, and the probes
# (llmhub/probes.py), which need no session and must answer whatever Host the orchestrator sends.
LLMHUB_MIDDLEWARE_FREE_PREFIXES = ["/v1/", "/healthz", "/readyz", "/metrics"]
# Prometheus metrics (docs/metrics.md): recorded unless LLMHUB_METRICS_ENABLED is false (then nothing is, and
# /metrics is 404). /metrics answers a scrape with `Authorization: Bearer <LLMHUB_METRICS_TOKEN>` or from an
# address in LLMHUB_METRICS_ALLOWED_IPS (addresses or networks, e.g. "10.0.0.0/8,127.0.0.1"); with neither
# set, every scrape is refused. Worker processes write their metrics to files in PROMETHEUS_MULTIPROC_DIR
# (docker-compose.yml: a tmpfs), one directory per server run under var/metrics/ when it is not set; set here,
# before anything imports prometheus-client, which reads it once (core/metrics.py).
LLMHUB_METRICS_ENABLED = env.bool("LLMHUB_METRICS_ENABLED", default=True)
LLMHUB_METRICS_TOKEN = env("LLMHUB_METRICS_TOKEN", default="")
LLMHUB_METRICS_ALLOWED_IPS = env.list("LLMHUB_METRICS_ALLOWED_IPS", default=[])
LLMHUB_METRICS_DIR = metrics_directory_choose(BASE_DIR / "var" / "metrics") if LLMHUB_METRICS_ENABLED else ""
# Traces (docs/observability.md, core/tracing.py; on when an OTEL_* variable names an exporter): the provider
# kinds whose requests carry the attempt's W3C trace context (`traceparent`, and the caller's `tracestate` and
# baggage), so that the provider's own spans join the trace. The self-hosted kinds by default, which an
# operator can instrument; "*" for every provider, "" for none.
LLMHUB_TRACE_UPSTREAM_KINDS = env.list("LLMHUB_TRACE_UPSTREAM_KINDS", default=["ollama", "vllm", "openai_compatible"])
# Outbound provider URLs: private and loopback hosts are refused unless allowed here (the demo and
# self-hosted servers such as Ollama or vLLM on the same machine need it).
LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = env.bool("LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS", default=True)
# Networks a provider (or the alert webhook) may be on even where private addresses are refused, e.g.
# "10.8.0.0/16" for a vLLM cluster; link-local and metadata addresses stay refused (docs/outbound.md).
LLMHUB_OUTBOUND_ALLOWED_NETWORKS = env.list("LLMHUB_OUTBOUND_ALLOWED_NETWORKS", default=[])
# The plan a user without one is put on at their first request; empty: such users are unrestricted.
LLMHUB_DEFAULT_PLAN = env("LLMHUB_DEFAULT_PLAN", default="Free")
# A request without max_tokens under a budget or token quota is sent upstream with max_tokens = the
# least of this, the model's output limit and what the budget still pays for (that much is reserved).
LLMHUB_BUDGET_MAX_TOKENS_CAP = env.int("LLMHUB_BUDGET_MAX_TOKENS_CAP", default=4096)
# Every alert (budget alerts, incidents, operations alerts) also goes to this Slack-compatible webhook
# ({"text": ...}) when set.
LLMHUB_ALERT_WEBHOOK_URL = env("LLMHUB_ALERT_WEBHOOK_URL", default="")
# Seconds one call of an alert webhook may take in all (connect, send, read; each step also has 10 s): a
# receiver trickling its answer is cut there, and the attempt fails and is retried (docs/alerts.md).
LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS = env.float("LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS", default=15.0)
# Seconds one alert email may take in all (the SMTP session: connect, greeting, commands, message; each step also
# has EMAIL_TIMEOUT): a mail server trickling its answers is cut there, and the attempt fails and is retried. A
# delivery's claim lasts at least twice the longer of the two deadlines (core.outbox.claim_lease).
LLMHUB_ALERT_EMAIL_DEADLINE_SECONDS = env.float("LLMHUB_ALERT_EMAIL_DEADLINE_SECONDS", default=60.0)
# The alert sweep (docs/alerts.md, "Delivery"; billing.tasks.alerts_undelivered_send, every minute) queues
# again the deliveries of alerts at least GRACE seconds old (the normal path has had its chance) and less
# than MAX_AGE hours old (an older backlog, after a long outage, is left in the admin rather than sent).
LLMHUB_ALERT_SWEEP_GRACE_SECONDS = env.int("LLMHUB_ALERT_SWEEP_GRACE_SECONDS", default=120)
LLMHUB_ALERT_SWEEP_MAX_AGE_HOURS = env.int("LLMHUB_ALERT_SWEEP_MAX_AGE_HOURS", default=24)
# Requests in flight (docs/reliability.md, "Reservations and in-flight requests"): a process holding any
# beats every INTERVAL seconds; one silent for TTL seconds is dead, and the sweep (every SWEEP_INTERVAL
# seconds in each server process, 0: only from the reconcile task) writes its requests as `lost` and
# releases their holds. After Redis lost its data, budget counters are rebuilt 3 × INTERVAL later.
LLMHUB_INFLIGHT_HEARTBEAT_INTERVAL = env.float("LLMHUB_INFLIGHT_HEARTBEAT_INTERVAL", default=2.0)
LLMHUB_INFLIGHT_HEARTBEAT_TTL = env.float("LLMHUB_INFLIGHT_HEARTBEAT_TTL", default=20.0)
LLMHUB_INFLIGHT_SWEEP_INTERVAL = env.float("LLMHUB_INFLIGHT_SWEEP_INTERVAL", default=20.0)
# Chat replies (docs/reliability.md, "A server killed mid-reply"): the process streaming a reply stamps it
# every INTERVAL seconds; one silent for 4 × INTERVAL is dead, and no longer holds its conversation.
LLMHUB_CHAT_HEARTBEAT_INTERVAL = env.float("LLMHUB_CHAT_HEARTBEAT_INTERVAL", default=10.0)
# Responses stored by POST /v1/responses (`store`, OpenAI's default: true) are kept this many days, as OpenAI
# keeps them (docs/responses.md, "Stored responses"): past it one is a 404 at once, and chat.tasks.
# stored_responses_expire_task (hourly) deletes it once no live response continues it.
LLMHUB_RESPONSES_RETENTION_DAYS = env.int("LLMHUB_RESPONSES_RETENTION_DAYS", default=30)
# Circuit breakers per deployment (docs/routing.md, "Circuit breakers"): a breaker opens after FAILURES
# consecutive failures, or when more than ERROR_RATE % of at least MIN_VOLUME calls in the last WINDOW
# seconds failed; it stays open COOLDOWN seconds, doubled after each failed half-open probe up to
# MAX_COOLDOWN. A claimed probe that reports nothing for PROBE_LEASE seconds lets another one through.
LLMHUB_BREAKER_FAILURES = env.int("LLMHUB_BREAKER_FAILURES", default=5)
LLMHUB_BREAKER_ERROR_RATE = env.float("LLMHUB_BREAKER_ERROR_RATE", default=50.0)
LLMHUB_BREAKER_WINDOW_SECONDS = env.float("LLMHUB_BREAKER_WINDOW_SECONDS", default=60.0)
LLMHUB_BREAKER_MIN_VOLUME = env.int("LLMHUB_BREAKER_MIN_VOLUME", default=20)
LLMHUB_BREAKER_COOLDOWN_SECONDS = env.float("LLMHUB_BREAKER_COOLDOWN_SECONDS", default=30.0)
LLMHUB_BREAKER_MAX_COOLDOWN_SECONDS = env.float("LLMHUB_BREAKER_MAX_COOLDOWN_SECONDS", default=600.0)
LLMHUB_BREAKER_PROBE_LEASE_SECONDS = env.float("LLMHUB_BREAKER_PROBE_LEASE_SECONDS", default=60.0)
# With REDIS_URL, each process re-reads every open breaker this often, in case it missed a change message.
LLMHUB_BREAKER_RESYNC_SECONDS = env.float("LLMHUB_BREAKER_RESYNC_SECONDS", default=2.0)
# Health checks (docs/routing.md, "Health checks and incidents"): this many failing probes in a row open a
# deployment's incident (its breaker opens at the first); a deployment keeps at most CHECKS_KEPT probe rows,
# none older than RETENTION_DAYS. Incident alerts go to ADMINS (addresses; without any, to the superusers)
# and to LLMHUB_ALERT_WEBHOOK_URL.
LLMHUB_HEALTH_INCIDENT_AFTER_FAILURES = env.int("LLMHUB_HEALTH_INCIDENT_AFTER_FAILURES", default=2)
# Failing probes of one deployment less than this apart are one round (two beats, a beat and a manual check in the
# same tick): the failures in a row above are counted in distinct rounds.
LLMHUB_HEALTH_ROUND_SECONDS = env.int("LLMHUB_HEALTH_ROUND_SECONDS", default=60)
LLMHUB_HEALTH_CHECKS_KEPT = env.int("LLMHUB_HEALTH_CHECKS_KEPT", default=1000)
LLMHUB_HEALTH_CHECK_RETENTION_DAYS = env.int("LLMHUB_HEALTH_CHECK_RETENTION_DAYS", default=30)
ADMINS = [("", address) for address in env.list("ADMINS", default=[])]
# Development prints alert mails in the worker's output (`make run` has no mail server: Django's SMTP
# default made every alert mail fail and retry); production.py sends through SMTP unless told otherwise.
# Django's SMTP backend is replaced by core.mail.DeadlineSmtpBackend, the same with each send bounded in all.
SMTP_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
BOUNDED_SMTP_EMAIL_BACKEND = "core.mail.DeadlineSmtpBackend"
EMAIL_BACKEND = env("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
if EMAIL_BACKEND == SMTP_EMAIL_BACKEND:
    EMAIL_BACKEND = BOUNDED_SMTP_EMAIL_BACKEND
# Seconds one email may take in all (the SMTP session: connect, greeting, commands, message, QUIT; each step also
# has EMAIL_TIMEOUT): a mail server trickling its answers is cut there, and the send fails (a user's notice is
# retried; a password reset is logged as failed). Alerts have their own, LLMHUB_ALERT_EMAIL_DEADLINE_SECONDS.
LLMHUB_EMAIL_DEADLINE_SECONDS = env.float("LLMHUB_EMAIL_DEADLINE_SECONDS", default=60.0)
# The SMTP server mails go through (production's backend; alerts, password resets) and the sender's address:
# Django's settings of the same names, from the environment. https://docs.djangoproject.com/en/5.2/ref/settings/#email-host
EMAIL_HOST = env("EMAIL_HOST", default="localhost")
EMAIL_PORT = env.int("EMAIL_PORT", default=25)
EMAIL_HOST_USER = env("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD = env("EMAIL_HOST_PASSWORD", default="")
EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", default=False)
EMAIL_USE_SSL = env.bool("EMAIL_USE_SSL", default=False)
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=30)
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="webmaster@localhost")
SERVER_EMAIL = env("SERVER_EMAIL", default=DEFAULT_FROM_EMAIL)

# JWT SIGN-IN (docs/auth.md): `Authorization: Bearer <JWT>` on /v1/*, /api/* and the WebSocket. Off unless a
# JWKS URL (RS256/ES256) or a shared secret (HS256) is set; issuer and audience are then required.
LLMHUB_JWT_JWKS_URL = env("LLMHUB_JWT_JWKS_URL", default="")
LLMHUB_JWT_HS256_SECRET = env("LLMHUB_JWT_HS256_SECRET", default="")
LLMHUB_JWT_ISSUER = env("LLMHUB_JWT_ISSUER", default="")
LLMHUB_JWT_AUDIENCE = env("LLMHUB_JWT_AUDIENCE", default="")
# The algorithms accepted (never taken from the token); empty: RS256 and ES256 with a JWKS URL, HS256 with
# a secret.
LLMHUB_JWT_ALGORITHMS = env.list("LLMHUB_JWT_ALGORITHMS", default=[])
# Clock skew allowed on exp, nbf and iat.
LLMHUB_JWT_LEEWAY_SECONDS = env.int("LLMHUB_JWT_LEEWAY_SECONDS", default=30)
# The claim naming the user's role (a dotted path reaches into objects: realm_access.roles), one value or a
# list; a token without a known role gets the default role.
LLMHUB_JWT_ROLE_CLAIM = env("LLMHUB_JWT_ROLE_CLAIM", default="role")
LLMHUB_JWT_DEFAULT_ROLE = env("LLMHUB_JWT_DEFAULT_ROLE", default="member")
# The JWKS is kept this long; a token with an unknown kid refetches it, at most once per REFRESH_MIN.
LLMHUB_JWT_JWKS_CACHE_SECONDS = env.float("LLMHUB_JWT_JWKS_CACHE_SECONDS", default=600.0)
LLMHUB_JWT_JWKS_REFRESH_MIN_SECONDS = env.float("LLMHUB_JWT_JWKS_REFRESH_MIN_SECONDS", default=30.0)
LLMHUB_JWT_JWKS_TIMEOUT_SECONDS = env.float("LLMHUB_JWT_JWKS_TIMEOUT_SECONDS", default=3.0)
# A verified token is trusted this long (never past its exp) before its signature is checked again.
LLMHUB_JWT_CACHE_SECONDS = env.float("LLMHUB_JWT_CACHE_SECONDS", default=60.0)
# Password guessing on the sign-in forms (accounts.signin_throttle, docs/auth.md): failures a (name, address) and an
# address may have in 15 minutes before the form checks no more passwords from there until the window ends.
LLMHUB_SIGNIN_FAILURES_PER_NAME = env.int("LLMHUB_SIGNIN_FAILURES_PER_NAME", default=10)
LLMHUB_SIGNIN_FAILURES_PER_ADDRESS = env.int("LLMHUB_SIGNIN_FAILURES_PER_ADDRESS", default=100)
# Mailbox flooding through the password reset form (accounts.reset_throttle, docs/auth.md): reset emails one email
# may be sent, and asks one address may make, in an hour; past either, the form sends nothing (and says the same).
LLMHUB_PASSWORD_RESETS_PER_EMAIL = env.int("LLMHUB_PASSWORD_RESETS_PER_EMAIL", default=3)
LLMHUB_PASSWORD_RESETS_PER_ADDRESS = env.int("LLMHUB_PASSWORD_RESETS_PER_ADDRESS", default=20)

# LOGGING
# https://docs.djangoproject.com/en/5.2/topics/logging/ — JSON lines with LLMHUB_LOG_FORMAT=json (production's
# default), every line with its request id (llmhub/logging.py, docs/observability.md).
LOGGING = logging_settings(log_format=env("LLMHUB_LOG_FORMAT", default="text"), level=env("LOG_LEVEL", default="INFO"))
