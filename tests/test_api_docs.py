"""The API docs (Swagger UI at /api/docs/, ReDoc at /api/redoc/) in a real browser with the network cut.

Every request the page makes to a host other than the live server is aborted, as it fails on a machine
without internet: the docs must render from llmhub's own static files alone.
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import pytest
from playwright.async_api import Browser, Page, Route, expect

from tests.conftest import LiveServer, free_port, process_stop
from tests.test_project import ROOT, manage, production_env
from tests.waiting import wait_until

# Paths a reader must find listed: an OpenAI-compatible route (added to the document by a postprocessing
# hook) and one of the management API's.
LISTED_PATHS = ["/v1/chat/completions", "/api/keys/"]


@dataclass
class OfflinePage:
    page: Page
    cut: list[tuple[str, str]] = field(default_factory=list)  # (resource type, URL) of aborted requests
    errors: list[str] = field(default_factory=list)  # uncaught exceptions in the page


@pytest.fixture
async def offline(live_site: LiveServer, browser: Browser) -> AsyncIterator[OfflinePage]:
    """A page in a browser context that reaches the live server and nothing else."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    origin = urlsplit(live_site.url)[:2]
    page = OfflinePage(await context.new_page())

    async def only_the_site(route: Route) -> None:
        if urlsplit(route.request.url)[:2] == origin:
            await route.continue_()
        else:
            page.cut.append((route.request.resource_type, route.request.url))
            await route.abort("internetdisconnected")

    await context.route("**/*", only_the_site)
    page.page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    yield page
    await context.close()


@pytest.mark.browser
async def test_swagger_ui_lists_the_endpoints_offline(live_site, offline):
    response = await offline.page.goto(live_site.url + "/api/docs/")
    assert response is not None and response.status == 200

    operations = offline.page.locator(".opblock-summary-path")
    for path in LISTED_PATHS:
        await expect(operations.filter(has_text=path).first).to_be_visible()
    await expect(offline.page.get_by_role("link", name="ReDoc")).to_have_attribute("href", "/api/redoc/")
    assert offline.cut == []
    assert offline.errors == []


@pytest.mark.browser
async def test_redoc_lists_the_endpoints_offline(live_site, offline):
    response = await offline.page.goto(live_site.url + "/api/redoc/")
    assert response is not None and response.status == 200

    # ReDoc draws the page once it has the schema, which the live server builds on its first request for it
    # (drf-spectacular walks every view): seconds alone, and 15 s was once too short on a loaded machine (the page
    # still said "Loading ..."). A wait, not a timing: a page that never draws still fails.
    await expect(offline.page.get_by_role("heading", name="llmhub API")).to_be_visible(timeout=60_000)
    # ReDoc writes each operation's path in the endpoint box beside the operation.
    for path in LISTED_PATHS:
        await expect(offline.page.get_by_text(path, exact=True).first).to_be_attached()
    await expect(offline.page.get_by_role("link", name="Swagger UI")).to_have_attribute("href", "/api/docs/")
    # The one request that may leave: the logo of ReDoc's "API docs by Redocly" badge, which its bundle
    # loads from cdn.redoc.ly unconditionally and hides when it fails. No script, stylesheet or font.
    assert [kind for kind, _ in offline.cut] in ([], ["image"]), offline.cut
    assert offline.errors == []


def test_production_serves_the_docs_assets_itself(tmp_path):
    """With DEBUG off, the scripts and stylesheets the docs pages name come from STATIC_ROOT (collected
    from drf_spectacular_sidecar) through ServeStatic, on the server's own origin."""
    env = production_env(
        STATIC_ROOT=str(tmp_path / "static"),
        SECURE_SSL_REDIRECT="false",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
    )
    collected = manage("collectstatic", "--noinput", env=env)
    assert collected.returncode == 0, collected.stderr
    port = free_port()
    site = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "llmhub.asgi:application", "--port", str(port), "--lifespan", "off"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def get(url: str) -> tuple[int, bytes]:
        request = urllib.request.Request(url, headers={"Host": "llmhub.example.com"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()

    try:
        pages: dict[str, tuple[int, bytes]] = {}

        def served() -> bool:
            try:
                pages.update({path: get(site + path) for path in ("/api/docs/", "/api/redoc/")})
                return True
            except OSError:
                assert server.poll() is None, f"the server ended with status {server.returncode}"
                return False

        wait_until(served, "the server serves both documentation pages", timeout=20, interval=0.2)
        assets = set()
        for path, (status, html) in pages.items():
            assert status == 200, path
            named = re.findall(rb'<(?:script[^>]*\ssrc|link[^>]*\shref)="([^"]+)"', html)
            assert named, path
            assets.update(urljoin(site + path, url.decode()) for url in named)
        assert {urlsplit(url).netloc for url in assets} == {f"127.0.0.1:{port}"}, assets
        assert any("swagger-ui-bundle" in url for url in assets) and any("redoc.standalone" in url for url in assets)
        for url in assets:
            status, body = get(url)
            assert status == 200 and body, url
    finally:
        process_stop(server)
