"""One access-log line per proxied request, JSON (default) or text, on logger ``keygate.access``.

Never a token: the path is logged without its query string's values that look like keys, and
no header value is logged at all.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from urllib.parse import parse_qsl, quote

from aiohttp import web

from .config import Config
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


def mask_query(raw_query: str, prefix: str) -> str:
    """The query with every value (or name) that looks like a key replaced by ``***``."""
    if prefix + "_" not in raw_query and "%5F" not in raw_query.upper():
        return raw_query
    out = []
    for name, value in parse_qsl(raw_query, keep_blank_values=True):
        if looks_like_token(name, prefix) or looks_like_token(value.removeprefix("Bearer "), prefix):
            out.append(f"{quote(name) if not looks_like_token(name, prefix) else '***'}=***")
        else:
            out.append(f"{quote(name)}={quote(value)}")
    return "&".join(out)


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
