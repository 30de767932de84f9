"""Reload without restart: re-read the config file and swap it in, or change nothing.

    SIGHUP / POST /admin/v1/reload → load and validate the file (every problem, or none)
    → keep the settings that need a restart (and name them) → swap, in one event-loop step

The swap is synchronous: no request sees half of it. A request already past route matching
keeps the route and upstream it matched; the next one sees the new config. Upstream pools of
removed or changed upstreams close once their requests are done. TLS certificates are loaded
into the listeners' live ``SSLContext``: new handshakes get the new certificate, open
connections keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import ssl
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import web

from .config import Config, TLSConfig, load_config, servable_problems
from .config.loader import top_level_line
from .config.nodes import one_line
from .models import header_key
from .errors import BadRequest, ConfigError, Conflict, StoreError

log = logging.getLogger("keygate")

# What a reload may change inside the listener/store sections; every other field there needs a
# restart (host, port, workers, store, timeouts, ...). Sections outside these three all reload.
RELOADABLE = {
    "server": ("max_body_bytes", "trusted_proxies", "log_level", "tls", "websocket_recheck"),
    "admin": ("tls",),
    "store": (),
}
# Whole sections built once at start (the OTLP exporter; the signing secret, read from the
# environment, which a running process cannot see change): kept until a restart.
RESTART_ONLY_SECTIONS = ("identity_signature", "tracing")
# Under ``serve --workers N`` the worker that answers ``POST /admin/v1/reload`` has the others
# reload too, and answers once they have (at most this many seconds): each worker writes
# ``reload-<pid>`` (when its last reload began reading the file, time.monotonic(), the same
# clock in every process of a host, and the problems it refused the file for, if it did) in
# the directory the supervisor made for its workers.
SIBLINGS_WAIT = 10.0
MARK_PREFIX = "reload-"


@dataclass(frozen=True)
class ReloadResult:
    source: str
    reloaded_at: float
    restart_required: tuple[str, ...]   # settings changed in the file but kept until a restart

    def to_json(self) -> dict[str, Any]:
        from .models import rfc3339
        return {"result": "ok", "config": self.source, "reloaded_at": rfc3339(self.reloaded_at),
                "restart_required": list(self.restart_required)}


def keep_restart_only(old: Config, new: Config) -> tuple[Config, tuple[str, ...]]:
    """``new`` with every restart-only setting put back to ``old``'s value, and the names of
    the settings that differed (``server.port``, ``store``...)."""
    kept: list[str] = []
    sections: dict[str, Any] = {}
    for section, reloadable in RELOADABLE.items():
        before, after = getattr(old, section), getattr(new, section)
        merged = {}
        for f in dataclasses.fields(before):
            a, b = getattr(before, f.name), getattr(after, f.name)
            if f.name in reloadable and not (f.name == "tls" and (a is None) != (b is None)):
                merged[f.name] = b
            else:  # restart-only (turning TLS on or off rebinds the listener, too)
                merged[f.name] = a
                if a != b:
                    kept.append(f"{section}.{f.name}")
        sections[section] = dataclasses.replace(before, **merged)
    for section in RESTART_ONLY_SECTIONS:
        if hasattr(old, section):
            sections[section] = getattr(old, section)
            if getattr(old, section) != getattr(new, section):
                kept.append(section)
    return dataclasses.replace(new, **sections), tuple(kept)


def kept_clashes(merged: Config, new: Config) -> list[str]:
    """What ``merged`` (the file's config with the restart-only settings in force put back)
    holds that no file could: a header the file names for the identity or the credential that
    is the name the signature in force is sent in. The file alone is checked against its own
    ``identity_signature``, not against the one kept until a restart; swapped in, the upstream
    would get two fields of that name and every signature check would fail."""
    signature = merged.identity_signature
    if signature is None or signature == new.identity_signature:
        return []
    name = header_key(signature.header)  # case and punctuation, as the file's own checks
    named = [(f"identity_headers.{f}", getattr(merged.identity_headers, f))
             for f in ("workspace", "key_id", "scopes", "plan")]
    named += [("keys.headers", h) for h in merged.keys.headers]
    return [one_line(f"{merged.source}:{top_level_line(merged.source, field.partition('.')[0])}: "
                     f"{field}: '{header}' is the header the signed identity is sent in until "
                     f"a restart (identity_signature is kept as it is in force); name it "
                     "otherwise, or restart to move the signature")
            for field, header in named if header_key(header) == name]


class Reloader:
    """Owns one gateway's reloads. ``apply`` does the swap (built by ``gateway.app``).

    ``in_use``: ``(new, old) -> problems``, what ``new`` drops that the store still uses (a
    plan workspaces are on, a configured role keys are bound to; ``gateway.config_in_use``);
    it raises ``StoreError`` when the store cannot say, and the reload then goes ahead with a
    warning naming what was not checked."""

    def __init__(self, config: Config, path: str | None, apply: Callable[[Config], None],
                 metrics=None, clock: Callable[[], float] = time.time,
                 in_use: Callable[[Config, Config], Awaitable[list[str]]] | None = None) -> None:
        self.config = config
        self.file = path  # the file a reload reads
        # the file as the log names it: escaped, so that no name (a newline, an ESC) forges a
        # log line or reaches a terminal's escapes
        self.path = None if path is None else one_line(path)
        self.apply = apply
        self.in_use = in_use
        self.metrics = metrics
        self.clock = clock
        self._lock = asyncio.Lock()
        self._echo = 0  # SIGHUPs we caused ourselves (a worker asking its siblings to reload)
        self._hup_waiting = False  # a SIGHUP's reload waits for its turn (it answers the next)
        self._marks = _shared_dir()  # serve --workers: where each worker says it reloaded
        # serve --workers: each worker logs its own reload; every line a worker logs says
        # which worker it is ('worker 2 (pid 4242): ', gateway.workers.name_worker_in_logs)
        # a worker that has not reloaded yet is named there too, behind any reload asked for
        # (its config is the one the supervisor read before forking it; see mark_forked)
        self._mark(0.0)
        if metrics is not None:
            metrics.config_reloaded_at.set(clock())

    async def reload(self, *, signalled: bool = False) -> ReloadResult:
        """Re-read the file and swap it in. Raises ``ConfigError`` (nothing changed).
        ``signalled``: for a SIGHUP (see ``on_signal``)."""
        async with self._turn(signalled):
            if self.path is None:
                raise ConfigError(["this gateway was started without a config file; "
                                   "there is nothing to reload"])
            try:
                new = await asyncio.get_running_loop().run_in_executor(
                    None, load_config, self.file)
                # what serve refuses to start on (no routes: a file emptied by mistake or
                # caught half-written) is no config to swap in either
                if problems := servable_problems(new):
                    raise ConfigError(problems)
                if problems := await self._in_use(new):
                    raise ConfigError(problems)
                merged, kept = keep_restart_only(self.config, new)
                if problems := kept_clashes(merged, new):
                    raise ConfigError(problems)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("reload refused: %s", problem)
                log.error("reload refused: the config in force is unchanged")
                self._count("error")
                raise
            try:
                self.apply(merged)
            except ConfigError as exc:  # e.g. a certificate replaced between check and load
                for problem in exc.problems:
                    log.error("reload refused: %s", problem)
                self._count("error")
                raise
            before = {warning.key for warning in self.config.warnings}
            self.config = merged
            now = self.clock()
            self._count("ok")
            if self.metrics is not None:
                self.metrics.config_reloaded_at.set(now)
            if kept:
                log.warning("config reloaded from %s; these settings need a restart and "
                            "keep their old values until then: %s", self.path,
                            ", ".join(kept))
            else:
                log.info("config reloaded from %s", self.path)
            for warning in merged.warnings:  # those this reload brings in, as serve logs them
                if warning.key not in before:
                    log.warning("%s", warning)
            return ReloadResult(self.file, now, kept)

    @contextlib.asynccontextmanager
    async def _turn(self, signalled: bool) -> AsyncIterator[None]:
        """One reload at a time. A SIGHUP's reload, once its turn comes (or it is cancelled
        waiting), no longer answers the SIGHUPs after it: the file is read from here on."""
        try:
            await self._lock.acquire()
        finally:
            if signalled:
                self._hup_waiting = False
        started, problems = time.monotonic(), None
        try:
            yield
        except ConfigError as exc:
            problems = list(exc.problems)
            raise
        except Exception as exc:
            problems = [f"the reload failed: {exc!r}"]
            raise
        finally:
            # done or refused: a sibling waiting on this worker goes on, and learns which
            self._mark(started, problems)
            self._lock.release()

    async def _in_use(self, new: Config) -> list[str]:
        if self.in_use is None:
            return []
        try:
            return await self.in_use(new, self.config)
        except StoreError as exc:
            from .config_in_use import not_checked
            log.warning("reload: could not check %s (%s); reloading without that check",
                        not_checked(new, self.config), exc)
            return []

    async def on_signal(self) -> None:
        """SIGHUP: reload, log the outcome (a signal has nobody to answer)."""
        if self._echo:
            self._echo -= 1
            return
        if self._hup_waiting:  # that reload reads the file after this SIGHUP: it answers both
            return
        self._hup_waiting = True
        log.info("SIGHUP: reloading %s", self.path)
        try:
            await self.reload(signalled=True)
        except ConfigError:
            pass  # logged line by line by reload()

    def tell_siblings(self) -> float | None:
        """Under ``serve --workers N``, after a reload asked over the admin API of this worker:
        have the supervisor pass SIGHUP to every worker (this one skips its own echo). Returns
        when it asked (time.monotonic()), None if it did not."""
        supervisor = os.environ.get("KEYGATE_SUPERVISOR_PID")
        if supervisor and supervisor.isdigit() and int(supervisor) == os.getppid():
            self._echo += 1
            asked = time.monotonic()
            try:
                os.kill(int(supervisor), signal.SIGHUP)
            except OSError:
                self._echo -= 1
                return None
            return asked
        return None

    async def siblings_reloaded(self, asked: float, timeout: float = SIBLINGS_WAIT
                                ) -> tuple[list[str], list[str]]:
        """Until every other worker still running has reloaded from the file since ``asked``
        (or refused it), so a request the API's caller sends next sees the new config
        whichever worker takes it; at most ``timeout`` seconds. Returns the problems of the
        workers that refused the file (each read it itself: one that read it changed, an
        editor half-way through writing it, kept its old config), as ``worker I (pid P):
        problem``, as its own log lines name it; and the workers that had not re-read it by
        then (``worker I (pid P)``: an event loop busy or wedged, a process stopped), which
        may still serve the old config. Both empty when all took it."""
        if self._marks is None:
            return [], []
        deadline = time.monotonic() + timeout
        while True:
            marks = [m for m in _marks(self._marks) if m[0] != os.getpid()]
            behind = [worker_name(place, pid) for pid, at, _, place in sorted(marks)
                      if at < asked and _running(pid)]
            if not behind:
                refused = [f"{worker_name(place, pid)}: {problem}"
                           for pid, at, problems, place in sorted(marks)
                           if at >= asked and problems for problem in problems]
                if refused:
                    log.error("reload: this worker took %s, but other workers refused it "
                              "and keep their old config: %s", self.path, "; ".join(refused))
                return refused, []
            if time.monotonic() >= deadline:
                log.warning("reload: %s had not re-read the config %.0f s after the reload "
                            "call, and may still serve the old one; the call answers so "
                            "(not_confirmed)", ", ".join(behind), timeout)
                return [], behind
            await asyncio.sleep(0.005)

    def _mark(self, started: float, problems: list[str] | None = None) -> None:
        """Say, for the worker asking (``siblings_reloaded``), that this one's latest reload
        began reading the file at ``started``, and the ``problems`` it refused it for."""
        if self._marks is None:
            return
        path = os.path.join(self._marks, f"{MARK_PREFIX}{os.getpid()}")
        try:
            with open(path + ".tmp", "w") as f:
                json.dump({"started": started, "problems": problems,
                           "worker": _place()}, f)
            os.replace(path + ".tmp", path)
        except OSError as exc:
            log.warning("reload: cannot write %s: %s", path, exc)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.config_reloads.labels(result).inc()


class ListenerTLS:
    """The ``SSLContext`` a listener is bound with, whose certificate a reload can replace.

    The listener's context hands every new handshake to ``current`` (through the SNI callback,
    which OpenSSL runs for every ClientHello, with or without a server name); a reload builds
    a whole new context from the new files and only then puts it in ``current``, so a bad
    pair never reaches a handshake and open connections keep the certificate they got."""

    def __init__(self, tls: TLSConfig) -> None:
        from .config import server_context
        self.current = server_context(tls.cert_file, tls.key_file)
        self.listener = server_context(tls.cert_file, tls.key_file)
        self.listener.sni_callback = self._pick

    def _pick(self, ssl_object: ssl.SSLObject, server_name: str | None,
              context: ssl.SSLContext) -> None:
        ssl_object.context = self.current

    @staticmethod
    def prepare(tls: TLSConfig, where: str, source: str) -> ssl.SSLContext:
        """A context from the new files; ``ConfigError`` if they changed since the check."""
        from .config import server_context
        try:
            return server_context(tls.cert_file, tls.key_file)
        except (ssl.SSLError, OSError, ValueError) as exc:  # ValueError: now encrypted
            raise ConfigError([one_line(f"{source}:1: {where}: cannot load {tls.cert_file} / "
                                        f"{tls.key_file}: {exc}")]) from exc


class WorkersDisagree(Conflict):
    """409 from ``POST /admin/v1/reload`` under ``serve --workers N``: the worker that took the
    call swapped the file in, and others refused it (``problems``: ``worker I (pid P): ...``)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("This worker took the config file, but other workers refused it and "
                         "keep their old config (the file changed while they read it?): the "
                         "workers serve different configs until a reload that all of them "
                         "take. Fix the file if it needs it and reload again.")
        self.problems = problems

    def body(self, request_id: str) -> bytes:
        return _with_problems(self, request_id)


class ConfigRejected(BadRequest):
    """400 from ``POST /admin/v1/reload``: the usual error body plus every problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"The config file has {len(problems)} problem"
                         f"{'' if len(problems) == 1 else 's'}; nothing was changed.")
        self.problems = problems

    def body(self, request_id: str) -> bytes:
        return _with_problems(self, request_id)


def _with_problems(error: BadRequest | Conflict, request_id: str) -> bytes:
    """The usual error body plus the ``problems`` found."""
    return json.dumps({"error": {"code": error.code, "message": error.message,
                                 "request_id": request_id,
                                 "problems": error.problems}}).encode()


def add_reload_route(app: web.Application, reloader: Reloader) -> None:
    """``POST /admin/v1/reload`` (operator token, like all of ``/admin/``): 200 with the
    result, 400 with the problems (nothing changed), 409 without a config file to re-read, or
    (``serve --workers N``) when other workers refused the file this one took. Under
    ``--workers N`` a 200 whose workers did not all confirm the reload within
    ``SIBLINGS_WAIT`` names those in ``not_confirmed``: this worker took the file, the SPEC's
    200, but the call cannot say the next request sees it whichever worker takes it."""

    async def reload(request: web.Request) -> web.Response:
        if (await request.read()).strip() not in (b"", b"{}"):
            raise BadRequest("POST /admin/v1/reload takes no body; it re-reads the config file.")
        if reloader.path is None:
            raise Conflict("This gateway was started without a config file; there is nothing "
                           "to reload.")
        try:
            result = await reloader.reload()
        except ConfigError as exc:
            raise ConfigRejected(list(exc.problems)) from None
        asked = reloader.tell_siblings()
        body = result.to_json()
        if asked is not None:
            refused, behind = await reloader.siblings_reloaded(asked)
            if refused:
                raise WorkersDisagree(refused)
            if behind:  # this worker took it; those may still serve the old config
                body["not_confirmed"] = behind
        return web.json_response(body)

    app.router.add_post("/admin/v1/reload", reload)


def worker_prefix() -> str:
    """``worker I (pid P): `` for a worker of ``serve --workers N`` (I its place among them,
    1..N, as the supervisor set it when forking), to begin the lines each worker logs alike."""
    return f"{worker_name(_place(), os.getpid())}: "


def worker_name(place: int | None, pid: int) -> str:
    """``worker I (pid P)``: how every line names a worker of ``serve --workers N``, its own,
    a sibling's, the supervisor's (``place``: 1..N, None if unknown)."""
    return f"worker {place} (pid {pid})" if place is not None else f"worker (pid {pid})"


def _place() -> int | None:
    """This worker's place among the workers (``KEYGATE_WORKER``, set by the supervisor)."""
    index = os.environ.get("KEYGATE_WORKER", "")
    return int(index) if index.isdigit() else None


def _shared_dir() -> str | None:
    """The directory every worker of this ``serve --workers N`` can write (the one the
    supervisor made for their metrics), None in a process of its own."""
    supervisor = os.environ.get("KEYGATE_SUPERVISOR_PID")
    if not (supervisor and supervisor.isdigit() and int(supervisor) == os.getppid()):
        return None
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def mark_forked(directory: str, pid: int, place: int) -> None:
    """For the supervisor, as it forks worker ``pid``: mark it behind any reload asked for, as
    its ``Reloader`` does once made, so that a reload asked meanwhile (the worker still
    starting) waits for it too. Only if the worker has not written its own mark yet.
    ``place``: its place among the workers, 1..N."""
    path = os.path.join(directory, f"{MARK_PREFIX}{pid}")
    made = f"{path}.forked"
    try:
        with open(made, "w") as f:
            json.dump({"started": 0.0, "problems": None, "worker": place}, f)
        os.link(made, path)  # whole, and never over the worker's own
    except FileExistsError:
        pass
    except OSError as exc:
        log.warning("reload: cannot write %s: %s", path, exc)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(made)


def _marks(directory: str) -> list[tuple[int, float, list[str] | None, int | None]]:
    """(pid, when its latest reload began, the problems it refused the file for, its place
    among the workers) of each worker that wrote a mark."""
    found = []
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for name in names:
        pid = name[len(MARK_PREFIX):]
        if not (name.startswith(MARK_PREFIX) and pid.isdigit()):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                mark = json.load(f)
            place = mark.get("worker")
            found.append((int(pid), float(mark["started"]), mark["problems"] or None,
                          place if isinstance(place, int) else None))
        except (OSError, ValueError, TypeError, KeyError):
            continue  # gone meanwhile, or caught being replaced: read again at the next poll
    return found


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
