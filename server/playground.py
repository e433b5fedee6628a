"""The playground: a browser page at `/` to try the model, shipped inside the package (server/static/playground:
plain ES modules and CSS, no CDN, no build step).

The page is a client like any other: it calls the public routes (the Workers AI run route,
/v1/chat/completions, /v1/models, /health, /limits, /openapi.json) and nothing else. It is served with a
Content-Security-Policy that allows only this origin's scripts, styles and connections (images also from
data: and blob: URLs, for the previews of uploads), so that model output rendered in it can never load or
run anything even if the renderer had a bug.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from server.errors import NO_ROUTE, ApiError

STATIC = Path(__file__).parent / "static" / "playground"
PREFIX = "/playground/"             # the assets; security.OPEN_PREFIXES lists it
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
CSP = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=HEADERS)


def install(app: FastAPI) -> None:
    # the files are listed once: a name in a URL is looked up, never joined to a path
    assets = {p.name: p for p in STATIC.iterdir() if p.suffix in _TYPES and p.name != "index.html"}
    if not (STATIC / "index.html").is_file():
        raise RuntimeError(f"the playground's files are missing from {STATIC}: a broken install")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return _file(STATIC / "index.html")

    @app.get(PREFIX + "{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in assets:
            raise ApiError(404, NO_ROUTE, "No route for that URI")
        return _file(assets[name])
