"""How commands print: a human line or table on stdout, or with ``--json`` the API's answer
exactly as it came; a new token once, with its warning on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from .client import AdminClient, CliError, printable

TOKEN_WARNING = ("keygate: this is the only time the token is shown; it cannot be shown again. "
                 "Store it now in a secret manager.")


def show(args: argparse.Namespace, client: AdminClient, text: Callable[[], str]) -> int:
    """Print the answer: ``text()`` for a human, the body as it came with ``--json``.

    ``text()`` builds its lines from values escaped one by one (:func:`esc`, and the tables
    and fields here): a newline inside a value (a name) is shown as ``\\x0a``, never as a
    line of its own that reads as another row."""
    if args.json:
        print_body(client)
    else:  # and once more line by line: no terminal escape sequence gets through
        try:
            shown = text()
        except (AttributeError, TypeError, KeyError, ValueError):
            # a field of another type than keygate sends (a number for a list, a list for an
            # object): the builders show what they can as it came; this is the backstop
            raise CliError(f"the admin API at {client.base_url} answered with JSON whose "
                           "fields are not of the types keygate sends (not keygate, or another "
                           "version?); --json prints it as it came"
                           + ("" if client.last_method in ("GET", "HEAD") else
                              " (the change asked for may have been made: read it back)")) \
                from None
        print("\n".join(printable(line) for line in shown.split("\n")))
    return 0


def esc(value: Any) -> str:
    """A value as the API sent it, as text on one line: its newlines and other control
    characters shown escaped (``printable``)."""
    return printable(str(value))


def print_body(client: AdminClient) -> None:
    """``--json``: the API's answer exactly as it came (a listing stays ``{"items": [...]}``)."""
    sys.stdout.write(client.last_body.decode("utf-8", "replace").rstrip("\n") + "\n")


def print_new_token(answer: dict, args: argparse.Namespace, client: AdminClient,
                    what: str) -> None:
    """A created or rotated key's token: alone on stdout (or inside the ``--json`` body), so
    ``$(keygate keys create ...)`` captures just the token; the rest goes to stderr."""
    key = answer.get("key")
    if not isinstance(key, dict):
        raise CliError(f"the admin API at {client.base_url} answered without the key as an "
                       "object, which keygate always sends (if that is your keygate, the key "
                       "may have been made: check with keygate keys list)")
    if args.json:
        _token_written(key, lambda: print_body(client))
    else:  # as the API sent them: escaped, so no terminal escape sequence gets through
        print(printable(f"keygate: {what} key {key.get('id')} ({key.get('name')}) in "
                        f"workspace {key.get('workspace')}"), file=sys.stderr)
        token = answer.get("token", "")
        token = token if isinstance(token, str) else str(token)
        if not token.isprintable():
            # a keygate token is letters, digits and '_': one holding a control (or an
            # invisible) character is no token, and printed escaped it would be a wrong one
            # in a secret manager
            raise CliError(f"the admin API at {client.base_url} answered with a token holding "
                           "a control or invisible character, which a keygate token never "
                           "holds; it is not printed (if that is your keygate, the key was "
                           "made: revoke it)")
        _token_written(key, lambda: print(token))
    print(TOKEN_WARNING, file=sys.stderr)


def _token_written(key: dict, write: Callable[[], None]) -> None:
    """``write()`` the token, flushed: one that cannot be written (a full disk, a pipe closed
    since the command began) leaves a working key nobody holds, so the error names it."""
    try:
        write()
        sys.stdout.flush()
    except OSError as exc:
        discard_stdout()
        raise CliError(f"key {key.get('id')} of workspace {key.get('workspace')} was made, but "
                       f"its token could not be written ({exc.strerror or exc}): nobody holds "
                       f"it. Revoke it: keygate keys revoke --workspace {key.get('workspace')} "
                       f"{key.get('id')}") from None


def discard_stdout() -> None:
    """Point stdout's file descriptor at /dev/null: what is left in its buffer, flushed
    later (at exit), goes nowhere instead of failing once more."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # no real file descriptor (a test's
        pass                                       # capture), or none at all


def human_time(value: Any) -> str:
    """``2026-11-05T12:34:56Z`` → ``2026-11-05 12:34 UTC``; None → ``-``; what is not a
    string (an answer not of keygate's shape) as it came."""
    if not isinstance(value, str):
        return cell(value)
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return value
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; each cell escaped (:func:`esc`) first."""
    rows = [[esc(value) for value in row] for row in rows]
    widths = [columns(h) for h in headers]
    for row in rows:
        widths = [max(w, columns(cell)) for w, cell in zip(widths, row)]
    lines = ["  ".join(cell + " " * (w - columns(cell)) for cell, w in zip(line, widths)).rstrip()
             for line in [list(headers), *rows]]
    return "\n".join(lines)


def columns(text: str) -> int:
    """The terminal columns ``text`` takes: two for an East Asian wide or fullwidth character
    (漢字), none for a combining mark or a zero-width format character, one for the rest."""
    return sum(0 if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf")
               else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def words(values: Any, sep: str = " ") -> str:
    """A list (of scopes, of names) as one cell, each escaped; anything else as it came."""
    if isinstance(values, list):
        return sep.join(esc(v) for v in values) or "-"
    return esc(cell(values))


def fields(obj: dict, order: Sequence[str]) -> str:
    """An object as ``name: value`` lines, the listed fields first, then any others."""
    names = [n for n in order if n in obj] + [n for n in obj if n not in order]
    width = max((columns(esc(n)) for n in names), default=0)
    lines = []
    for name in names:
        value = obj[name]
        if isinstance(value, str) and name.endswith("_at"):
            shown = human_time(value)
        elif isinstance(value, list):
            shown = " ".join(esc(v) for v in value) or "-"
        elif isinstance(value, dict):
            shown = json.dumps(value, separators=(",", ":")) if value else "-"
        else:
            shown = cell(value)
        lines.append(f"{esc(name)}{' ' * (width - columns(esc(name)))}  {esc(shown)}")
    return "\n".join(lines)


def days_table(items: list[dict]) -> str:
    """``--daily``: a DATE / REQUESTS line per day, the counts right-aligned."""
    width = max([len(esc(d.get("requests"))) for d in items] + [8])
    lines = [f"{'DATE':<10}  {'REQUESTS':>{width}}"]
    lines += [f"{esc(day.get('date', '')):<10}  {esc(day.get('requests', 0)):>{width}}"
              for day in items]
    return "\n".join(lines)
