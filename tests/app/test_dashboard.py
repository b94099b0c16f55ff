"""The dashboard router: the page and its assets are served locally, safely and completely."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.dashboard import MEDIA_TYPES, STATIC_DIR, router
from worker.contract import SolverSpec


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    app.include_router(router)
    return TestClient(app)


def test_index_is_the_dashboard_page_with_a_strict_policy(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="/static/main.js">' in response.text
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("name", sorted(p.name for p in STATIC_DIR.iterdir()))
def test_every_asset_is_served_with_its_media_type(client: TestClient, name: str) -> None:
    response = client.get(f"/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == MEDIA_TYPES[(STATIC_DIR / name).suffix]
    assert response.content == (STATIC_DIR / name).read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/static/..%2Fdashboard.py",
        "/static/../dashboard.py",
        "/static/dashboard.py",
        "/static/.hidden.js",
        "/static/missing.js",
        "/static/sub%2Fmain.js",
    ],
)
def test_nothing_outside_the_static_folder_is_served(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "import" not in response.text


def test_every_reference_resolves_to_a_local_asset() -> None:
    """No CDN: each src/href and each ES-module import names a file of the static folder."""
    names = {p.name for p in STATIC_DIR.iterdir()}
    html = (STATIC_DIR / "index.html").read_text()
    referenced = re.findall(r'(?:src|href)="/static/([^"]+)"', html)
    assert {"main.js", "style.css"} <= set(referenced)
    for module in STATIC_DIR.glob("*.js"):
        referenced += re.findall(r'from "\./([^"]+)"', module.read_text())
    assert referenced and set(referenced) <= names
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", text), path.name
        assert not re.search(r"""(?:import|fetch)\s*\(?\s*["'](?:https?:)?//""", text), path.name


def test_the_solver_forms_defaults_are_the_engines() -> None:
    """The query form shows each solver's defaults: what a request that leaves the field
    out would get (the form sends every field, so a drift would change the answers)."""
    html = (STATIC_DIR / "index.html").read_text()
    shown = dict(re.findall(r'<input name="([a-z_]+)"[^>]*value="([^"]*)"', html))
    cg, lissa = SolverSpec(name="cg"), SolverSpec(name="lissa")
    assert float(shown["tol"]) == cg.tol and int(shown["max_iter"]) == cg.max_iter
    assert float(shown["lissa_tol"]) == lissa.tol
    assert (int(shown["depth"]), int(shown["repeats"]), int(shown["lissa_batch_size"])) == (
        lissa.depth,
        lissa.repeats,
        lissa.batch_size,
    )
    assert int(shown["seed"]) == lissa.seed and "scale" not in shown  # empty: estimated
