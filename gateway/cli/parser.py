"""The ``keygate`` argument parser: the admin options, and the commands in the order
``keygate --help`` lists them (each command module adds its own)."""

from __future__ import annotations

import argparse
import os
from typing import Any, NoReturn

from . import key_controls, keys, reports, roles, server, workspaces
from .client import DEFAULT_TIMEOUT, printable
from .connection import DEFAULT_ADMIN_URL, admin_url
from .parsing import CommandTree, argtype, seconds


def admin_options(suppress: bool, hidden: bool = False) -> argparse.ArgumentParser:
    """The options every admin command takes, before the command name, after its group's
    name and after its own.

    After it (``suppress``), an unset option must not overwrite a value given before it:
    SUPPRESS leaves it out of the namespace. (No %(default)s in their help: with SUPPRESS
    there is no default to show, and argparse raised KeyError on --help.) ``hidden``: left out
    of the help (a group's, which lists its verbs; the options are in the verbs' help).
    """
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    def shown(text: str) -> str:
        return argparse.SUPPRESS if hidden else text
    p.add_argument("--admin-url", type=argtype(admin_url, "URL"), metavar="URL",
                   default=default(None),
                   help=shown(f"admin API base URL (env KEYGATE_ADMIN_URL, default "
                             f"{DEFAULT_ADMIN_URL})"))
    p.add_argument("--config", metavar="PATH", default=default(None),
                   help=shown("take the admin URL and operator token from this config file's "
                             "admin section"))
    p.add_argument("--timeout", type=argtype(seconds, "SECONDS"), metavar="SECONDS",
                   default=default(DEFAULT_TIMEOUT),
                   help=shown(f"seconds to wait for the admin API (default {DEFAULT_TIMEOUT:g})"))
    p.add_argument("--json", action="store_true", default=default(False),
                   help=shown("print the API's JSON answer as is (errors too, on stdout)"))
    return p


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors show the values they echo (``'...' is not a
    duration``, ``unrecognized arguments: ...``, an admin URL) with their control characters
    escaped, as every other line the CLI writes: a value from untrusted text must not
    retitle, wipe or write to the clipboard of the terminal. Its subparsers are of its class
    (argparse makes them so)."""

    def error(self, message: str) -> NoReturn:
        super().error("\n".join(printable(line) for line in message.split("\n")))


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(
        prog="keygate", parents=[admin_options(suppress=False)], allow_abbrev=False,
        description="keygate: an authenticating reverse proxy for API keys.",
        epilog="Exit codes: 0 success, 1 API or runtime error, 2 bad usage, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"keygate {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    tree = CommandTree(verbs, [admin_options(suppress=True)],
                       [admin_options(suppress=True, hidden=True)])

    server.add_local_commands(tree)
    workspace_verbs = workspaces.add_commands(tree)
    key_verbs = keys.add_commands(tree)
    key_controls.add_key_commands(tree, key_verbs)
    key_controls.add_workspace_commands(tree, workspace_verbs)
    roles.add_commands(tree)
    reports.add_usage(tree)
    server.add_reload(tree)
    reports.add_audit(tree)
    _utf8_only(parser)
    return parser


# The admin options every command shares: --config is a path (any bytes a file name has), the
# others check their own values.
_SHARED = {"admin_url", "config", "timeout", "json", "help"}


def _utf8_only(parser: argparse.ArgumentParser) -> None:
    """Every value an admin command sends has to be UTF-8 text. A byte that is not (a name
    typed in a Latin-1 terminal, `$'caf\\xe9'`) reaches Python as a lone surrogate, which
    ended the command in a UnicodeEncodeError traceback as an id in the URL and came back
    as the API's 400 as a name: it is bad usage (exit 2), saying which bytes."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _utf8_only(sub)
        elif (not parser._defaults.get("local", True) and action.nargs != 0
              and action.dest not in _SHARED):
            action.type = _utf8(action.type)


def _utf8(inner: Any) -> Any:
    def convert(text: str) -> Any:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Under an ASCII locale without Python's UTF-8 mode (LC_ALL=C, PYTHONUTF8=0: cron,
            # a minimal container) every non-ASCII byte arrives as a surrogate, UTF-8 ones
            # too: the argument's own bytes are read as UTF-8, and only bytes that are not
            # UTF-8 are refused.
            raw = os.fsencode(text)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                shown = raw.decode("ascii", "backslashreplace")
                raise argparse.ArgumentTypeError(
                    f"'{shown}' is not UTF-8 text (typed in a terminal set to another "
                    "encoding?); the admin API takes UTF-8 only") from None
        return text if inner is None else inner(text)
    convert.__name__ = getattr(inner, "__name__", "text")
    return convert
