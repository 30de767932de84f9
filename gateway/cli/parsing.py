"""What the command modules build their commands from: the option value types (pure, each a
``ValueError``-raising parser that :func:`argtype` turns into an argparse usage error, exit 2),
:func:`given` for request bodies, and :class:`CommandTree`, the parser they add their
commands to.
"""

from __future__ import annotations

import argparse
import re
import time
from datetime import date
from typing import Any, Callable

from ..models import (MAX_AUDIT_LIMIT, MAX_COUNT, MAX_SCOPE_LEN, MAX_SECONDS, MAX_UNUSED_DAYS,
                      TooManyDigits, meta_json, parse_rate_limit, parse_rfc3339, rfc3339,
                      well_formed_scope, whole_number)
from ..strictjson import RepeatedName, strict_json
from ..trust import allowed_network

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
NONE_WORDS = ("none", "null", "unlimited")


# --- option values -------------------------------------------------------------------------------

def parse_duration(text: str) -> int:
    """``30d`` / ``24h`` / ``90m`` / ``3600s`` / ``2w`` → seconds. ``0`` alone is accepted.

    A unit is required otherwise: a bare ``30`` could mean seconds or days.
    """
    text = text.strip()
    if text == "0":
        return 0
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a duration; use e.g. 30d, 24h, 90m or 3600s")
    seconds = whole_number(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_SECONDS:  # the admin API's bound on expires_in and grace_seconds
        raise ValueError(f"'{text}' is more than a century ({MAX_SECONDS}s, 36500d), the most "
                         "the admin API takes")
    return seconds


def parse_expiry(text: str) -> dict[str, Any]:
    """``--expires``: a duration → ``{"expires_in": seconds}``; an RFC 3339 date or datetime →
    ``{"expires_at": "...Z"}`` (a bare date is midnight UTC; a datetime needs a zone)."""
    text = text.strip()
    if _DURATION.match(text):
        seconds = parse_duration(text)
        if seconds <= 0:
            raise ValueError("--expires must be a positive duration")
        return {"expires_in": seconds}
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"'{text}' is not a valid date") from None
        return _within_a_century(text, {"expires_at": f"{day.isoformat()}T00:00:00Z"})
    try:
        moment = parse_rfc3339(text)  # the admin API's own reading: RFC 3339 only
    except ValueError:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?", text):
            raise ValueError(f"'{text}' has no time zone; add Z or an offset like +02:00") \
                from None
        raise ValueError(f"'{text}' is neither a duration (30d, 24h, 90m, 3600s) nor an "
                         "RFC 3339 date (2027-01-31) or datetime (2027-01-31T12:00:00Z)") from None
    try:
        expiry = {"expires_at": rfc3339(moment)}
    except (ValueError, OverflowError):  # a year 1 or 9999 whose offset leaves them in UTC
        raise ValueError(f"'{text}' falls outside the years 0001 to 9999 in UTC") from None
    return _within_a_century(text, expiry)


def _within_a_century(text: str, expiry: dict[str, Any]) -> dict[str, Any]:
    """A date more than a century away (and a day: the admin API counts from its own clock,
    which may be that far from this machine's) is one the admin API refuses."""
    if parse_rfc3339(expiry["expires_at"]) > time.time() + MAX_SECONDS + 86400:
        raise ValueError(f"'{text}' is more than a century away, past the most the admin API "
                         "takes")
    return expiry


def seconds(text: str) -> float:
    """``--timeout``: a finite number of seconds above 0 (0 would make the socket
    non-blocking; a negative, nan or inf one is refused by the socket with a traceback)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a number of seconds") from None
    if not 0 < value < 10**6:  # nan compares false
        raise ValueError(f"'{text}' must be a number of seconds above 0 (and below 1000000)")
    return value


def positive_int(text: str) -> int:
    try:
        value = whole_number(text)
    except TooManyDigits:
        raise
    except ValueError:  # int()'s own message is Python's: "invalid literal for int() ..."
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def count_or_none(text: str) -> int | None:
    """``--monthly-requests 5000`` / ``none`` (no limit of its own)."""
    if text.strip().lower() in NONE_WORDS:
        return None
    if not text.strip().isascii() or not text.strip().isdigit():
        raise ValueError(f"'{text}' is not a whole number (or 'none')")
    value = whole_number(text)
    if value > MAX_COUNT:  # the admin API's bound: else its 400, exit 1, for a slip of usage
        raise ValueError(f"'{text.strip()}' is too large: at most {MAX_COUNT}")
    return value


def rate(text: str) -> str:
    """``--rate-limit 10/s``: read as the admin API reads it (else its 400 came back as an API
    error, exit 1, for what is a malformed option)."""
    return str(parse_rate_limit(text.strip()))


def rate_or_none(text: str) -> str | None:
    return None if text.strip().lower() in NONE_WORDS else rate(text)


def audit_limit(text: str) -> int:
    """``audit --limit N``: 1 to 1000, as the API takes it."""
    value = positive_int(text)
    if value > MAX_AUDIT_LIMIT:
        raise ValueError(f"'{text.strip()}' is not a number of events from 1 to "
                         f"{MAX_AUDIT_LIMIT}")
    return value


def json_object(text: str) -> dict:
    """``--meta '{"customer": "c-42"}'``."""
    try:
        value = strict_json(text)  # as the admin API reads it
    except RepeatedName as exc:
        raise ValueError(f"--meta gives {exc.name!r} more than once; give each name once") \
            from None
    except (ValueError, RecursionError):
        raise ValueError("--meta must be a JSON object, e.g. "
                         "'{\"customer\": \"c-42\"}'") from None
    if not isinstance(value, dict):
        raise ValueError("--meta must be a JSON object")
    try:
        meta_json(value)  # its depth and size, as the admin API checks them
    except ValueError as exc:
        raise ValueError(f"--meta {exc}") from None
    return value


def scope(text: str) -> str:
    """``--scope people:read``: a scope as the admin API reads it."""
    if not well_formed_scope(text):
        raise ValueError(f"{text!r} is a malformed scope; a scope looks like 'people:read' "
                         f"(letters, digits, '_', '.', '-', parts joined by ':'; at most "
                         f"{MAX_SCOPE_LEN} characters)")
    return text


def allowed_ip(text: str) -> str:
    """``--allow-ip 203.0.113.0/24``: an address or CIDR as the admin API reads it (sent as
    written)."""
    try:
        allowed_network(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR like '203.0.113.0/24'") \
            from None
    return text


def days(text: str) -> int:
    """``--unused 30d`` (or ``30``) → 30."""
    body = text.strip().lower().removesuffix("d")
    if not body.isascii() or not body.isdigit():
        raise ValueError(f"'{text}' is not a number of days like 30d")
    value = whole_number(body)
    if value > MAX_UNUSED_DAYS:  # as the API takes it
        raise ValueError(f"'{text}' is not a number of days from 0 to {MAX_UNUSED_DAYS}")
    return value


def daily_days(text: str) -> int:
    """``--days N`` of ``--daily``: 1 to 90, as the API takes it (else bad usage, exit 2)."""
    days = whole_number(text) if text.strip().isascii() and text.strip().isdigit() else 0
    if not 1 <= days <= 90:
        raise ValueError(f"'{text}' is not a number of days from 1 to 90")
    return days


def argtype(fn: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """Wrap a ValueError-raising parser so argparse reports its message (exit 2)."""
    def convert(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = name
    return convert


def given(**fields: Any) -> dict[str, Any]:
    """The fields whose option was given (not None), in order: what a request body carries."""
    return {name: value for name, value in fields.items() if value is not None}


# --- the command tree ----------------------------------------------------------------------------

SubCommands = argparse._SubParsersAction


class CommandTree:
    """The ``keygate`` parser as the command modules see it.

    A remote command (the default) takes the admin options after its name too (``leaf``),
    and after its group's (``keygate keys --json list``); its handler is called as
    ``handler(args, client)``; a local one (``serve``, ``demo``, ``config check``) as
    ``handler(args)``. No parser takes an abbreviated option: argparse would read ``--any``
    as ``--any-ip`` (lifting a key's IP allow-list) and ``--no`` as ``--no-expiry``.
    """

    def __init__(self, verbs: SubCommands, leaf: list[argparse.ArgumentParser],
                 between: list[argparse.ArgumentParser] | None = None) -> None:
        self.verbs = verbs
        self.leaf = leaf
        self.between = leaf if between is None else between  # a group's (help hidden)

    def group(self, name: str, help: str, *, local: bool = False) -> SubCommands:
        """A noun (``keys``, ``workspaces``, ...) whose verbs are added under it."""
        sub = self.verbs.add_parser(name, parents=[] if local else self.between, help=help,
                                    description=help, allow_abbrev=False)
        return sub.add_subparsers(dest=f"{name}_verb", metavar="COMMAND", required=True)

    def command(self, where: SubCommands | None, name: str, help: str, handler: Callable,
                *, local: bool = False, described: bool = True) -> argparse.ArgumentParser:
        """A command under ``where`` (a group; None: a top-level verb). ``described=False``
        leaves the help line out of the command's own ``--help``."""
        where = self.verbs if where is None else where
        extra = {"description": help} if described else {}
        sub = where.add_parser(name, parents=[] if local else self.leaf, help=help,
                               allow_abbrev=False, **extra)
        sub.set_defaults(handler=handler, local=local)
        return sub


def identifier(text: str) -> str:
    """A workspace, key, role or plan named on the command line: an empty one (an unset
    shell variable) would ask for another path (``/workspaces/acme/keys/``) and read as "no
    such admin endpoint".

    No workspace id, key id, role or plan name holds '/' or '\\' or is '.' or '..' (slugs,
    base62 key ids, plan names starting with a letter or digit: SPEC). Sent as one segment,
    such an id is still read as a path by a reverse proxy in front of the admin listener
    (nginx decodes %2F and removes dot segments): ``keys revoke -w acme
    ../../other/keys/ID`` revoked a key of workspace ``other``. Refused before anything is
    sent."""
    if not text.strip():
        raise ValueError("must not be empty")
    if text in (".", "..") or "/" in text or "\\" in text:
        raise ValueError(f"{text!r} is not an id or name: none holds '/' or '\\' or is '.' "
                         "or '..'")
    return text


ID = argtype(identifier, "ID")
"""The ``type`` of a positional workspace, key, role or plan name."""


def workspace_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", "-w", required=True, type=argtype(identifier, "WS"),
                   metavar="WS", help="workspace id")


class _DaysAction(argparse.Action):
    """``--days N`` asks for days: it implies ``--daily`` (alone it was taken and dropped,
    and the month's one line answered a question about N days)."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        setattr(namespace, self.dest, values)
        namespace.daily = True


def daily_options(p: argparse.ArgumentParser) -> None:
    """``--daily [--days N]`` of ``usage`` and ``keys usage``."""
    p.add_argument("--daily", action="store_true", help="one line per UTC day")
    p.add_argument("--days", type=argtype(daily_days, "DAYS"), default=30, action=_DaysAction,
                   metavar="N",
                   help="one line per UTC day for the last N days (1-90, default 30); "
                        "implies --daily")
