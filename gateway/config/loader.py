"""``load_config``: a YAML file in, a ``gateway.settings.Config`` out, or every problem in it.

The loader walks the *composed* YAML node tree (``yaml.compose``) rather than the constructed
Python objects, so every value keeps its line number: each problem reads
``config.yaml:14: routes[2].upstream: unknown upstream 'crm2' (known: crm)``. Every problem in
the file is collected before ``ConfigError`` is raised, so one ``keygate config check`` run
shows them all.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import unicodedata

import yaml

from ..errors import ConfigError
from ..settings import AdminConfig, Config
from .nodes import Node, child, one_line
from .cors import CorsSections
from .routing import RoutingSections
from .service import ServiceSections

TOP_LEVEL_KEYS = ("server", "admin", "store", "keys", "plans", "default_plan", "roles",
                  "upstreams", "routes", "identity_headers", "identity_signature", "tracing",
                  "scopes", "cors")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::"})
MAX_DEPTH = 100  # nesting a problem names; the YAML reader itself gives up a few hundred deep


class Reader(ServiceSections, RoutingSections, CorsSections):
    """Turns a composed node tree into a ``Config``, recording problems as it goes."""

    def config(self, root: Node | None) -> Config:
        top = self.mapping(root, "", TOP_LEVEL_KEYS)
        if top is None:
            return Config(source=self.source)
        nodes = {key: value_node for key, _key_node, value_node in top}
        value = nodes.get

        server = self.server(value("server"))
        admin = self.admin(value("admin"))
        store = self.store(value("store"))
        keys = self.keys(value("keys"))
        # the catalogue first: every scope read after it (roles, routes) is checked against it
        self.catalogue = self.scope_catalogue(value("scopes")) if "scopes" in nodes else None
        plans, default_plan = self.plans(value("plans"), value("default_plan"))
        roles = self.roles(value("roles"))
        upstreams = self.upstreams(value("upstreams"))
        routes = self.routes(value("routes"), upstreams)
        identity = self.identity_headers(value("identity_headers"), keys)
        signature = self.identity_signature(value("identity_signature"), keys, identity)
        tracing = self.tracing(value("tracing"))
        cors = self.cors(value("cors"))
        warnings = self.warnings + self.verb_warnings(routes, upstreams, cors is not None)
        if server.port == admin.port and \
                (shared := _shared_address(server.host, admin.host, admin.port)) is not None:
            self.fail(child(value("admin"), "port") or child(value("server"), "port") or root,
                      "admin.port", f"the admin listener cannot share port {admin.port} with "
                                    f"the proxy listener{shared}")
        return Config(server=server, admin=admin, store=store, keys=keys, plans=plans,
                      default_plan=default_plan, roles=roles, upstreams=upstreams,
                      routes=routes, identity_headers=identity, identity_signature=signature,
                      tracing=tracing, source=self.source, scopes=self.catalogue,
                      cors=cors, warnings=tuple(warnings))


def _shared_address(first: str, second: str, port: int) -> str | None:
    """How two listeners on ``port`` would bind one address ('' when their hosts say so as
    written: one spelling, or a wildcard), or None when they bind apart. Each host is
    resolved as serve binds it (``getaddrinfo``, passive: ``localhost`` is ``127.0.0.1``,
    ``0`` is ``0.0.0.0``); a wildcard address overlaps every other. Resolved only here, for
    two listeners on one port; a name that does not resolve is serve's to report."""
    if first == second or first in _WILDCARD_HOSTS or second in _WILDCARD_HOSTS:
        return ""
    bound = [_bound_addresses(first, port), _bound_addresses(second, port)]
    if not bound[0] or not bound[1]:
        return None
    for host, addresses in zip((first, second), bound):
        wildcard = sorted(addresses & _WILDCARD_ADDRESSES)
        if wildcard:
            return f" ({host} binds {wildcard[0]}, every address)"
    shared = sorted(bound[0] & bound[1])
    return f" ({first} and {second} both bind {shared[0]})" if shared else None


def _bound_addresses(host: str, port: int) -> set[str]:
    """The addresses a listener on ``host`` binds (empty: it does not resolve)."""
    import socket
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError, ValueError):
        return set()
    return {f"{addr[0]}%{addr[3]}" if len(addr) > 3 and addr[3] else addr[0]
            for _, _, _, _, addr in found}


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a YAML config file; ``None`` means all defaults.

    Raises ``ConfigError`` carrying every problem found, one line each:
    ``<file>:<line>: <field path>: <what is wrong>``.
    """
    if path is None:
        return Config()
    source = os.fspath(path)
    root, text = _compose(source)
    reader = Reader(source)
    try:
        config = reader.config(root)
    except RecursionError:  # merge keys chained through more anchors than Python recurses
        raise ConfigError([_too_deep(source, text)]) from None
    if reader.problems:
        raise ConfigError(reader.sorted_problems())
    return config


def load_admin_section(path: str | os.PathLike[str]) -> AdminConfig:
    """The ``admin`` section alone, as a client of the admin listener needs it (a remote
    ``keygate --config FILE`` command): the address, ``token_env`` and, with ``admin.tls``,
    ``cert_file``, which must be a readable file. ``key_file`` is neither read nor required:
    the user running the CLI usually may not read the listener's private key (it is the
    service account's), and serve / config check / reloads still check it. Problems elsewhere
    in the file are not looked for (it may be one a reload is about to refuse).

    Raises ``ConfigError`` with the section's problems, ``file:line: field: what``."""
    source = os.fspath(path)
    root, text = _compose(source)
    reader = Reader(source, client=True)
    try:
        # the top level's own problems (a key duplicated or not a name) are the rest of the
        # file's, but one that leaves no mapping to find `admin` in, and a duplicate `admin`
        top = Reader(source, client=True).mapping(root, "")
        if top is None:
            reader.mapping(root, "")  # says why
        else:
            _duplicate_admin(reader, root)
        admin = dict((key, value) for key, _, value in top or ()).get("admin")
        section = reader.admin(admin) if top is not None else AdminConfig()
    except RecursionError:
        raise ConfigError([_too_deep(source, text)]) from None
    if reader.problems:
        raise ConfigError(reader.sorted_problems())
    return section


def _duplicate_admin(reader: Reader, root: Node | None) -> None:
    """A second top-level ``admin`` key, which leaves the section a client reads in doubt."""
    if not isinstance(root, yaml.MappingNode):
        return
    first = None
    for key_node, _ in root.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == "admin":
            if first is None:
                first = key_node
            else:
                reader.fail(key_node, "admin", f"duplicate key (first given on line "
                                               f"{first.start_mark.line + 1})")


def _compose(source: str) -> tuple[Node | None, str]:
    """(the file's composed YAML tree, its text), or ``ConfigError`` for a file that cannot
    be read or is not YAML."""
    try:
        raw = _read(source)
    except OSError as exc:
        raise ConfigError([one_line(f"cannot read {source}: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([_not_utf8(source, exc)]) from None
    if _deep_line(text) is not None:  # before the reader, which recurses as deep
        raise ConfigError([_too_deep(source, text)])
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ConfigError([_too_deep(source, text)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"{mark.line + 1}" if mark is not None else "1"
        what = exc.problem or exc.context or "invalid YAML"
        col = f" (column {mark.column + 1})" if mark is not None else ""
        raise ConfigError([one_line(f"{source}:{line}: invalid YAML: {what}{col}")]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow: no mark
        raise ConfigError([_bad_character(source, text, exc)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([one_line(f"{source}:1: invalid YAML: {exc}")]) from None
    return root, text


# what YAML (and so PyYAML's marks, and every other problem's line) counts as a line break
_LINE_BREAKS = re.compile("\r\n|[\n\r\x85\u2028\u2029]")


def _bad_character(source: str, text: str, exc: yaml.reader.ReaderError) -> str:
    """``file:line: invalid YAML: ...`` for a character YAML does not allow (a DEL, NUL or
    ESC pasted from a terminal), at its own line and column: PyYAML's ReaderError gives only
    its offset in the text, and says it in its own words ("unacceptable character #x007f ...
    in "<unicode string>", position 170")."""
    position = exc.position if isinstance(exc.position, int) else 0
    if isinstance(exc.character, int):
        char = chr(exc.character)
    elif isinstance(exc.character, str) and exc.character:
        char = exc.character[0]
    else:
        char = text[position] if 0 <= position < len(text) else ""
    breaks = list(_LINE_BREAKS.finditer(text, 0, position))
    line = len(breaks) + 1
    column = position - (breaks[-1].end() if breaks else 0) + 1
    what = f"character U+{ord(char):04X}" if char else "a character"
    if char and unicodedata.category(char) == "Cc":
        what += " (a control character)"
    return one_line(f"{source}:{line}: invalid YAML: {what} is not allowed in a YAML file "
                    f"(column {column})")


def _not_utf8(source: str, exc: UnicodeDecodeError) -> str:
    """``file:line: cannot read the file: not UTF-8 text ...`` at the bad byte's own line (the
    line breaks before it, plus one) and column (the characters before it on its line): a file
    saved in Latin-1 or cp1252 by an editor. Offsets are the decoded bytes' (after a byte
    order mark)."""
    data = bytes(exc.object)
    start = exc.start
    # the text before it, decoded (it is valid up to there), its line breaks counted as YAML
    # counts them (lone CR, NEL, U+2028...), as every other problem's line is
    before = data[:start].decode("utf-8", "replace")
    breaks = list(_LINE_BREAKS.finditer(before))
    line = len(breaks) + 1
    column = len(before) - (breaks[-1].end() if breaks else 0) + 1
    return one_line(f"{source}:{line}: cannot read the file: not UTF-8 text (byte "
                    f"0x{data[start]:02x}, column {column}); save it as UTF-8")


MAX_CONFIG_BYTES = 16 * 1024 * 1024
PIPE_WAIT = 10.0  # seconds a pipe's writer has to write the whole file


def _read(source: str) -> bytes:
    """The file's bytes, at most ``MAX_CONFIG_BYTES``, without waiting for ever: a regular
    file, or a pipe something writes the file into (``config check <(envsubst < t.yaml)``),
    given ``PIPE_WAIT`` seconds. A FIFO nothing writes to made the open wait for a writer (a
    reload then held its lock, and an executor thread the stop waited for, for good), and a
    device (a path turned into a link to /dev/zero) was read until memory ran out.
    Raises ``OSError`` whose ``strerror`` says what is wrong."""
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb", buffering=0, closefd=True) as fh:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        if stat.S_ISREG(mode):
            os.set_blocking(fd, True)
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        elif stat.S_ISFIFO(mode):
            raw = _read_pipe(fd)
        else:
            raise OSError(errno.EINVAL, "not a regular file (a device)")
    if len(raw) > MAX_CONFIG_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB, "
                                   "which no config file is")
    return raw


def _read_pipe(fd: int) -> bytes:
    import select
    import time
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + PIPE_WAIT
    while size <= MAX_CONFIG_BYTES:
        try:  # no writer (none yet, or none any more): the end of the file, at once
            chunk = os.read(fd, 65536)
        except BlockingIOError:  # a writer that has not written yet
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise OSError(errno.ETIMEDOUT, f"a pipe whose writer did not finish within "
                                               f"{PIPE_WAIT:g} s") from None
            continue
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if not chunks:
        raise OSError(errno.ENODATA, "a FIFO nothing wrote to")
    return b"".join(chunks)


def _too_deep(source: str, text: str) -> str:
    """The problem of a file nested deeper than the YAML reader (which recurses) can follow:
    at the line where its nesting first passes ``MAX_DEPTH`` (``_deep_line``); line 1 for a
    chain of merge keys."""
    return one_line(f"{source}:{_deep_line(text) or 1}: top level: nested too deeply (more "
                    f"than {MAX_DEPTH} levels of mappings, lists or merge keys)")


def _deep_line(text: str) -> int | None:
    """The line where the file's nesting first passes ``MAX_DEPTH``, found by the parser's
    events (which do not recurse), or None. libyaml's parser where PyYAML has it: it takes
    a millisecond or two for a config, where the pure-Python one's scanner is quadratic in flow
    nesting ("[" * 5000: ~10 s of CPU, and composing it ~1 s more before Python's recursion
    limit ended it: a reload's thread holding the GIL that long). A file libyaml cannot parse
    is left to the reader, which says why."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    return event.start_mark.line + 1
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.MarkedYAMLError as exc:
        # libyaml's own bound (1000 levels), met as it scans ahead: deeper than ours too
        if "nesting depth" in (exc.problem or "") and exc.problem_mark is not None:
            return exc.problem_mark.line + 1
    except yaml.YAMLError:
        pass
    return None


def check_config(path: str | os.PathLike[str] | None) -> list[str]:
    """Every problem in the file, one line each; ``[]`` when it is fine."""
    try:
        load_config(path)
    except ConfigError as exc:
        return list(exc.problems)
    return []


def servable_problems(config: Config) -> list[str]:
    """What makes a valid config unfit to serve with: no routes means a gateway that can
    forward nothing (usually an empty file, or a file that is not the one meant).
    ``keygate serve`` and ``keygate config check`` refuse it; tests build such configs freely."""
    if not config.routes:
        return [one_line(f"{config.source}:{_routes_line(config.source)}: routes: no routes "
                         "are defined, so the gateway would answer every request 404 "
                         "no_route; add at least one route (see docs/configuration.md#routes)")]
    return []


def _routes_line(source: str) -> int:
    """The line of the file's top-level ``routes:`` (1 when it has none), for the problem's
    ``file:line: field: what``."""
    return top_level_line(source, "routes")


def top_level_line(source: str, key: str) -> int:
    """The line of the file's top-level ``key:`` (1 when it has none), for a problem's
    ``file:line: field: what``."""
    try:
        if not os.path.isfile(source):  # a pipe read once is not read again (nor waited on)
            return 1
        with open(source, encoding="utf-8-sig") as fh:
            for number, line in enumerate(fh, 1):
                if line.startswith(f"{key}:") or line.startswith(f"{key} "):
                    return number
    except (OSError, UnicodeDecodeError):
        pass
    return 1
