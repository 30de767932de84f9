"""JSON as RFC 8259 has it, for what keygate reads from people (the admin API's bodies, its own
list cursors, the CLI's ``--meta``). No imports beyond the standard library: the CLI uses it."""

from __future__ import annotations

import json
import re
from typing import Any

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(rb"[\[\]{}]")


def _not_json(text: str) -> float:
    raise ValueError(f"{text} is not a JSON number")


class OutOfRange(ValueError):
    """A JSON number no reader keeps whole: a float past the double range (``1e999``) or an
    integer of more digits than Python reads (4300). ``shown``: the number, shortened."""

    def __init__(self, text: str) -> None:
        self.shown = text if len(text) <= 24 else f"{text[:12]}… ({len(text)} characters)"
        super().__init__(f"{self.shown} is out of range")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e999: no JSON can carry it back out
        raise OutOfRange(text)
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # past sys.get_int_max_str_digits() (4300), in Python's own words
        raise OutOfRange(text) from None


class RepeatedName(ValueError):
    """A JSON object that gives one name twice."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name!r} is given more than once")
        self.name = name


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        raise RepeatedName(next(n for n, _ in pairs if n in seen or seen.add(n)))
    return data


class NotUtf8(ValueError):
    """Bytes that are not UTF-8 text (RFC 8259 8.1: JSON between systems is UTF-8)."""


_UTF8_BOM = b"\xef\xbb\xbf"


class TooDeep(ValueError):
    """JSON nested deeper than the reader was asked to take."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"nested more than {limit} levels deep")
        self.limit = limit


def nesting(raw: bytes) -> int:
    """How deep the arrays and objects of ``raw`` nest (strings skipped), without recursion:
    Python's reader nests by recursing, so how deep it can go depends on how deep the stack
    already is where it runs, and past that it fails as if the text were not JSON."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', raw)):
        if m.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def strict_json(raw: bytes | str, max_depth: int | None = None) -> Any:
    """JSON as RFC 8259 has it: Python's reader also takes NaN, Infinity and numbers that
    overflow to infinity, which ``meta`` would store and every later answer would carry as bare
    ``NaN`` (not JSON: the console and jq could no longer read the listing). And no name twice
    in one object (:class:`RepeatedName`): Python keeps the last, other readers the first, so
    a log, a proxy in front or a reviewer could read ``scopes`` as one list while the key got
    the other. With ``max_depth``, :class:`TooDeep` for arrays and objects nested deeper, so
    the answer never depends on the caller's stack. Bytes are UTF-8 (:class:`NotUtf8`), a
    leading byte order mark ignored as RFC 8259 allows: Python's reader also guesses UTF-16 and
    UTF-32 from NUL bytes, so a proxy or log in front, reading the body as the UTF-8 it must
    be, saw other text than keygate acted on. ValueError (or RecursionError) for anything
    else."""
    if isinstance(raw, bytes):
        if b"\x00" in raw:  # never in JSON text, raw; in every UTF-16 or UTF-32 one
            raise NotUtf8("a NUL byte: UTF-16 or UTF-32 text")
        try:
            raw = raw.removeprefix(_UTF8_BOM).decode("utf-8")
        except UnicodeDecodeError:
            raise NotUtf8("not UTF-8 text") from None
    if max_depth is not None:
        if nesting(raw.encode("utf-8", "surrogatepass")) > max_depth:
            raise TooDeep(max_depth)
    return json.loads(raw, parse_constant=_not_json, parse_float=_finite, parse_int=_integer,
                      object_pairs_hook=_unique)
