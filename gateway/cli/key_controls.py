"""The key controls on the command line: the control options of ``keys update`` (caps, rate
limit, enable/disable, metadata, IP allow-list), the ``keys list`` options that find unused
keys, ``keys usage [--daily]``, ``keys delete`` and ``workspaces limits``.

Every command is a thin client of the admin API: it sends what the options say and prints
what the API answers (``--json``: the body as is).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..models import parse_rate_limit
from .client import AdminClient, CliError, printable, seg
from .output import days_table, esc, show
from .parsing import (CommandTree, SubCommands, allowed_ip, argtype, count_or_none, daily_options, days,
                      given, ID, json_object, rate_or_none, workspace_option)


# --- options of keys update / keys list ----------------------------------------------------------

def add_update_options(update: argparse.ArgumentParser) -> None:
    """The key-control options of ``keys update`` (see :func:`update_body`)."""
    update.add_argument("--monthly-requests", type=argtype(count_or_none, "N"), metavar="N|none",
                        default=argparse.SUPPRESS,
                        help="the key's own monthly cap (none: only the workspace's quota)")
    update.add_argument("--rate-limit", type=argtype(rate_or_none, "RATE"),
                        metavar="N/s|N/m|none", default=argparse.SUPPRESS,
                        help="the key's own rate limit, held within its workspace's (plan or "
                             "override); none: the workspace's alone")
    enabled = update.add_mutually_exclusive_group()
    enabled.add_argument("--enable", dest="enabled", action="store_const", const=True,
                         help="let a disabled key work again")
    enabled.add_argument("--disable", dest="enabled", action="store_const", const=False,
                         help="refuse the key (401 disabled_key) until enabled; not a revoke")
    update.add_argument("--meta", type=argtype(json_object, "JSON"), metavar="JSON",
                        help="replace the key's metadata (a JSON object, at most 4 KiB)")
    ips = update.add_mutually_exclusive_group()
    ips.add_argument("--allow-ip", action="extend", nargs="+", metavar="CIDR",
                     type=argtype(allowed_ip, "CIDR"),
                     help="the only addresses the key may be used from (repeatable)")
    ips.add_argument("--any-ip", action="store_true", help="drop the key's address allow-list")


def update_body(args: argparse.Namespace) -> dict[str, Any]:
    """The PATCH fields the key-control options of ``keys update`` ask for. A cap or rate
    given as ``none`` is sent as null (no limit of the key's own), so those two count as given
    when present at all."""
    body = {name: getattr(args, name) for name in ("monthly_requests", "rate_limit")
            if hasattr(args, name)}
    body.update(given(enabled=args.enabled, meta=args.meta, allowed_ips=args.allow_ip))
    if args.any_ip:
        body["allowed_ips"] = None
    return body


def add_create_options(create: argparse.ArgumentParser) -> None:
    """The key controls ``keys create`` sets in the create call itself (see
    :func:`create_body`): a key meant to be capped or bound to addresses never works without
    them, not even between a create and an update."""
    create.add_argument("--monthly-requests", type=argtype(count_or_none, "N"), metavar="N",
                        help="the key's own monthly cap on top of the workspace's quota")
    create.add_argument("--disable", dest="enabled", action="store_const", const=False,
                        help="create it disabled (401 disabled_key until enabled)")
    create.add_argument("--meta", type=argtype(json_object, "JSON"), metavar="JSON",
                        help="the key's metadata (a JSON object, at most 4 KiB)")
    create.add_argument("--allow-ip", action="extend", nargs="+", metavar="CIDR",
                        type=argtype(allowed_ip, "CIDR"),
                        help="the only addresses the key may be used from (repeatable)")


def create_body(args: argparse.Namespace) -> dict[str, Any]:
    return given(monthly_requests=args.monthly_requests, enabled=args.enabled, meta=args.meta,
                 allowed_ips=args.allow_ip)


def note_rate_in_force(client: AdminClient, workspace: str, key: dict) -> None:
    """After a create or update that gave the key a rate of its own: a note on stderr when
    the workspace's rate in force (its plan's, or its own ``limits``) holds the key to less.
    The API takes such a rate and answers it unchanged (the key's own setting, kept for a
    later upgrade), so the answer alone does not tell. Called once the answer is printed
    (``--json`` stays the body as is); a failed look-up says nothing: the change was made."""
    own = key.get("rate_limit") if isinstance(key, dict) else None
    if not own:
        return
    try:
        workspace_json = client.request("GET", f"/workspaces/{seg(workspace)}")
        bound = ((workspace_json or {}).get("limits") or {}).get("rate_limit")
        if not bound:
            return
        own_rate, bound_rate = parse_rate_limit(own), parse_rate_limit(bound)
    except (CliError, ValueError, AttributeError):
        return
    if own_rate.exceeds(bound_rate):
        print(printable(f"keygate: note: the key's rate_limit {own} is not within workspace "
                        f"{workspace}'s {bound}: the key is held to "
                        f"{own_rate.within(bound_rate)} (to give it more: keygate workspaces "
                        f"limits {workspace} --rate-limit RATE)"), file=sys.stderr)


def add_list_options(key_list: argparse.ArgumentParser) -> None:
    """``keys list --unused 30d --sort last_used``."""
    key_list.add_argument("--unused", type=argtype(days, "DAYS"), metavar="Nd",
                          help="only keys never used or last used more than N days ago")
    key_list.add_argument("--sort", choices=("created", "last_used", "name"),
                          help="order of the listing (default: created)")


def list_query(args: argparse.Namespace) -> dict[str, str]:
    query: dict[str, str] = {}
    if getattr(args, "unused", None) is not None:
        query["unused_days"] = str(args.unused)
    if getattr(args, "sort", None):
        query["sort"] = args.sort
    return query


# --- keys usage, keys delete, workspaces limits --------------------------------------------------

def add_key_commands(tree: CommandTree, keys: SubCommands) -> None:
    """``keys usage`` and ``keys delete``."""
    usage = tree.command(keys, "usage", "a key's requests this month, or per day with --daily",
                         cmd_keys_usage)
    workspace_option(usage)
    usage.add_argument("id", type=ID, metavar="ID", help="key id, as keys list shows it")
    daily_options(usage)

    delete = tree.command(keys, "delete", "remove a revoked or expired key from listings",
                          cmd_keys_delete)
    workspace_option(delete)
    delete.add_argument("id", type=ID, metavar="ID", help="key id, as keys list shows it")


def add_workspace_commands(tree: CommandTree, workspaces: SubCommands) -> None:
    """``workspaces limits ID [--monthly-requests N|none] [--max-keys N|none]
    [--rate-limit N/s|N/m|none] [--reset]``: without options, shows the limits in force."""
    limits = tree.command(workspaces, "limits",
                          "show or override a workspace's plan limits (a custom deal)",
                          cmd_workspaces_limits)
    limits.add_argument("id", type=ID, metavar="ID", help="workspace id")
    for flag, kind, metavar, what in (
            ("--monthly-requests", count_or_none, "N|none", "requests a month"),
            ("--max-keys", count_or_none, "N|none", "active keys"),
            ("--rate-limit", rate_or_none, "N/s|N/m|none",
             "per-key rate, N/s or N/m, that holds a key's own")):
        limits.add_argument(flag, type=argtype(kind, "VALUE"), metavar=metavar,
                            default=argparse.SUPPRESS,
                            help=f"override the plan's {what} (none: unlimited)")
    limits.add_argument("--reset", action="store_true",
                        help="drop every override: the plan's limits again")


def show_daily(args: argparse.Namespace, client: AdminClient, path: str) -> int:
    """``--daily``: the ``/usage/daily`` answer under ``path`` (a workspace or a key)."""
    items = client.listing(path + "/usage/daily", {"days": str(args.days)})
    return show(args, client, lambda: days_table(items))


def cmd_keys_usage(args: argparse.Namespace, client: AdminClient) -> int:
    path = f"/workspaces/{seg(args.workspace)}/keys/{seg(args.id)}"
    if args.daily:
        return show_daily(args, client, path)
    key = client.request("GET", path)

    def text() -> str:
        cap = key.get("monthly_requests")
        return (f"{esc(key.get('id'))}  {esc(key.get('name'))}  used "
                f"{esc(key.get('used_this_month'))} this month / "
                f"{'no cap of its own' if cap is None else esc(cap)}")
    return show(args, client, text)


def cmd_keys_delete(args: argparse.Namespace, client: AdminClient) -> int:
    key = client.request("DELETE", f"/workspaces/{seg(args.workspace)}/keys/{seg(args.id)}")
    return show(args, client, lambda: f"deleted key {esc(key.get('id', args.id))} of workspace "
                                      f"{esc(key.get('workspace', args.workspace))} (its audit "
                                      "entries stay)")


def cmd_workspaces_limits(args: argparse.Namespace, client: AdminClient) -> int:
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

    def text() -> str:
        limits, custom = workspace.get("limits") or {}, workspace.get("custom_limits") or {}
        lines = [f"workspace {esc(workspace.get('id'))}  plan {esc(workspace.get('plan'))}"]
        if not isinstance(limits, dict) or not isinstance(custom, (dict, list)):
            # not keygate's shape: shown as it came
            return "\n".join(lines + [f"  limits {esc(limits)}",
                                      f"  custom_limits {esc(custom)}"])
        for field in ("monthly_requests", "max_keys", "rate_limit"):
            source = "custom" if field in custom else "plan"
            value = limits.get(field)
            lines.append(f"  {field:<17} {'unlimited' if value is None else esc(value)}  "
                         f"({source})")
        return "\n".join(lines)
    return show(args, client, text)
