"""The API's documentation: the interactive pages work offline (every asset from this
server, under a Content-Security-Policy), and the decomposition example of
docs/service.md is accepted and (a slow test) runs as written."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import LiveServer, WorkerThreads
from worker.settings import Settings

ALICE = {"Authorization": "Bearer key-alice"}
SERVICE_DOC = Path(__file__).resolve().parents[2] / "docs" / "service.md"


class _Assets(HTMLParser):
    """URLs of the scripts, stylesheets and icons a page loads."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and found.get("src"):
            self.urls.append(found["src"] or "")
        if tag == "link" and found.get("href"):
            self.urls.append(found["href"] or "")


@pytest.mark.parametrize(("path", "script"), [("/docs", "swagger-ui"), ("/redoc", "redoc")])
def test_api_pages_load_every_asset_from_this_server(
    live: LiveServer, path: str, script: str
) -> None:
    page = httpx.get(live.url + path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "cdn" not in page.text.lower() and "googleapis" not in page.text
    parser = _Assets()
    parser.feed(page.text)
    assert any(script in url for url in parser.urls), parser.urls
    for url in parser.urls:
        assert url.startswith("/docs-static/"), url
        asset = httpx.get(live.url + url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy
    assert "http" not in policy  # no other origin
    # the page fetches the OpenAPI document it names, which is served here
    assert "/openapi.json" in page.text
    assert httpx.get(live.url + "/openapi.json").json()["openapi"].startswith("3.1")


def _documented_decomposition() -> str:
    """The JSON body of the curl example in docs/service.md (its here-document)."""
    text = SERVICE_DOC.read_text()
    found = re.search(r"\$API/decompositions .*?-d @- <<EOF\n(.*?)\nEOF\n", text, re.DOTALL)
    assert found is not None, "docs/service.md has no POST /decompositions example"
    return found.group(1)


def _documented_body(uploaded: dict[str, str]) -> dict:
    template = _documented_decomposition()
    return json.loads(
        template.replace("$MODEL", uploaded["model"])
        .replace("$TRAIN", uploaded["train"])
        .replace("$TEST", uploaded["test"])
    )


def _submit(live: LiveServer, body: dict) -> str:
    response = httpx.post(live.url + "/decompositions", headers=ALICE, json=body, timeout=30)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "queued" and accepted["meaning"] is None
    return accepted["job"]


def test_the_documented_decomposition_is_accepted(
    live: LiveServer, uploaded: dict[str, str]
) -> None:
    _submit(live, _documented_body(uploaded))


@pytest.mark.slow  # about 80 s on 2 cores: the example's 30 L-BFGS retrainings
def test_the_documented_decomposition_runs(
    live: LiveServer, workers: WorkerThreads, settings: Settings, uploaded: dict[str, str]
) -> None:
    body = _documented_body(uploaded)
    job = _submit(live, body)
    workers.start(settings)
    with live.client() as client:
        final = client.wait(job, timeout=300)
    assert final.status == "succeeded", final.error
    result = final.result or {}
    assert {"summary", "gaps", "correlation"} <= set(result), sorted(result)
    assert all(len(values) == body["arguments"]["num_points"] for values in result["gaps"].values())
