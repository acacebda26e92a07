"""The web dashboard (``/ui/``) and the API's documentation pages (``/docs``, ``/redoc``), from files shipped in
the package: nothing is fetched from a CDN, so both work on a cluster without internet.

The dashboard is static files (plain JavaScript modules, no build step) that log in with ``POST
/api/v1/auth/login`` and read the JSON API with the user's own token: the pages themselves hold no data and need
no login, every datum comes through the API's rights checks. Every page answers with a strict
Content-Security-Policy (scripts from files of this server only, no inline script), ``nosniff`` and no framing.
See docs/dashboard.md.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(str(importlib.resources.files(__package__) / "static"))

UI_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
          "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Swagger UI and ReDoc set styles at run time (ReDoc's styled-components writes <style> elements, its search runs in
# a blob: worker): their pages allow inline styles, never inline scripts
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; font-src 'self' data:; worker-src blob:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                    "Cross-Origin-Opener-Policy": "same-origin"}
# Vendored libraries live in versioned directories (vendor/uplot-1.6.32/): their bytes never change under a name.
# Our own files keep their names across releases: revalidated each time (a 304 when unchanged, via the ETag).
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"


def _secure(response: Response, csp: str = UI_CSP) -> Response:
    response.headers["Content-Security-Policy"] = csp
    response.headers.update(SECURITY_HEADERS)
    return response


class _Files(StaticFiles):
    """Static files with the dashboard's caching and security headers; any other path without a file extension
    under /ui/ is a view of the single-page application (``/ui/works/<uid>``): index.html."""

    def __init__(self, directory: Path, csp: str, spa: bool) -> None:
        super().__init__(directory=directory, follow_symlink=False)
        self.csp = csp
        self.spa = spa

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            response = await super().get_response(path, scope)
        except HTTPException as exc:
            last = path.rsplit("/", 1)[-1]
            if not (self.spa and exc.status_code == 404 and (last == "." or "." not in last)):  # "." is /ui/
                raise
            response = await super().get_response("index.html", scope)
        if response.status_code == 404:
            return _secure(response, self.csp)
        immutable = path.startswith("vendor/") and response.status_code in (200, 304)
        response.headers["Cache-Control"] = IMMUTABLE if immutable else REVALIDATE
        return _secure(response, self.csp)


def _offline_assets() -> Path:
    """Swagger UI's and ReDoc's files, as the fastapi-offline package ships them (see docs/dashboard.md)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


_SWAGGER_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} — API (Swagger UI)</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="/ui/img/favicon.svg">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="swagger-ui" data-openapi="{openapi}"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/ui/js/swagger-init.js"></script></body></html>
"""

_REDOC_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} — API (ReDoc)</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="/ui/img/favicon.svg"></head>
<body><redoc spec-url="{openapi}"></redoc>
<script src="/docs/assets/redoc.standalone.js"></script></body></html>
"""


def install(app: FastAPI) -> None:
    """Serve the dashboard at ``/ui/`` (``/`` redirects there) and the documentation at ``/docs`` and ``/redoc``
    from local files. The app must be created with ``docs_url=None, redoc_url=None`` (FastAPI's own pages load
    their scripts from a CDN)."""
    openapi = app.openapi_url or "/openapi.json"
    title = app.title

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return _secure(RedirectResponse("/ui/", status_code=307))

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> Response:
        return _secure(RedirectResponse("/ui/", status_code=307))

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> Response:
        html = _SWAGGER_HTML.format(title=title, openapi=openapi)
        return _secure(HTMLResponse(html, headers={"Cache-Control": REVALIDATE}), DOCS_CSP)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> Response:
        html = _REDOC_HTML.format(title=title, openapi=openapi)
        return _secure(HTMLResponse(html, headers={"Cache-Control": REVALIDATE}), DOCS_CSP)

    app.mount("/ui", _Files(STATIC, UI_CSP, spa=True), name="ui")
    app.mount("/docs/assets", _Files(_offline_assets(), DOCS_CSP, spa=False), name="docs-assets")
