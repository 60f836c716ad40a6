"""The settings modules: ``base`` (development, what every other one builds on), ``production`` and ``test``."""

from __future__ import annotations

from pathlib import Path

import environ

ENV_FILE = Path(__file__).resolve().parent.parent.parent / ".env"


def env_file_read() -> None:
    """Put the variables of the ``.env`` file next to ``manage.py``, when there is one, into the environment; a
    variable the environment already sets keeps its value. Production calls it before it checks its secrets,
    which may be in the file."""
    if ENV_FILE.exists():
        environ.Env.read_env(ENV_FILE, overwrite=False)
