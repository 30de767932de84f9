"""``keygate usage`` and ``keygate audit``: what a workspace's keys did this month (or per
day) and its key life-cycle events. A single key's usage is ``keys usage``, with the key
controls."""

from __future__ import annotations

import argparse
import json

from .client import AdminClient, seg
from .key_controls import show_daily
from .output import cell, esc, format_table, human_time, show
from .parsing import CommandTree, argtype, audit_limit, daily_options, workspace_option


def add_usage(tree: CommandTree) -> None:
    p = tree.command(None, "usage", "a workspace's usage this month", cmd_usage)
    workspace_option(p)
    daily_options(p)


def add_audit(tree: CommandTree) -> None:
    p = tree.command(None, "audit", "a workspace's lifecycle events (its creation, plan, limits, "
                     "roles and keys), newest first",
                     cmd_audit)
    workspace_option(p)
    p.add_argument("--limit", type=argtype(audit_limit, "N"), metavar="N",
                   help="how many events (default 100, at most 1000)")


def _usage_line(usage: dict) -> str:
    unlimited = usage.get("limit") is None
    usage = {name: esc(usage.get(name)) for name in
             ("workspace", "period", "used", "limit", "remaining", "resets_at")}
    limit = usage["limit"]
    if unlimited:
        tail = f"used {usage.get('used')} / unlimited  (resets {usage.get('resets_at')})"
    else:
        tail = (f"used {usage.get('used')} / {limit}  ({usage.get('remaining')} remaining, "
                f"resets {usage.get('resets_at')})")
    return f"{usage.get('workspace')}  {usage.get('period')}  {tail}"


def cmd_usage(args: argparse.Namespace, client: AdminClient) -> int:
    path = f"/workspaces/{seg(args.workspace)}"
    if args.daily:
        return show_daily(args, client, path)
    usage = client.request("GET", path + "/usage")
    return show(args, client, lambda: _usage_line(usage))


def cmd_audit(args: argparse.Namespace, client: AdminClient) -> int:
    query = {"limit": str(args.limit)} if args.limit is not None else None
    items = client.listing(f"/workspaces/{seg(args.workspace)}/audit", query)
    return show(args, client, lambda: format_table(
        ["AT", "ACTOR", "ACTION", "TARGET", "DETAILS"],
        [[human_time(e.get("at")), cell(e.get("actor")), cell(e.get("action")),
          cell(e.get("target")),
          json.dumps(e.get("details"), separators=(",", ":")) if e.get("details") else "-"]
         for e in items]))
