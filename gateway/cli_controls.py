"""CLI verbs for the key controls: the control options of ``keys update``, ``keys usage
[--daily]``, ``keys delete``, ``workspaces limits`` and the ``keys list`` / ``usage`` options that
find unused keys and show days. Kept apart from ``gateway.cli`` (which wires them in with
``add_*`` calls) so the rest of the CLI can change without these moving.

Every command is a thin client of the admin API: it sends what the options say and prints
what the API answers (``--json``: the body as is).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

NONE_WORDS = ("none", "null", "unlimited")


def _count_or_none(text: str) -> int | None:
    """``--monthly-requests 5000`` / ``none`` (no limit of its own)."""
    if text.strip().lower() in NONE_WORDS:
        return None
    if not text.strip().isascii() or not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number (or 'none')")
    return int(text)


def _rate_or_none(text: str) -> str | None:
    return None if text.strip().lower() in NONE_WORDS else text.strip()


def _meta(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError("--meta must be a JSON object, e.g. "
                                         "'{\"customer\": \"c-42\"}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--meta must be a JSON object")
    return value


def _days(text: str) -> int:
    """``--unused 30d`` (or ``30``) → 30."""
    body = text.strip().lower().removesuffix("d")
    if not body.isascii() or not body.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of days like 30d")
    return int(body)


def _named(fn: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    fn.__name__ = name  # argparse names the type in its error message
    return fn


# --- wiring ------------------------------------------------------------------------------------

def add_update_options(update: Any) -> None:
    """The key-control options of ``keys update`` (see :func:`update_body`)."""
    update.add_argument("--monthly-requests", type=_named(_count_or_none, "N"), metavar="N|none",
                        default=argparse.SUPPRESS,
                        help="the key's own monthly cap (none: only the workspace's quota)")
    update.add_argument("--rate-limit", type=_named(_rate_or_none, "RATE"), metavar="N/s|N/m|none",
                        default=argparse.SUPPRESS,
                        help="the key's own rate limit (none: the plan's)")
    enabled = update.add_mutually_exclusive_group()
    enabled.add_argument("--enable", dest="enabled", action="store_const", const=True,
                         help="let a disabled key work again")
    enabled.add_argument("--disable", dest="enabled", action="store_const", const=False,
                         help="refuse the key (401 disabled_key) until enabled; not a revoke")
    update.add_argument("--meta", type=_named(_meta, "JSON"), metavar="JSON",
                        help="replace the key's metadata (a JSON object, at most 4 KiB)")
    ips = update.add_mutually_exclusive_group()
    ips.add_argument("--allow-ip", action="extend", nargs="+", metavar="CIDR",
                     help="the only addresses the key may be used from (repeatable)")
    ips.add_argument("--any-ip", action="store_true", help="drop the key's address allow-list")


def update_body(args: argparse.Namespace) -> dict[str, Any]:
    """The PATCH fields the key-control options of ``keys update`` ask for."""
    body: dict[str, Any] = {}
    for field in ("monthly_requests", "rate_limit"):
        if hasattr(args, field):
            body[field] = getattr(args, field)
    if args.enabled is not None:
        body["enabled"] = args.enabled
    if args.meta is not None:
        body["meta"] = args.meta
    if args.allow_ip is not None:
        body["allowed_ips"] = args.allow_ip
    if args.any_ip:
        body["allowed_ips"] = None
    return body


def add_key_commands(key_verbs: Any, leaf: list, seg: Callable[[str], str]) -> None:
    """``keys usage`` and ``keys delete`` (``keys update`` is the CLI's own, with
    :func:`add_update_options` added to it)."""
    _add_usage_and_delete(key_verbs, leaf, seg)


def _add_usage_and_delete(key_verbs: Any, leaf: list, seg: Callable[[str], str]) -> None:
    usage = key_verbs.add_parser("usage", parents=leaf,
                                 help="a key's requests this month, or per day with --daily")
    usage.add_argument("--workspace", required=True, metavar="WS")
    usage.add_argument("id", metavar="ID")
    usage.add_argument("--daily", action="store_true", help="one line per UTC day")
    usage.add_argument("--days", type=int, default=30, help="days with --daily (1-90, default 30)")
    usage.set_defaults(handler=lambda a, c: cmd_keys_usage(a, c, seg))

    delete = key_verbs.add_parser("delete", parents=leaf,
                                  help="remove a revoked or expired key from listings")
    delete.add_argument("--workspace", required=True, metavar="WS")
    delete.add_argument("id", metavar="ID")
    delete.set_defaults(handler=lambda a, c: cmd_keys_delete(a, c, seg))


def add_list_options(key_list: Any) -> None:
    """``keys list --unused 30d --sort last_used``."""
    key_list.add_argument("--unused", type=_named(_days, "DAYS"), metavar="Nd",
                          help="only keys never used or last used more than N days ago")
    key_list.add_argument("--sort", choices=("created", "last_used", "name"))


def list_query(args: argparse.Namespace) -> dict[str, str]:
    query: dict[str, str] = {}
    if getattr(args, "unused", None) is not None:
        query["unused_days"] = str(args.unused)
    if getattr(args, "sort", None):
        query["sort"] = args.sort
    return query


def add_workspace_commands(ws_verbs: Any, leaf: list, seg: Callable[[str], str]) -> None:
    """``workspaces limits ID [--monthly-requests N|none] [--max-keys N|none]
    [--rate-limit R|none] [--reset]``: without options, shows the limits in force."""
    limits = ws_verbs.add_parser("limits", parents=leaf,
                                 help="show or override a workspace's plan limits (a custom deal)")
    limits.add_argument("id", metavar="ID")
    for flag, kind, what in (("--monthly-requests", _count_or_none, "requests a month"),
                             ("--max-keys", _count_or_none, "active keys"),
                             ("--rate-limit", _rate_or_none, "per-key rate, N/s or N/m")):
        limits.add_argument(flag, type=_named(kind, "VALUE"), metavar="VALUE|none",
                            default=argparse.SUPPRESS,
                            help=f"override the plan's {what} (none: unlimited)")
    limits.add_argument("--reset", action="store_true",
                        help="drop every override: the plan's limits again")
    limits.set_defaults(handler=lambda a, c: cmd_workspaces_limits(a, c, seg))


def add_usage_options(usage: Any) -> None:
    usage.add_argument("--daily", action="store_true", help="one line per UTC day")
    usage.add_argument("--days", type=int, default=30, help="days with --daily (1-90, default 30)")


# --- commands ----------------------------------------------------------------------------------

def _print(value: Any, client: Any = None) -> None:
    """``--json``: the API's body as it came when the client keeps it, else re-encoded."""
    raw = getattr(client, "last_body", None)
    if isinstance(raw, bytes):
        sys.stdout.write(raw.decode("utf-8", "replace").rstrip("\n") + "\n")
    else:
        print(json.dumps(value, indent=2))


def _print_days(items: list[dict]) -> None:
    width = max([len(str(d.get("requests"))) for d in items] + [8])
    print(f"{'DATE':<10}  {'REQUESTS':>{width}}")
    for day in items:
        print(f"{day.get('date', ''):<10}  {day.get('requests', 0):>{width}}")


def cmd_keys_usage(args: argparse.Namespace, client: Any, seg: Callable[[str], str]) -> int:
    path = f"/workspaces/{seg(args.workspace)}/keys/{seg(args.id)}"
    if args.daily:
        answer = client.request("GET", path + "/usage/daily", query={"days": str(args.days)})
        if args.json:
            _print(answer, client)
        else:
            _print_days(answer.get("items", []))
        return 0
    key = client.request("GET", path)
    if args.json:
        _print(key, client)
    else:
        cap = key.get("monthly_requests")
        print(f"{key.get('id')}  {key.get('name')}  used {key.get('used_this_month')} this "
              f"month / {'no cap of its own' if cap is None else cap}")
    return 0


def cmd_keys_delete(args: argparse.Namespace, client: Any, seg: Callable[[str], str]) -> int:
    key = client.request("DELETE", f"/workspaces/{seg(args.workspace)}/keys/{seg(args.id)}")
    if args.json:
        _print(key, client)
    else:
        print(f"deleted key {key.get('id', args.id)} of workspace {args.workspace} "
              "(its audit entries stay)")
    return 0


def cmd_workspaces_limits(args: argparse.Namespace, client: Any,
                          seg: Callable[[str], str]) -> int:
    overrides = {field: getattr(args, field) for field in
                 ("monthly_requests", "max_keys", "rate_limit") if hasattr(args, field)}
    path = f"/workspaces/{seg(args.id)}"
    if args.reset and overrides:
        print("keygate workspaces limits: error: --reset cannot be combined with overrides",
              file=sys.stderr)
        return 2
    if args.reset:
        workspace = client.request("PATCH", path, {"limits": None})
    elif overrides:
        workspace = client.request("PATCH", path, {"limits": overrides})
    else:
        workspace = client.request("GET", path)
    if args.json:
        _print(workspace, client)
        return 0
    limits, custom = workspace.get("limits") or {}, workspace.get("custom_limits") or {}
    print(f"workspace {workspace.get('id')}  plan {workspace.get('plan')}")
    for field in ("monthly_requests", "max_keys", "rate_limit"):
        source = "custom" if field in custom else "plan"
        value = limits.get(field)
        print(f"  {field:<17} {'unlimited' if value is None else value}  ({source})")
    return 0


def print_daily_usage(args: argparse.Namespace, client: Any, seg: Callable[[str], str]) -> int:
    """``usage --workspace WS --daily``."""
    answer = client.request("GET", f"/workspaces/{seg(args.workspace)}/usage/daily",
                            query={"days": str(args.days)})
    if args.json:
        _print(answer, client)
    else:
        _print_days(answer.get("items", []))
    return 0
