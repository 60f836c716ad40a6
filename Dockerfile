# llmhub's image: one for web (uvicorn), worker and beat; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    DJANGO_SETTINGS_MODULE=llmhub.settings.production \
    PROMETHEUS_MULTIPROC_DIR=/tmp/llmhub-metrics

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin llmhub
WORKDIR /app
RUN chown llmhub:llmhub /app

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall them.
COPY pyproject.toml ./
RUN pip install . && rm -rf build *.egg-info

COPY --chown=llmhub:llmhub . .
USER llmhub
# The ledger spool's volume (docker-compose.yml) takes this directory's owner when first mounted.
RUN mkdir -p /app/var/spool

# Production settings refuse to load without secrets and ALLOWED_HOSTS; collectstatic gets throwaway ones that
# exist only for this command and are never stored in the image.
RUN SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(50))')" \
    FIELD_ENCRYPTION_KEYS="$(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')" \
    ALLOWED_HOSTS=collectstatic.invalid \
    python manage.py collectstatic --noinput

EXPOSE 8000
# The access log (uvicorn's, to stderr) shows request paths without their query strings: llmhub/logging.py,
# installed by llmhub.asgi, so it holds for any uvicorn command line. tests/test_access_log.py runs this CMD.
# --timeout-graceful-shutdown comes after llmhub's own grace period (LLMHUB_SHUTDOWN_GRACE_SECONDS), once
# every reply has ended: see docker-compose.yml's stop_grace_period and docs/reliability.md.
CMD ["uvicorn", "llmhub.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--lifespan", "on", "--proxy-headers", "--timeout-graceful-shutdown", "10"]
