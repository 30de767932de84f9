"""The gateway process and its config file: ``serve``, ``demo`` and ``config check`` run
locally (they import the gateway only when run, so the admin commands start fast);
``reload`` asks a running gateway to re-read its file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from .client import AdminClient, ApiError, printable
from .output import esc, show, words
from .parsing import CommandTree, argtype, positive_int

DEFAULT_CONFIG = "config.yaml"


def worker_count(text: str) -> int:
    """``--workers``: the range ``server.workers`` has in the config."""
    from ..config.service import MAX_WORKERS
    value = positive_int(text)
    if value > MAX_WORKERS:
        raise ValueError(f"must be {MAX_WORKERS} or fewer, as server.workers")
    return value


def add_local_commands(tree: CommandTree) -> None:
    serve = tree.command(None, "serve", "run the gateway (proxy and admin listeners)",
                         cmd_serve, local=True)
    serve.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                       help=f"config file (default: $KEYGATE_CONFIG, else ./{DEFAULT_CONFIG})")
    serve.add_argument("--workers", type=argtype(worker_count, "N"), metavar="N",
                       help="worker processes (default: server.workers from the config)")

    tree.command(None, "demo", "try keygate: embedded store, sample upstream, two keys",
                 cmd_demo, local=True)

    config = tree.group("config", "configuration tools", local=True)
    check = tree.command(config, "check", "validate a config file", cmd_config_check,
                         local=True)
    check.set_defaults(output_errors=True)  # its OSErrors left are its output's (main())
    check.add_argument("path", nargs="?", metavar="PATH",
                       help=f"config file (default: $KEYGATE_CONFIG, else ./{DEFAULT_CONFIG})")


def add_reload(tree: CommandTree) -> None:
    tree.command(None, "reload", "re-read the gateway's config file without a restart",
                 cmd_reload)


def config_path(given: str | None) -> str:
    """The config file ``serve`` and ``config check`` use: the one named, else
    ``$KEYGATE_CONFIG``, else ``./config.yaml``."""
    return given or os.environ.get("KEYGATE_CONFIG") or DEFAULT_CONFIG


def _missing_default_config(path: str, given: str | None, how: str) -> bool:
    """``how``: the command line that names a file (`config check` takes it as its argument,
    not as --config)."""
    if given or os.environ.get("KEYGATE_CONFIG") or os.path.exists(path):
        return False
    print(printable(f"keygate: no config file: {os.path.abspath(path)} does not exist. Name "
                    f"one ({how}, or set KEYGATE_CONFIG); `keygate demo` runs without one."),
          file=sys.stderr)
    return True


def cmd_serve(args: argparse.Namespace) -> int:
    # First of all, before the imports and the config's load, which take a second or two on a
    # cold start: a SIGHUP meanwhile (systemd's ExecReload, a config tool) ended the process
    # with no word, and a SIGTERM cut it off halfway. Held here, both are delivered once serve
    # has its handlers (gateway.workers.serve holds them from then on).
    held = {signal.SIGHUP, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        from ..workers import serve
        given = getattr(args, "config", None)
        path = config_path(given)
        if _missing_default_config(path, given, "keygate serve --config PATH"):
            return 1
        return serve(path, args.workers)
    finally:
        # for a caller that goes on (tests call main() in-process); a signal still held is
        # left pending rather than delivered now, which would turn exit 1 into death by it
        if not held & signal.sigpending():
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo
    return run_demo()


def cmd_config_check(args: argparse.Namespace) -> int:
    from ..config import load_config, servable_problems
    from ..config.nodes import one_line
    from ..errors import ConfigError
    given = args.path or getattr(args, "config", None)
    path = config_path(given)
    if _missing_default_config(path, given, "keygate config check PATH"):
        return 1
    try:
        config = load_config(path)
        problems = servable_problems(config)
    except ConfigError as exc:
        problems = exc.problems
    except OSError as exc:
        print(one_line(f"keygate: cannot read {path}: {exc.strerror or exc}"), file=sys.stderr)
        return 1
    if not problems:  # a valid file: what it drops that the store still uses
        for warning in config.warnings:  # served as written, but likely not as meant
            print(warning, file=sys.stderr)
        problems, note = _in_use_problems(config)
        if note:
            print(f"keygate: note: {note}", file=sys.stderr)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {one_line(path)}")
    return 0


def _in_use_problems(config) -> tuple[list[str], str | None]:
    """(problems, note): the plans workspaces are on and the configured roles keys use that
    the file lacks (``gateway.config_in_use``), asked of the file's store in a bounded call;
    a store that cannot be reached (an embedded one that is not running is never started
    here) is a note saying what was not checked, not a problem."""
    import asyncio

    from ..config_in_use import in_use_problems, not_checked
    from ..errors import StoreError
    from ..store import Store
    unchecked = f"{not_checked(config, None)} were not checked against it"
    url = config.store.redis_url
    if url == "embedded":
        from ..store.embedded import EmbeddedRedis, data_dir_trust_problem
        embedded = EmbeddedRedis(config.store.data_dir)
        try:
            running = embedded.socket_path.exists()
        except OSError as exc:  # data_dir is mode 700 for the user that serves, or a bad path
            return [], (f"cannot look for the embedded store in {embedded.data_dir} "
                        f"({exc.strerror or exc}); {unchecked}")
        if not running:
            return [], f"the embedded store in {embedded.data_dir} is not running; {unchecked}"
        # serve's trust rules: a data_dir or a server of another user is never consulted
        # (that user would decide what this check reports about keygate's own store)
        try:
            problem = data_dir_trust_problem(embedded.data_dir)
            problem = (f"it {problem}" if problem else embedded.peer_problem())
        except OSError as exc:
            problem = f"whose server answers on it is unknown ({exc.strerror or exc})"
        if problem:
            return [], (f"the embedded store in {embedded.data_dir} was not asked: {problem}; "
                        f"{unchecked}")
        url = embedded.url

    async def check() -> list[str]:
        store = await Store.connect(url, config)
        try:
            return await in_use_problems(store, config)
        finally:
            await store.close()

    try:
        return asyncio.run(check()), None
    except StoreError as exc:
        return [], f"the store could not be asked ({exc}); {unchecked}"


def cmd_reload(args: argparse.Namespace, client: AdminClient) -> int:
    try:
        result = client.request("POST", "/reload")
    except ApiError as exc:
        if not args.json:  # the file's problems, one per line, like config check
            try:
                for problem in json.loads(exc.body)["error"].get("problems", []):
                    # as the API sent it: escaped, so no terminal escape sequence gets through
                    print(printable(str(problem)), file=sys.stderr)
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                pass
        raise
    kept = result.get("restart_required") or []
    code = show(args, client, lambda: f"reloaded {esc(result.get('config'))}" + (
        f"; kept until a restart: {words(kept, ', ')}" if kept else ""))
    behind = result.get("not_confirmed")
    if code == 0 and behind:  # taken by the worker that answered, not (yet) by these
        print(f"keygate: but {words(behind, ', ')} had not re-read the file when the call "
              "answered and may still serve the old config (busy, wedged or stopped?): see "
              "the gateway's log, and reload again", file=sys.stderr)
        return 1
    return code
