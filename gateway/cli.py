"""``keygate``: the command line.

``serve``, ``demo`` and ``config check`` run locally; every other verb is a thin client of the
admin API (``--admin-url`` / ``KEYGATE_ADMIN_URL``, operator token from ``KEYGATE_ADMIN_TOKEN``).

The client uses the stdlib ``urllib`` so the CLI starts fast (no aiohttp/redis import for a
``keys list``). Two deliberate choices there: environment proxies are ignored and redirects are
refused, because either would hand the operator token to a host the user did not name.

Exit codes: 0 success, 1 API or local error (one line on stderr), 2 bad usage (argparse).
A token is printed only in the answer to ``keys create`` / ``keys rotate``; the operator token
is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import date, datetime, timezone
from typing import Any, Callable, Sequence, TextIO

from . import cli_controls

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"
DEFAULT_TIMEOUT = 10.0
TOKEN_WARNING = ("keygate: this is the only time the token is shown; it cannot be shown again. "
                 "Store it now in a secret manager.")

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# --- argument types (pure) ---------------------------------------------------------------------

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
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


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
        return {"expires_at": f"{day.isoformat()}T00:00:00Z"}
    try:
        moment = datetime.fromisoformat(re.sub(r"[zZ]$", "+00:00", text))
    except ValueError:
        raise ValueError(f"'{text}' is neither a duration (30d, 24h, 90m, 3600s) nor an "
                         "RFC 3339 date (2027-01-31) or datetime (2027-01-31T12:00:00Z)") from None
    if moment.tzinfo is None:
        raise ValueError(f"'{text}' has no time zone; add Z or an offset like +02:00")
    return {"expires_at": moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _argtype(fn: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """Wrap a ValueError-raising parser so argparse reports its message (exit 2)."""
    def convert(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = name
    return convert


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


# --- admin API client ----------------------------------------------------------------------------

class CliError(Exception):
    """Ends the command with exit 1 and this one-line message on stderr."""


class ApiError(CliError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.status, self.code, self.message = status, code, message


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        raise CliError(f"the admin API answered with a redirect to {newurl}; refusing to follow "
                       "it with the operator token")


class AdminClient:
    """Blocking JSON client for ``/admin/v1``; raises ``ApiError`` / ``CliError``."""

    def __init__(self, base_url: str, token: str | None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        # A token file saved with CRLF leaves '\r' in "$(cat file)": surrounding blanks are
        # never part of a token. (The server strips them too.)
        self._token = token.strip() if token else token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def request(self, method: str, path: str, body: dict | None = None,
                query: dict[str, str] | None = None) -> Any:
        url = self.base_url + "/admin/v1" + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json", "User-Agent": "keygate-cli"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._token:
            if not all(" " <= c <= "~" for c in self._token):
                # http.client would raise ValueError("Invalid header value 'Bearer <token>'"):
                # a traceback or message holding the operator token. Say what is wrong, not what.
                raise CliError("KEYGATE_ADMIN_TOKEN holds characters that cannot be sent in an "
                               "HTTP header (line breaks, control or non-ASCII characters)")
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return self._decode(resp.status, resp.read())
        except urllib.error.HTTPError as exc:
            raise self._api_error(exc.code, exc.read()) from None
        except (TimeoutError, socket.timeout):
            raise CliError(f"the admin API at {self.base_url} did not answer within "
                           f"{self.timeout:g}s") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise CliError(f"the admin API at {self.base_url} did not answer within "
                               f"{self.timeout:g}s") from None
            raise CliError(f"cannot reach the admin API at {self.base_url}: {reason}") from None
        except (ConnectionError, OSError) as exc:
            raise CliError(f"cannot reach the admin API at {self.base_url}: {exc}") from None

    def _decode(self, status: int, raw: bytes) -> Any:
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            raise CliError(f"the admin API at {self.base_url} answered {status} with a body "
                           "that is not JSON") from None

    def _api_error(self, status: int, raw: bytes) -> ApiError:
        try:
            error = json.loads(raw)["error"]
            return ApiError(status, str(error["code"]), str(error["message"]))
        except (ValueError, KeyError, TypeError):
            return ApiError(status, f"http_{status}",
                            f"the admin API at {self.base_url} answered HTTP {status}")


def _seg(value: str) -> str:
    return urllib.parse.quote(value, safe="")


# --- output helpers ------------------------------------------------------------------------------

def human_time(value: str | None) -> str:
    """``2026-11-05T12:34:56Z`` → ``2026-11-05 12:34 UTC``; None → ``-``."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return value
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
             for line in [list(headers), *rows]]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _print_json(value: Any, out: TextIO) -> None:
    print(json.dumps(value, indent=2, sort_keys=False), file=out)


def _key_access(key: dict) -> str:
    if key.get("role"):
        return f"role:{key['role']}"
    return ",".join(key.get("scopes") or []) or "-"


def _usage_line(usage: dict) -> str:
    limit = usage.get("limit")
    if limit is None:
        tail = f"used {usage.get('used')} / unlimited  (resets {usage.get('resets_at')})"
    else:
        tail = (f"used {usage.get('used')} / {limit}  ({usage.get('remaining')} remaining, "
                f"resets {usage.get('resets_at')})")
    return f"{usage.get('workspace')}  {usage.get('period')}  {tail}"


# --- commands ------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from .app import serve
    return serve(args.config, args.workers)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo()


def cmd_config_check(args: argparse.Namespace) -> int:
    from .config import load_config
    from .errors import ConfigError
    path = args.path or os.environ.get("KEYGATE_CONFIG") or "config.yaml"
    try:
        load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"keygate: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"ok: {path}")
    return 0


def cmd_workspaces_create(args: argparse.Namespace, client: AdminClient) -> int:
    body: dict[str, Any] = {"id": args.id, "name": args.name}
    if args.plan:
        body["plan"] = args.plan
    workspace = client.request("POST", "/workspaces", body)
    if args.json:
        _print_json(workspace, sys.stdout)
    else:
        print(f"created workspace {workspace.get('id')} ({workspace.get('name')}, "
              f"plan {workspace.get('plan')})")
    return 0


def cmd_workspaces_list(args: argparse.Namespace, client: AdminClient) -> int:
    items = client.request("GET", "/workspaces").get("items", [])
    if args.json:
        _print_json(items, sys.stdout)
        return 0
    rows = [[_cell(w.get("id")), _cell(w.get("name")), _cell(w.get("plan")),
             human_time(w.get("created_at"))] for w in items]
    print(format_table(["ID", "NAME", "PLAN", "CREATED"], rows))
    return 0


def cmd_workspaces_set_plan(args: argparse.Namespace, client: AdminClient) -> int:
    workspace = client.request("PATCH", f"/workspaces/{_seg(args.id)}", {"plan": args.plan})
    if args.json:
        _print_json(workspace, sys.stdout)
    else:
        print(f"workspace {workspace.get('id')} is now on plan {workspace.get('plan')}")
    return 0


def _print_new_token(answer: dict, args: argparse.Namespace, what: str) -> None:
    key = answer.get("key", {})
    if args.json:
        _print_json(answer, sys.stdout)
    else:
        print(f"keygate: {what} key {key.get('id')} ({key.get('name')}) in workspace "
              f"{key.get('workspace')}", file=sys.stderr)
        print(answer.get("token", ""))
    print(TOKEN_WARNING, file=sys.stderr)


def cmd_keys_create(args: argparse.Namespace, client: AdminClient) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.role is not None:
        body["role"] = args.role
    else:
        body["scopes"] = args.scope
    if args.description is not None:
        body["description"] = args.description
    if args.expires is not None:
        body.update(args.expires)
    if args.env is not None:
        body["environment"] = args.env
    if args.rate_limit is not None:
        body["rate_limit"] = args.rate_limit
    answer = client.request("POST", f"/workspaces/{_seg(args.workspace)}/keys", body)
    _print_new_token(answer, args, "created")
    return 0


def cmd_keys_list(args: argparse.Namespace, client: AdminClient) -> int:
    query = {"status": args.status} if args.status else {}
    query.update(cli_controls.list_query(args))
    items = client.request("GET", f"/workspaces/{_seg(args.workspace)}/keys",
                           query=query).get("items", [])
    if args.json:
        _print_json(items, sys.stdout)
        return 0
    rows = [[_cell(k.get("id")), _cell(k.get("name")), _key_access(k),
             human_time(k.get("created_at")), human_time(k.get("last_used_at")),
             human_time(k.get("expires_at")), _cell(k.get("status"))] for k in items]
    print(format_table(["ID", "NAME", "ROLE/SCOPES", "CREATED", "LAST USED", "EXPIRES",
                        "STATUS"], rows))
    return 0


def _confirm(question: str) -> bool:
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def cmd_keys_revoke(args: argparse.Namespace, client: AdminClient) -> int:
    if not args.yes and not _confirm(f"Revoke key {args.id} of workspace {args.workspace}? "
                                     "This cannot be undone."):
        print("aborted", file=sys.stderr)
        return 1
    key = client.request("POST", f"/workspaces/{_seg(args.workspace)}/keys/{_seg(args.id)}/revoke")
    if args.json:
        _print_json(key, sys.stdout)
    else:
        print(f"revoked key {key.get('id', args.id)} of workspace {args.workspace}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace, client: AdminClient) -> int:
    body = {"grace_seconds": args.grace} if args.grace is not None else {}
    answer = client.request(
        "POST", f"/workspaces/{_seg(args.workspace)}/keys/{_seg(args.id)}/rotate", body)
    _print_new_token(answer, args, f"rotated {args.id} into")
    if not args.json:
        if args.grace:
            print(f"keygate: the old key {args.id} keeps working for {args.grace}s",
                  file=sys.stderr)
        else:
            print(f"keygate: the old key {args.id} is revoked", file=sys.stderr)
    return 0


def cmd_usage(args: argparse.Namespace, client: AdminClient) -> int:
    if args.daily:
        return cli_controls.print_daily_usage(args, client, _seg)
    usage = client.request("GET", f"/workspaces/{_seg(args.workspace)}/usage")
    if args.json:
        _print_json(usage, sys.stdout)
    else:
        print(_usage_line(usage))
    return 0


# --- parser --------------------------------------------------------------------------------------

def _admin_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"'{text}' is not an http(s) URL")
    return text


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    # Admin options are accepted before the verb and after it; SUPPRESS keeps a leaf's unset
    # option from overwriting a value given at the top level.
    def admin_options(suppress: bool) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(add_help=False)
        default = argparse.SUPPRESS
        p.add_argument("--admin-url", type=_argtype(_admin_url, "URL"),
                       default=default if suppress else None,
                       help=f"admin API base URL (env KEYGATE_ADMIN_URL, default {DEFAULT_ADMIN_URL})")
        p.add_argument("--timeout", type=float, default=default if suppress else DEFAULT_TIMEOUT,
                       # not %(default)s: a leaf's default is SUPPRESS, and formatting
                       # its --help then raised KeyError (every subcommand's --help crashed)
                       help=f"seconds to wait for the admin API (default {DEFAULT_TIMEOUT})")
        p.add_argument("--json", action="store_true", default=default if suppress else False,
                       help="machine-readable JSON output")
        return p

    leaf = [admin_options(suppress=True)]
    parser = argparse.ArgumentParser(
        prog="keygate", parents=[admin_options(suppress=False)],
        description="keygate: an authenticating reverse proxy for API keys.")
    parser.add_argument("--version", action="version", version=f"keygate {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    serve = verbs.add_parser("serve", help="run the gateway (proxy and admin listeners)")
    serve.add_argument("--config", default=os.environ.get("KEYGATE_CONFIG"),
                       help="config file (env KEYGATE_CONFIG)")
    serve.add_argument("--workers", type=_argtype(_positive_int, "N"),
                       help="worker processes (default: server.workers from the config)")
    serve.set_defaults(handler=cmd_serve, local=True)

    demo = verbs.add_parser("demo", help="try keygate: embedded store, sample upstream, a key")
    demo.set_defaults(handler=cmd_demo, local=True)

    config = verbs.add_parser("config", help="configuration tools")
    config_verbs = config.add_subparsers(dest="config_verb", metavar="COMMAND", required=True)
    check = config_verbs.add_parser("check", help="validate a config file")
    check.add_argument("path", nargs="?", help="config file (default: $KEYGATE_CONFIG or config.yaml)")
    check.set_defaults(handler=cmd_config_check, local=True)

    workspaces = verbs.add_parser("workspaces", help="manage workspaces")
    ws_verbs = workspaces.add_subparsers(dest="ws_verb", metavar="COMMAND", required=True)
    ws_create = ws_verbs.add_parser("create", parents=leaf, help="create a workspace")
    ws_create.add_argument("id", metavar="ID")
    ws_create.add_argument("--name", required=True)
    ws_create.add_argument("--plan")
    ws_create.set_defaults(handler=cmd_workspaces_create)
    ws_list = ws_verbs.add_parser("list", parents=leaf, help="list workspaces")
    ws_list.set_defaults(handler=cmd_workspaces_list)
    ws_plan = ws_verbs.add_parser("set-plan", parents=leaf, help="change a workspace's plan")
    ws_plan.add_argument("id", metavar="ID")
    ws_plan.add_argument("plan", metavar="PLAN")
    ws_plan.set_defaults(handler=cmd_workspaces_set_plan)
    cli_controls.add_workspace_commands(ws_verbs, leaf, _seg)

    keys = verbs.add_parser("keys", help="manage API keys")
    key_verbs = keys.add_subparsers(dest="key_verb", metavar="COMMAND", required=True)
    k_create = key_verbs.add_parser("create", parents=leaf, help="create a key; prints its token once")
    k_create.add_argument("--workspace", required=True, metavar="WS")
    k_create.add_argument("--name", required=True)
    access = k_create.add_mutually_exclusive_group(required=True)
    access.add_argument("--role", help="bind the key to a role")
    access.add_argument("--scope", action="extend", nargs="+", metavar="S",
                        help="bind the key to explicit scopes (repeatable)")
    k_create.add_argument("--expires", type=_argtype(parse_expiry, "EXPIRES"),
                          help="30d, 24h, 90m, 3600s, or a date/datetime like 2027-01-31")
    k_create.add_argument("--env", help="token environment, e.g. test (default: live)")
    k_create.add_argument("--description")
    k_create.add_argument("--rate-limit", metavar="N/s|N/m",
                          help="the key's own rate limit instead of the plan's")
    k_create.set_defaults(handler=cmd_keys_create)

    k_list = key_verbs.add_parser("list", parents=leaf, help="list a workspace's keys")
    k_list.add_argument("--workspace", required=True, metavar="WS")
    k_list.add_argument("--status", choices=("active", "expired", "revoked"))
    k_list.set_defaults(handler=cmd_keys_list)
    cli_controls.add_list_options(k_list)

    k_revoke = key_verbs.add_parser("revoke", parents=leaf, help="revoke a key (permanent)")
    k_revoke.add_argument("--workspace", required=True, metavar="WS")
    k_revoke.add_argument("id", metavar="ID")
    k_revoke.add_argument("--yes", "-y", action="store_true", help="do not ask to confirm")
    k_revoke.set_defaults(handler=cmd_keys_revoke)

    k_rotate = key_verbs.add_parser("rotate", parents=leaf,
                                    help="replace a key; prints the new token once")
    k_rotate.add_argument("--workspace", required=True, metavar="WS")
    k_rotate.add_argument("id", metavar="ID")
    k_rotate.add_argument("--grace", type=_argtype(parse_duration, "DURATION"),
                          help="how long the old key keeps working, e.g. 24h (default 0: revoked now)")
    k_rotate.set_defaults(handler=cmd_keys_rotate)
    cli_controls.add_key_commands(key_verbs, leaf, _seg, _argtype(parse_expiry, "EXPIRES"))

    usage = verbs.add_parser("usage", parents=leaf, help="a workspace's usage this month")
    usage.add_argument("--workspace", required=True, metavar="WS")
    usage.set_defaults(handler=cmd_usage)
    cli_controls.add_usage_options(usage)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help → 0, bad usage → 2; returned so main() is testable
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if getattr(args, "local", False):
            return int(args.handler(args) or 0)
        admin_url = args.admin_url or os.environ.get("KEYGATE_ADMIN_URL") or DEFAULT_ADMIN_URL
        try:
            admin_url = _admin_url(admin_url)
        except ValueError as exc:
            parser.print_usage(sys.stderr)
            print(f"keygate: error: KEYGATE_ADMIN_URL: {exc}", file=sys.stderr)
            return 2
        client = AdminClient(admin_url, os.environ.get("KEYGATE_ADMIN_TOKEN"), args.timeout)
        return int(args.handler(args, client) or 0)
    except ApiError as exc:
        print(f"keygate: {exc}", file=sys.stderr)
        if exc.status == 401 and not os.environ.get("KEYGATE_ADMIN_TOKEN"):
            print("keygate: set KEYGATE_ADMIN_TOKEN to the operator token", file=sys.stderr)
        return 1
    except CliError as exc:
        print(f"keygate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
