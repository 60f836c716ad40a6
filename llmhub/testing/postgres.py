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
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmhub.testing.ports import free_port


class PostgresUnavailable(RuntimeError):
    pass


def server_bin() -> Path | None:
    """The directory of the newest installed PostgreSQL server, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    postgres = shutil.which("postgres")
    return Path(postgres).parent if postgres else None


class PostgresCluster:
    """A private cluster in a temporary directory on a free loopback port. ``init`` and ``start`` make it
    serve; ``stop`` and ``start`` again (same port, same data) are an operator restarting the database,
    which the tests of database outages do under load; ``remove`` ends it and deletes its files."""

    def __init__(self, *, max_connections: int = 200, database: str = "llmhub") -> None:
        bindir = server_bin()
        if bindir is None:
            raise PostgresUnavailable("no PostgreSQL server is installed (apt-get install postgresql)")
        self.bindir = bindir
        self.owner: str | None = None
        if os.geteuid() == 0:
            self.owner = "postgres"
            try:
                pwd.getpwnam(self.owner)
            except KeyError:
                raise PostgresUnavailable("running as root and there is no `postgres` user to run the server") from None
        self.max_connections = max_connections
        self.work = Path(tempfile.mkdtemp(prefix="llmhub-pg-"))
        if self.owner:
            shutil.chown(self.work, user=self.owner)
        self.data, self.log = self.work / "data", self.work / "server.log"
        self.port = free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args: str, check: bool = True) -> None:
        argv = [str(self.bindir / program), *args]
        if self.owner:
            argv = ["runuser", "-u", self.owner, "--", *argv]
        subprocess.run(argv, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.work} -c listen_addresses=127.0.0.1 -c max_connections={self.max_connections} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")

    def stop(self) -> None:
        """A fast stop: every session is cut, as when the database host goes away."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.work, ignore_errors=True)


@contextlib.contextmanager
def throwaway_postgres(*, max_connections: int = 200, database: str = "llmhub") -> Iterator[str]:
    """Start a private server; yield the URL of ``database`` on it (created by whoever connects first:
    Django's test runner creates its own, the benchmark runs ``createdb``)."""
    cluster = PostgresCluster(max_connections=max_connections, database=database)
    try:
        try:
            cluster.init()
            cluster.start()
        except subprocess.CalledProcessError as exc:
            tail = cluster.log.read_text()[-2000:] if cluster.log.exists() else ""
            raise PostgresUnavailable(
                f"could not start PostgreSQL ({exc.cmd[-1]} exited {exc.returncode})\n{tail}"
            ) from None
        yield cluster.url
    finally:
        cluster.remove()


def createdb(url: str) -> None:
    """Create the database of ``url`` (a URL ``throwaway_postgres`` gave)."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
