"""Path sanity, keys in query strings, and route matching. Pure: no I/O.

The gateway matches routes on the path exactly as it forwards it, byte for byte, so a path that
an upstream could read differently from the gateway (``/public/..%2Fadmin``, ``/admin;x=1``,
``//admin``, ``/%61dmin``) is refused with 400 ``bad_path`` instead of being rewritten.

What ``check_path`` accepts (the raw request target before any decoding, query excluded):

- ASCII only, starting with ``/``, at most 2048 bytes;
- characters RFC 3986 allows in a path (``pchar`` and ``/``) except ``;``: unreserved letters,
  digits and ``-._~``, the sub-delimiters ``!$&'()*+,=``, ``:``, ``@`` and percent escapes;
- no empty segment (``//``) except one trailing slash (``/people/`` is fine);
- no segment of dots only: ``.``, ``..``, nor ``...`` and longer, which Windows and IIS read
  as an empty segment once they strip a segment's trailing dots (percent-encoded dots are
  refused as encoded unreserved anyway); nor of dots and encoded spaces only (``..%20``,
  ``%20``, ``.%20``), which they read as ``..`` or an empty segment once they strip its
  trailing spaces too;
- percent escapes must be well-formed (``%`` + two hex digits) and must be needed: an escape of
  an unreserved character (``%41``, ``%2e``, ``%7E``) is not canonical; ``%2F`` and ``%5C``
  (encoded ``/`` and ``\\``), ``%00`` and other encoded control characters are refused, as is
  double encoding (``%25`` followed by two hex digits, like ``%252e``).
- Lower-case hex in a needed escape (``%c3%a9``) is accepted: it decodes to the same bytes as
  ``%C3%A9`` and cannot change which segment or route a path means.
- An encoded ``;`` (``%3B``) is data inside a segment, not a segment parameter, and is accepted,
  except where a server that decodes it and cuts the parameter off (``..%3Bx`` read as
  ``..;x``, then as ``..``: the ``..;/`` bypass, encoded) would read another path: a segment
  that is ``.``, ``..`` or empty once everything from its first encoded ``;`` is cut off.
- A percent-encoded character that Unicode compatibility normalisation (NFKC, as IIS/.NET and
  some Python and Java stacks apply to the decoded path) turns into path syntax is refused:
  ``/``, ``\\``, ``;`` or ``%`` (``%EF%BC%8F``, a fullwidth solidus), or a segment that
  becomes ``.`` or ``..`` (``%EF%BC%8E%EF%BC%8E``, two fullwidth full stops; ``%E2%80%A5``, a
  two dot leader), also once a ``;`` parameter is cut off. Other characters NFKC changes
  (fullwidth letters, ``™``) pass ``check_path``; ``RouteTable.match`` refuses them where the
  path NFKC reads matches another route than the path as sent, or none (``/%EF%BD%81dmin``).

A path an upstream could read as under keygate's reserved ``/_keygate/``, though it is not so
as sent, is refused too: its first segment compared case-insensitively, with trailing dots and
spaces stripped, or after NFKC (``/_KEYGATE/``, ``/_keygate./``, ``/%EF%BC%BFkeygate/``).

Route globs are case-sensitive, but many upstreams match paths case-insensitively (IIS/ASP.NET,
Windows file servers, some Spring and Express configurations), so ``RouteTable.match`` also
refuses a path that, compared case-insensitively (ASCII letters), matches another route than
the first it matches as sent: ``/ADMIN/users`` in front of a public ``/**`` with a scoped
``/admin/**`` before it (and so a path whose NFKC reading does, ``/%EF%BC%A1dmin``).

Likewise, most upstream routers read ``/people/1/`` as ``/people/1``, so ``RouteTable.match``
refuses a path with a trailing slash whose reading without it matches another route (or an
earlier one case-insensitively): ``DELETE /people/1/`` matching a ``/people/**`` write route
while ``/people/*`` holds the stricter DELETE.

And a path with a dot at the end of a segment or in its last segment is read two more ways:
with every segment's trailing dots and spaces stripped (Windows, IIS: ``/admin./users`` and
``/admin%20/users`` are ``/admin/users``), and with its last segment cut at its first dot (a
format suffix: Rails' ``(.:format)``, Spring MVC's suffix pattern matching before 5.3:
``/admin.json`` is ``/admin``). A reading that matches another route is refused, also once a trailing slash is
dropped from it; the second one not when the route matched as sent names the dotted last
segment literally (``/users.csv`` beside ``/users``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence
from urllib.parse import quote, unquote, unquote_to_bytes

from .errors import BadRequest, NotFound, shown
from .models import HTTP_METHODS, RESERVED_PATH, Route
from .percent import unquote_latin1
from .tokens import BODY_LEN, alternation as _alternation, looks_like_token, marked

MAX_PATH_BYTES = 2048

_PCHAR = r"A-Za-z0-9\-._~!$&'()*+,=:@"
# The common case in one C-level match: canonical segments, escapes merely well-formed.
_FAST = re.compile(r"(?:/(?!\.+(?:/|\Z))(?:[%s]|%%[0-9A-Fa-f]{2})+)*/?" % _PCHAR)
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_HEX = frozenset("0123456789abcdefABCDEF")
_BAD_CHAR = re.compile(r"[^%s/%%]" % _PCHAR)

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _bad(message: str) -> BadRequest:
    return BadRequest(message, code="bad_path")


def no_route(method: str, raw_path: str) -> NotFound:
    """404 ``no_route``, naming the path without any segment long enough to hold a key's
    secret (32 characters, however encoded): a key in the path is never echoed back."""
    path = "/".join(seg if len(seg) < 32 else "***" for seg in raw_path.split("/"))
    return NotFound(f"No route matches {shown(method)} {path}.", code="no_route")


def check_path(raw_path: str | bytes) -> None:
    """Refuse a request path that is not already canonical (400 ``bad_path``).

    ``raw_path`` is the path part of the request target exactly as sent (no query)."""
    if isinstance(raw_path, bytes):
        raw_path = raw_path.decode("utf-8", "surrogateescape")
    if len(raw_path) > MAX_PATH_BYTES:
        raise _bad(f"The request path is longer than {MAX_PATH_BYTES} bytes.")
    if raw_path[:1] == "/" and _FAST.fullmatch(raw_path) is not None:
        if "%" in raw_path:
            _check_escapes(raw_path)
        # only a first segment starting with '_' or an escape can be read as keygate's own
        if raw_path[1:2] in ("_", "%") and _reads_reserved(raw_path):
            raise _bad(f"The request path is {RESERVED_PATH} as a server that compares paths "
                       "case-insensitively or normalises them reads it, but not as sent; "
                       f"keygate's own endpoints are under {RESERVED_PATH} exactly.")
        return
    raise _bad(_diagnose(raw_path))


_RESERVED_SEGMENT = RESERVED_PATH.strip("/")


def _reads_reserved(raw_path: str) -> bool:
    """Whether an upstream could read ``raw_path`` (accepted so far by ``check_path``) as under
    ``RESERVED_PATH`` though it is not so as sent: its first segment compared
    case-insensitively (IIS/ASP.NET, Windows file servers, some Spring and Express configs),
    with trailing dots and spaces stripped (Windows, IIS), after NFKC (a fullwidth '_') and
    without the invisible format characters NFKC keeps (a zero-width space, a soft hyphen, a
    BOM), cut at a ';' (a path parameter, which servers that decode '%3B' drop) or a ':' (an
    NTFS stream name, ``_keygate::$DATA``). keygate answers ``/_keygate/`` itself and forwards
    nothing under it; behind a catch-all route ``/_KEYGATE/v1/keys`` would be forwarded, with
    the identity headers, to an upstream that serves it as ``/_keygate/v1/keys``. (8.3 short
    names, ``_KEYGA~1``, depend on the upstream's disk and are left to it.)"""
    end = raw_path.find("/", 1)
    if end < 0:
        return False
    segment = raw_path[1:end]
    if segment == _RESERVED_SEGMENT:
        return False  # as sent: keygate's own
    if "%" in segment:  # well-formed, needed escapes of UTF-8 (checked before)
        segment = unicodedata.normalize("NFKC", unquote(segment))
        segment = "".join(c for c in segment if unicodedata.category(c) != "Cf")
    segment = segment.partition(";")[0].partition(":")[0]
    return segment.rstrip(". ").lower() == _RESERVED_SEGMENT


def _check_escapes(path: str) -> None:
    """Every escape is well-formed here; refuse the ones a canonical path never has."""
    for m in _ESCAPE.finditer(path):
        byte = int(m.group(1), 16)
        if byte == 0x2F or byte == 0x5C:
            raise _bad(f"The request path contains an encoded '{chr(byte)}' ({m.group(0)}); "
                       "send path separators unencoded.")
        if byte == 0:
            raise _bad("The request path contains an encoded NUL (%00).")
        if byte < 0x20 or byte == 0x7F:
            raise _bad(f"The request path contains an encoded control character ({m.group(0)}).")
        if byte in _UNRESERVED:
            what = "dot" if byte == 0x2E else f"'{chr(byte)}'"
            raise _bad(f"The request path contains a percent-encoded {what} ({m.group(0)}); "
                       "send unreserved characters unencoded.")
        if byte == 0x25:
            end = m.end()
            if path[end:end + 1] in _HEX and path[end + 1:end + 2] in _HEX:
                raise _bad("The request path is double-encoded "
                           f"({path[m.start():end + 2]}).")
    try:  # strict UTF-8: no overlong forms (%c0%ae is an overlong '.'), no surrogates
        decoded = unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("The request path's percent-encoding is not valid UTF-8.") from None
    if " " in decoded:  # (a path with an escape pays one more C-level scan)
        for seg in decoded.split("/"):
            if _dots_spaces_only(seg):
                # Windows strips a segment's trailing dots and spaces: '..%20' is '..' to
                # IIS ('/public/..%20/admin' is '/admin'), '%20' and '.%20' are empty
                raise _bad("The request path contains a segment of dots and spaces only.")
    # only an encoded ';' or non-ASCII can read differently to a server that does more than
    # decode (an ordinary path pays two C-level scans)
    if ";" in decoded or not decoded.isascii():
        problem = decoded_problem(decoded)
        if problem is not None:
            raise _bad(f"The request path contains {problem}.")


_SYNTAX = "/\\;%"  # what NFKC must not make of a compatibility character


def decoded_problem(decoded: str) -> str | None:
    """What a percent-decoded path (``/`` only between segments: ``%2F`` is refused before)
    holds that a server cutting ``;`` parameters off or NFKC-normalising would read as path
    syntax, as the end of a sentence naming no part of the path; None when nothing does."""
    # is_normalized answers most non-ASCII paths (é, ü, CJK) without building a new string
    same = decoded.isascii() or unicodedata.is_normalized("NFKC", decoded)
    if same and ";" not in decoded:
        return None
    for seg in decoded.split("/"):
        read = seg
        if not same and not seg.isascii():
            read = unicodedata.normalize("NFKC", seg)
            if read != seg:
                for ch in _SYNTAX:
                    if read.count(ch) > seg.count(ch):
                        return ("a percent-encoded character that Unicode compatibility "
                                f"normalisation (NFKC) turns into '{ch}'")
                if _dots_spaces_only(read):
                    return ("a segment that Unicode compatibility normalisation (NFKC) "
                            f"turns into '{read}'")
        if ";" in read:
            head = read.partition(";")[0]
            if head == "" or _dots_spaces_only(head):
                what = f"'{head}'" if head else "empty"
                return f"a segment that is {what} once its encoded ';' parameter is cut off"
    return None


def _windows_segment(segment: str) -> str:
    """A segment as Windows and IIS read it: its trailing dots and spaces stripped."""
    while True:
        bare = segment.rstrip(".")
        if bare[-3:] == "%20":
            bare = bare[:-3]
        if bare == segment:
            return bare
        segment = bare


# An NTFS stream naming a file's or directory's own contents, at a segment's end, ':' and '$'
# either as sent or percent-encoded (RFC 3986 reserved characters: check_path keeps their
# escapes): 'admin::$INDEX_ALLOCATION' and 'admin:$I30:$INDEX_ALLOCATION' are the directory
# 'admin', 'report::$DATA' the file 'report' (the classic IIS authentication bypass)
_NTFS_STREAM = re.compile(r"(?:%3A|:)(?:(?:%24|\$)I30)?(?:%3A|:)(?:%24|\$)"
                          r"(?:INDEX_ALLOCATION|DATA)\Z", re.IGNORECASE)


def _windows_file_segment(segment: str) -> str:
    """A segment as a server on Windows that maps paths to files reads it: its trailing dots
    and spaces stripped, and a stream naming its own contents (``::$DATA``,
    ``::$INDEX_ALLOCATION``) cut off, in any order."""
    while True:
        bare = _windows_segment(segment)
        if "$" in bare or "%24" in bare:
            bare = _NTFS_STREAM.sub("", bare)
        if bare == segment:
            return bare
        segment = bare


def _windows_reads(path: str) -> bool:
    """Whether a Windows server may read ``path`` as another (cheap: substring scans)."""
    return "." in path or "%20" in path or "$" in path or "%24" in path


def _dots_only(segment: str) -> bool:
    """``.``, ``..``, ``...``: a segment of dots only (Windows strips trailing dots, so from
    three on it reads as an empty segment there)."""
    return segment != "" and segment.strip(".") == ""


def _dots_spaces_only(segment: str) -> bool:
    """A decoded segment of dots and spaces only (``..``, ``.. ``, `` ``): Windows strips a
    segment's trailing dots and spaces, so it reads as ``..`` or ``.`` or empty there."""
    return segment != "" and segment.strip(". ") == ""


_READ_SAFE = "-._~!$&'()*+,=:@"  # what a canonical segment holds unencoded


def nfkc_reading(raw_path: str) -> str | None:
    """The raw path an upstream that NFKC-normalises the decoded path reads, each segment NFKC
    changes percent-encoded again (upper-case hex, as route globs are written); None when NFKC
    changes nothing. For a path ``check_path`` accepted: NFKC makes no '/', '\\', ';', '%'
    or dot segment of it."""
    try:
        decoded = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        return None  # bad_path in check_path
    if decoded.isascii() or unicodedata.is_normalized("NFKC", decoded):
        return None
    out = []
    for raw, seg in zip(raw_path.split("/"), decoded.split("/")):
        read = unicodedata.normalize("NFKC", seg)
        out.append(raw if read == seg else quote(read, safe=_READ_SAFE))
    return "/".join(out)


def _diagnose(path: str) -> str:
    """Why the fast match failed, as one clear sentence (the slow path: bad requests only)."""
    if not path.startswith("/"):
        return "The request path must start with '/'."
    if not path.isascii():
        return "The request path contains non-ASCII bytes; percent-encode them."
    if "\x00" in path:
        return "The request path contains a NUL byte."
    for ch in path:
        if ch < " " or ch == "\x7f":
            return "The request path contains a control character."
    if " " in path:
        return "The request path contains a space; percent-encode it as %20."
    if "\\" in path:
        return "The request path contains a backslash."
    if ";" in path:
        return "The request path contains ';' (segment parameters are not accepted)."
    m = _BAD_CHAR.search(path)
    if m is not None:
        return f"The request path contains '{m.group(0)}', which must be percent-encoded."
    for m in re.finditer("%", path):
        if not (path[m.end():m.end() + 1] in _HEX and path[m.end() + 1:m.end() + 2] in _HEX):
            return "The request path contains a malformed percent escape."
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        if seg == "" and i != len(segments) - 1:
            return "The request path contains an empty segment ('//')."
        if seg in (".", ".."):
            return f"The request path contains a '{seg}' segment."
        if _dots_only(seg):
            return "The request path contains a segment of dots only."
    return "The request path is not canonical."


# --- keys in the query string --------------------------------------------------------------------

_TOKEN_RES: dict[str | tuple[str, ...], re.Pattern[str]] = {}


def _token_re(prefix: str | tuple[str, ...]) -> re.Pattern[str]:
    pattern = _TOKEN_RES.get(prefix)
    if pattern is None:
        pattern = re.compile(r"%s_[0-9A-Za-z-]+_[0-9A-Za-z]{%d}" % (_alternation(prefix),
                                                                   BODY_LEN))
        _TOKEN_RES[prefix] = pattern
    return pattern


def query_has_token(raw_query: str, prefix: str | tuple[str, ...]) -> bool:
    """True when any query parameter name or value holds a keygate token (valid checksum).

    Looks at the percent-decoded query (``+`` as space), decoded up to three times so that
    double encoding does not hide a key, and finds tokens anywhere in it: bare, as
    ``Bearer <token>``, or inside a larger value. Any environment counts — a key in a URL has
    leaked whatever its environment. ``prefix``: one, or several (every prefix this process
    has used, ``Pipeline.key_prefixes``: a key of a prefix a reload replaced has leaked too)."""
    if not raw_query:
        return False
    text = raw_query
    pattern = _token_re(prefix)
    for _ in range(3):
        before = text
        if "+" in text:
            text = text.replace("+", " ")
        if "%" in text:
            text = unquote_latin1(text)  # (urllib's raises per '%' without hex digits)
        if marked(text, prefix):
            for m in pattern.finditer(text):
                if looks_like_token(m.group(0), prefix):
                    return True
        if "%" not in text or text is before:  # (the same object: nothing decoded, and
            return False                        # no further round would decode anything)
    return False


# --- route matching ------------------------------------------------------------------------------

@dataclass(eq=False)
class _Compiled:
    index: int
    route: Route
    methods: frozenset[str] | None     # None = any method
    regex: re.Pattern[str]
    # The glob lower-cased, as a regex over the lower-cased path (None when its literals have no
    # letter: case changes nothing then). And when RouteTable.match looks for an earlier route
    # matching the path case-insensitively: 0 never (no earlier route with a letter could share
    # its first segment), 1 when the path has an upper-case letter (every such route's glob is
    # lower-case), 2 always (one's glob has an upper-case letter).
    folded: re.Pattern[str] | None = None
    case_check: int = 0


def compile_glob(path: str) -> re.Pattern[str]:
    """A route glob as a regex over the raw path.

    ``*`` is exactly one non-empty segment, ``**`` (last segment only) is the rest: zero or
    more segments, so ``/people/**`` matches ``/people``, ``/people/`` and ``/people/a/b``.
    Other segments are literal and compared, case-sensitively, with the raw (still
    percent-encoded) segment, except the hex digits of an escape (``%c3%a9`` is ``%C3%A9``).
    A trailing slash is significant: ``/people`` does not match ``/people/``."""
    if not path.startswith("/"):
        raise ValueError(f"route path {path!r} must start with '/'")
    segments = path.split("/")[1:]
    parts: list[str] = []
    for i, seg in enumerate(segments):
        if seg == "**":
            if i != len(segments) - 1:
                raise ValueError(f"route path {path!r}: '**' must be the last segment")
            parts.append("(?:/.*)?")
        elif seg == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + _literal(seg))
    return re.compile("".join(parts) or "/")


def _literal(seg: str) -> str:
    """A literal glob segment as a regex: its escapes in either hex case (``%c3%a9`` and
    ``%C3%A9`` are the same bytes, and check_path accepts both), the rest as written."""
    out, pos = [], 0
    for m in _ESCAPE.finditer(seg):
        out.append(re.escape(seg[pos:m.start()]))
        out.append("%" + "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c
                                 for c in m.group(1)))
        pos = m.end()
    out.append(re.escape(seg[pos:]))
    return "".join(out)


def _upper_escapes(seg: str) -> str:
    return _ESCAPE.sub(lambda m: m.group(0).upper(), seg) if "%" in seg else seg


def glob_problem(glob: str) -> str | None:
    """Why a route glob from the config could never match a request, as one sentence; None
    when it is fine.

    Requests are matched on the raw path and refused unless ``check_path`` finds it canonical,
    so a glob's literal segments must be what a canonical path can hold: a glob that breaks
    these rules would load and then silently never match. ``/_keygate/`` is keygate's own."""
    if not glob.startswith("/"):
        return f"'{glob}' must start with /"
    if glob.startswith(RESERVED_PATH) or glob == RESERVED_PATH.rstrip("/"):
        return f"'{glob}' is under {RESERVED_PATH}, which keygate reserves for itself"
    if _reads_reserved(glob):
        return (f"'{glob}' is {RESERVED_PATH} as a case-insensitive or Windows server reads "
                f"it; requests with it are refused, so it never matches")
    if any(c in glob for c in "?#;\\") or any(ord(c) <= 32 or ord(c) >= 127 for c in glob):
        return (f"'{glob}' contains a character not allowed in a route path (space, control, "
                "non-ASCII, ?, #, ; or \\; percent-encode non-ASCII)")
    segments = glob[1:].split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "" and not last:
            return f"'{glob}' has an empty segment (//)"
        if _dots_only(segment):
            return (f"'{glob}' has a '{segment}' segment; requests with dot-segments are "
                    "refused, so it never matches")
        if segment and _windows_segment(segment) == "":
            return (f"'{glob}' has a '{segment}' segment of dots and spaces only; requests "
                    "with it are refused, so it never matches")
        if "*" in segment and segment not in ("*", "**"):
            return f"'{glob}': '*' and '**' must be a whole segment (got '{segment}')"
        if segment == "**" and not last:
            return f"'{glob}': '**' may only be the last segment"
        if re.search(r"%(?![0-9A-Fa-f]{2})", segment):
            return f"'{glob}' has a bad percent-escape"
        for escape in _ESCAPE.finditer(segment):
            byte = int(escape.group(1), 16)
            if byte in _UNRESERVED or byte in b"/\\%":
                return (f"'{glob}' has '{escape.group(0)}'; requests with it are refused as "
                        "non-canonical, so it never matches")
        if "%" in segment:
            try:
                decoded = unquote_to_bytes(segment).decode("utf-8")
            except UnicodeDecodeError:
                decoded = None
            problem = None if decoded is None else decoded_problem(decoded)
            if problem is None and decoded is not None and \
                    not unicodedata.is_normalized("NFKC", decoded):
                # a request with it reads as another path under NFKC, which this glob's
                # literal never is: RouteTable.match refuses it
                problem = ("a percent-encoded character Unicode compatibility normalisation "
                           "(NFKC) changes")
            if problem is not None:
                return (f"'{glob}' has {problem}; requests with it are refused, so it never "
                        "matches")
    return None


def case_twin(glob: str, other: str) -> bool:
    """Whether two route globs differ only by the case of letters (an escape's hex digits
    aside, which match in either case)."""
    return glob.lower() == other.lower() and _upper_escapes(glob) != _upper_escapes(other)


def case_shadow(glob: str, earlier: str) -> bool:
    """Whether every path ``glob`` matches, ``earlier`` matches compared case-insensitively
    (ASCII letters) though not as sent: ``RouteTable.match`` refuses each of them, with
    ``earlier`` before ``glob``. ``case_twin`` is the case of equal globs."""
    return _covers(earlier.lower(), glob.lower()) and \
        not _covers(_upper_escapes(earlier), _upper_escapes(glob))


def _covers(wide: str, narrow: str) -> bool:
    """Whether glob ``wide`` matches every path glob ``narrow`` matches (escapes compared as
    written: pass both with their hex in one case)."""
    a, b = wide.split("/")[1:], narrow.split("/")[1:]
    for i, seg in enumerate(a):
        if seg == "**":
            return True
        if i >= len(b) or b[i] == "**":
            return False
        if seg == "*":
            if b[i] == "":  # '*' is a non-empty segment, '' a trailing slash
                return False
        elif seg != b[i]:
            return False
    return len(a) == len(b)


def glob_meet(a: str, b: str) -> str | None:
    """The glob of the paths both route globs ``a`` and ``b`` match (escapes compared with
    their hex in one case), or None when no path matches both: ``/admin/*`` and ``/*/users``
    meet in ``/admin/users``, ``/admin/**`` and ``/**`` in ``/admin/**``."""
    return _meet(_upper_escapes(a).split("/")[1:], _upper_escapes(b).split("/")[1:])


def _meet(x: list[str], y: list[str]) -> str | None:
    """``glob_meet`` of two globs' segments (escapes' hex in one case)."""
    out: list[str] = []
    for i in range(max(len(x), len(y))):
        p = x[i] if i < len(x) else None
        q = y[i] if i < len(y) else None
        if p == "**":  # the rest of the other glob ('/people/**' matches '/people' too)
            return "/" + "/".join(out + y[i:])
        if q == "**":
            return "/" + "/".join(out + x[i:])
        if p is None or q is None:  # one ends before the other
            return None
        if p == "*" or q == "*":
            seg = q if p == "*" else p
            if seg == "":  # '*' is a non-empty segment, '' a trailing slash
                return None
            out.append(seg)
        elif p == q:
            out.append(p)
        else:
            return None
    return "/" + "/".join(out)


# A request method no route's 'methods' can name is any token: a public route for every method
# takes PURGE, PROPFIND, QUERY... as it takes DELETE. CONNECT is refused (501) before routing.
_ROUTED_METHODS = tuple(m for m in HTTP_METHODS if m != "CONNECT")


@dataclass(frozen=True)
class FallThrough:
    """Methods a keyed route leaves, on some of its paths, to a later public route
    (``fall_throughs``): ``keyed`` and ``public`` are indexes into the routes, ``methods`` the
    named methods that fall through, ``any_other`` whether every method no 'methods' entry can
    name (PURGE...) does too (the public route takes every method)."""
    keyed: int
    public: int
    methods: tuple[str, ...]
    any_other: bool
    # how the paths meet: "" as written, "case" only compared case-insensitively, "slash"
    # the public route's paths with their trailing slash dropped, "slashcase" both
    reading: str = ""
    # the methods that need a key on those paths: the keyed route's and those of the keyed
    # routes before the public one that cover them all (in HTTP_METHODS order, HEAD with GET)
    keyed_methods: tuple[str, ...] = ()


def _taken(route: Route) -> frozenset[str] | None:
    """The methods ``route`` takes (HEAD with GET), None for every method."""
    if not route.methods:
        return None
    names = set(route.methods)
    if "GET" in names:
        names.add("HEAD")
    return frozenset(names)


# The work ``fall_throughs`` may do (glob comparisons: index steps, meets, covering routes
# looked at) before it stops and says so: a warning must not make a large config slow to load
# (5000 routes of the shapes in tests/test_config.py take well under 1 s extra).
FALL_THROUGH_BUDGET = 100_000


@dataclass(frozen=True)
class FallThroughs:
    """What ``fall_throughs`` found, in file order of the keyed route; ``cut_at``: the keyed
    route at which it spent its budget and stopped (that route and the later ones were not
    looked at in full), None when it looked at every route."""
    found: tuple[FallThrough, ...]
    cut_at: int | None = None
    budget: int = 0  # the comparisons it had


class _Spent(Exception):
    """``fall_throughs``' budget is spent."""


class _Budget:
    __slots__ = ("left",)

    def __init__(self, amount: int) -> None:
        self.left = amount

    def spend(self, amount: int = 1) -> None:
        self.left -= amount
        if self.left < 0:
            raise _Spent


class _GlobIndex:
    """Globs by their segments (a trie), for ``fall_throughs``: which of them a glob meets,
    walking only the branches that can (a literal segment meets the same literal, '*' and
    '**'), not comparing it with each."""

    def __init__(self) -> None:
        self._root: dict = {}

    def add(self, index: int, segs: Sequence[str]) -> None:
        node = self._root
        for seg in segs:
            node = node.setdefault(seg, {})
        node.setdefault(None, []).append(index)  # None: the globs ending here

    def meeting(self, segs: Sequence[str], budget: _Budget) -> list[int]:
        """The indexes of the globs that meet the glob of ``segs`` (``_meet`` is not None),
        each node visited spending one from ``budget``."""
        found: list[int] = []
        stack = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            budget.spend()
            if "**" in node:  # the rest of the path, whatever it is (zero segments too)
                found += node["**"].get(None, ())
            if i == len(segs):
                found += node.get(None, ())
                continue
            seg = segs[i]
            if seg == "**":  # every glob from here on (duplicates are harmless)
                below = [node]
                while below:
                    at = below.pop()
                    budget.spend()
                    found += at.get(None, ())
                    below.extend(child for key, child in at.items() if key is not None)
                continue
            if seg == "*":  # every child but '' (a trailing slash); '**' is above
                budget.spend(len(node))
                after = segs[i + 1] if i + 1 < len(segs) else None
                if after is None or after in ("*", "**"):
                    stack.extend((child, i + 1) for key, child in node.items()
                                 if key is not None and key not in ("", "**"))
                else:  # only those with a child the next segment can meet
                    stack.extend((child, i + 1) for key, child in node.items()
                                 if key is not None and key not in ("", "**") and
                                 (after in child or "**" in child or
                                  "*" in child and after != ""))
                continue
            if seg in node and seg != "**":
                stack.append((node[seg], i + 1))
            if "*" in node and seg != "":
                stack.append((node["*"], i + 1))
        return found


def fall_throughs(routes: Sequence[Route], *, options_kept: bool,
                  budget: int | None = None,
                  target: Callable[[Route], Hashable] | None = None) -> FallThroughs:
    """Where HTTP verb tampering may reach an upstream without a key, as the config is written
    (for a warning: matching itself stays first match in file order, SPEC). A keyed route
    whose GET needs a key and whose ``methods`` leave others out, followed by a public route
    whose glob meets it (a catch-all, or any overlapping glob) and that takes some of those
    others: 'PURGE /admin/users' reaches the public route, and an upstream handler that does
    not check the method serves it as a GET.

    Not counted: the methods any route between (or before) them takes on every path where the
    two meet (a keyed route for the same glob without methods ends it all); a public route
    with explicit methods written for the keyed route's very glob (the operator's word for
    those methods on those paths); a keyed route that leaves GET itself to others (keyed
    writes, public reads: GET is served without a key there anyway). ``options_kept``: no
    cors section, so OPTIONS is left out (the upstream's CORS preflights carry no key).

    Globs meet as the matcher reads paths (``RouteTable.match`` refuses a path whose other
    reading another route holds, for the methods that route takes): compared
    case-insensitively, and a public glob ending in '/' also without it. A public '/API/**'
    or '/api/reports/*/' after a keyed '/api/reports/*' [GET]: GET '/API/reports/1' is
    refused, DELETE is forwarded without a key to an upstream that reads it as
    '/api/reports/1'.

    Bounded: the public routes a keyed one meets are found through an index of their globs,
    and after ``budget`` comparisons the check stops (``FallThroughs.cut_at``): comparing
    every keyed route with every public one took seconds for a few thousand routes.
    ``budget``: FALL_THROUGH_BUDGET when None.

    Only a public route that forwards where the keyed one does counts: ``target`` says where
    a route forwards (its upstream's name when None is given). Verify-only routes (no
    upstream) are alike: the proxy asking /_keygate/v1/verify forwards them all. A public
    catch-all for another upstream (a web front end after an API's keyed routes) sends
    'PURGE /api/users' to a server that has no such handler."""
    found: list[FallThrough] = []
    if target is None:
        def target(route: Route) -> Hashable:
            return route.upstream
    targets = [target(route) for route in routes]
    if budget is None:
        budget = FALL_THROUGH_BUDGET
    spend = _Budget(budget)
    segments = [_upper_escapes(route.path).split("/")[1:] for route in routes]
    # compared as the matcher guards paths: case-insensitively ('/API/reports/1' is refused
    # for GET where '/api/reports/*' holds it, so a case-insensitive upstream reads it so)
    folded = [route.path.lower().split("/")[1:] for route in routes]
    globs = FoldedGlobs()  # which routes cover a glob case-insensitively, not comparing each
    publics = _GlobIndex()  # the public routes' readings
    # (public route, its reading's segments, the reading's as written, trailing slash dropped)
    readings: list[tuple[int, list[str], list[str], bool]] = []
    for i, route in enumerate(routes):
        globs.add(i, route.path)
        if route.public:
            publics.add(len(readings), folded[i])
            readings.append((i, folded[i], segments[i], False))
            if len(folded[i]) > 1 and folded[i][-1] == "":
                # '/api/reports/*/': its paths as an upstream that drops a trailing slash
                # reads them (the matcher refuses GET '/api/reports/1/' where '/api/reports/*'
                # holds it)
                publics.add(len(readings), folded[i][:-1])
                readings.append((i, folded[i][:-1], segments[i][:-1], True))
    k = 0
    try:
        for k, keyed in enumerate(routes):
            mine = _taken(keyed)
            if keyed.public or mine is None or "GET" not in mine:
                continue
            # only the public routes whose readings meet this one's glob, in file order
            met: dict[int, list[int]] = {}
            for r in publics.meeting(folded[k], spend):
                if readings[r][0] > k and targets[readings[r][0]] == targets[k]:
                    met.setdefault(readings[r][0], []).append(r)
            for p in sorted(met):
                public = routes[p]
                theirs = _taken(public)
                methods_out: set[str] = set()
                keyed_out: set[str] = set()  # what the keyed routes on those paths take
                leaks, reading = False, ""
                for r in sorted(set(met[p])):
                    _, reading_segs, written, slash = readings[r]
                    spend.spend()
                    meet = _meet(folded[k], reading_segs)
                    if meet is None:
                        continue
                    if theirs is not None and not slash and segments[p] == segments[k]:
                        continue  # the operator's word for those methods on those paths
                    taken, every, keys = set(mine), False, set(mine)
                    covering = globs.covering(meet)
                    spend.spend(len(covering))
                    for j in covering:
                        if j >= p:
                            break
                        other = routes[j]
                        if j == k or not _covers(other.path.lower(), meet):
                            continue
                        names = _taken(other)
                        if names is None:
                            every = True
                            break
                        taken |= names
                        if not other.public:
                            keys |= names
                    if every:
                        continue
                    offered = _ROUTED_METHODS if theirs is None else \
                        tuple(m for m in _ROUTED_METHODS if m in theirs)
                    methods = {m for m in offered if m not in taken
                               and not (options_kept and m == "OPTIONS")}
                    if methods or theirs is None:
                        if not leaks:
                            as_written = _meet(segments[k], written) is not None
                            reading = ("slash" if slash else "") + \
                                ("" if as_written else "case")
                        leaks = True
                        methods_out |= methods
                        keyed_out |= keys
                if leaks:
                    found.append(FallThrough(
                        k, p, tuple(m for m in _ROUTED_METHODS if m in methods_out),
                        theirs is None, reading,
                        tuple(m for m in HTTP_METHODS if m in keyed_out)))
    except _Spent:
        return FallThroughs(tuple(found), k, budget)
    return FallThroughs(tuple(found), None, budget)


class FoldedGlobs:
    """Globs by their lower-cased segments (a trie), for the config's load-time check: which
    of them could cover a glob case-insensitively (``case_shadow``), without comparing it
    with each. Only globs with a letter are worth adding: for the others case changes
    nothing."""

    def __init__(self, fold: bool = True) -> None:
        """``fold=False``: the globs as written (their escapes' hex in one case), for
        ``fall_throughs``: ``covering`` then finds exactly the globs that cover one."""
        self._root: dict = {}
        self._key = str.lower if fold else _upper_escapes

    def add(self, index: int, glob: str) -> None:
        node = self._root
        for seg in self._key(glob).split("/")[1:]:
            node = node.setdefault(seg, {})
        node.setdefault(None, []).append(index)  # None: the globs ending here

    def covering(self, glob: str) -> list[int]:
        """The indexes of the globs that, lower-cased, match every path ``glob`` lower-cased
        matches: a superset of those ``case_shadow`` holds for."""
        segs = self._key(glob).split("/")[1:]
        found: list[int] = []
        stack = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if "**" in node:
                found += node["**"].get(None, ())
            if i == len(segs):
                found += node.get(None, ())
                continue
            seg = segs[i]
            if seg == "**":
                continue
            if seg in node and seg != "*":
                stack.append((node[seg], i + 1))
            if "*" in node and seg != "":
                stack.append((node["*"], i + 1))
        return sorted(found)


SEEN_MAX = 4096      # (method, path) pairs whose route is remembered
SEEN_PATH_LEN = 256  # longer paths are matched each time, not remembered


class RouteTable:
    """Routes in file order; ``match`` returns the first whose methods and glob fit.

    Routes are indexed by their first literal segment, so a request only tries the routes that
    could match its first segment (plus the ones starting with a glob), in file order.
    The routes with a letter in their glob are indexed the same way by their lower-cased first
    segment (``_fold``), so a path's case-insensitive reading tries only those."""

    def __init__(self, routes: Sequence[Route]) -> None:
        compiled: list[_Compiled] = []
        firsts: list[str | None] = []
        for i, route in enumerate(routes):
            methods = None
            if route.methods:
                names = {m.upper() for m in route.methods}
                if "GET" in names:
                    names.add("HEAD")   # HEAD is GET without the body; same scopes
                methods = frozenset(names)
            compiled.append(_Compiled(i, route, methods, compile_glob(route.path)))
            first = route.path.split("/", 2)[1]
            firsts.append(None if first in ("*", "**") else _upper_escapes(first))
        self._ci_literal, self._ci_wild, self._ci_by_first = _fold(compiled)
        self._wild = tuple(c for c, f in zip(compiled, firsts) if f is None)
        self._by_first: dict[str, tuple[_Compiled, ...]] = {}
        for key in {f for f in firsts if f is not None}:
            self._by_first[key] = tuple(c for c, f in zip(compiled, firsts)
                                        if f is None or f == key)
        self.routes = tuple(routes)
        # (method, path) -> the route it matched, for paths matched lately (a new table on
        # every reload, so never a route of an old config)
        self._seen: dict[tuple[str, str], Route] = {}

    def match(self, method: str, raw_path: str) -> Route:
        route = self._seen.get((method, raw_path))  # a hot endpoint: one dict lookup
        if route is not None:
            return route
        found = self._find(method, raw_path)
        # a case-insensitive upstream (IIS/ASP.NET, Windows file servers, some Spring and
        # Express configs) reads '/ADMIN/users' as '/admin/users': behind a public catch-all
        # that must not be the catch-all's. Only routes with a rival pay, and a path without an
        # upper-case letter only a lower() when no rival's glob has one.
        if found.case_check:
            lower = raw_path.lower()
            if (found.case_check == 2 or lower != raw_path) and \
                    self._case_rival(found, method, lower):
                raise _bad("The request path, compared case-insensitively (as many upstreams "
                           "compare paths), matches another route than as sent; send it in "
                           "the case the route is written in.")
        if raw_path[-1:] == "/" and len(raw_path) > 1:
            # most upstream routers read '/people/1/' as '/people/1' (Express and Spring MVC 5
            # by default, Flask's strict_slashes=False): that reading must be this route too,
            # also compared case-insensitively. Only paths with a trailing slash pay for it.
            if self._rival(found, method, raw_path[:-1]):
                raise _bad("The request path, read without its trailing slash (as many "
                           "upstreams read it), matches another route than as sent; send it "
                           "without the trailing slash.")
        if _windows_reads(raw_path) and self._dotted_rival(found, method, raw_path):
            raise _bad("The request path, read without a segment's trailing dots or spaces "
                       "or an NTFS stream name such as '::$DATA' (as Windows and IIS read "
                       "it) or without its last segment's dot suffix (a format, as Rails "
                       "and older Spring MVC read it), matches another route than as sent; "
                       "send the path the route is written for.")
        if "%" in raw_path:
            # an upstream that NFKC-normalises the decoded path reads '/%EF%BD%81dmin' (a
            # fullwidth 'a') as '/admin': that reading must be this route too, also compared
            # case-insensitively ('/%EF%BC%A1dmin', a fullwidth 'A', reads '/Admin')
            reading = nfkc_reading(raw_path)
            if reading is not None:
                try:
                    other = self._find(method, reading)
                except NotFound:
                    other = None
                # ...and read as such an upstream reads a dotted path ('/admin%EF%BC%8E/users',
                # a fullwidth full stop, is '/admin./users', which IIS serves as '/admin/users')
                if other is not found or \
                        found.case_check and self._case_rival(found, method, reading.lower()) or \
                        _windows_reads(reading) and \
                        self._dotted_rival(found, method, reading):
                    raise _bad("The request path contains a percent-encoded character that "
                               "Unicode compatibility normalisation (NFKC) reads as another "
                               "route's path.")
        route = found.route
        if len(raw_path) <= SEEN_PATH_LEN:
            if len(self._seen) >= SEEN_MAX:
                self._seen.clear()
            self._seen[(method, raw_path)] = route
        return route

    def _dotted_rival(self, found: _Compiled, method: str, raw_path: str) -> bool:
        """Whether a reading of the dotted ``raw_path`` an upstream may serve instead matches
        another route than ``found`` (or an earlier one case-insensitively): each segment's
        trailing dots and spaces, and an NTFS stream naming its own contents (``::$DATA``),
        stripped (Windows, IIS), or the last segment cut at its first
        dot (a format suffix: Rails, Spring MVC's suffix patterns), the latter not when
        ``found`` names the dotted segment literally (a route written for ``/users.csv``). A reading ending in
        a slash is read without it too."""
        segments = raw_path.split("/")
        at = len(segments) - 1 if segments[-1] or len(segments) < 3 else len(segments) - 2
        readings = []
        if raw_path.endswith(".") or "./" in raw_path or "%20" in raw_path or \
                "$" in raw_path or "%24" in raw_path:
            readings.append("/".join(_windows_file_segment(seg) for seg in segments))
        name, dot, _ = segments[at].partition(".")
        if dot and name:
            glob = found.route.path.split("/")
            # a route naming the dotted last segment as sent is written for it: not its
            # format reading (the segments before it are read as Windows reads them still)
            if not (len(glob) == len(segments) and glob[at] == segments[at]):
                cut = segments[:]
                cut[at] = name
                readings.append("/".join(cut))
        for reading in readings:
            if reading == raw_path:
                continue
            if self._rival(found, method, reading):
                return True
            # and without a trailing slash, as upstreams read '/admin.json/' ('/admin/' to
            # IIS, '/admin.json' to Rails, each '/admin' to both)
            if reading[-1:] == "/" and len(reading) > 1 and \
                    self._rival(found, method, reading[:-1]):
                return True
        return False

    def _rival(self, found: _Compiled, method: str, reading: str) -> bool:
        """Whether another route than ``found`` matches ``reading`` (or an earlier one does
        case-insensitively)."""
        try:
            other = self._find(method, reading)
        except NotFound:
            other = None
        return other is not None and other is not found or \
            bool(found.case_check) and self._case_rival(found, method, reading.lower())

    def _find(self, method: str, raw_path: str) -> _Compiled:
        end = raw_path.find("/", 1)
        first = raw_path[1:] if end < 0 else raw_path[1:end]
        if "%" in first:  # the index is keyed with upper-case hex, as the regexes match either
            first = _upper_escapes(first)
        for c in self._by_first.get(first, self._wild):
            if (c.methods is None or method in c.methods) and c.regex.fullmatch(raw_path):
                return c
        raise no_route(method, raw_path)

    def _case_rival(self, found: _Compiled, method: str, lower: str) -> bool:
        """Whether a route before ``found`` (which matches the path as sent) matches the path
        compared case-insensitively, ``lower`` being the path lower-cased: the route a
        case-insensitive upstream would serve instead. Only routes with a letter in their
        glob can (for the others case changes nothing), tried as ``_find`` tries routes."""
        for c in self._ci_literal.get(lower, ()):
            if c.index >= found.index:
                break
            if c.methods is None or method in c.methods:
                return True
        end = lower.find("/", 1)
        first = lower[1:] if end < 0 else lower[1:end]
        for c in self._ci_by_first.get(first, self._ci_wild):
            if c.index >= found.index:
                break
            if (c.methods is None or method in c.methods) and c.folded.fullmatch(lower):
                return True
        return False


_LETTER = re.compile(r"[A-Za-z]")
_UPPER = re.compile(r"[A-Z]")


def _literal_text(path: str) -> str:
    """A glob's literal segments without their escapes (whose hex matches in either case)."""
    return _ESCAPE.sub("", "/".join(s for s in path.split("/") if s not in ("*", "**")))


def _fold(compiled: Sequence[_Compiled]) -> tuple[dict[str, tuple[_Compiled, ...]],
                                                  tuple[_Compiled, ...],
                                                  dict[str, tuple[_Compiled, ...]]]:
    """The routes whose glob has a letter, for ``RouteTable._case_rival``: those without a
    '*' by their glob lower-cased, the others indexed as ``RouteTable`` indexes all routes but
    by their lower-cased first segment; and each route's ``folded`` and ``case_check``.
    Linear in the routes (a regex each at most): a table is built in the event loop on every
    reload, and comparing each route with every earlier one took seconds for 2000."""
    literal: dict[str, list[_Compiled]] = {}
    wild: list[_Compiled] = []
    by_first: dict[str, list[_Compiled]] = {}
    # (any lettered route so far, any with an upper-case letter) among the wild-first ones,
    # per lower-cased first segment, and over all of them
    wild_seen = [False, False]
    first_seen: dict[str, list[bool]] = {}
    all_seen = [False, False]
    for c in compiled:
        first = c.route.path.split("/", 2)[1].lower()
        is_wild = first in ("*", "**")
        if is_wild:
            lettered, upper = all_seen
        else:
            mine = first_seen.get(first, (False, False))
            lettered, upper = wild_seen[0] or mine[0], wild_seen[1] or mine[1]
        c.case_check = 0 if not lettered else 2 if upper else 1
        text = _literal_text(c.route.path)
        if _LETTER.search(text) is None:
            continue
        has_upper = _UPPER.search(text) is not None
        for seen in (all_seen,
                     wild_seen if is_wild else first_seen.setdefault(first, [False, False])):
            seen[0] = True
            seen[1] = seen[1] or has_upper
        if "*" not in c.route.path:
            # matched as written, escapes aside: lower-cased, a lower-cased path is it
            literal.setdefault(c.route.path.lower(), []).append(c)
            continue
        c.folded = compile_glob(c.route.path.lower())
        if is_wild:
            wild.append(c)
            for bucket in by_first.values():
                bucket.append(c)
        else:
            by_first.setdefault(first, list(wild)).append(c)
    return ({k: tuple(v) for k, v in literal.items()}, tuple(wild),
            {k: tuple(v) for k, v in by_first.items()})
