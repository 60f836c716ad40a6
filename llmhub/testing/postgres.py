"""A throw-away PostgreSQL server for the tests and the benchmark: ``with throwaway_postgres() as url``.

A private cluster in a temporary directory on a free loopback port (trust authentication, no fsync: it
lives for one run), removed afterwards, also when the body fails or is interrupted. PostgreSQL refuses
to run as root, so as root the cluster runs as the ``postgres`` user that Debian's package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    pass


def server_bin() -> Path | None:
    """The directory of the newest installed PostgreSQL server, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    postgres = shutil.which("postgres")
    return Path(postgres).parent if postgres else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres(*, max_connections: int = 200, database: str = "llmhub") -> Iterator[str]:
    """Start a private server; yield the URL of ``database`` on it (created by whoever connects first:
    Django's test runner creates its own, the benchmark runs ``createdb``)."""
    bindir = server_bin()
    if bindir is None:
        raise PostgresUnavailable("no PostgreSQL server is installed (apt-get install postgresql)")
    owner = None
    if os.geteuid() == 0:
        owner = "postgres"
        try:
            pwd.getpwnam(owner)
        except KeyError:
            raise PostgresUnavailable("running as root and there is no `postgres` user to run the server") from None

    def as_owner(argv: list[str]) -> list[str]:
        return ["runuser", "-u", owner, "--", *argv] if owner else argv

    work = Path(tempfile.mkdtemp(prefix="llmhub-pg-"))
    if owner:
        shutil.chown(work, user=owner)
    data, log = work / "data", work / "server.log"
    port = _free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
    started = False
    try:
        try:
            subprocess.run(
                as_owner(
                    [
                        str(bindir / "initdb"),
                        "-D",
                        str(data),
                        "-A",
                        "trust",
                        "-U",
                        "postgres",
                        "-E",
                        "UTF8",
                        "--no-sync",
                    ]
                ),
                check=True,
                **quiet,
            )
            options = (
                f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c max_connections={max_connections} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            subprocess.run(
                as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"]),
                check=True,
                **quiet,
            )
        except subprocess.CalledProcessError as exc:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise PostgresUnavailable(
                f"could not start PostgreSQL ({exc.cmd[-1]} exited {exc.returncode})\n{tail}"
            ) from None
        started = True
        yield f"postgres://postgres@127.0.0.1:{port}/{database}"
    finally:
        if started:
            subprocess.run(
                as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]), **quiet
            )
        shutil.rmtree(work, ignore_errors=True)


def createdb(url: str) -> None:
    """Create the database of ``url`` (a URL ``throwaway_postgres`` gave)."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
