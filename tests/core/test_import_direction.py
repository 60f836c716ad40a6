"""DESIGN.md's one direction of imports: chat → experiments → prompts → billing → providers → accounts → audit →
core, and ``core`` imports no app.

Read from the source (every ``import``, at module level or inside a function), so a new import the
wrong way fails here before it makes a cycle at runtime."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
APPS = ("core", "audit", "accounts", "providers", "billing", "prompts", "experiments", "chat")
# What each app must not import: the apps that come before it in the chain, and the project's wiring.
FORBIDDEN = {app: {*APPS[APPS.index(app) + 1 :], "llmhub"} for app in APPS}
# llmhub.testing is the fake upstreams: code any test may import, no wiring.
ALLOWED = {"llmhub.testing"}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("app", APPS)
def test_app_imports_only_down_the_chain(app):
    wrong = sorted(
        f"{path.relative_to(ROOT)}: {module}"
        for path in (ROOT / app).rglob("*.py")
        for module in _imported_modules(path)
        if module.split(".")[0] in FORBIDDEN[app] and not module.startswith(tuple(ALLOWED))
    )

    assert wrong == []
