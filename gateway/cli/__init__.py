"""``keygate``: the command line.

``serve``, ``demo`` and ``config check`` run locally; every other verb is a thin client of the
admin API (``--admin-url`` / ``KEYGATE_ADMIN_URL``, operator token from ``KEYGATE_ADMIN_TOKEN``).

Exit codes: 0 success, 1 API or local error (one line on stderr), 2 bad usage (argparse).
A token is printed only in the answer to ``keys create`` / ``keys rotate``; the operator token
is never printed.

Where things are: :mod:`.parser` (the parser, commands in ``--help`` order), :mod:`.client`
(the admin API client and the errors that end a command), :mod:`.connection` (which admin API,
which token), :mod:`.output`, :mod:`.parsing` (option values, the command tree), and a module
per noun: :mod:`.server` (serve, demo, config check, reload), :mod:`.workspaces`,
:mod:`.keys`, :mod:`.key_controls`, :mod:`.roles`, :mod:`.reports` (usage, audit).
"""

from __future__ import annotations

import io
import os
import re
import sys

from .client import AdminClient, ApiError, CliError, UsageError, key_minting, printable
from .connection import admin_url, connection
from .output import discard_stdout
from .parser import build_parser
from .parsing import parse_duration, parse_expiry

__all__ = ["build_parser", "main", "parse_duration", "parse_expiry"]


def main(argv: list[str] | None = None) -> int:
    """Run one ``keygate`` command; the exit code is returned (the console script exits
    with it)."""
    if sys.stderr is None:
        # closed (2>&-): print(..., file=None) writes to stdout, so stderr's lines landed in
        # a captured token or the --json body; they go nowhere instead
        sys.stderr = open(os.devnull, "w", encoding="utf-8", errors="backslashreplace")
    code = _command(argv)
    try:  # here, not at the interpreter's exit: a file's output is written when flushed
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        return _output_closed()
    except OSError as exc:
        return _output_failed(exc)
    return code


def _command(argv: list[str] | None) -> int:
    """The command ``argv`` names, run; its exit code."""
    for stream in (sys.stdout, sys.stderr):
        # A name the terminal's encoding cannot show (a Latin-1 terminal, a Windows console)
        # is written escaped, as stderr already does, instead of ending the command in a
        # UnicodeEncodeError traceback after its API call was made.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help → 0, bad usage → 2; returned so main() is testable
        return exc.code if isinstance(exc.code, int) else 2
    token = client = None
    try:
        if getattr(args, "local", False):
            return int(args.handler(args) or 0)
        if getattr(args, "prints_token", False) and not _stdout_open():
            # the key would be made and its token, shown once, written nowhere
            print("keygate: the output was closed before the command ran (stdout is not "
                  "open, or a pipe nothing reads): the new token would be written nowhere, so "
                  "nothing was sent", file=sys.stderr)
            return 1
        url, token, cert_file, token_source = connection(args)
        try:
            url = admin_url(url)  # --admin-url is checked by argparse; the others here
        except ValueError as exc:
            parser.print_usage(sys.stderr)
            # where the URL came from: --admin-url is checked by argparse, so the config's
            # admin listener (with --config) or the environment
            source = (f"the admin listener of {args.config}" if getattr(args, "config", None)
                      else "KEYGATE_ADMIN_URL")
            print(printable(f"keygate: error: {source}: {exc}"), file=sys.stderr)
            return 2
        client = AdminClient(url, token, args.timeout, cert_file, token_source)
        return int(args.handler(args, client) or 0)
    except UsageError as exc:  # some echo an argument as given: escaped
        print("\n".join(printable(line) for line in f"keygate: error: {exc}".split("\n")),
              file=sys.stderr)
        return 2
    except ApiError as exc:
        if getattr(args, "json", False) and exc.body:
            sys.stdout.write(exc.body.decode("utf-8", "replace").rstrip("\n") + "\n")
        print(f"keygate: {exc}", file=sys.stderr)
        if exc.status == 401 and not token:
            print("keygate: set KEYGATE_ADMIN_TOKEN to the operator token", file=sys.stderr)
        elif exc.status == 503 and exc.code == "store_unavailable":
            print(_store_hint(getattr(client, "last_method", "GET"),
                              getattr(client, "last_path", "")), file=sys.stderr)
        elif exc.status == 429 and exc.code == "too_many_failures":
            # every operator-token call from this address is refused for the window, the
            # right token's too: say when it works again
            wait = exc.retry_after if re.fullmatch(r"[0-9]{1,9}", exc.retry_after) else ""
            print("keygate: the gateway refuses calls from this address after too many wrong "
                  "tokens (an old token in a script?); try again in "
                  + (f"{wait} second{'' if wait == '1' else 's'}" if wait else "a minute")
                  + ", with the operator token", file=sys.stderr)
        elif exc.code == "no_route":  # answered by a proxy listener only, never the admin API
            print(f"keygate: {url} is a keygate proxy listener; the admin API is on the admin "
                  "listener (admin.port, default 8081): pass --admin-url or set "
                  "KEYGATE_ADMIN_URL to it", file=sys.stderr)
        elif exc.status == 401 and exc.invalid_token and exc.code == "unauthorized":
            source = (f"the variable admin.token_env names in {printable(args.config)}, else "
                      if getattr(args, "config", None) else "")
            print(f"keygate: the token from {source}KEYGATE_ADMIN_TOKEN is not the operator "
                  f"token of the gateway at {url}: set it to the value that gateway was "
                  "started with", file=sys.stderr)
        return 1
    except CliError as exc:  # some name what a server sent (a redirect's Location, a reason)
        print("\n".join(printable(line) for line in f"keygate: {exc}".split("\n")),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _output_closed()
    except OSError as exc:
        # a remote command's own OSErrors are its output's (the API's are CliErrors), as are
        # config check's (a file it cannot read is said as such): a full disk (ENOSPC), an
        # I/O error; serve's and demo's are their own to report
        if getattr(args, "local", False) and not getattr(args, "output_errors", False):
            raise
        return _output_failed(exc)


def _store_hint(method: str, path: str) -> str:
    """What to do after a 503 ``store_unavailable`` (Redis did not answer the gateway), chosen
    by the request (``path``: its URL's path): a key create or rotation answered 503 changed
    nothing, whether it ran (it is taken back) or not, whatever the answer's text says."""
    again = ("run the same command again once the gateway's store is back (its /readyz "
             "answers 200)")
    if method in ("GET", "HEAD"):
        return f"keygate: {again}"
    if method == "POST" and key_minting(path):
        return ("keygate: nothing was changed (what the store may have done is taken back); "
                f"{again}")
    return (f"keygate: the change may have been made or not; {again}: it is safe to (a "
            "create then answered 409 conflict was made by the first), or read it back")


def _stdout_open() -> bool:
    """Whether stdout can be written to: with ``>&-`` Python's sys.stdout is None, and
    print() then writes nothing, silently; a pipe whose reader is gone (``| true``, a ``tee``
    that could not open its file) takes nothing either, and Linux says so before anything is
    written, as POLLERR on its write end."""
    import select
    if sys.stdout is None:
        return False
    try:
        fd = sys.stdout.fileno()
        os.fstat(fd)
    except (AttributeError, ValueError, io.UnsupportedOperation):  # no file descriptor (a
        return True                                                # test's capture)
    except OSError:
        return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        events = poller.poll(0)
    except (AttributeError, OSError, ValueError):  # no poll() here: what fstat said stands
        return True
    return not any(revents & (select.POLLERR | select.POLLNVAL) for _, revents in events)


def _output_closed() -> int:
    """stdout's reader went away (``keygate keys list | head``): one line, exit 1, instead of
    a BrokenPipeError traceback and a second one when Python flushes stdout at exit."""
    return _output_lost("the output was closed before all of it was written")


def _output_failed(exc: OSError) -> int:
    """stdout could not be written (``> file`` on a full disk: ENOSPC; EIO): one line, exit 1,
    instead of an OSError traceback."""
    return _output_lost(f"the output could not be written ({exc.strerror or exc})")


def _output_lost(why: str) -> int:
    discard_stdout()  # the exit's flush goes nowhere, quietly
    try:
        print(f"keygate: {why}", file=sys.stderr)
    except (OSError, ValueError):
        pass
    return 1
