"""Importing llmhub's ASGI application in a process where Django is already set up (the test process: pytest-django
set it up, and a live server imports the application in a fixture) leaves the logging configuration of that
process alone: pytest's handlers (``caplog``, the live log, the log file) keep every record after the import.
Production's logging, configured by that import in a fresh server process, is tests/test_json_logs.py's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run by a pytest of its own: the import happens once per process, and this process has made it long ago.
PROBE = """
import logging


def test_caplog_keeps_what_is_logged_after_the_import(caplog):
    caplog.set_level(logging.WARNING)
    import llmhub.asgi  # noqa: F401

    logging.getLogger("probe").warning("in caplog after the import")
    assert "in caplog after the import" in caplog.text


def test_the_live_log_keeps_the_next_tests_records():
    logging.getLogger("probe").warning("in the live log after the import")
"""


def test_importing_the_asgi_application_leaves_pytests_log_handlers_in_place(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    log_file = tmp_path / "pytest.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    env["DJANGO_SETTINGS_MODULE"] = "llmhub.settings.test"
    env["LLMHUB_LEDGER_SPOOL"] = str(tmp_path / "spool.jsonl")
    run = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", str(probe), "-q", "-p", "no:cacheprovider", "-p", "no:xdist"),
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
    assert "in the live log after the import" in run.stdout, run.stdout
    assert "in the live log after the import" in log_file.read_text(), run.stdout
