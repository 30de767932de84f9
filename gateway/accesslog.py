"""One access-log line per proxied request, JSON (default) or text, on logger ``keygate.access``.

Never a token: the path is logged without its query string's values that look like keys, and
no header value is logged at all.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from aiohttp import web

from .config import Config
from .routes import _token_re, query_has_token
from .tokens import looks_like_token

logger = logging.getLogger("keygate.access")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (it may be swapped after start-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_SEPARATORS = re.compile(r"([&;])")


def mask_query(raw_query: str, prefix: str) -> str:
    """The query with every parameter that holds a key replaced by ``name=***``.

    "Holds a key" is exactly what the pipeline refuses as ``key_in_url``
    (:func:`gateway.routes.query_has_token`): percent- or double-encoded, inside a larger
    value, in a name, behind ``;`` separators. Parameters without a key are logged as sent."""
    if not query_has_token(raw_query, prefix):
        return raw_query
    parts = _SEPARATORS.split(raw_query)
    for i in range(0, len(parts), 2):
        if query_has_token(parts[i], prefix):
            name = parts[i].partition("=")[0]
            parts[i] = "***=***" if query_has_token(name, prefix) else f"{name}=***"
    return "".join(parts)


def mask_path(path: str, prefix: str) -> str:
    """The path with every key in it replaced by ``***`` (SPEC forwards keys in paths; the log
    never holds one). A key hidden by percent-encoding withholds the whole path."""
    if prefix + "_" not in path and "%" not in path:
        return path
    path = _token_re(prefix).sub(
        lambda m: "***" if looks_like_token(m.group(0), prefix) else m.group(0), path)
    if "%" in path and query_has_token(path, prefix):
        return "/***"
    return path


LOG_FIELDS = ("request_id", "method", "path", "status", "duration_ms", "actor", "client")
"""Fields a log call may pass with ``extra=`` that the JSON format writes as their own keys."""


class JsonFormatter(logging.Formatter):
    """Application log records as one JSON object per line, like the JSON access log:
    ``{"time", "level", "logger", "message", ...}`` plus ``exception`` (the traceback as one
    string) and any of ``LOG_FIELDS`` the call passed. Used when ``server.access_log: json``,
    so a log pipeline parses every line keygate writes the same way."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        for name in LOG_FIELDS:
            if name in record.__dict__:
                entry[name] = record.__dict__[name]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


def mask_target(raw_path: str, prefix: str) -> str:
    """A raw request target (path and query) fit for a log: keys masked in both."""
    path, _, query = raw_path.partition("?")
    path = mask_path(path, prefix)
    return f"{path}?{mask_query(query, prefix)}" if query else path


class AccessLog:
    def __init__(self, config: Config) -> None:
        self.prefix = config.keys.prefix
        self.text = config.server.access_log == "text"
        if not logger.handlers:  # one bare line per request, not wrapped in the app's format
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
            logger.setLevel(logging.INFO)

    def write(self, request: web.BaseRequest, response: web.StreamResponse, outcome,
              request_id: str, elapsed: float) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        path, _, query = request.raw_path.partition("?")
        path = mask_path(path, self.prefix)
        if query:
            path = f"{path}?{mask_query(query, self.prefix)}"
        bytes_out = response.body_length if response.prepared else len(getattr(response, "body", b"") or b"")
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "request_id": request_id, "method": request.method, "path": path,
            "status": response.status, "duration_ms": round(elapsed * 1000, 3),
            "workspace": outcome.workspace, "key_id": outcome.key_id, "route": outcome.route,
            "upstream": outcome.upstream, "error": outcome.code,
            "bytes_in": request.content_length or 0, "bytes_out": bytes_out,
            "client": request.remote,
        }
        if self.text:
            logger.info("%s %s %s %d %.1fms ws=%s key=%s rid=%s", record["client"],
                        record["method"], path, record["status"], record["duration_ms"],
                        record["workspace"] or "-", record["key_id"] or "-", request_id)
        else:
            logger.info(json.dumps(record, separators=(",", ":")))
