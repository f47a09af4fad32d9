"""GET /: the web page (plain HTML, CSS and JavaScript from `server/static/`, no build step). It
sends images to the inference routes, parses their safetensors answers and draws the PCA colouring
of the patch features, the prototype map and the correspondences. Assets are served from /static/."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

from cotap.core.wire import ErrorCode
from cotap.server.errors import ServerError

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page talks only to this server; nothing else may load or run.
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}

router = APIRouter(tags=["web"], include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def index() -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:  # a fixed list: no path ever reaches the file system unchecked
        raise ServerError(ErrorCode.NOT_FOUND, f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)
