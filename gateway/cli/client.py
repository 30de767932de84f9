"""The admin API client every remote ``keygate`` command is handed, and the errors that end a
command.

It uses the stdlib ``urllib`` so the CLI starts fast (no aiohttp/redis import for a
``keys list``). Two deliberate choices there: environment proxies are ignored and redirects are
refused, because either would hand the operator token to a host the user did not name.
"""

from __future__ import annotations

import email.utils
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_TIMEOUT = 10.0


class CliError(Exception):
    """Ends the command with exit 1 and this one-line message on stderr."""


class UsageError(Exception):
    """Bad usage found after parsing: exit 2 with this message."""


class ApiError(CliError):
    """The admin API answered an error; ``body`` is its JSON body as received (``--json``
    prints it on stdout)."""

    def __init__(self, status: int, code: str, message: str, body: bytes = b"") -> None:
        super().__init__(f"{message} ({code})")
        self.status, self.code, self.message, self.body = status, code, message, body


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        raise CliError(f"the admin API answered with a redirect to {newurl}; refusing to follow "
                       "it with the operator token")


class AdminClient:
    """Blocking JSON client for ``/admin/v1``; raises ``ApiError`` / ``CliError``."""

    def __init__(self, base_url: str, token: str | None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        # A token file saved with CRLF leaves '\r' in "$(cat file)": surrounding blanks are
        # never part of a token. (The server strips them too.)
        self._token = token.strip() if token else token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
        self.last_body = b""   # the raw JSON of the last successful answer (for --json)
        # the admin API's clock as its last answer's Date read it (Unix seconds; None if
        # it sent none): a deadline "N from now" is counted from it, not from this machine's
        self.server_time: float | None = None

    def request(self, method: str, path: str, body: dict | None = None,
                query: dict[str, str] | None = None) -> Any:
        url = self.base_url + "/admin/v1" + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json", "User-Agent": "keygate-cli"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._token:
            if not all(" " <= c <= "~" for c in self._token):
                # http.client would raise ValueError("Invalid header value 'Bearer <token>'"):
                # a traceback or message holding the operator token. Say what is wrong, not what.
                raise CliError("KEYGATE_ADMIN_TOKEN holds characters that cannot be sent in an "
                               "HTTP header (line breaks, control or non-ASCII characters)")
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                self.server_time = _http_date(resp.headers.get("Date"))
                return self._decode(resp.status, resp.read())
        except urllib.error.HTTPError as exc:
            raise self._api_error(exc.code, exc.read()) from None
        except (TimeoutError, socket.timeout):
            raise CliError(f"the admin API at {self.base_url} did not answer within "
                           f"{self.timeout:g}s") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise CliError(f"the admin API at {self.base_url} did not answer within "
                               f"{self.timeout:g}s") from None
            raise CliError(f"cannot reach the admin API at {self.base_url}: {reason}") from None
        except (ConnectionError, OSError) as exc:
            raise CliError(f"cannot reach the admin API at {self.base_url}: {exc}") from None

    def _decode(self, status: int, raw: bytes) -> Any:
        self.last_body = raw
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            raise CliError(f"the admin API at {self.base_url} answered {status} with a body "
                           "that is not JSON") from None

    def _api_error(self, status: int, raw: bytes) -> ApiError:
        try:
            error = json.loads(raw)["error"]
            return ApiError(status, str(error["code"]), str(error["message"]), raw)
        except (ValueError, KeyError, TypeError):
            return ApiError(status, f"http_{status}",
                            f"the admin API at {self.base_url} answered HTTP {status}")


def _http_date(value: str | None) -> float | None:
    """A ``Date`` header's instant (Unix seconds), or None if absent or not a date."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def seg(value: str) -> str:
    """One path segment of an admin URL: an id with '/' or '?' in it stays one segment."""
    return urllib.parse.quote(value, safe="")
