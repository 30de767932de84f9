"""``keygate workspaces create|list|show|set-plan|rename`` (``workspaces limits`` is with the
key controls)."""

from __future__ import annotations

import argparse
from typing import Any

from .client import AdminClient, seg
from .output import cell, esc, fields, format_table, human_time, show
from .parsing import ID, CommandTree, SubCommands

WORKSPACE_FIELDS = ("id", "name", "plan", "created_at")


def add_commands(tree: CommandTree) -> SubCommands:
    """The ``workspaces`` group and its verbs; returns the group for the verbs added later."""
    workspaces = tree.group("workspaces", "manage workspaces")
    p = tree.command(workspaces, "create", "create a workspace", cmd_workspaces_create)
    p.add_argument("id", type=ID, metavar="ID", help="slug: lowercase letters, digits, '-'")
    p.add_argument("--name", required=True, help="display name")
    # an empty one (an unset variable) is bad usage, as for set-plan: not the default plan
    p.add_argument("--plan", type=ID, help="plan name (default: the config's default_plan)")
    tree.command(workspaces, "list", "list workspaces", cmd_workspaces_list)
    p = tree.command(workspaces, "show", "show one workspace", cmd_workspaces_show)
    p.add_argument("id", type=ID, metavar="ID", help="workspace id")
    p = tree.command(workspaces, "set-plan", "change a workspace's plan",
                     cmd_workspaces_set_plan)
    p.add_argument("id", type=ID, metavar="ID", help="workspace id")
    p.add_argument("plan", type=ID, metavar="PLAN", help="a plan name from the config's plans")
    p = tree.command(workspaces, "rename", "change a workspace's display name",
                     cmd_workspaces_rename)
    p.add_argument("id", type=ID, metavar="ID", help="workspace id")
    p.add_argument("--name", required=True, help="the new display name")
    return workspaces


def cmd_workspaces_create(args: argparse.Namespace, client: AdminClient) -> int:
    body: dict[str, Any] = {"id": args.id, "name": args.name}
    if args.plan is not None:
        body["plan"] = args.plan
    workspace = client.request("POST", "/workspaces", body)
    return show(args, client, lambda: f"created workspace {esc(workspace.get('id'))} "
                                      f"({esc(workspace.get('name'))}, plan "
                                      f"{esc(workspace.get('plan'))})")


def cmd_workspaces_list(args: argparse.Namespace, client: AdminClient) -> int:
    items = client.listing("/workspaces")
    return show(args, client, lambda: format_table(
        ["ID", "NAME", "PLAN", "CREATED"],
        [[cell(w.get("id")), cell(w.get("name")), cell(w.get("plan")),
          human_time(w.get("created_at"))] for w in items]))


def cmd_workspaces_show(args: argparse.Namespace, client: AdminClient) -> int:
    workspace = client.request("GET", f"/workspaces/{seg(args.id)}")
    return show(args, client, lambda: fields(workspace, WORKSPACE_FIELDS))


def cmd_workspaces_set_plan(args: argparse.Namespace, client: AdminClient) -> int:
    workspace = client.request("PATCH", f"/workspaces/{seg(args.id)}", {"plan": args.plan})
    return show(args, client, lambda: f"workspace {esc(workspace.get('id'))} is now on "
                                      f"plan {esc(workspace.get('plan'))}")


def cmd_workspaces_rename(args: argparse.Namespace, client: AdminClient) -> int:
    workspace = client.request("PATCH", f"/workspaces/{seg(args.id)}", {"name": args.name})
    return show(args, client, lambda: f"workspace {esc(workspace.get('id'))} is now "
                                      f"named {esc(workspace.get('name'))}")
