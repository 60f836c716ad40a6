"""The lifespan's warm-up imports the URLconf before the first request (llmhub/lifespan.py): Django would
otherwise import it, and every view module with it (SciPy among them), while the first requests wait. It builds
the block-list's character tables too (docs/moderation.md), which the first text that is not ASCII waited for, and
imports every configured provider kind's adapter and SDK, whether the catalog serves one yet or not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import asyncio, sys
import django
django.setup()
from django.urls import get_resolver
assert "url_patterns" not in vars(get_resolver()), "the URLconf was imported before the warm-up"
from llmhub.lifespan import _warm_up
asyncio.run(_warm_up())
resolver = get_resolver()
assert "url_patterns" in vars(resolver), "the URLconf was not imported"
assert "chat.api_openai" in sys.modules and "experiments.apis" in sys.modules
from providers.moderation import _plain_form
assert _plain_form.cache_info().currsize == 1, "the block-list's character tables were not built"
# Every configured kind's adapter, with its SDK: a provider of a kind the catalog did not have at start-up, added
# in the admin later, would import its SDK on the loop at its first request, seconds every request waited for.
from django.conf import settings
for dotted in settings.LLMHUB_ADAPTERS.values():
    assert dotted.rsplit(".", 1)[0] in sys.modules, dotted + " was not imported"
assert "openai" in sys.modules and "anthropic" in sys.modules
print("warm")
"""


def test_the_warm_up_imports_the_urlconf_and_every_view_and_builds_the_blocklist_tables(tmp_path):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "llmhub.settings.test",
        # An empty database of its own: the catalog cannot be read, which the warm-up logs and goes past.
        "TEST_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite3'}",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("warm")
