"""``keygate roles list|set|delete``: the roles a workspace defines for its own keys."""

from __future__ import annotations

import argparse

from .client import AdminClient, seg
from .output import cell, esc, format_table, show, words
from .parsing import ID, CommandTree, argtype, scope, workspace_option


def add_commands(tree: CommandTree) -> None:
    roles = tree.group("roles", "manage a workspace's own roles")
    p = tree.command(roles, "list", "list the roles a workspace's keys can use", cmd_roles_list)
    workspace_option(p)
    p = tree.command(roles, "set", "create or replace a workspace role", cmd_roles_set)
    workspace_option(p)
    p.add_argument("name", type=ID, metavar="NAME", help="role name (a slug)")
    p.add_argument("--scope", action="extend", nargs="+", metavar="S", required=True,
                   type=argtype(scope, "S"),
                   help="the role's scopes (repeatable)")
    p = tree.command(roles, "delete", "delete a workspace role", cmd_roles_delete)
    workspace_option(p)
    p.add_argument("name", type=ID, metavar="NAME", help="role name (a slug)")


def _role_path(args: argparse.Namespace) -> str:
    return f"/workspaces/{seg(args.workspace)}/roles/{seg(args.name)}"


def cmd_roles_list(args: argparse.Namespace, client: AdminClient) -> int:
    items = client.listing(f"/workspaces/{seg(args.workspace)}/roles")
    return show(args, client, lambda: format_table(
        ["NAME", "SOURCE", "SCOPES"],
        [[cell(r.get("name")), cell(r.get("source")), words(r.get("scopes"))] for r in items]))


def cmd_roles_set(args: argparse.Namespace, client: AdminClient) -> int:
    role = client.request("PUT", _role_path(args), {"scopes": args.scope})
    return show(args, client, lambda: f"role {esc(role.get('name'))} of workspace "
                                      f"{args.workspace}: "
                                      f"{words(role.get('scopes')) if role.get('scopes') else '(no scopes)'}")


def cmd_roles_delete(args: argparse.Namespace, client: AdminClient) -> int:
    role = client.request("DELETE", _role_path(args))
    return show(args, client, lambda: f"deleted role {esc(role.get('name', args.name))} of workspace "
                                      f"{args.workspace}")
