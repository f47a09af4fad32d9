"""GET / and its assets (the browser test in tests/browser drives the page itself)."""

from __future__ import annotations

import httpx


def test_page_and_assets_are_served(server_url: str) -> None:
    page = httpx.get(f"{server_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/app.js"' in page.text and 'id="file-a"' in page.text
    js = httpx.get(f"{server_url}/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "function parseSafetensors" in js.text
    assert httpx.get(f"{server_url}/static/style.css").headers["content-type"].startswith("text/css")


def test_only_the_listed_assets_exist(server_url: str) -> None:
    for path in ("/static/nope.js", "/static/..%2Fapp.py", "/static/index.html"):
        r = httpx.get(f"{server_url}{path}")
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"
