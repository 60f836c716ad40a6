"""The logging configuration of the test process is pytest's once a test runs: a live server started in it, or the
import of llmhub's ASGI application that starting one makes, leaves pytest's handlers (``caplog``, the live log,
the log file) taking every record after it. Production's logging, configured in a fresh server process, is
tests/test_json_logs.py's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each probe runs in a pytest of its own: the import happens once per process, and this one made it long ago.
IMPORT_PROBE = """
import logging


def test_caplog_keeps_what_is_logged_after_the_import(caplog):
    caplog.set_level(logging.WARNING)
    import llmhub.asgi  # noqa: F401

    logging.getLogger("probe").warning("in caplog after")
    assert "in caplog after" in caplog.text


def test_the_live_log_and_the_log_file_keep_the_next_tests_records():
    logging.getLogger("probe").warning("in the log after")
"""

LIVE_SERVER_PROBE = """
import logging

import pytest

from tests.conftest import LiveServer


@pytest.mark.django_db(transaction=True)
def test_caplog_keeps_what_is_logged_after_a_live_server(caplog):
    caplog.set_level(logging.WARNING)
    LiveServer().start().stop()

    logging.getLogger("probe").warning("in caplog after")
    assert "in caplog after" in caplog.text


def test_the_live_log_and_the_log_file_keep_the_next_tests_records():
    logging.getLogger("probe").warning("in the log after")
"""


def run_probe(source: str, tmp_path: Path) -> None:
    """Run ``source``'s tests with the live log and a log file, and check that the last test's record reached
    both.

    Its test database is made from the models (``--nomigrations``): a serial pytest runs every migration first
    (about 7 CPU-s, half of the live server probe's, which a loaded machine stretched past its 120 s timeout), and
    what is checked is the logging of a server started in the test process, whatever made its tables."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(source)
    log_file = tmp_path / "pytest.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    env["DJANGO_SETTINGS_MODULE"] = "llmhub.settings.test"
    env["LLMHUB_LEDGER_SPOOL"] = str(tmp_path / "spool.jsonl")
    run = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", str(probe), "-q", "-p", "no:cacheprovider", "-p", "no:xdist"),
            "--nomigrations",
            *("--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml")),
            *("--log-cli-level=WARNING", f"--log-file={log_file}", "--log-file-level=WARNING"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "in the log after" in run.stdout, run.stdout
    assert "in the log after" in log_file.read_text(), run.stdout


def test_importing_the_asgi_application_leaves_pytests_log_handlers_in_place(tmp_path):
    run_probe(IMPORT_PROBE, tmp_path)


def test_a_live_server_in_the_test_process_leaves_pytests_log_handlers_in_place(tmp_path):
    run_probe(LIVE_SERVER_PROBE, tmp_path)
