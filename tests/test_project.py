"""The project's wiring as an operator meets it: Django's checks per environment, the refusal to start
without secrets, the development key, the compose file, and `make run`'s supervisor.

Everything that starts Django runs it in a subprocess with a clean environment, as a shell would,
so that the test settings this process runs under do not hide a problem.
"""

from __future__ import annotations

import fnmatch
import http.cookiejar
import importlib.util
import io
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socketserver
import stat
import string
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from email.message import Message
from pathlib import Path, PurePosixPath

import openai
import pytest
import yaml
from cryptography.fernet import Fernet

from llmhub.testing.ports import free_port
from tests.conftest import process_stop
from tests.trickling import TricklingMailServer
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def clean_env(**variables: str) -> dict[str, str]:
    """What a developer's shell would pass, without anything this test process or its user has set."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    env.update(variables)
    return env


def manage(*args: str, cwd: Path = ROOT, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "manage.py", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def production_env(**overrides: str) -> dict[str, str]:
    alphabet = string.ascii_letters + string.digits + "!@#%^&*(-_=+)"
    env = clean_env(
        DJANGO_SETTINGS_MODULE="llmhub.settings.production",
        SECRET_KEY="".join(secrets.choice(alphabet) for _ in range(60)),
        FIELD_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        ALLOWED_HOSTS="llmhub.example.com",
    )
    env.update(overrides)
    return {name: value for name, value in env.items() if value is not None}


def copy_project(destination: Path) -> Path:
    """The source tree without developer state, so that a test may create .local/ and a database in it."""
    top_level = {".venv", ".git", ".local", "var", "test-artifacts", "node_modules", "db.sqlite3"}

    def ignore(directory: str, names: list[str]) -> set[str]:
        ignored = {name for name in names if name in {"__pycache__", ".pytest_cache", ".ruff_cache"}}
        if Path(directory) == ROOT:
            ignored |= {name for name in names if name in top_level or name.startswith("db.sqlite3")}
        return ignored

    shutil.copytree(ROOT, destination, ignore=ignore)
    return destination


# Django checks ------------------------------------------------------------------------------------


def test_check_is_clean_in_development():
    result = manage(
        "check",
        "--fail-level",
        "WARNING",
        env=clean_env(
            DJANGO_SETTINGS_MODULE="llmhub.settings.base", FIELD_ENCRYPTION_KEYS=Fernet.generate_key().decode()
        ),
    )
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_deploy_check_is_clean_with_production_settings():
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=production_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_models_and_migrations_agree():
    env = clean_env(DJANGO_SETTINGS_MODULE="llmhub.settings.test")
    result = manage("makemigrations", "--check", "--dry-run", env=env)
    assert result.returncode == 0, f"a model change has no migration:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"SECRET_KEY": None}, "SECRET_KEY"),
        ({"SECRET_KEY": "short-and-weak"}, "SECRET_KEY"),
        ({"FIELD_ENCRYPTION_KEYS": None}, "FIELD_ENCRYPTION_KEYS"),
        ({"FIELD_ENCRYPTION_KEYS": "not-a-fernet-key"}, "FIELD_ENCRYPTION_KEYS"),
        # Without a host to answer to, every page and /v1 request would be answered 400 Bad Request.
        ({"ALLOWED_HOSTS": None}, "ALLOWED_HOSTS"),
        ({"ALLOWED_HOSTS": " , "}, "ALLOWED_HOSTS"),
    ],
    ids=[
        "secret-key-missing",
        "secret-key-weak",
        "encryption-keys-missing",
        "encryption-key-malformed",
        "allowed-hosts-missing",
        "allowed-hosts-empty",
    ],
)
def test_production_refuses_to_start_without_its_secrets(overrides, variable):
    env = production_env(**overrides)
    result = manage("check", env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line naming the problem, got:\n{result.stderr}"
    assert variable in lines[0]
    # The refusal names the variable, never its (wrong) value.
    for value in overrides.values():
        if value and value.strip(" ,"):
            assert value not in result.stderr


def test_production_answers_every_host_allowed_hosts_names(tmp_path):
    """ALLOWED_HOSTS is a comma-separated list: a space after a comma is no part of the next name, which would
    otherwise never match a Host header (every request to that name answered 400 Bad Request)."""
    env = production_env(
        ALLOWED_HOSTS="llmhub.example.com, api.example.com ,",
        SECURE_SSL_REDIRECT="false",
        STATIC_ROOT=str(tmp_path / "static"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
    )
    assert manage("collectstatic", "--noinput", env=env).returncode == 0
    ask = (
        "from django.test import Client; client = Client(raise_request_exception=False); "
        "print([client.get('/no-such-page/', HTTP_HOST=host).status_code "
        "for host in ('llmhub.example.com', 'api.example.com', 'elsewhere.example.com')])"
    )
    result = manage("shell", "-c", ask, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[404, 404, 400]", result.stdout


def test_only_production_requires_allowed_hosts():
    """Development (`make run`) and the test settings answer their own defaults when ALLOWED_HOSTS is unset;
    production with it set to a host starts (test_deploy_check_is_clean_with_production_settings)."""
    show = ["shell", "-c", "from django.conf import settings; print(settings.ALLOWED_HOSTS)"]
    key = Fernet.generate_key().decode()
    development = manage(*show, env=clean_env(DJANGO_SETTINGS_MODULE="llmhub.settings.base", FIELD_ENCRYPTION_KEYS=key))
    assert development.returncode == 0, development.stderr
    assert "127.0.0.1" in development.stdout and "localhost" in development.stdout
    testing = manage(*show, env=clean_env(DJANGO_SETTINGS_MODULE="llmhub.settings.test"))
    assert testing.returncode == 0, testing.stderr
    assert "testserver" in testing.stdout


def test_production_reads_its_secrets_from_the_env_file_too(tmp_path):
    """README: settings come from the environment or a `.env` file next to manage.py; production's refusal to start
    without its secrets looks at both (the environment wins)."""
    project = copy_project(tmp_path / "project")
    secrets_in_file = production_env()
    names = ("SECRET_KEY", "FIELD_ENCRYPTION_KEYS", "ALLOWED_HOSTS")
    (project / ".env").write_text("".join(f"{name}={secrets_in_file[name]}\n" for name in names))
    env = clean_env(DJANGO_SETTINGS_MODULE="llmhub.settings.production")
    result = manage("check", "--deploy", "--fail-level", "WARNING", cwd=project, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (project / ".local").exists(), "production must never make a development key"

    env["SECRET_KEY"] = "short-and-weak"
    refused = manage("check", cwd=project, env=env)
    assert refused.returncode != 0 and "SECRET_KEY is too weak" in refused.stderr


class SmtpSink(socketserver.ThreadingTCPServer):
    """Just enough of an SMTP server to take mail: each message's envelope sender and its text."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", 0), _SmtpSession)


class _SmtpSession(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        def say(line: str) -> None:
            self.wfile.write(line.encode() + b"\r\n")

        say("220 sink")
        sender, data, lines = "", False, []
        while line := self.rfile.readline():
            if data:
                if line == b".\r\n":
                    self.server.messages.append((sender, b"".join(lines).decode()))
                    data, lines = False, []
                    say("250 queued")
                else:
                    lines.append(line)
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                say("250 sink")
            elif verb == b"MAIL":
                sender = line.decode().split(":", 1)[1].strip().strip("<>")
                say("250 ok")
            elif verb == b"DATA":
                data = True
                say("354 go ahead")
            elif verb == b"QUIT":
                say("221 bye")
                return
            else:
                say("250 ok")


def test_production_sends_mail_through_the_smtp_server_the_environment_names(tmp_path):
    """Alerts and password resets go out by SMTP in production: the server, its login and the sender's address
    come from the EMAIL_* variables (docs/alerts.md), not Django's localhost:25 and webmaster@localhost."""
    sink = SmtpSink()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        env = production_env(
            DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=str(sink.server_address[1]),
            EMAIL_HOST_USER="",
            EMAIL_TIMEOUT="10",
            DEFAULT_FROM_EMAIL="llmhub@example.com",
        )
        result = manage("sendtestemail", "ops@example.com", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        ((sender, text),) = sink.messages
        assert sender == "llmhub@example.com"
        assert "To: ops@example.com" in text
    finally:
        sink.shutdown()
        sink.server_close()


@pytest.mark.parametrize("backend", [None, "django.core.mail.backends.smtp.EmailBackend"])
def test_production_cuts_a_mail_server_that_trickles_its_answers_at_the_email_deadline(tmp_path, backend):
    """Every email, not only alerts, is bounded in all by LLMHUB_EMAIL_DEADLINE_SECONDS: production's default
    backend and Django's SMTP backend named in EMAIL_BACKEND alike (the settings put core.mail.DeadlineSmtpBackend
    in its place). Before, a mail server answering a byte now and then, each within EMAIL_TIMEOUT, got the email."""
    server = TricklingMailServer()
    try:
        env = production_env(
            DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
            EMAIL_BACKEND=backend,
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=str(server.port),
            EMAIL_HOST_USER="",
            EMAIL_TIMEOUT="10",
            LLMHUB_EMAIL_DEADLINE_SECONDS="0.3",
        )
        result = manage("sendtestemail", "ops@example.com", env=env)
        assert result.returncode != 0
        assert "MailDeadlineExceeded: the mail server did not finish within 0.3 s (LLMHUB_EMAIL_DEADLINE_SECONDS)" in (
            result.stderr
        )
        assert server.accepted == 0
    finally:
        server.close()


def test_development_generates_a_private_encryption_key_once(tmp_path):
    project = copy_project(tmp_path / "project")
    env = clean_env(DJANGO_SETTINGS_MODULE="llmhub.settings.base")
    key_file = project / ".local" / "field-encryption.key"

    first = manage("check", cwd=project, env=env)
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    Fernet(key.encode())  # a usable key, not just a file

    second = manage("check", cwd=project, env=env)
    assert second.returncode == 0, second.stderr
    assert key_file.read_text().strip() == key, "a second start must reuse the key, or stored secrets are lost"


# Environment variables ----------------------------------------------------------------------------

# env("NAME"), env.bool("NAME", ...) and the like in the settings; production.py reads its secrets with os.environ.
SETTINGS_READS = re.compile(r'(?:\benv(?:\.\w+)?|os\.environ\.get)\(\s*"([A-Z][A-Z0-9_]*)"')
APP_SOURCES = ("llmhub", "core", "audit", "accounts", "providers", "billing", "prompts", "experiments", "chat")


def documentation() -> str:
    return "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def named(variable: str, text: str) -> bool:
    return re.search(rf"(?<![A-Z0-9_]){variable}(?![A-Z0-9_])", text) is not None


def test_every_environment_variable_the_settings_read_is_documented():
    read = set()
    for module in ("base.py", "production.py"):
        read |= set(SETTINGS_READS.findall((ROOT / "llmhub" / "settings" / module).read_text()))
    assert {"SECRET_KEY", "FIELD_ENCRYPTION_KEYS", "ALLOWED_HOSTS", "SECURE_HSTS_SECONDS"} <= read  # the pattern works
    text = documentation()
    undocumented = sorted(variable for variable in read if not named(variable, text))
    assert not undocumented, f"read by the settings, named nowhere in README.md or docs/: {undocumented}"


def test_every_variable_the_configuration_table_and_compose_name_is_read():
    section = ROOT.joinpath("README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    documented = {name for cell in first_cells for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell)}
    environment = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["x-llmhub-environment"]
    sources = [path for source in (*APP_SOURCES, "scripts") for path in (ROOT / source).rglob("*.py")]
    code = "\n".join(path.read_text() for path in sources if "migrations" not in path.parts)
    unread = sorted(name for name in documented | set(environment) if not named(name, code))
    assert not unread, f"documented or set by docker-compose.yml, read by nothing: {unread}"


# docker-compose -----------------------------------------------------------------------------------

APP_SERVICES = ("migrate", "web", "worker", "beat")
REQUIRED_SECRETS = ("SECRET_KEY", "FIELD_ENCRYPTION_KEYS")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_every_part_of_llmhub(compose):
    services = compose["services"]
    assert set(services) >= {*APP_SERVICES, "redis", "postgres"}
    assert services["web"]["command"][:2] == ["uvicorn", "llmhub.asgi:application"]
    assert "--lifespan" in services["web"]["command"]  # the ledger drains at shutdown
    assert services["worker"]["command"][:4] == ["celery", "-A", "llmhub", "worker"]
    beat = " ".join(services["beat"]["command"])
    assert "beat" in beat and "django_celery_beat.schedulers:DatabaseScheduler" in beat
    assert "migrate" in " ".join(services["migrate"]["command"])
    assert services["redis"]["image"].startswith("redis:7")
    assert services["postgres"]["image"].startswith("postgres:16")


def test_compose_configures_every_app_service_alike(compose):
    for name in APP_SERVICES:
        environment = compose["services"][name]["environment"]
        assert environment["DJANGO_SETTINGS_MODULE"] == "llmhub.settings.production", name
        assert environment["DATABASE_URL"].startswith("postgres://"), name
        assert environment["REDIS_URL"] == "redis://redis:6379/0", name
        for secret in (*REQUIRED_SECRETS, "ALLOWED_HOSTS"):
            # ${VAR:?message}: compose refuses to start rather than run with an empty secret, or with no host
            # to answer to (every request 400).
            assert environment[secret].startswith("${" + secret + ":?"), (name, secret)


def test_compose_starts_services_only_once_their_dependencies_are_ready(compose):
    services = compose["services"]
    for name in ("postgres", "redis", "web"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("web", "worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_lets_the_operator_name_the_proxy_uvicorn_trusts(compose):
    """Behind the TLS proxy, uvicorn takes a client's address from X-Forwarded-For only when the proxy's address is
    in FORWARDED_ALLOW_IPS (127.0.0.1 unless set): compose passes the operator's value to web, the README says to
    set it, and web keeps the environment every app service shares."""
    web = compose["services"]["web"]
    assert "--proxy-headers" in web["command"]
    assert web["environment"]["FORWARDED_ALLOW_IPS"] == "${FORWARDED_ALLOW_IPS:-127.0.0.1}"
    shared = compose["x-llmhub-environment"]
    assert {name: web["environment"][name] for name in shared} == shared
    deploying = (ROOT / "README.md").read_text().split("## Deploying with Docker Compose", 1)[1].split("\n## ", 1)[0]
    assert "FORWARDED_ALLOW_IPS" in deploying


def test_compose_hands_every_other_setting_to_every_app_service_from_a_private_file(compose):
    """Compose passes a container only the variables it names: the rest of the configuration table reaches web,
    worker, beat and migrate alike from .env.llmhub, optional, which neither git nor the image takes in."""
    for name in APP_SERVICES:
        assert compose["services"][name]["env_file"] == [{"path": ".env.llmhub", "required": False}], name
    ignored_by_docker = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert any(fnmatch.fnmatch(".env.llmhub", pattern) for pattern in ignored_by_docker if pattern)
    for secrets_file in (".env.llmhub", ".env"):
        check = subprocess.run(["git", "check-ignore", "-q", secrets_file], cwd=ROOT, check=False)
        assert check.returncode == 0, f"git would take in the operator's secrets in {secrets_file}"
    deploying = (ROOT / "README.md").read_text().split("## Deploying with Docker Compose", 1)[1].split("\n## ", 1)[0]
    assert ".env.llmhub" in deploying


# The image -----------------------------------------------------------------------------------------

APP_USER = "llmhub"
IMAGE_ROOT = PurePosixPath("/app")


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments): continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        line = line.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, arguments = (current + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def image_environment() -> dict[str, str]:
    """What the Dockerfile's ENV instructions set."""
    environment = {}
    for keyword, arguments in dockerfile():
        if keyword == "ENV":
            environment.update(pair.split("=", 1) for pair in shlex.split(arguments))
    return environment


def image_writable_directories() -> set[PurePosixPath]:
    """The directories the Dockerfile hands to the app's user (``chown``), the only ones besides /tmp it may write."""
    writable = set()
    for keyword, arguments in dockerfile():
        if keyword == "RUN":
            for command in re.findall(r"\bchown\s[^&;|]+", arguments):
                owner, *paths = [word for word in shlex.split(command)[1:] if not word.startswith("-")]
                assert owner == f"{APP_USER}:{APP_USER}", command
                writable |= {PurePosixPath(path) for path in paths}
    return writable


def image_volumes() -> set[PurePosixPath]:
    """The directories the Dockerfile declares volumes (``VOLUME``, in either of its forms)."""
    volumes = set()
    for keyword, arguments in dockerfile():
        if keyword == "VOLUME":
            paths = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
            volumes |= {PurePosixPath(path) for path in paths}
    return volumes


def test_the_image_runs_as_a_user_who_cannot_change_its_code():
    """A compromised app process must not rewrite llmhub's code or its packages: the image builds everything as
    root (COPY without --chown, pip install, collectstatic) and only then switches to the app's user, who gets
    nothing but the directories it writes, each named (never /app or a parent of it)."""
    instructions = dockerfile()
    users = [index for index, (keyword, _) in enumerate(instructions) if keyword == "USER"]
    assert users, "the image runs as root"
    assert instructions[users[-1]][1] == APP_USER
    after = [keyword for keyword, _ in instructions[users[-1] :] if keyword in {"COPY", "ADD", "RUN"}]
    assert after == [], f"built as the app's user, so owned by it: {after}"
    for keyword, arguments in instructions:
        if keyword in {"COPY", "ADD"}:
            assert "--chown" not in arguments and "--chmod" not in arguments, arguments
        if keyword == "RUN":
            # A chmod may make files readable (a build context's modes are the checkout's), never writable.
            for command in re.findall(r"\bchmod\s[^&;|]+", arguments):
                mode = next(word for word in shlex.split(command)[1:] if not word.startswith("-"))
                assert not re.search(r"\d", mode) and "w" not in re.sub(r"[ugoa]*-[rwxX]+", "", mode), command
    writable = image_writable_directories()
    assert writable, "the app's user has nowhere to write its ledger spool"
    for directory in writable:
        assert directory.is_relative_to(IMAGE_ROOT / "var") and directory != IMAGE_ROOT / "var", directory
        assert directory.name != "static", "collectstatic's output is code: root's"


@pytest.mark.parametrize("with_compose", [False, True], ids=["image", "compose"])
def test_every_path_the_app_writes_at_runtime_is_writable_in_the_image(compose, with_compose):
    """The settings as the image (and compose's environment on top of it) gives them: the ledger spool and the
    metrics directory are where the app's user may write; the compose volume mounts the spool's directory."""
    environment = {**clean_env(), **image_environment(), "PYTHONPATH": str(ROOT)}
    given = production_env()
    if with_compose:

        def value(text: str) -> str:
            # ${NAME:?message} and ${NAME:-default}, as compose fills them in (the operator's values from `given`).
            def fill(match: re.Match) -> str:
                name, form, default = match.groups()
                return given.get(name, default if form == "-" else "set-by-the-operator")

            return re.sub(r"\$\{(\w+):([?-])([^}]*)\}", fill, text)

        environment.update({name: value(str(text)) for name, text in compose["x-llmhub-environment"].items()})
    else:
        environment.update({name: given[name] for name in ("SECRET_KEY", "FIELD_ENCRYPTION_KEYS", "ALLOWED_HOSTS")})
    show = (
        "import json, os, django; django.setup(); from django.conf import settings; db = settings.DATABASES['default'];"
        " broker = settings.CELERY_BROKER_TRANSPORT_OPTIONS; print(json.dumps({"
        "'spool': str(settings.LLMHUB_LEDGER_SPOOL), 'metrics': os.environ['PROMETHEUS_MULTIPROC_DIR'],"
        " 'static': str(settings.STATIC_ROOT), 'engine': db['ENGINE'], 'database': str(db['NAME']),"
        " 'broker': settings.CELERY_BROKER_URL, **{f'broker:{name}': str(path) for name, path in broker.items()"
        " if name.endswith(('_in', '_out', '_folder'))}}))"
    )
    result = subprocess.run(
        [PYTHON, "-c", show], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    engine, broker = shown.pop("engine"), shown.pop("broker")
    if with_compose:  # PostgreSQL and Redis: nothing of theirs is written in the container
        assert engine == "django.db.backends.postgresql" and broker.startswith("redis://"), (engine, broker)
        shown = {name: path for name, path in shown.items() if name in ("spool", "metrics", "static")}
    else:  # run alone: SQLite and kombu's filesystem broker, whose files must land where the app may write
        assert engine == "django.db.backends.sqlite3" and broker == "filesystem://", (engine, broker)
        assert {"broker:data_folder_in", "broker:processed_folder", "broker:control_folder"} <= set(shown), shown
    paths = {name: PurePosixPath(path) for name, path in shown.items()}
    # The project's files are at /app in the image.
    paths = {
        name: IMAGE_ROOT / path.relative_to(ROOT) if path.is_relative_to(ROOT) else path for name, path in paths.items()
    }
    writable = image_writable_directories()
    assert paths["spool"].parent in writable, paths["spool"]
    assert paths["metrics"].is_relative_to("/tmp"), paths["metrics"]  # a tmpfs in web, /tmp elsewhere
    assert not any(paths["static"].is_relative_to(directory) for directory in writable), paths["static"]
    if with_compose:
        for name in APP_SERVICES:
            assert f"ledger-spool:{paths['spool'].parent}" in compose["services"][name]["volumes"], name
    else:
        # The database and the broker's folders, in a directory the app's user owns and the image declares a
        # volume (so they outlive the container's file system); before, /app itself, which it cannot write.
        data = image_volumes()
        for name in ("database", "broker:data_folder_in", "broker:processed_folder", "broker:control_folder"):
            assert any(paths[name].is_relative_to(directory) for directory in writable & data), (name, paths[name])


def test_docker_build_context_leaves_developer_secrets_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".local", ".env", ".venv", ".git", "db.sqlite3"} <= ignored


def _docker_compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _docker_compose_works(), reason="the docker compose plugin is not installed")
def test_docker_compose_accepts_the_file_and_refuses_missing_secrets():
    env = clean_env(
        SECRET_KEY=secrets.token_urlsafe(50),
        FIELD_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        POSTGRES_PASSWORD=secrets.token_urlsafe(16),
        ALLOWED_HOSTS="llmhub.example.com",
    )
    command = ["docker", "compose", "-f", "docker-compose.yml", "config", "--quiet"]
    ok = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    for variable in ("SECRET_KEY", "ALLOWED_HOSTS"):
        without = {name: value for name, value in env.items() if name != variable}
        refused = subprocess.run(command, cwd=ROOT, env=without, capture_output=True, text=True, check=False)
        assert refused.returncode != 0
        assert variable in refused.stderr


# make run's supervisor ----------------------------------------------------------------------------


def load_run_dev():
    if "run_dev" in sys.modules:
        return sys.modules["run_dev"]
    spec = importlib.util.spec_from_file_location("run_dev", ROOT / "scripts" / "run_dev.py")
    module = importlib.util.module_from_spec(spec)
    # Registered first: dataclasses look their module up while the class is being built.
    sys.modules["run_dev"] = module
    spec.loader.exec_module(module)
    return module


def alive(pid: int) -> bool:
    """True while the process runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Until none of ``pids`` runs; those still running (none)."""

    def left() -> list[int]:
        return [pid for pid in pids if alive(pid)]

    wait_until(lambda: not left(), lambda: f"every process gone ({left()} still run)", timeout=timeout, interval=0.1)
    return left()


# A leader that ignores SIGTERM and has a child of its own: only a group kill ends both.
STUBBORN = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print('grandchild', child.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def supervised(run_dev, extra: list | None = None):
    services = [
        run_dev.Service("sleeper", [PYTHON, "-c", "import time; time.sleep(120)"]),
        run_dev.Service("stubborn", [PYTHON, "-c", STUBBORN]),
        *(extra or []),
    ]
    out = io.StringIO()
    return run_dev.Supervisor(services, cwd=ROOT, stop_timeout=1.0, out=out), services, out


def started_pids(services, out: io.StringIO) -> list[int]:
    grandchildren = [int(pid) for pid in re.findall(r"grandchild (\d+)", out.getvalue())]
    assert grandchildren, out.getvalue()
    return [service.process.pid for service in services] + grandchildren


def test_supervisor_stops_everything_when_one_child_dies():
    run_dev = load_run_dev()
    crasher = run_dev.Service("crasher", [PYTHON, "-c", "import time, sys; time.sleep(1.5); sys.exit(3)"])
    supervisor, services, out = supervised(run_dev, [crasher])

    status = supervisor.run()

    assert status == 3
    assert "crasher exited with status 3" in out.getvalue()
    assert wait_gone(started_pids(services, out)) == []


def test_supervisor_stops_everything_on_sigterm():
    run_dev = load_run_dev()
    supervisor, services, out = supervised(run_dev)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM)
    timer.start()
    try:
        status = supervisor.run()
    finally:
        timer.cancel()

    assert status == 0
    assert signal.getsignal(signal.SIGTERM) is previous, "the supervisor must give the signal back"
    assert wait_gone(started_pids(services, out)) == []


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def untracked(project: Path) -> set[str]:
    listing = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=normal"], cwd=project, capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    return set(listing.stdout.splitlines())


@pytest.mark.timeout(300)  # migrations, the demo (its seeded experiment) and a server start, on a loaded CI
def test_make_run_serves_the_demo_and_ctrl_c_stops_it(tmp_path):
    """scripts/run_dev.py (what `make run` runs) in a copy of the project: a fresh database and .local/."""
    project = copy_project(tmp_path / "project")
    # A repository of its own, so that `git status` can tell what the run leaves behind (.gitignore applies).
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    untracked_before = untracked(project)
    port, upstream_port = free_port(), free_port()
    env = clean_env()
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [PYTHON, "scripts/run_dev.py", "--port", str(port), "--upstream-port", str(upstream_port), "--tps", "0"],
            cwd=project,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    children: list[int] = []
    try:
        wait_until(
            lambda: "Ctrl-C stops everything" in log_path.read_text() or process.poll() is not None,
            lambda: f"make run says it serves; its log:\n{log_path.read_text()}",
            timeout=90,
            interval=0.2,
        )
        assert process.poll() is None, log_path.read_text()
        children = [int(pid) for pid in re.findall(r"started \w+ \(pid (\d+)\)", log_path.read_text())]
        assert len(children) == 3

        site = f"http://127.0.0.1:{port}"
        password = (project / ".local" / "demo-admin-password").read_text().strip()
        assert password in log_path.read_text(), "the login is printed for the developer"
        demo_password = (project / ".local" / "demo-user-password").read_text().strip()
        assert demo_password in log_path.read_text(), "so is the Free plan's demo user"
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with browser.open(f"{site}/admin/login/", timeout=10) as login:
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.read().decode()).group(1)
        form = {"csrfmiddlewaretoken": token, "username": "admin", "password": password, "next": "/admin/"}
        with browser.open(f"{site}/admin/login/", urllib.parse.urlencode(form).encode(), timeout=10) as logged_in:
            assert logged_in.url.endswith("/admin/"), "the printed password logs in"
        with browser.open(f"{site}/admin/providers/provider/", timeout=10) as providers:
            listing = providers.read().decode()
        assert "demo-fake-openai" in listing and "demo-fake-anthropic" in listing
        with browser.open(f"{site}/static/admin/css/base.css", timeout=10) as stylesheet:
            assert stylesheet.status == 200

        created = manage("createapikey", "admin", cwd=project, env=env)
        assert created.returncode == 0, created.stderr
        client = openai.OpenAI(base_url=f"{site}/v1", api_key=created.stdout.strip().splitlines()[-1], max_retries=0)
        reply = client.chat.completions.create(
            model="demo-gpt-4o-mini", messages=[{"role": "user", "content": "[[reply=hello from the demo]]"}]
        )
        assert reply.choices[0].message.content == "hello from the demo"
        # The demo's fake provider answers like a model, in Markdown the chat page renders.
        greeting = client.chat.completions.create(
            model="demo-claude-haiku", messages=[{"role": "user", "content": "Hi"}]
        )
        assert "**" in greeting.choices[0].message.content and "```python" in greeting.choices[0].message.content

        # The demo user signs in on the chat page, and its Free plan shows: the cheap model only.
        demo = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with demo.open(f"{site}/accounts/login/", timeout=10) as login:
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.read().decode()).group(1)
        form = {"csrfmiddlewaretoken": token, "username": "demo", "password": demo_password, "next": "/"}
        with demo.open(f"{site}/accounts/login/", urllib.parse.urlencode(form).encode(), timeout=10) as page:
            assert urllib.parse.urlsplit(page.url).path == "/", "the printed password signs the demo user in"
        created = manage("createapikey", "demo", cwd=project, env=env)
        assert created.returncode == 0, created.stderr
        free = openai.OpenAI(base_url=f"{site}/v1", api_key=created.stdout.strip().splitlines()[-1], max_retries=0)
        cheap = free.chat.completions.create(model="demo-gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
        assert cheap.choices[0].message.content
        with pytest.raises(openai.NotFoundError):
            free.chat.completions.create(model="demo-gpt-4o", messages=[{"role": "user", "content": "Hi"}])

        members = [pid for child in children for pid in group_members(child)]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, log_path.read_text()
        assert wait_gone(members) == [], "every process `make run` started is gone after Ctrl-C"
        assert untracked(project) == untracked_before, (
            "`make run` leaves only ignored files (.local/, db.sqlite3, var/)"
        )
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for child in children:
            try:
                os.killpg(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


MIGRATE_AND_LOAD_THE_DEMO = (
    "from django.core.management import call_command; "
    "call_command('migrate', interactive=False, verbosity=1); call_command('demo_setup')"
)


@pytest.mark.timeout(300)  # migrations, the demo (its seeded experiment) and a server start, on a loaded CI
def test_make_run_twice_keeps_one_admin_one_demo_user_and_one_catalog(tmp_path):
    project = copy_project(tmp_path / "project")
    openai_key = "sk-test-" + secrets.token_hex(16)
    env = clean_env(DJANGO_SETTINGS_MODULE="llmhub.settings.base", OPENAI_API_KEY=openai_key)
    # As `make run` sets up (scripts/run_dev.py): the migrations and the demo in one process, one Django start.
    first = manage("shell", "-c", MIGRATE_AND_LOAD_THE_DEMO, cwd=project, env=env, timeout=240)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Applying providers.0001_initial... OK" in first.stdout, "the migrations ran"
    password = (project / ".local" / "demo-admin-password").read_text().strip()
    demo_password = (project / ".local" / "demo-user-password").read_text().strip()
    assert demo_password in first.stdout
    assert stat.S_IMODE((project / ".local" / "demo-user-password").stat().st_mode) == 0o600
    second = manage("demo_setup", cwd=project, env=env)
    assert second.returncode == 0, second.stderr
    assert (project / ".local" / "demo-admin-password").read_text().strip() == password
    assert (project / ".local" / "demo-user-password").read_text().strip() == demo_password
    assert "created" not in second.stdout and "updated" not in second.stdout
    assert openai_key not in first.stdout + first.stderr + second.stdout + second.stderr
    # Both questions in one Django start: the admin and the catalog, then the demo user.
    found = manage(
        "shell",
        "-c",
        "from django.contrib.auth import authenticate; from django.contrib.auth.models import User; "
        "from providers.models import CatalogModel, Provider; "
        "print(User.objects.filter(username='admin').count(), sorted(Provider.objects.values_list('name', flat=True)), "
        "CatalogModel.objects.filter(deployments__provider__name='openai').count()); "
        f"user = authenticate(username='demo', password={demo_password!r}); "
        "print(User.objects.filter(username='demo').count(), user is not None and not user.is_staff, "
        "user.billing_plan.plan.name)",
        cwd=project,
        env=env,
    )
    catalog, demo_user = found.stdout.strip().splitlines()[-2:]
    expected = "1 ['demo-fake-anthropic', 'demo-fake-openai', 'demo-fake-openai-west', 'openai'] 2"
    assert catalog == expected, found.stdout + found.stderr
    assert demo_user == "1 True Free", found.stdout + found.stderr

    # A plan an admin gives the demo user later is theirs to keep.
    assert manage("setplan", "demo", "Pro", cwd=project, env=env).returncode == 0
    third = manage("demo_setup", cwd=project, env=env)
    assert third.returncode == 0, third.stderr
    assert "user 'demo' (Pro plan)" in third.stdout, third.stdout


def test_a_plain_http_trial_of_production_can_sign_in_to_the_admin(tmp_path):
    """README: SECURE_SSL_REDIRECT=false with SESSION_COOKIE_SECURE and CSRF_COOKIE_SECURE false serves plain HTTP
    for a trial. A browser keeps no Secure cookie from a plain-HTTP site (localhost aside), and neither does
    http.cookiejar: without its CSRF cookie the sign-in form is refused with 403."""
    env = production_env(
        SECURE_SSL_REDIRECT="false",
        SESSION_COOKIE_SECURE="false",
        CSRF_COOKIE_SECURE="false",
        ALLOWED_HOSTS="127.0.0.1",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        LLMHUB_LEDGER_SPOOL=str(tmp_path / "spool.jsonl"),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
        STATIC_ROOT=str(tmp_path / "static"),
    )
    password = secrets.token_urlsafe(16)
    # The operator's three commands (collectstatic as the image's build does) in one Django start.
    prepared = manage(
        "shell",
        "-c",
        "from django.core.management import call_command; "
        "call_command('migrate', interactive=False); call_command('collectstatic', interactive=False); "
        "call_command('createsuperuser', interactive=False, username='first', email='first@example.com')",
        env={**env, "DJANGO_SUPERUSER_PASSWORD": password},
        timeout=240,
    )
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert "Superuser created successfully." in prepared.stdout, prepared.stdout
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "llmhub.asgi:application", "--port", str(port), "--lifespan", "off"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

        def login_page() -> str | None:
            try:
                with browser.open(f"{base}/admin/login/", timeout=2) as response:
                    return response.read().decode()
            except OSError:
                assert server.poll() is None, f"the server ended with status {server.returncode}"
                return None

        page = wait_until(login_page, "the server serves the admin's sign-in page", timeout=30, interval=0.2)
        # A Secure cookie is kept but never sent back over plain HTTP: the form would be refused (403).
        assert [(cookie.name, cookie.secure) for cookie in jar] == [("csrftoken", False)]
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        form = urllib.parse.urlencode({"username": "first", "password": password, "csrfmiddlewaretoken": token})
        request = urllib.request.Request(
            f"{base}/admin/login/?next=/admin/", data=form.encode(), headers={"Origin": base}
        )
        with browser.open(request, timeout=10) as response:
            assert response.status == 200 and response.url == f"{base}/admin/"
            assert "Site administration" in response.read().decode()
    finally:
        process_stop(server)


HASHED = r"\.[0-9a-f]{12}\."  # the content hash ManifestStaticFilesStorage puts in a collected file's name
FOREVER = "max-age=315360000, public, immutable"


def test_production_serves_collected_static_files_itself(tmp_path):
    """With DEBUG off, pages name their assets by hashed names (app.<hash>.css), which change with their content, so
    that a browser never keeps an old script or stylesheet after an upgrade; ServeStatic serves them from STATIC_ROOT
    with far-future cache headers, and the names without a hash (a page cached from before an upgrade) for a minute."""
    env = production_env(
        STATIC_ROOT=str(tmp_path / "static"),
        SECURE_SSL_REDIRECT="false",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
    )
    collected = manage("collectstatic", "--noinput", env=env)
    assert collected.returncode == 0, collected.stderr
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "llmhub.asgi:application", "--port", str(port), "--lifespan", "off"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    site = f"http://127.0.0.1:{port}"

    def get(path: str) -> tuple[int, Message, bytes]:
        request = urllib.request.Request(site + path, headers={"Host": "llmhub.example.com"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, response.read()

    try:

        def page() -> bytes | None:
            try:
                return get("/accounts/login/")[2]
            except OSError:
                assert server.poll() is None, f"the server ended with status {server.returncode}"
                return None

        html = wait_until(page, "the server serves the sign-in page", timeout=20, interval=0.2).decode()
        assets = re.findall(r'<(?:script[^>]*\ssrc|link[^>]*\shref)="(/static/[^"]+)"', html)
        assert any(asset.startswith("/static/chat/app.") for asset in assets), assets
        for asset in assets:
            assert re.search(HASHED, asset), f"{asset}: no content hash in its name"
            status, headers, body = get(asset)
            assert status == 200 and body, asset
            assert headers["Cache-Control"] == FOREVER, asset
        status, headers, body = get("/static/admin/css/base.css")
        assert status == 200 and b"body" in body
        assert headers["Cache-Control"] == "max-age=60, public"
    finally:
        process_stop(server)


def test_every_page_names_its_static_files_through_the_manifest(tmp_path):
    """collectstatic succeeds with production's storage (a file naming another that is missing, such as a source map,
    fails it), every ``{% static %}`` of every template is in the manifest (else the page fails under production), and
    no template, script or stylesheet of ours names a /static/ path directly (it would miss the hash)."""
    env = production_env(STATIC_ROOT=str(tmp_path / "static"))
    collected = manage("collectstatic", "--noinput", env=env)
    assert collected.returncode == 0, collected.stderr
    manifest = json.loads((tmp_path / "static" / "staticfiles.json").read_text())["paths"]
    templates = [path for path in ROOT.rglob("templates/**/*.html") if not ({".venv", "var", ".git"} & set(path.parts))]
    assert len(templates) > 15
    named = set()
    for template in templates:
        text = template.read_text()
        named |= set(re.findall(r"""{%\s*static\s+["']([^"']+)["']""", text))
        assert not re.search(r"""["'(]/?static/""", text), f"{template}: a static path without {{% static %}}"
    assert {"chat/app.css", "chat/chat.js", "vendor/chartjs/chart.umd.min.js"} <= named
    assert sorted(name for name in named if name not in manifest) == []
    for name in named:
        assert re.search(HASHED, manifest[name]), name
    ours = [
        path
        for source in APP_SOURCES
        for pattern in ("static/**/*.js", "static/**/*.css")
        for path in (ROOT / source).glob(pattern)
        if "vendor" not in path.parts
    ]
    assert ours
    for path in ours:
        assert not re.search(r"""["'(]/static/""", path.read_text()), path


def test_no_two_test_modules_share_a_name():
    """The test folders are not packages (a ``tests/experiments/__init__.py`` would shadow the app), so pytest
    imports each test module by its file name: two ``test_admin.py`` stop the whole suite at collection."""
    names: dict[str, list[str]] = {}
    for path in (Path(__file__).resolve().parent).rglob("test_*.py"):
        names.setdefault(path.name, []).append(str(path))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
