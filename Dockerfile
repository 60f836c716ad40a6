# llmhub's image: one for web (uvicorn), worker and beat; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    DJANGO_SETTINGS_MODULE=llmhub.settings.production \
    PROMETHEUS_MULTIPROC_DIR=/tmp/llmhub-metrics \
    LLMHUB_LEDGER_SPOOL=/app/var/spool/ledger-spool.jsonl \
    LLMHUB_DATA_DIR=/app/var/data

# The app runs as llmhub, which can read the code, the installed packages and the collected static files but
# not change them: all are root's, built as root. It writes only in the directories of its own made below (the
# ledger spool; LLMHUB_DATA_DIR) and in /tmp (PROMETHEUS_MULTIPROC_DIR; web's is a tmpfs). tests/test_project.py
# holds this.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin llmhub
WORKDIR /app

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall them.
COPY pyproject.toml ./
RUN pip install . && rm -rf build *.egg-info

COPY . .
# Readable by llmhub whatever modes the build context had (a checkout made under umask 077 has 600 files),
# writable by root alone.
RUN chmod -R a+rX,go-w /app

# Production settings refuse to load without secrets and ALLOWED_HOSTS; collectstatic gets throwaway ones that
# exist only for this command and are never stored in the image.
RUN SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(50))')" \
    FIELD_ENCRYPTION_KEYS="$(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')" \
    ALLOWED_HOSTS=collectstatic.invalid \
    python manage.py collectstatic --noinput

# The ledger spool (LLMHUB_LEDGER_SPOOL) and the data directory (LLMHUB_DATA_DIR: the SQLite database and the
# filesystem broker's folders of an image run alone, without DATABASE_URL and REDIS_URL), the app's only
# directories here. A volume mounted on either takes its owner when first mounted: docker-compose.yml's on the
# spool; on the data directory the one VOLUME declares (anonymous unless `docker run -v NAME:/app/var/data`), so
# that a database written there outlives the container's file system.
RUN mkdir -p /app/var/spool /app/var/data && chown llmhub:llmhub /app/var/spool /app/var/data
VOLUME ["/app/var/data"]

USER llmhub
EXPOSE 8000
# The access log (uvicorn's, to stderr) shows request paths without their query strings: llmhub/logging.py,
# installed by llmhub.asgi, so it holds for any uvicorn command line. tests/test_access_log.py runs this CMD.
# --timeout-graceful-shutdown comes after llmhub's own grace period (LLMHUB_SHUTDOWN_GRACE_SECONDS), once
# every reply has ended: see docker-compose.yml's stop_grace_period and docs/reliability.md.
# --ws-ping-interval/--ws-ping-timeout: a chat client whose network vanished is found within 20 s (uvicorn's own 20 +
# 20 s let a reply shorter than 40 s stream whole to it): docs/reliability.md, "A chat client whose network vanished".
# --ws-max-size: 1.25 MiB, above the largest chat frame a client may send (about 1.2 MB), far below uvicorn's 16 MiB
# default: docs/deployment.md, "How large a request may be".
CMD ["uvicorn", "llmhub.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--lifespan", "on", "--proxy-headers", "--timeout-graceful-shutdown", "10", "--ws-ping-interval", "10", "--ws-ping-timeout", "10", "--ws-max-size", "1310720"]
