"""One access-log line per proxied request, JSON (default) or text, on stderr.

Never a token: the path is logged without its query string's values that look like keys, and
no header value is logged at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from json.encoder import encode_basestring_ascii as _escape
import logging
import os
import queue
import re
import stat
import sys
import threading
import time
from typing import Callable

from aiohttp import web

from .config import Config
from .percent import unquote_latin1, unquote_utf8
from .tokens import ID_LEN, SECRET_LEN, alternation as _alternation, marked

_SEPARATORS = re.compile(r"([&;])")
_KEY_LIKE: dict["Prefixes", re.Pattern[str]] = {}

Prefixes = "str | tuple[str, ...]"
"""The key prefixes a log masks: one (``keys.prefix``, as long as no reload changed it), or
every one this process has used since it started (``Pipeline.key_prefixes``): a key of a
prefix a reload replaced still opens its key (under the new prefix, its checksum recomputed;
on a replica not yet reloaded, as it is). The functions below take either; one prefix costs
what it always did, several are one regex alternation."""


def _key_like(prefix: "Prefixes") -> re.Pattern[str]:
    """``<prefix>_<env>_`` then a key id and any of a secret (and as much of a checksum as
    follows): a key whether its checksum verifies or not. One mistyped in its checksum still
    holds the secret whole, and the checksum is computed from the rest; one cut short holds
    part of it (20 of its 32 characters leave 12 to guess), so the log masks both like a
    valid one. The key id alone (the public ``kg_live_<id>`` prefix) is no secret."""
    pattern = _KEY_LIKE.get(prefix)
    if pattern is None:
        pattern = _KEY_LIKE[prefix] = re.compile(
            r"%s_[0-9A-Za-z-]+_[0-9A-Za-z]{%d,%d}" % (_alternation(prefix), ID_LEN + 1,
                                                     ID_LEN + SECRET_LEN + 6))
    return pattern


def holds_key(text: str, prefix: "Prefixes") -> bool:
    """Whether ``text`` (a query, a part of one, a path) holds a key as ``_key_like`` reads one,
    percent-decoded (``+`` as space) up to three times, as the pipeline's ``key_in_url`` check
    (:func:`gateway.routes.query_has_token`) decodes: every query it refuses is masked too.

    Broad on purpose, for what a log withholds: any environment label (a key of an
    environment a reload has since removed, or another replica's during a rolling change,
    is still a secret) and no boundary before the prefix (a key glued to a parameter's text
    is masked too). A false match only hides some text; :func:`holds_token` is the strict
    reading, for refusing text (the admin API's fields)."""
    return _holds(text, prefix, _key_like(prefix))


_TOKEN_LIKE: dict[tuple["Prefixes", tuple[str, ...]], re.Pattern[str]] = {}


def _token_like(prefix: "Prefixes", environments: tuple[str, ...]) -> re.Pattern[str]:
    """``_key_like`` as a token is written: the prefix at the start of a word (no ASCII letter
    or digit before it; a ``_`` may be, as in ``CI_KEY_<token>``), then one of
    ``environments``. ``pkg_sha256_<hex digest>`` is none."""
    pattern = _TOKEN_LIKE.get((prefix, environments))
    if pattern is None:
        least = ID_LEN + SECRET_LEN
        pattern = _TOKEN_LIKE[prefix, environments] = re.compile(
            r"(?<![0-9A-Za-z])%s_(?:%s)_[0-9A-Za-z]{%d,%d}" % (
                _alternation(prefix), "|".join(map(re.escape, environments)), least, least + 6))
    return pattern


def holds_token(text: str, prefix: "Prefixes", environments: tuple[str, ...]) -> bool:
    """Whether ``text`` holds what can only be a key's token of this gateway: the prefix at
    a word's start, one of ``environments``, and a key id and a secret's worth of base62 (the
    checksum may be mistyped or cut short: the secret is whole), percent-decoded as
    :func:`holds_key` decodes. What the admin API refuses to store (``refuse_tokens``), where
    a false match refuses legitimate data: a digest label such as ``pkg_sha256_<hex>``
    matched :func:`holds_key`, which stays the log's broader reading."""
    return _holds(text, prefix, _token_like(prefix, environments))


def _holds(text: str, prefix: "Prefixes", pattern: re.Pattern[str]) -> bool:
    if isinstance(prefix, str):  # one prefix (no reload changed it): as it always cost
        marker = prefix + "_"
        return holds_decoded(text, lambda t: marker in t and pattern.search(t) is not None)
    return holds_decoded(text, lambda t: marked(t, prefix) and pattern.search(t) is not None)


DECODINGS = 3  # percent-decodings a log's masking looks through (a URL encoded three times)


def holds_decoded(text: str, found: Callable[[str], bool], *, plus_as_space: bool = True,
                  decode: Callable[[str], str] = unquote_latin1) -> bool:
    """Whether ``found`` holds for ``text`` or for one of its ``DECODINGS`` successive
    percent-decodings (``decode``; with ``plus_as_space``, a ``+`` read as a space first, as
    a query's form encoding): a secret a reader or a script gets back by decoding the URL
    once, twice or three times is masked, whoever masks it (the access log's keys, the admin
    log's operator token). The default decoding reads each escape as one latin-1 character:
    enough for ASCII patterns, and urllib's raises per '%' without hex digits."""
    for _ in range(DECODINGS + 1):
        if found(text):
            return True
        if "%" not in text and (not plus_as_space or "+" not in text):
            return False
        before = text
        if plus_as_space and "+" in text:
            text = text.replace("+", " ")
        text = decode(text)
        if text == before:  # nothing decoded: no further round would decode anything
            return False
    return False


def mask_query(raw_query: str, prefix: "Prefixes") -> str:
    """The query with every parameter that holds a key replaced by ``name=***``.

    "Holds a key" covers what the pipeline refuses as ``key_in_url``
    (:func:`gateway.routes.query_has_token`): percent- or double-encoded, inside a larger
    value, in a name, behind ``;`` separators; and a key whose checksum fails (it still holds
    the secret). Parameters without a key are logged as sent."""
    if not holds_key(raw_query, prefix):
        return raw_query
    parts = _SEPARATORS.split(raw_query)
    for i in range(0, len(parts), 2):
        if holds_key(parts[i], prefix):
            name = parts[i].partition("=")[0]
            parts[i] = "***=***" if holds_key(name, prefix) else f"{name}=***"
    return "".join(parts)


def mask_path(path: str, prefix: "Prefixes") -> str:
    """The path with every key in it replaced by ``***`` (SPEC forwards keys in paths; the log
    never holds one), its checksum verified or not. A key hidden by percent-encoding withholds
    the whole path."""
    if "%" not in path and (prefix + "_" not in path if isinstance(prefix, str)
                            else not marked(path, prefix)):
        return path
    path = _key_like(prefix).sub("***", path)
    if "%" in path and holds_key(path, prefix):
        return "/***"
    return path


LOG_FIELDS = ("request_id", "method", "path", "status", "duration_ms", "actor", "client")
"""Fields a log call may pass with ``extra=`` that the JSON format writes as their own keys."""


class JsonFormatter(logging.Formatter):
    """Application log records as one JSON object per line, like the JSON access log:
    ``{"time", "level", "logger", "message", ...}`` plus ``exception`` (the traceback as one
    string) and any of ``LOG_FIELDS`` the call passed. Used when ``server.access_log: json``,
    so a log pipeline parses every line keygate writes the same way. ``prefix`` begins every
    message (a worker's name under ``serve --workers N``, as in the text format)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": self.prefix + record.getMessage()}
        for name in LOG_FIELDS:
            if name in record.__dict__:
                entry[name] = record.__dict__[name]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


# Seconds a stop waits for the last lines to reach stderr: the access log's buffer when the
# listeners have closed (AccessLog.close), then the application log's queue at exit (the
# logging module's atexit, or a worker's own, calls BackgroundHandler.flush). Both count in
# the grace periods deploy/ gives a stop (tests/test_deploy.py adds them up).
ACCESS_LOG_CLOSE_TIMEOUT = 5.0
LOG_FLUSH_TIMEOUT = 2.0


class BackgroundHandler(logging.Handler):
    """Application log lines on stderr, written by a thread of their own, as the access log's
    are: a record is formatted where it is logged and queued (at most ``max_lines``); a stderr
    that is slow or full (a pipe nobody reads) holds only that thread, never the event loop.
    Lines past the bound, and lines stderr refused (closed, a full disk), are dropped, counted
    (``on_drop``, the gateway's metric) and said so, in one line, once stderr takes lines
    again.
    ``flush`` (``logging.shutdown`` at exit, a worker before it exits) waits, bounded, for the
    queue to be written."""

    def __init__(self, max_lines: int = 10_000) -> None:
        super().__init__()
        self.max_lines = max_lines
        self._pid = -1
        self._queue: "queue.Queue[str | None] | None" = None
        self._writer: threading.Thread | None = None
        self._dropped = 0
        self.on_drop: Callable[[], None] | None = None  # told of each dropped line, any thread
        # guards _dropped between emit and the writer. Not the handler's own lock: that one
        # is held around flush() by logging.shutdown at exit, and a writer waiting on it
        # could not write what flush() waits for
        self._drop_lock = threading.Lock()

    def _lines(self) -> "queue.Queue[str]":
        if self._pid != os.getpid():  # first use, or a forked worker: no writer thread yet
            self._dropped = 0
            self._drop_lock = threading.Lock()  # the parent's writer may have held it
            q = queue.Queue(self.max_lines)
            writer = threading.Thread(target=self._run, args=(q,), name="keygate-log",
                                      daemon=True)
            writer.start()
            # the pid last: another thread logging its first line meanwhile makes a queue of
            # its own (written by its own writer) rather than taking one not made yet
            self._queue, self._writer, self._pid = q, writer, os.getpid()
            return q
        return self._queue

    def end_writer(self, timeout: float = 2.0) -> None:
        """End the writer thread once it has written the lines queued (bounded); the next
        line logged starts another. For a process about to fork (``keygate serve --workers``):
        a thread running at ``fork()`` may hold a lock its copy in the child never releases
        (Python 3.12+ warns of it), and the supervisor forks after its first lines (the
        operator-token warning)."""
        q, writer = self._queue, self._writer
        if q is None or writer is None or self._pid != os.getpid():
            return
        try:
            q.put(None, timeout=timeout)  # after the lines queued: the writer's last item
        except queue.Full:
            return
        # the next line starts a new queue and writer: none is lost if this one is still
        # stuck on stderr when the wait ends (it goes on to the end of its own queue)
        self._pid, self._queue, self._writer = -1, None, None
        writer.join(timeout)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        try:
            self._lines().put_nowait(line)
        except queue.Full:
            with self._drop_lock:
                self._dropped += 1
            if (on_drop := self.on_drop) is not None:
                on_drop()

    def _run(self, q: "queue.Queue[str | None]") -> None:
        last = False
        while not last:
            lines = [q.get()]
            with contextlib.suppress(queue.Empty):
                while len(lines) < 1000:
                    lines.append(q.get_nowait())
            if None in lines:  # end_writer(): nothing is queued after it
                last = True
                lines.remove(None)
                q.task_done()
            with self._drop_lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                lines.append(self._dropped_notice(dropped))
            try:
                lost = _write_block(_encode(lines))
            except Exception:  # stderr itself failed: nowhere left to say it
                lost = len(lines)
            finally:
                for _ in range(len(lines) - (1 if dropped else 0)):
                    q.task_done()
            if lost:  # the last lines of the block (the notice of drops, if any, among them)
                lost = _records_lost(lines, lost) - (1 if dropped else 0)
                with self._drop_lock:  # said in the notice once stderr takes lines again
                    self._dropped += dropped + lost
                if lost and (on_drop := self.on_drop) is not None:
                    for _ in range(lost):
                        on_drop()

    def _dropped_notice(self, dropped: int) -> str:
        """The line saying ``dropped`` lines were lost, formatted as every other line (the
        handler's formatter: a JSON object with ``access_log: json``, the worker's name first
        under ``serve --workers``): a log pipeline parsing JSON must not reject exactly the
        line that says logs were lost."""
        record = logging.LogRecord("keygate", logging.WARNING, __file__, 0,
                                   "%d log lines were dropped: stderr did not keep up",
                                   (dropped,), None)
        try:
            return self.format(record) + "\n"
        except Exception:  # a formatter that fails: the count is still said
            return f"{dropped} log lines were dropped: stderr did not keep up\n"

    def flush(self, timeout: float = LOG_FLUSH_TIMEOUT) -> None:
        q = self._queue
        if q is None or self._pid != os.getpid():
            return
        deadline = time.monotonic() + timeout
        while q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)


def _records_lost(records: list[str], lines: int) -> int:
    """How many of ``records`` (the last ones) hold the last ``lines`` lines: a record with a
    traceback spans several."""
    gone = 0
    for record in reversed(records):
        if lines <= 0:
            break
        lines -= record.count("\n")
        gone += 1
    return gone


def mask_target(raw_path: str, prefix: "Prefixes") -> str:
    """A raw request target (path and query) fit for a log: keys masked in both."""
    path, _, query = raw_path.partition("?")
    path = mask_path(path, prefix)
    return f"{path}?{mask_query(query, prefix)}" if query else path


def mask_secret(target: str, secret: str) -> str:
    """``target`` (a request target, its keys masked already; or any text) with ``secret``
    (the operator token, without blanks around it) masked: where it shows as sent it is
    replaced by ``***``; a path or query that holds it only once percent-decoded is withheld
    whole (``/***``, ``***``). A script may paste the operator token into a URL
    (``?token=...``), to the admin listener or to the proxy one (a port's digit apart): the
    admin log, the access log and the spans mask it alike.

    Looked for in the whole target first (a token may hold a ``?``), and decoded both ways: a
    ``+`` is a plus in a path and a space in a query, and a reader decodes either way."""
    if not secret:
        return target
    target = target.replace(secret, "***")
    if "%" not in target and "+" not in target:  # nothing a decoding could reveal
        return target
    if not _holds_secret(target, secret):
        return target
    path, sep, query = target.partition("?")
    path_holds, query_holds = _holds_secret(path, secret), _holds_secret(query, secret)
    if not (path_holds or query_holds):  # across the '?': neither half is fit to write
        path_holds = query_holds = True
    return ("/***" if path_holds else path) + sep + ("***" if query_holds else query)


def _holds_secret(text: str, secret: str) -> bool:
    """Whether ``text`` holds ``secret`` percent-decoded up to three times (``holds_decoded``,
    as the log looks for keys: a script that encodes a URL twice sends ``%252F`` for ``/``),
    ``+`` read as a plus or as a space, each escape's bytes read as UTF-8 (a token may be any
    text)."""
    def found(decoded: str) -> bool:
        return secret in decoded
    if holds_decoded(text, found, plus_as_space=False, decode=unquote_utf8):
        return True
    # a '+' read as a space can reveal only a secret holding a space or a '+' (no escape
    # holds one: '+' is no hex digit): a usual token (URL-safe) is looked for once
    return (" " in secret or "+" in secret) and holds_decoded(text, found, decode=unquote_utf8)


TARGET_MAX = 2048  # bytes of a request target a log line holds, as written (JSON-escaped)
CUT = "...[cut]"   # ends a target cut to TARGET_MAX


def cut_target(target: str, size: Callable[[str], int] | None = None,
               limit: int = TARGET_MAX) -> str:
    """``target`` (masked already: a cut must never leave part of a key for masking to miss)
    cut so that ``size`` of it, ``CUT`` included, is at most ``limit``: a log line then
    always fits in one write of at most PIPE_BUF bytes, which workers sharing a stderr pipe
    never interleave (a request head, and so its target, may be 32 KiB). ``size``: its
    length as written; by default JSON-escaped, which is never shorter than its UTF-8."""
    if size is None:
        size = _json_size
    if size(target) <= limit:
        return target
    room = limit - len(CUT)
    if size(target[:room]) <= room:  # ASCII without escapes: what the request parser lets by
        return target[:room] + CUT
    low, high = 0, room - 1  # else the longest prefix that fits
    while low < high:
        mid = (low + high + 1) // 2
        if size(target[:mid]) <= room:
            low = mid
        else:
            high = mid - 1
    return target[:low] + CUT


def _json_size(text: str) -> int:
    return len(_escape(text)) - 2  # without its quotes


def _text_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def body_bytes_sent(response: web.StreamResponse) -> int:
    """The body bytes of a response keygate wrote before its log line: a streamed upstream
    answer (``gateway.proxying.forward`` counts its chunks as it writes them, a truncated
    one included), a head-only answer (HEAD, 204, 304), or a 408 written before the
    connection was closed (``gateway.proxying.server.answer_and_close``). Reads aiohttp's
    private ``_must_be_empty_body``, which ``prepare`` sets (as ``gateway.proxying.response``
    does)."""
    sent = getattr(response, "body_bytes_sent", None)
    if sent is not None:
        return sent
    if response._must_be_empty_body:  # set by prepare: HEAD, 1xx, 204, 304
        return 0
    return len(getattr(response, "body", None) or b"")  # whole, in one write


_TARGET_SHORT = TARGET_MAX // 6  # never longer than TARGET_MAX written (\uXXXX: 6 bytes)
SEEN_MAX = 4096  # combinations of a line's repeating fields kept formatted (~0.3 KB each)
_PIPE_BUF = 4096                        # a write this size or smaller is never interleaved


def _js(value: str | None) -> str:
    """``value`` as a JSON string, exactly as ``json.dumps`` writes it (its C escaper, without
    the encoder object around it: a tenth of the time)."""
    return "null" if value is None else _escape(value)


class AccessLog:
    """One line per request, buffered and written off the event loop.

    ``write`` only formats the line and appends it to a buffer (a few µs); a task hands what
    has gathered to a writer thread every ``interval`` seconds (and ``close`` writes the rest,
    so a clean stop loses no line). A slow or blocked stderr therefore never stalls requests:
    while the writer is stuck, lines gather up to ``max_buffer`` bytes and past that are
    dropped and counted (``dropped``; ``keygate_access_log_dropped_total``), never an unbounded
    buffer. Lines a failing stderr refuses (closed: EPIPE; a full disk) are counted likewise.
    Writes go out in whole lines of at most PIPE_BUF bytes, so lines of several workers
    sharing one stderr pipe never interleave mid-line."""

    def __init__(self, config: Config, *, interval: float = 0.1,
                 max_buffer: int = 4 * 1024 * 1024, on_drop=None,
                 operator_token: str = "") -> None:
        self.prefix = config.keys.prefix
        # masked too (mask_secret): a script may send it to this listener (?token=...). Only
        # a target with a query or an escape, or long enough to hold it, is looked at: the
        # usual request's line costs what it did
        self._secret = operator_token.strip()
        self._secret_len = len(self._secret) if self._secret else 1 << 62
        self.text = config.server.access_log == "text"
        self.interval, self.max_buffer = interval, max_buffer
        self.on_drop = on_drop
        self.dropped = 0
        self._lines: list[str] = []
        self._size = 0
        self._next_second = 0.0  # when the current second's time stamp runs out
        self._stamp = ""
        self._seen: dict = {}  # repeating field values (and tuples of them) → their JSON
        self._task: asyncio.Task | None = None
        self._writing: asyncio.Future | None = None

    @property
    def prefix(self) -> "Prefixes":
        return self._prefix

    @prefix.setter
    def prefix(self, prefix: "Prefixes") -> None:
        # a reload sets the key prefixes (every one used since start): the marker of a path
        # that may hold a key follows them. Several: "_", which every one ends with (a path
        # holding it is looked at; masking finds what it holds, if anything)
        if not isinstance(prefix, str) and len(prefix) == 1:
            prefix = prefix[0]
        self._prefix = prefix
        self._marker = prefix + "_" if isinstance(prefix, str) else "_"

    # --- per request --------------------------------------------------------------------------

    def write(self, request: web.BaseRequest, response: web.StreamResponse, outcome,
              request_id: str, elapsed: float) -> None:
        path, method = request.raw_path, request.method
        if "?" in path or "%" in path or self._marker in path:  # else no key to mask
            path = mask_target(path, self.prefix)
            if len(path) >= self._secret_len:  # (shorter holds it nowhere, decoded or not)
                path = mask_secret(path, self._secret)
        elif len(path) >= self._secret_len and (self._secret in path or "+" in path):
            path = mask_secret(path, self._secret)  # (a "+": a space, read as a query's)
        if len(path) > _TARGET_SHORT:  # may not fit in a line of one atomic write: cut
            path = cut_target(path, _text_size if self.text else _json_size)
        trace_id = outcome.trace.trace_id if outcome.trace is not None else None  # hex
        now = time.time()
        if not self._next_second - 1.0 <= now < self._next_second:  # a new second (or a
            self._next_second = float(int(now) + 1)                  # clock stepped back)
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        if self.text:
            line = (f"{outcome.client or request.remote} {method} {path} {response.status} "
                    f"{elapsed * 1000:.1f}ms ws={outcome.workspace or '-'} "
                    f"key={outcome.key_id or '-'} rid={request_id} trace={trace_id or '-'}\n")
        else:
            # The fields that repeat from request to request (who, which route, from where)
            # are formatted once per value: ~1.5 µs of a line's ~5.
            seen = self._seen
            key = (outcome.workspace, outcome.key_id, outcome.route, outcome.upstream,
                   outcome.code)
            middle = seen.get(key)
            if middle is None:
                middle = self._remember(key, '"workspace":%s,"key_id":%s,"route":%s,'
                                        '"upstream":%s,"error":%s' % tuple(map(_js, key)))
            # the body's bytes alone (what Envoy's BYTES_SENT and nginx's $body_bytes_sent
            # count): aiohttp's body_length would add the status line, the headers and the
            # chunk framing. A response not yet written (the common case: every one keygate
            # leaves to aiohttp is a web.Response) goes out after this line, whole, but
            # without its body to a HEAD, and not at all to a client already gone (aiohttp
            # writes nothing to a closing transport).
            if response.prepared:
                bytes_out = body_bytes_sent(response)
            elif method == "HEAD" or (transport := request.transport) is None or \
                    transport.is_closing():
                bytes_out = 0
            else:
                bytes_out = len(response.body or b"")
            status = response.status  # a property: read once
            # a WebSocket tunnel's (101): the bytes relayed each way while it was open
            bytes_in = request.content_length or 0 if status != 101 else response.bytes_in
            client = outcome.client or request.remote  # through server.trusted_proxies
            js_method = seen.get(method) or self._remember(method, _js(method))
            js_client = seen.get(client) or self._remember(client, _js(client))
            # the duration as a fixed 3 decimals: repr of a round()ed float took a fifth of
            # the line's time (two float-to-string conversions and one back)
            line = (f'{{"time":"{self._stamp}","request_id":{_escape(request_id)},'
                    f'"method":{js_method},"path":{_escape(path)},"status":{status},'
                    f'"duration_ms":{elapsed * 1000:.3f},{middle},'
                    f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
                    f'"client":{js_client},"trace_id":{_js(trace_id)}}}\n')
        if self._size + len(line) > self.max_buffer:
            self._drop(1)
            return
        self._lines.append(line)
        self._size += len(line)
        if self._task is None:  # not started (a test driving the pipeline directly)
            self._start()

    def _drop(self, lines: int) -> None:
        self.dropped += lines
        if self.on_drop is not None:
            for _ in range(lines):
                self.on_drop()

    def _remember(self, key, formatted: str) -> str:
        if len(self._seen) >= SEEN_MAX:
            self._seen.clear()
        self._seen[key] = formatted
        return formatted

    # --- the background writer ----------------------------------------------------------------

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flush_every_interval())

    async def start(self) -> None:
        if self._task is None:
            self._start()

    async def _flush_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._lines and (self._writing is None or self._writing.done()):
                self._writing = self._hand_over()

    def _hand_over(self) -> asyncio.Future:
        """Give the buffered lines, as one encoded block, to the writer thread. The loop does
        one join and one encode (C, a few µs for a 100 ms batch); the thread only cuts the
        block at line ends and makes the write calls, which release the GIL, so a write
        blocked on a full stderr holds neither the loop nor, at exit, the interpreter (the
        thread is a daemon: an executor's worker would be joined at exit and keep a
        SIGTERMed process alive). One thread for the process's life, not one per batch."""
        lines, self._lines, self._size = self._lines, [], 0
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        done.add_done_callback(self._count_lost)
        _writer().put((_encode(lines), loop, done))
        return done

    def _count_lost(self, done: asyncio.Future) -> None:
        """The lines of a handed-over block that stderr refused, counted as dropped."""
        if not done.cancelled() and (lost := done.result()):
            self._drop(lost)

    def flush_now(self) -> None:
        """Write what is buffered, from this thread (tests, and the last words at shutdown)."""
        lines, self._lines, self._size = self._lines, [], 0
        if lost := _write_block(_encode(lines)):
            self._drop(lost)

    async def close(self, timeout: float = ACCESS_LOG_CLOSE_TIMEOUT) -> None:
        """Stop the flusher and write every line still buffered (bounded by ``timeout``)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        pending = [f for f in (self._writing,) if f is not None and not f.done()]
        if self._lines:
            pending.append(self._hand_over())
        if pending:
            await asyncio.wait(pending, timeout=timeout)


def _settle(future: asyncio.Future, lost: int) -> None:
    if not future.done():
        future.set_result(lost)


def _encode(lines: list[str]) -> bytes:
    return "".join(lines).encode("utf-8", "surrogateescape")


_queue: "queue.SimpleQueue[tuple[bytes, asyncio.AbstractEventLoop, asyncio.Future]] | None" = None
_queue_pid = -1
_queue_lock = threading.Lock()


def _writer() -> "queue.SimpleQueue":
    """The queue of the process's one access-log writer thread (started on first use, and
    again in a forked worker, where the parent's thread does not exist)."""
    with _queue_lock:
        if _queue is None or _queue_pid != os.getpid():
            _start_writer()
        return _queue


def _start_writer() -> None:
    global _queue, _queue_pid
    _queue, _queue_pid = queue.SimpleQueue(), os.getpid()
    q = _queue

    def run() -> None:
        while True:
            block, loop, done = q.get()
            lost = 0
            try:
                lost = _write_block(block)
            except Exception:  # nowhere left to say it (stderr itself failed); the thread
                lost = block.count(b"\n")  # must live on, or every later batch waits for it
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be closed by then
                    loop.call_soon_threadsafe(_settle, done, lost)

    threading.Thread(target=run, name="keygate-access-log", daemon=True).start()


def _write_block(block: bytes) -> int:
    """Whole lines to stderr (whatever it is now): to a pipe or socket, which other workers
    may share, in writes of at most PIPE_BUF bytes cut at line ends (never interleaved
    mid-line); to a file or terminal, in one write. Returns how many lines stderr refused
    (closed, or a full disk): 0 when all were written."""
    if not block:
        return 0
    try:
        fd = sys.stderr.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object with no fd
        try:
            sys.stderr.write(block.decode("utf-8", "surrogateescape"))
        except Exception:  # none at all (None), or closed
            return block.count(b"\n")
        return 0
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) or len(block) <= _PIPE_BUF:
        return block.count(b"\n", len(block) - _write_all(fd, block))
    start, end = 0, len(block)
    while start < end:
        stop = start + _PIPE_BUF
        if stop < end:
            cut = block.rfind(b"\n", start, stop)
            # a single line longer than PIPE_BUF goes out whole (it cannot be atomic anyway)
            stop = cut + 1 if cut >= start else block.find(b"\n", stop) + 1 or end
        if left := _write_all(fd, block[start:stop]):
            return block.count(b"\n", stop - left)  # that line, and every one after it
        start = stop
    return 0


def _write_all(fd: int, data: bytes) -> int:
    """Write ``data`` to ``fd``; returns how many of its bytes were not written (0: all)."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        except OSError:   # stderr closed, or its disk full: nothing more can be said
            return len(view)
        view = view[written:]
    return 0
