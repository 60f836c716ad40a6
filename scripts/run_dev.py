#!/usr/bin/env python
"""`make run`: migrate, load the demo, then run everything llmhub needs on one machine, and stop it
all together.

The children are the bundled fake upstream (one process serving two hosts, ``east`` and ``west``,
which the demo providers point at: ``demo-gpt-4o-mini`` is balanced over both), daphne serving llmhub,
and a Celery worker with beat embedded. Each runs in its own process group, so a Ctrl-C in
the terminal reaches only this supervisor, which then stops them in an orderly way (SIGTERM, then
SIGKILL for what is left of each group after a grace period) instead of leaving half of them behind.
When any child dies on its own, the others are stopped too and the exit status is non-zero: a demo
with a dead worker would only mislead.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
WEST_PORT = 18082


@dataclass
class Service:
    name: str
    argv: list[str]
    # A TCP port that accepts connections once the service is ready, if it has one.
    port: int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    reader: threading.Thread | None = field(default=None, repr=False)


class Supervisor:
    """Start services, relay their output with a name prefix, and stop all of them together."""

    def __init__(
        self,
        services: Sequence[Service],
        *,
        cwd: Path = ROOT,
        env: dict[str, str] | None = None,
        stop_timeout: float = 15.0,
        ready_timeout: float = 60.0,
        out: IO[str] | None = None,
    ) -> None:
        self.services = list(services)
        self.cwd = cwd
        self.env = env if env is not None else dict(os.environ)
        self.stop_timeout = stop_timeout
        self.ready_timeout = ready_timeout
        self.out = out if out is not None else sys.stdout
        self._write_lock = threading.Lock()
        self._stop_requested: int | None = None
        self._force = False

    def say(self, message: str) -> None:
        with self._write_lock:
            self.out.write(message + "\n")
            self.out.flush()

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Run until a signal asks to stop (exit status 0) or a child dies (non-zero)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._start_all()
            return self._watch(on_ready)
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stop_requested is not None:
            # A second Ctrl-C means: do not wait for a graceful shutdown.
            self._force = True
        self._stop_requested = signum

    def _start_all(self) -> None:
        for service in self.services:
            if self._stop_requested is not None:
                return
            service.process = subprocess.Popen(
                service.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            service.reader = threading.Thread(target=self._relay, args=(service,), daemon=True)
            service.reader.start()
            self.say(f"started {service.name} (pid {service.process.pid})")

    def _relay(self, service: Service) -> None:
        assert service.process is not None and service.process.stdout is not None
        width = max(len(s.name) for s in self.services)
        for raw in iter(service.process.stdout.readline, b""):
            self.say(f"{service.name:>{width}} | {raw.decode(errors='replace').rstrip()}")

    def _watch(self, on_ready: Callable[[], None] | None) -> int:
        deadline = time.monotonic() + self.ready_timeout
        waiting = [s for s in self.services if s.port is not None]
        while self._stop_requested is None:
            for service in self.services:
                assert service.process is not None
                code = service.process.poll()
                if code is not None:
                    self.say(f"{service.name} exited with status {code}; stopping everything else")
                    return code or 1
            if waiting:
                waiting = [s for s in waiting if not _listening(s.port)]
                if not waiting and on_ready is not None:
                    on_ready()
                elif waiting and time.monotonic() > deadline:
                    names = ", ".join(f"{s.name} (port {s.port})" for s in waiting)
                    self.say(f"not ready after {self.ready_timeout:.0f}s: {names}; stopping everything")
                    return 1
            time.sleep(0.2)
        self.say(f"{signal.Signals(self._stop_requested).name} received; stopping")
        return 0

    def _stop_all(self) -> None:
        running = [s for s in reversed(self.services) if s.process is not None]
        for service in running:
            assert service.process is not None
            if service.process.poll() is None:
                # The leader only: Celery's main process shuts its pool down itself, which is cleaner
                # than every pool child receiving the signal at once.
                _signal_quietly(service.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for service in running:
            assert service.process is not None
            while service.process.poll() is None and time.monotonic() < deadline and not self._force:
                time.sleep(0.05)
        for service in running:
            assert service.process is not None
            # Whatever is left of the group (a stuck leader, or children it left behind) is killed.
            _signal_group_quietly(service.process.pid, signal.SIGKILL)
            service.process.wait()
            if service.reader is not None:
                service.reader.join(timeout=2)
            self.say(f"stopped {service.name} (status {service.process.returncode})")


def _signal_quietly(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group_quietly(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _listening(port: int | None, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def prepare(*, upstream_url: str, west_upstream_url: str) -> None:
    """Migrate and load the demo in this process (one Django start instead of several)."""
    import django
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections

    django.setup()
    if settings.CELERY_BROKER_URL.startswith("filesystem://"):
        # kombu's filesystem transport does not create its folders.
        options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
        for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
            if options.get(key):
                Path(options[key]).mkdir(parents=True, exist_ok=True)
    call_command("migrate", interactive=False, verbosity=1)
    call_command("demo_setup", upstream_url=upstream_url, west_upstream_url=west_upstream_url)
    call_command("setupschedules")
    connections.close_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="llmhub's port on 127.0.0.1")
    parser.add_argument("--upstream-port", type=int, default=18080, help="the fake upstream's east host's port")
    parser.add_argument(
        "--west-port",
        type=int,
        default=0,
        help=f"the fake upstream's west host's port (default: {WEST_PORT}, or any free port when that is taken)",
    )
    parser.add_argument("--tps", type=int, default=30, help="tokens per second the fake upstream streams")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from llmhub.testing.ports import free_port

    west_port = args.west_port or (WEST_PORT if not _listening(WEST_PORT) else free_port())
    busy = [port for port in (args.port, args.upstream_port, west_port) if _listening(port)]
    if busy:
        print(f"port {busy[0]} on 127.0.0.1 is already in use (another `make run`?)", file=sys.stderr)
        return 1

    os.chdir(ROOT)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings.base")
    upstream_url = f"http://127.0.0.1:{args.upstream_port}"
    west_url = f"http://127.0.0.1:{west_port}"
    try:
        prepare(upstream_url=upstream_url, west_upstream_url=west_url)
    except KeyboardInterrupt:
        return 130

    python = sys.executable
    services = [
        Service(
            "upstream",
            [
                python,
                "-m",
                "llmhub.testing.fake_upstream",
                "--demo",
                "--upstream",
                f"east={args.upstream_port}",
                "--upstream",
                f"west={west_port}",
                "--tps",
                str(args.tps),
            ],
            # The west host starts after the east one: once it listens, both do.
            port=west_port,
        ),
        Service(
            "daphne",
            [python, "-m", "llmhub.devserver", "-b", "127.0.0.1", "-p", str(args.port), "llmhub.asgi:application"],
            port=args.port,
        ),
        Service("celery", [python, "-m", "celery", "-A", "llmhub", "worker", "-B", "-l", "info"]),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    supervisor = Supervisor(services, env=env)

    def password(username: str, file_name: str) -> str:
        password_file = ROOT / ".local" / file_name
        return password_file.read_text().strip() if password_file.exists() else f"(see `changepassword {username}`)"

    def banner() -> None:
        site = f"http://127.0.0.1:{args.port}"
        key_hint = "  key: .venv/bin/python manage.py createapikey admin"
        lines = [
            "llmhub is running. Ctrl-C stops everything.",
            f"  chat page      {site}/",
            f"  admin          {site}/admin/   user: admin   password: {password('admin', 'demo-admin-password')}",
            f"  Free plan      {site}/         user: demo    password: {password('demo', 'demo-user-password')}",
            f"  API            {site}/v1/{key_hint}",
            f"  API docs       {site}/api/docs/   ReDoc: {site}/api/redoc/",
            f"  fake upstream  east {upstream_url}   west {west_url}   (one process; serve the demo-* models)",
            f"  experiment     {site}/experiments/   demo-mini-east-vs-west: demo-gpt-4o-mini's users 50/50 on east"
            " and west, with three weeks of seeded results",
            "  routing        demo-gpt-4o-mini: east or west as the experiment assigns (3:1 without it), then"
            " demo-claude-haiku. Break east:",
            f"""                 curl -d '{{"fault":"status=503"}}' {upstream_url}/__control   (heal: "fault":null)""",
        ]
        rule = "=" * max(len(line) for line in lines)
        supervisor.say("\n".join([rule, *lines, rule]))

    return supervisor.run(on_ready=banner)


if __name__ == "__main__":
    sys.exit(main())
