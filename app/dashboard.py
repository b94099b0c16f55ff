"""The web dashboard: a single page of plain HTML, CSS and ES modules served by the API.

Every action the page takes is an ordinary call to the public API, so the router here
only serves files: ``GET /`` returns the page and ``GET /static/{name}`` its assets from
the flat ``app/static/`` folder. A strict Content-Security-Policy keeps every script,
style, image and connection on this server (no CDN, no inline script).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).parent / "static"

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


def _asset(name: str) -> FileResponse:
    """Serve one file of the flat static folder; anything else (sub-paths, dot-files) is 404."""
    path = STATIC_DIR / name
    media_type = MEDIA_TYPES.get(path.suffix)
    if "/" in name or "\\" in name or name.startswith(".") or media_type is None:
        raise HTTPException(status_code=404, detail=f"no dashboard asset named {name!r}")
    if not path.is_file():
        raise HTTPException(status_code=404, detail=f"no dashboard asset named {name!r}")
    return FileResponse(
        path,
        media_type=media_type,
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


@router.get("/", response_class=FileResponse)
def index() -> FileResponse:
    """The dashboard page."""
    return _asset("index.html")


@router.get("/static/{name}", response_class=FileResponse)
def static_asset(name: str) -> FileResponse:
    """A stylesheet, script module or icon of the dashboard."""
    return _asset(name)
