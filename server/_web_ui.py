"""The web UI: a page and a small hand-written script (server/ui/, package data)
that draw everything in the browser from the HTTP API (server/_http_api.py). No
build step and no Node.js: the files are served as they are committed."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

# The UI's files, by the name they are served under (/ui/<name>).
_FILES = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html"}


def _read(name: str) -> bytes:
    return resources.files("tideflow.server").joinpath("ui", name).read_bytes()


def add_ui_routes(app: web.Application) -> None:
    """Serve the UI at ``/`` (one page; the part after ``#`` picks the view)."""

    async def index(request: web.Request) -> web.Response:
        return _file("index.html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _FILES:
            raise web.HTTPNotFound(text=f"no UI file {name!r}")
        return _file(name)

    app.router.add_get("/", index)
    app.router.add_get("/ui/{name}", asset)


def _file(name: str) -> web.Response:
    # Read on each request: the files are small, and an edited file shows at once.
    return web.Response(
        body=_read(name),
        content_type=_FILES[name],
        charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )
