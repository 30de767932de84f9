"""The admin API client every remote ``keygate`` command is handed, and the errors that end a
command.

It uses the stdlib ``urllib`` so the CLI starts fast (no aiohttp/redis import for a
``keys list``). Two deliberate choices there: environment proxies are ignored and redirects are
refused, because either would hand the operator token to a host the user did not name.
"""

from __future__ import annotations

import email.utils
import functools
import http.client
import io
import json
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ..models import UNSAFE_TEXT_CLASS

DEFAULT_TIMEOUT = 10.0


class CliError(Exception):
    """Ends the command with exit 1 and this one-line message on stderr."""


class UsageError(Exception):
    """Bad usage found after parsing: exit 2 with this message."""


# What to do when nothing answers: the URL came from --admin-url, --config,
# KEYGATE_ADMIN_URL or the default, and the gateway may simply not be running.
_UNREACHABLE = (" (is keygate serve running there? Name its admin listener with --admin-url, "
                "--config or KEYGATE_ADMIN_URL)")


# what the admin API refuses in text: controls (terminal escape sequences), line separators,
# and the bidi marks, overrides and isolates that make a line read other than it is
_CONTROLS = re.compile(f"[{UNSAFE_TEXT_CLASS}]")


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xff else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with the characters the admin API refuses in text (C0, DEL, C1, U+2028/9, bidi
    controls) shown as ``\\xNN`` / ``\\uNNNN``."""
    return _CONTROLS.sub(lambda m: _escaped(m.group()), text)


class ApiError(CliError):
    """The admin API answered an error; ``body`` is its JSON body as received (``--json``
    prints it on stdout)."""

    def __init__(self, status: int, code: str, message: str, body: bytes = b"") -> None:
        # shown on a terminal: what an admin URL that is not keygate's sent (a typo, a
        # hostile host) must not retitle it, clear it or write to its clipboard
        code, message = printable(code), printable(message)
        super().__init__(f"{message} ({code})")
        self.status, self.code, self.message, self.body = status, code, message, body
        self.invalid_token = False   # 401 for a token sent that is not the one expected
        self.retry_after = ""        # a refusal's Retry-After, as sent


class _CertificateRefused(Exception):
    """The listener's certificate was refused in the TLS handshake (nothing was sent)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        raise CliError(f"the admin API answered with a redirect to {newurl}; refusing to follow "
                       "it with the operator token")


_PEM_END = "-----END CERTIFICATE-----"


def listener_contexts(cert_file: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The TLS contexts for an admin listener whose ``admin.tls.cert_file`` the CLI read from
    ``--config``: (the certificate in that file, pinned: trusted as it is, whatever its name or
    issuer, as the listener serving it is the one the file configures; the system's CAs and
    the file's whole chain, the name checked as usual). The second is for a listener still
    serving the certificate a renewal replaced in the file (until keygate reloads)."""
    try:
        with open(cert_file, encoding="ascii") as fh:
            pem = fh.read()
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read admin.tls.cert_file ({cert_file}): "
                       f"{getattr(exc, 'strerror', None) or exc}") from None
    end = pem.find(_PEM_END)
    if end < 0:
        raise CliError(f"admin.tls.cert_file ({cert_file}) holds no PEM certificate")
    pinned = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pinned.check_hostname = False  # the exact certificate is trusted, not a name
    pinned.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # ...even one no CA of ours signed
    chain = ssl.create_default_context()
    chain.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    try:
        pinned.load_verify_locations(cadata=pem[:end + len(_PEM_END)])
        chain.load_verify_locations(cadata=pem)
    except ssl.SSLError as exc:
        raise CliError(f"admin.tls.cert_file ({cert_file}) holds no usable certificate: "
                       f"{exc.reason or exc}") from None
    return pinned, chain


class _DeadlineReader(io.RawIOBase):
    """An answer's socket, read against the request's deadline: urllib's timeout bounds each
    socket read alone, so an answer trickling in a byte at a time (a stalled proxy) never ran
    out of it. Before each read the socket's timeout is set to the time left."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._raw, self._sock, self._deadline = raw, sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the answer did not come within the time given")
        self._sock.settimeout(left)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """An answer whose status line, headers and body are all read by the deadline."""

    def __init__(self, sock: socket.socket, *args: Any, deadline: float, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        # nothing is read yet: the buffer is empty, and detach() keeps the socket's file open
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline))


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, deadline: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, deadline: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline)


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_HTTPConnection, deadline=req.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext | None) -> None:
        super().__init__(context=context)
        self._tls = context

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_HTTPSConnection, deadline=req.deadline), req,
                            context=self._tls)


class AdminClient:
    """Blocking JSON client for ``/admin/v1``; raises ``ApiError`` / ``CliError``.

    ``cert_file``: the ``admin.tls.cert_file`` of the config the URL came from (``--config``),
    whose certificate the listener is trusted with (``listener_contexts``)."""

    def __init__(self, base_url: str, token: str | None, timeout: float = DEFAULT_TIMEOUT,
                 cert_file: str | None = None,
                 token_source: str = "KEYGATE_ADMIN_TOKEN") -> None:
        self.base_url = base_url.rstrip("/")
        # A token file saved with CRLF leaves '\r' in "$(cat file)": surrounding blanks are
        # never part of a token. (The server strips them too.)
        self._token = token.strip() if token else token
        self._token_source = token_source  # the variable it came from (config's token_env)
        self.timeout = timeout
        self.last_method = "GET"  # of the last request sent (a write's 503 says more)
        self.last_path = ""  # and its URL's path
        self._cert_file = cert_file
        self._openers = [self._opener_for(context) for context in (
            listener_contexts(cert_file) if cert_file else (None,))]
        self.last_body = b""   # the raw JSON of the last successful answer (for --json)
        # the admin API's clock as its last answer's Date read it (Unix seconds; None if
        # it sent none): a deadline "N from now" is counted from it, not from this machine's
        self.server_time: float | None = None

    @staticmethod
    def _opener_for(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
        handlers: list[Any] = [urllib.request.ProxyHandler({}), _NoRedirect(), _HTTPHandler(),
                               _HTTPSHandler(context)]
        return urllib.request.build_opener(*handlers)

    def request(self, method: str, path: str, body: dict | None = None,
                query: dict[str, str] | None = None) -> dict:
        url = self.base_url + "/admin/v1" + path
        self.last_method, self.last_path = method, urllib.parse.urlsplit(url).path
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
                raise CliError(f"{self._token_source} holds characters that cannot be sent in "
                               "an HTTP header (line breaks, control or non-ASCII characters)")
            headers["Authorization"] = f"Bearer {self._token}"
        # --timeout bounds the whole exchange (connect, send, the answer to its last byte)
        deadline = time.monotonic() + self.timeout
        for opener in self._openers:
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            req.deadline = deadline  # type: ignore[attr-defined]
            try:
                return self._send(opener, req)
            except _CertificateRefused:
                continue  # refused in the handshake, nothing sent: the next context may try
        # (only with cert_file: one context alone raises no _CertificateRefused)
        raise CliError(f"the admin API at {self.base_url} does not serve the certificate "
                       f"admin.tls.cert_file names ({self._cert_file}), nor one the system's "
                       "CAs or that file's chain vouch for under its name; if the file was "
                       "renewed, reload keygate (SIGHUP) first, or name the listener with "
                       "--admin-url")

    def _send(self, opener: urllib.request.OpenerDirector, req: urllib.request.Request) -> Any:
        try:
            failed, status, headers, raw = self._exchange(opener, req)
        except (TimeoutError, socket.timeout):
            raise CliError(f"the admin API at {self.base_url} did not answer within "
                           f"{self.timeout:g}s{_unanswered(req)}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise CliError(f"the admin API at {self.base_url} did not answer within "
                               f"{self.timeout:g}s{_unanswered(req)}") from None
            if isinstance(reason, ssl.SSLCertVerificationError) and len(self._openers) > 1:
                raise _CertificateRefused from None
            raise CliError(f"cannot reach the admin API at {self.base_url}: {reason}"
                           f"{_UNREACHABLE}") from None
        except http.client.HTTPException as exc:
            # not HTTP (another service's greeting: an SSH port), or an answer cut short (a
            # gateway that stopped, a proxy that cut it): a write may have been made
            said = str(exc) if isinstance(exc, http.client.RemoteDisconnected) else \
                f"{type(exc).__name__}: {exc}"
            raise CliError(f"the admin API at {self.base_url} did not send a whole HTTP answer "
                           f"({printable(said.strip())[:120]}){_unanswered(req)}") from None
        except (ConnectionError, OSError) as exc:
            raise CliError(f"cannot reach the admin API at {self.base_url}: {exc}"
                           f"{_UNREACHABLE}") from None
        except ValueError as exc:
            # a URL urllib cannot send (admin_url refuses those it knows of): a UnicodeError
            # from the idna codec looking up a host, a UnicodeEncodeError in the request line
            # or Host header, http.client's InvalidURL; nothing was sent
            raise CliError(f"cannot reach the admin API at {self.base_url}: "
                           f"{printable(str(exc))[:200]}{_UNREACHABLE}") from None
        if failed:
            error = self._api_error(status, raw)
            error.invalid_token = 'error="invalid_token"' in headers.get(
                "WWW-Authenticate", "")
            error.retry_after = headers.get("Retry-After", "").strip()
            raise error
        self.server_time = _http_date(headers.get("Date"))
        return self._decode(status, raw)

    @staticmethod
    def _exchange(opener: urllib.request.OpenerDirector,
                  req: urllib.request.Request) -> tuple[bool, int, Any, bytes]:
        """(an error status?, the status, the headers, the whole body) of ``req``."""
        left = max(req.deadline - time.monotonic(), 0.001)  # type: ignore[attr-defined]
        try:
            with opener.open(req, timeout=left) as resp:
                return False, resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:  # its body is read by the deadline too
            with exc:
                return True, exc.code, exc.headers, exc.read()

    def listing(self, path: str, query: dict[str, str] | None = None) -> list[dict]:
        """The ``items`` of a ``GET`` listing (``{"items": [{...}, ...]}``), checked: an
        answer of another shape (a JSON service that is not keygate) is refused as one that
        is not JSON is."""
        items = self.request("GET", path, query=query).get("items")
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise CliError(f"the admin API at {self.base_url} answered 200 with JSON that is "
                           "not a listing (an object whose items are a list of objects)")
        return items

    def _decode(self, status: int, raw: bytes) -> dict:
        self.last_body = raw
        try:
            answer = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):  # nested deeper than Python's stack: not ours
            raise CliError(f"the admin API at {self.base_url} answered {status} with a body "
                           "that is not JSON") from None
        if not isinstance(answer, dict):  # every answer of the admin API is an object
            raise CliError(f"the admin API at {self.base_url} answered {status} with JSON "
                           "that is not an object, which the admin API always answers")
        return answer

    def _api_error(self, status: int, raw: bytes) -> ApiError:
        try:
            error = json.loads(raw)["error"]
            return ApiError(status, str(error["code"]), str(error["message"]), raw)
        except (ValueError, KeyError, TypeError, RecursionError):
            return ApiError(status, f"http_{status}",
                            f"the admin API at {self.base_url} answered HTTP {status}")


_KEY_MINTING = re.compile(r"/admin/v1/workspaces/([^/?]+)/keys(?:/[^/?]+/rotate)?$")


def key_minting(path: str) -> bool:
    """Whether a POST to ``path`` (a URL's path) is a key create or rotation."""
    return _KEY_MINTING.search(path) is not None


def _unanswered(req: urllib.request.Request) -> str:
    """What a write whose answer did not come in time may have done, and what to do."""
    if req.get_method() in ("GET", "HEAD"):
        return ""
    path = urllib.parse.urlsplit(req.full_url).path
    if req.get_method() == "POST" and (m := _KEY_MINTING.search(path)):
        ws = urllib.parse.unquote(m.group(1))
        return ("; a key create or rotation whose answer the gateway could not deliver is "
                f"taken back: check with `keygate keys list --workspace {ws}` (revoke a key "
                "whose token you did not get), then run the command again (with a longer "
                "--timeout)")
    return ("; the change may have been made or not: run the same command again (it is safe "
            "to), or read it back")


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
