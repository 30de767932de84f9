"""The web console's static files at ``/console/``, read once from the package."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from ..proxying.server import ANSWER_HEADERS

CONSOLE_FILES = {"index.html": "text/html", "app.js": "text/javascript",
                 "app.css": "text/css", "favicon.svg": "image/svg+xml"}
CONSOLE_HEADERS = {
    # Everything from this origin only; no inline script or style, no plugins, no framing,
    # no <base> rewriting, forms post nowhere (the page sends JSON with fetch). Trusted Types
    # with no policy: the browser refuses any HTML written by script (innerHTML and the like),
    # so data the API returns can only ever become text, whatever code is added later.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
                               "require-trusted-types-for 'script'; trusted-types 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # the page is where tokens are typed and shown: no cache keeps a copy of it (no-cache lets
    # one store it and only asks it to check again), and a browser keeps no-store pages out of
    # its back/forward cache
    "Cache-Control": "no-store",
}
_BODIES = web.AppKey("console_files", dict)
"""File name → its bytes, read when the routes are added."""


def add_console_routes(app: web.Application) -> None:
    """``GET /console/`` and its few files (no directory listing: no path from the request
    ever reaches the file system)."""
    folder = resources.files(__package__) / "console"
    app[_BODIES] = {name: (folder / name).read_bytes() for name in CONSOLE_FILES}
    app.on_response_prepare.append(_console_headers)
    # and the answers made outside the app, to requests the listener's HTTP parser refused (a
    # console URL over 8 KiB, large cookies for the host): their path is not known, so every
    # one is the console's, for the admin API's JSON harmless (AdminRunner)
    app[ANSWER_HEADERS] = CONSOLE_HEADERS
    app.router.add_get("/console", to_console)
    app.router.add_get("/console/", serve_file)
    for name in CONSOLE_FILES:
        if name != "index.html":
            app.router.add_get("/console/" + name, serve_file)


async def _console_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer under /console/ is the console's, a 404 or 405 too (a mistyped asset, a
    probe, a POST): the same no-sniffing, no-framing, no-referrer headers as its files. The
    admin API's JSON keeps its own."""
    if request.path == "/console" or request.path.startswith("/console/"):
        for name, value in CONSOLE_HEADERS.items():
            response.headers.setdefault(name, value)


async def to_console(request: web.Request) -> web.Response:
    """``/console`` → ``console/``, relative (to ``/console/`` here): behind a reverse proxy
    that mounts the admin listener under a path, ``/kg/console`` stays under it (an absolute
    ``/console/`` sent the browser to the host's own /console/, out of the mount)."""
    raise web.HTTPPermanentRedirect("console/", headers=CONSOLE_HEADERS)


async def serve_file(request: web.Request) -> web.Response:
    name = request.path.removeprefix("/console/") or "index.html"  # a registered path
    return web.Response(body=request.app[_BODIES][name], headers=CONSOLE_HEADERS,
                        content_type=CONSOLE_FILES[name],
                        charset=None if name == "favicon.svg" else "utf-8")
