"""Run a command against a throw-away PostgreSQL server: ``python scripts/with_postgres.py -- CMD ...``.

Production runs PostgreSQL (``docker-compose.yml``), so the tests about money (budgets under
concurrency, row locks, Decimal sums, the ledger) run on it too, not only on SQLite. This starts a
private cluster in a temporary directory on a free loopback port (trust authentication, no fsync: it
lives for one test run), exports ``TEST_DATABASE_URL`` for CMD, and removes the cluster afterwards, also
when CMD fails or is interrupted. PostgreSQL refuses to run as root, so as root the cluster runs as the
``postgres`` user that Debian's package creates.

Without a PostgreSQL server installed it says so and exits 0, unless ``CI`` is set (``.ci/run`` installs
``postgresql``), where that is a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def server_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    postgres = shutil.which("postgres")
    return Path(postgres).parent if postgres else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_owner(argv: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *argv] if owner else argv


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    bindir = server_bin()
    if bindir is None:
        if os.environ.get("CI"):
            print("with_postgres: no PostgreSQL server is installed; .ci/run must install postgresql", file=sys.stderr)
            return 1
        print("with_postgres: PostgreSQL is not installed; the PostgreSQL part of the tests is skipped", flush=True)
        return 0

    owner = None
    if os.geteuid() == 0:
        owner = "postgres"
        try:
            pwd.getpwnam(owner)
        except KeyError:
            print("with_postgres: running as root and there is no `postgres` user to run the server", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="llmhub-pg-"))
    if owner:
        shutil.chown(work, user=owner)
    data, log = work / "data", work / "server.log"
    port = free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
    started = False
    try:
        subprocess.run(
            as_owner(
                [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"],
                owner,
            ),
            check=True,
            **quiet,
        )
        options = (
            f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c max_connections=200 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        subprocess.run(
            as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"], owner),
            check=True,
            **quiet,
        )
        started = True
        url = f"postgres://postgres@127.0.0.1:{port}/llmhub"
        print(f"with_postgres: PostgreSQL {bindir.parent.name} on port {port}: TEST_DATABASE_URL={url}", flush=True)
        return subprocess.run(argv, env={**os.environ, "TEST_DATABASE_URL": url}, check=False).returncode
    except subprocess.CalledProcessError as exc:
        print(f"with_postgres: could not start PostgreSQL ({exc.cmd[0]} exited {exc.returncode})", file=sys.stderr)
        if log.exists():
            print(log.read_text()[-2000:], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if started:
            subprocess.run(
                as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], owner), **quiet
            )
            time.sleep(0.1)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
