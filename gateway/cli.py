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
    """The admin API answered an error; ``body`` is its JSON body as received (``--json``
    prints it on stdout)."""

    def __init__(self, status: int, code: str, message: str, body: bytes = b"") -> None:
        super().__init__(f"{message} ({code})")
        self.status, self.code, self.message, self.body = status, code, message, body


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
        self.last_body = b""   # the raw JSON of the last successful answer (for --json)

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
        self.last_body = raw
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            raise CliError(f"the admin API at {self.base_url} answered {status} with a body "
                           "that is not JSON") from None

    def _api_error(self, status: int, raw: bytes) -> ApiError:
        try:
            error = json.loads(raw)["error"]
            return ApiError(status, str(error["code"]), str(error["message"]), raw)
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


def _print_body(client: "AdminClient") -> None:
    """``--json``: the API's answer exactly as it came (a listing stays ``{"items": [...]}``)."""
    sys.stdout.write(client.last_body.decode("utf-8", "replace").rstrip("\n") + "\n")


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


def _fields(obj: dict, order: Sequence[str]) -> str:
    """An object as ``name: value`` lines, the listed fields first, then any others."""
    names = [n for n in order if n in obj] + [n for n in obj if n not in order]
    width = max((len(n) for n in names), default=0)
    lines = []
    for name in names:
        value = obj[name]
        if isinstance(value, str) and name.endswith("_at"):
            shown = human_time(value)
        elif isinstance(value, list):
            shown = " ".join(str(v) for v in value) or "-"
        elif isinstance(value, dict):
            shown = json.dumps(value, separators=(",", ":")) if value else "-"
        else:
            shown = _cell(value)
        lines.append(f"{name.ljust(width)}  {shown}")
    return "\n".join(lines)


KEY_FIELDS = ("id", "workspace", "name", "description", "status", "environment", "role",
              "scopes", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at",
              "rate_limit")
WORKSPACE_FIELDS = ("id", "name", "plan", "created_at")


# --- commands ------------------------------------------------------------------------------------

DEFAULT_CONFIG = "config.yaml"


def config_path(given: str | None) -> str:
    """The config file ``serve`` and ``config check`` use: the one named, else
    ``$KEYGATE_CONFIG``, else ``./config.yaml``."""
    return given or os.environ.get("KEYGATE_CONFIG") or DEFAULT_CONFIG


def _missing_default_config(path: str, given: str | None) -> bool:
    if given or os.environ.get("KEYGATE_CONFIG") or os.path.exists(path):
        return False
    print(f"keygate: no config file: {os.path.abspath(path)} does not exist. Pass --config "
          "PATH (or set KEYGATE_CONFIG); `keygate demo` runs without one.", file=sys.stderr)
    return True


def cmd_serve(args: argparse.Namespace) -> int:
    from .workers import serve
    given = getattr(args, "config", None)
    path = config_path(given)
    if _missing_default_config(path, given):
        return 1
    return serve(path, args.workers)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo()


def cmd_config_check(args: argparse.Namespace) -> int:
    from .config import load_config, servable_problems
    from .errors import ConfigError
    given = args.path or getattr(args, "config", None)
    path = config_path(given)
    if _missing_default_config(path, given):
        return 1
    try:
        problems = servable_problems(load_config(path))
    except ConfigError as exc:
        problems = exc.problems
    except OSError as exc:
        print(f"keygate: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {path}")
    return 0


def _show(args: argparse.Namespace, client: AdminClient, text: Callable[[], str]) -> int:
    if args.json:
        _print_body(client)
    else:
        print(text())
    return 0


def cmd_workspaces_create(args: argparse.Namespace, client: AdminClient) -> int:
    body: dict[str, Any] = {"id": args.id, "name": args.name}
    if args.plan:
        body["plan"] = args.plan
    workspace = client.request("POST", "/workspaces", body)
    return _show(args, client, lambda: f"created workspace {workspace.get('id')} "
                                       f"({workspace.get('name')}, plan {workspace.get('plan')})")


def cmd_workspaces_list(args: argparse.Namespace, client: AdminClient) -> int:
    items = client.request("GET", "/workspaces").get("items", [])
    rows = [[_cell(w.get("id")), _cell(w.get("name")), _cell(w.get("plan")),
             human_time(w.get("created_at"))] for w in items]
    return _show(args, client, lambda: format_table(["ID", "NAME", "PLAN", "CREATED"], rows))


def cmd_workspaces_show(args: argparse.Namespace, client: AdminClient) -> int:
    workspace = client.request("GET", f"/workspaces/{_seg(args.id)}")
    return _show(args, client, lambda: _fields(workspace, WORKSPACE_FIELDS))


def cmd_workspaces_set_plan(args: argparse.Namespace, client: AdminClient) -> int:
    workspace = client.request("PATCH", f"/workspaces/{_seg(args.id)}", {"plan": args.plan})
    return _show(args, client, lambda: f"workspace {workspace.get('id')} is now on plan "
                                       f"{workspace.get('plan')}")


def cmd_workspaces_rename(args: argparse.Namespace, client: AdminClient) -> int:
    workspace = client.request("PATCH", f"/workspaces/{_seg(args.id)}", {"name": args.name})
    return _show(args, client, lambda: f"workspace {workspace.get('id')} is now named "
                                       f"{workspace.get('name')}")


def _print_new_token(answer: dict, args: argparse.Namespace, client: AdminClient,
                     what: str) -> None:
    key = answer.get("key", {})
    if args.json:
        _print_body(client)
    else:
        print(f"keygate: {what} key {key.get('id')} ({key.get('name')}) in workspace "
              f"{key.get('workspace')}", file=sys.stderr)
        print(answer.get("token", ""))
    print(TOKEN_WARNING, file=sys.stderr)


def _binding(args: argparse.Namespace, body: dict[str, Any]) -> None:
    if getattr(args, "role", None) is not None:
        body["role"] = args.role
    elif getattr(args, "scope", None) is not None:
        body["scopes"] = args.scope


def cmd_keys_create(args: argparse.Namespace, client: AdminClient) -> int:
    body: dict[str, Any] = {"name": args.name}
    _binding(args, body)
    if args.description is not None:
        body["description"] = args.description
    if args.expires is not None:
        body.update(args.expires)
    if args.env is not None:
        body["environment"] = args.env
    if args.rate_limit is not None:
        body["rate_limit"] = args.rate_limit
    answer = client.request("POST", f"/workspaces/{_seg(args.workspace)}/keys", body)
    _print_new_token(answer, args, client, "created")
    return 0


def _keys_table(items: list[dict]) -> str:
    rows = [[_cell(k.get("id")), _cell(k.get("name")), _key_access(k),
             human_time(k.get("created_at")), human_time(k.get("last_used_at")),
             human_time(k.get("expires_at")), _cell(k.get("status"))] for k in items]
    return format_table(["ID", "NAME", "ROLE/SCOPES", "CREATED", "LAST USED", "EXPIRES",
                         "STATUS"], rows)


def cmd_keys_list(args: argparse.Namespace, client: AdminClient) -> int:
    query = {"status": args.status} if args.status else {}
    query.update(cli_controls.list_query(args))
    items = client.request("GET", f"/workspaces/{_seg(args.workspace)}/keys",
                           query=query).get("items", [])
    return _show(args, client, lambda: _keys_table(items))


def cmd_keys_show(args: argparse.Namespace, client: AdminClient) -> int:
    key = client.request("GET", f"/workspaces/{_seg(args.workspace)}/keys/{_seg(args.id)}")
    return _show(args, client, lambda: _fields(key, KEY_FIELDS))


def cmd_keys_update(args: argparse.Namespace, client: AdminClient) -> int:
    body: dict[str, Any] = {}
    if args.name is not None:
        body["name"] = args.name
    if args.description is not None:
        body["description"] = args.description
    _binding(args, body)
    if args.no_expiry:
        body["expires_at"] = None
    elif args.expires is not None:
        if "expires_in" in args.expires:  # PATCH takes a moment, not a duration
            from datetime import timedelta
            moment = datetime.now(timezone.utc) + timedelta(seconds=args.expires["expires_in"])
            body["expires_at"] = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        else:
            body.update(args.expires)
    body.update(cli_controls.update_body(args))
    if not body:
        raise UsageError("nothing to change: give one or more of --name, --description, "
                         "--role, --scope, --expires, --no-expiry, --monthly-requests, "
                         "--rate-limit, --enable, --disable, --meta, --allow-ip, --any-ip")
    key = client.request("PATCH", f"/workspaces/{_seg(args.workspace)}/keys/{_seg(args.id)}",
                         body)
    return _show(args, client, lambda: _fields(key, KEY_FIELDS))


def _confirm(question: str) -> bool | None:
    """True on y/yes, False on any other answer, None when there is no answer (end of input:
    a script that forgot --yes)."""
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    if not answer:
        return None
    return answer.strip().lower() in ("y", "yes")


def cmd_keys_revoke(args: argparse.Namespace, client: AdminClient) -> int:
    if not args.yes:
        confirmed = _confirm(f"Revoke key {args.id} of workspace {args.workspace}? "
                             "This cannot be undone.")
        # Not confirmed: nothing was done, which a script must not read as success (0), and
        # nothing failed at the API (1): exit 2, as for a command that needed --yes.
        if confirmed is None:
            raise UsageError(f"no answer to the confirmation (end of input): key {args.id} was "
                             "not revoked. Pass --yes to revoke without asking")
        if not confirmed:
            print(f"aborted: key {args.id} was not revoked", file=sys.stderr)
            return 2
    key = client.request("POST", f"/workspaces/{_seg(args.workspace)}/keys/{_seg(args.id)}/revoke")
    return _show(args, client, lambda: f"revoked key {key.get('id', args.id)} of workspace "
                                       f"{args.workspace}")


def cmd_keys_rotate(args: argparse.Namespace, client: AdminClient) -> int:
    body = {"grace_seconds": args.grace} if args.grace is not None else {}
    answer = client.request(
        "POST", f"/workspaces/{_seg(args.workspace)}/keys/{_seg(args.id)}/rotate", body)
    _print_new_token(answer, args, client, f"rotated {args.id} into")
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
    return _show(args, client, lambda: _usage_line(usage))


def cmd_roles_list(args: argparse.Namespace, client: AdminClient) -> int:
    items = client.request("GET", f"/workspaces/{_seg(args.workspace)}/roles").get("items", [])
    rows = [[_cell(r.get("name")), _cell(r.get("source")), " ".join(r.get("scopes") or []) or "-"]
            for r in items]
    return _show(args, client, lambda: format_table(["NAME", "SOURCE", "SCOPES"], rows))


def cmd_roles_set(args: argparse.Namespace, client: AdminClient) -> int:
    role = client.request("PUT", f"/workspaces/{_seg(args.workspace)}/roles/{_seg(args.name)}",
                          {"scopes": args.scope})
    return _show(args, client, lambda: f"role {role.get('name')} of workspace {args.workspace}: "
                                       f"{' '.join(role.get('scopes') or []) or '(no scopes)'}")


def cmd_roles_delete(args: argparse.Namespace, client: AdminClient) -> int:
    role = client.request("DELETE", f"/workspaces/{_seg(args.workspace)}/roles/{_seg(args.name)}")
    return _show(args, client, lambda: f"deleted role {role.get('name', args.name)} of workspace "
                                       f"{args.workspace}")


def cmd_audit(args: argparse.Namespace, client: AdminClient) -> int:
    query = {"limit": str(args.limit)} if args.limit is not None else None
    items = client.request("GET", f"/workspaces/{_seg(args.workspace)}/audit",
                           query=query).get("items", [])
    rows = [[human_time(e.get("at")), _cell(e.get("actor")), _cell(e.get("action")),
             _cell(e.get("target")),
             json.dumps(e.get("details"), separators=(",", ":")) if e.get("details") else "-"]
            for e in items]
    return _show(args, client, lambda: format_table(["AT", "ACTOR", "ACTION", "TARGET",
                                                     "DETAILS"], rows))


def cmd_reload(args: argparse.Namespace, client: AdminClient) -> int:
    try:
        result = client.request("POST", "/reload")
    except ApiError as exc:
        if not args.json:  # the file's problems, one per line, like config check
            try:
                for problem in json.loads(exc.body)["error"].get("problems", []):
                    print(problem, file=sys.stderr)
            except (ValueError, KeyError, TypeError, AttributeError):
                pass
        raise
    kept = result.get("restart_required") or []
    return _show(args, client, lambda: f"reloaded {result.get('config')}" + (
        f"; kept until a restart: {', '.join(kept)}" if kept else ""))


# --- parser --------------------------------------------------------------------------------------

class UsageError(Exception):
    """Bad usage found after parsing: exit 2 with this message."""


def _admin_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"'{text}' is not an http(s) URL")
    return text


def admin_from_config(path: str) -> tuple[str, str | None]:
    """(admin URL, operator token) for the gateway a config file describes: its admin
    listener's address (a wildcard host is reached on loopback) and the token from the
    variable its ``admin.token_env`` names."""
    from .config import load_config
    from .errors import ConfigError
    try:
        admin = load_config(path).admin
    except ConfigError as exc:
        # A file with problems elsewhere (say, one `keygate reload` is about to refuse) still
        # names the admin listener: read that section alone.
        admin = _admin_section(path, exc)
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(admin.host, admin.host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if getattr(admin, "tls", None) else "http"
    return f"{scheme}://{host}:{admin.port}", os.environ.get(admin.token_env)


def _admin_section(path: str, original: Exception) -> Any:
    import tempfile

    import yaml

    from .config import load_config
    from .errors import ConfigError
    problems = "\n".join(getattr(original, "problems", [str(original)]))
    try:
        with open(path, encoding="utf-8-sig") as fh:
            document = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        raise CliError(problems) from None
    if not isinstance(document, dict):
        raise CliError(problems)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump({"admin": document.get("admin")}, fh)
    try:
        return load_config(fh.name).admin
    except ConfigError as exc:
        raise CliError("\n".join(p.replace(fh.name, path) for p in exc.problems)) from None
    finally:
        os.unlink(fh.name)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    # Admin options are accepted before the verb and after it; SUPPRESS keeps a leaf's unset
    # option from overwriting a value given at the top level. (No %(default)s in their help:
    # with SUPPRESS there is no default to show, and argparse raised KeyError on --help.)
    def admin_options(suppress: bool) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(add_help=False)
        def default(value: Any) -> Any:
            return argparse.SUPPRESS if suppress else value
        p.add_argument("--admin-url", type=_argtype(_admin_url, "URL"), default=default(None),
                       help=f"admin API base URL (env KEYGATE_ADMIN_URL, default "
                            f"{DEFAULT_ADMIN_URL})")
        p.add_argument("--config", metavar="PATH", default=default(None),
                       help="take the admin URL and operator token from this config file's "
                            "admin section")
        p.add_argument("--timeout", type=float, default=default(DEFAULT_TIMEOUT),
                       help=f"seconds to wait for the admin API (default {DEFAULT_TIMEOUT:g})")
        p.add_argument("--json", action="store_true", default=default(False),
                       help="print the API's JSON answer as is (errors too, on stdout)")
        return p

    leaf = [admin_options(suppress=True)]
    parser = argparse.ArgumentParser(
        prog="keygate", parents=[admin_options(suppress=False)],
        description="keygate: an authenticating reverse proxy for API keys.",
        epilog="Exit codes: 0 success, 1 API or runtime error, 2 bad usage.")
    parser.add_argument("--version", action="version", version=f"keygate {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    def group(name: str, help: str) -> argparse._SubParsersAction:
        sub = verbs.add_parser(name, help=help, description=help)
        return sub.add_subparsers(dest=f"{name}_verb", metavar="COMMAND", required=True)

    def command(where: argparse._SubParsersAction, name: str, help: str, handler: Callable,
                *, local: bool = False) -> argparse.ArgumentParser:
        sub = where.add_parser(name, parents=[] if local else leaf, help=help, description=help)
        sub.set_defaults(handler=handler, local=local)
        return sub

    def workspace_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workspace", "-w", required=True, metavar="WS", help="workspace id")

    serve = command(verbs, "serve", "run the gateway (proxy and admin listeners)", cmd_serve,
                    local=True)
    serve.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                       help=f"config file (default: $KEYGATE_CONFIG, else ./{DEFAULT_CONFIG})")
    serve.add_argument("--workers", type=_argtype(_positive_int, "N"),
                       help="worker processes (default: server.workers from the config)")

    command(verbs, "demo", "try keygate: embedded store, sample upstream, two keys", cmd_demo,
            local=True)

    config = group("config", "configuration tools")
    check = command(config, "check", "validate a config file", cmd_config_check, local=True)
    check.add_argument("path", nargs="?", metavar="PATH",
                       help=f"config file (default: $KEYGATE_CONFIG, else ./{DEFAULT_CONFIG})")

    workspaces = group("workspaces", "manage workspaces")
    p = command(workspaces, "create", "create a workspace", cmd_workspaces_create)
    p.add_argument("id", metavar="ID", help="slug: lowercase letters, digits, '-'")
    p.add_argument("--name", required=True, help="display name")
    p.add_argument("--plan", help="plan name (default: the config's default_plan)")
    command(workspaces, "list", "list workspaces", cmd_workspaces_list)
    p = command(workspaces, "show", "show one workspace", cmd_workspaces_show)
    p.add_argument("id", metavar="ID")
    p = command(workspaces, "set-plan", "change a workspace's plan", cmd_workspaces_set_plan)
    p.add_argument("id", metavar="ID")
    p.add_argument("plan", metavar="PLAN")
    p = command(workspaces, "rename", "change a workspace's display name",
                cmd_workspaces_rename)
    p.add_argument("id", metavar="ID")
    p.add_argument("--name", required=True)

    keys = group("keys", "manage API keys")
    p = command(keys, "create", "create a key; prints its token once", cmd_keys_create)
    workspace_option(p)
    p.add_argument("--name", required=True)
    access = p.add_mutually_exclusive_group(required=True)
    access.add_argument("--role", help="bind the key to a role")
    access.add_argument("--scope", action="extend", nargs="+", metavar="S",
                        help="bind the key to explicit scopes (repeatable)")
    p.add_argument("--expires", type=_argtype(parse_expiry, "EXPIRES"),
                   help="30d, 24h, 90m, 3600s, or a date/datetime like 2027-01-31")
    p.add_argument("--env", help="token environment, e.g. test (default: live)")
    p.add_argument("--description")
    p.add_argument("--rate-limit", metavar="N/s|N/m",
                   help="the key's own rate limit instead of the plan's")

    p = command(keys, "list", "list a workspace's keys", cmd_keys_list)
    workspace_option(p)
    p.add_argument("--status", choices=("active", "expired", "revoked"))
    cli_controls.add_list_options(p)

    p = command(keys, "show", "show one key (never its token)", cmd_keys_show)
    workspace_option(p)
    p.add_argument("id", metavar="ID")

    p = command(keys, "update", "change a key's name, description, role/scopes or expiry",
                cmd_keys_update)
    workspace_option(p)
    p.add_argument("id", metavar="ID")
    p.add_argument("--name")
    p.add_argument("--description")
    access = p.add_mutually_exclusive_group()
    access.add_argument("--role", help="re-bind the key to a role (takes effect at once)")
    access.add_argument("--scope", action="extend", nargs="+", metavar="S",
                        help="re-bind the key to explicit scopes (repeatable)")
    expiry = p.add_mutually_exclusive_group()
    expiry.add_argument("--expires", type=_argtype(parse_expiry, "EXPIRES"),
                        help="new expiry: 30d, 24h (from now) or a date/datetime")
    expiry.add_argument("--no-expiry", action="store_true", help="the key never expires")
    cli_controls.add_update_options(p)

    p = command(keys, "revoke", "revoke a key (permanent)", cmd_keys_revoke)
    workspace_option(p)
    p.add_argument("id", metavar="ID")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask to confirm")

    p = command(keys, "rotate", "replace a key; prints the new token once", cmd_keys_rotate)
    workspace_option(p)
    p.add_argument("id", metavar="ID")
    p.add_argument("--grace", type=_argtype(parse_duration, "DURATION"),
                   help="how long the old key keeps working, e.g. 24h (default 0: revoked now)")

    cli_controls.add_key_commands(keys, leaf, _seg)
    cli_controls.add_workspace_commands(workspaces, leaf, _seg)

    roles = group("roles", "manage a workspace's own roles")
    p = command(roles, "list", "list the roles a workspace's keys can use", cmd_roles_list)
    workspace_option(p)
    p = command(roles, "set", "create or replace a workspace role", cmd_roles_set)
    workspace_option(p)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--scope", action="extend", nargs="+", metavar="S", required=True,
                   help="the role's scopes (repeatable)")
    p = command(roles, "delete", "delete a workspace role", cmd_roles_delete)
    workspace_option(p)
    p.add_argument("name", metavar="NAME")

    p = command(verbs, "usage", "a workspace's usage this month", cmd_usage)
    workspace_option(p)
    cli_controls.add_usage_options(p)

    command(verbs, "reload", "re-read the gateway's config file without a restart", cmd_reload)

    p = command(verbs, "audit", "a workspace's key lifecycle events, newest first", cmd_audit)
    workspace_option(p)
    p.add_argument("--limit", type=_argtype(_positive_int, "N"),
                   help="how many events (default 100, at most 1000)")
    return parser


def _connection(args: argparse.Namespace) -> tuple[str, str | None]:
    """(admin URL, token): --admin-url, then --config, then the environment, then the
    default; the token from the config's token_env when --config is given."""
    url, token = None, None
    if getattr(args, "config", None):
        url, token = admin_from_config(args.config)
    token = token or os.environ.get("KEYGATE_ADMIN_TOKEN")
    url = args.admin_url or url or os.environ.get("KEYGATE_ADMIN_URL") or DEFAULT_ADMIN_URL
    return url, token


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help → 0, bad usage → 2; returned so main() is testable
        return exc.code if isinstance(exc.code, int) else 2
    token = None
    try:
        if getattr(args, "local", False):
            return int(args.handler(args) or 0)
        admin_url, token = _connection(args)
        try:
            admin_url = _admin_url(admin_url)
        except ValueError as exc:
            parser.print_usage(sys.stderr)
            print(f"keygate: error: KEYGATE_ADMIN_URL: {exc}", file=sys.stderr)
            return 2
        client = AdminClient(admin_url, token, args.timeout)
        return int(args.handler(args, client) or 0)
    except UsageError as exc:
        print(f"keygate: error: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        if getattr(args, "json", False) and exc.body:
            sys.stdout.write(exc.body.decode("utf-8", "replace").rstrip("\n") + "\n")
        print(f"keygate: {exc}", file=sys.stderr)
        if exc.status == 401 and not token:
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
