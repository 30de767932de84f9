"""``keygate keys create|list|show|update|revoke|rotate``: a key's life cycle. The token is
printed only by ``create`` and ``rotate``, once. The key-control options of ``update`` and
``list`` and the ``keys usage`` / ``keys delete`` verbs are in :mod:`.key_controls`.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from typing import Any

from . import key_controls
from .client import AdminClient, CliError, UsageError, printable, seg
from .output import (cell, esc, fields, format_table, human_time, print_new_token, show,
                     words)
from .parsing import (CommandTree, SubCommands, argtype, given, parse_duration, parse_expiry,
                      ID, rate, scope, workspace_option)

KEY_FIELDS = ("id", "workspace", "name", "description", "status", "environment", "role",
              "scopes", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at",
              "rate_limit")


def add_commands(tree: CommandTree) -> SubCommands:
    """The ``keys`` group and its life-cycle verbs; returns the group for the verbs added
    later."""
    keys = tree.group("keys", "manage API keys")
    p = tree.command(keys, "create", "create a key; prints its token once", cmd_keys_create)
    p.set_defaults(prints_token=True)
    workspace_option(p)
    p.add_argument("--name", required=True, help="the key's name, e.g. the integration using it")
    access = p.add_mutually_exclusive_group(required=True)
    access.add_argument("--role", help="bind the key to a role")
    access.add_argument("--scope", action="extend", nargs="+", metavar="S",
                        type=argtype(scope, "S"),
                        help="bind the key to explicit scopes (repeatable)")
    p.add_argument("--expires", type=argtype(parse_expiry, "EXPIRES"), metavar="30d|DATE",
                   help="30d, 24h, 90m, 3600s, or a date/datetime like 2027-01-31")
    p.add_argument("--env", help="token environment, e.g. test (default: the gateway's first "
                                 "environment, keys.environments)")
    p.add_argument("--description", metavar="TEXT", help="free text shown with the key")
    p.add_argument("--rate-limit", type=argtype(rate, "RATE"), metavar="N/s|N/m",
                   help="the key's own rate limit, held within its workspace's (plan or "
                        "override)")
    key_controls.add_create_options(p)

    p = tree.command(keys, "list", "list a workspace's keys", cmd_keys_list)
    workspace_option(p)
    p.add_argument("--status", choices=("active", "expired", "revoked"),
                   help="only keys with this status")
    key_controls.add_list_options(p)

    p = tree.command(keys, "show", "show one key (never its token)", cmd_keys_show)
    workspace_option(p)
    p.add_argument("id", type=ID, metavar="ID", help="key id, as keys list shows it")

    p = tree.command(keys, "update", "change a key: role, expiry, limits, disable, allowed IPs...",
                     cmd_keys_update)
    workspace_option(p)
    p.add_argument("id", type=ID, metavar="ID", help="key id, as keys list shows it")
    p.add_argument("--name", help="new name")
    p.add_argument("--description", metavar="TEXT", help="new description")
    access = p.add_mutually_exclusive_group()
    access.add_argument("--role", help="re-bind the key to a role (takes effect at once)")
    access.add_argument("--scope", action="extend", nargs="+", metavar="S",
                        type=argtype(scope, "S"),
                        help="re-bind the key to explicit scopes (repeatable)")
    expiry = p.add_mutually_exclusive_group()
    expiry.add_argument("--expires", type=argtype(parse_expiry, "EXPIRES"), metavar="30d|DATE",
                        help="new expiry: 30d, 24h (from now) or a date/datetime")
    expiry.add_argument("--no-expiry", action="store_true", help="the key never expires")
    key_controls.add_update_options(p)

    p = tree.command(keys, "revoke", "revoke a key (permanent)", cmd_keys_revoke)
    workspace_option(p)
    p.add_argument("id", type=ID, metavar="ID", help="key id, as keys list shows it")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask to confirm")

    p = tree.command(keys, "rotate", "replace a key; prints the new token once", cmd_keys_rotate)
    p.set_defaults(prints_token=True)
    workspace_option(p)
    p.add_argument("id", type=ID, metavar="ID", help="key id, as keys list shows it")
    p.add_argument("--grace", type=argtype(parse_duration, "DURATION"), metavar="DURATION",
                   help="how long the old key keeps working, e.g. 24h (default 0: revoked now)")
    return keys


def _key_path(args: argparse.Namespace) -> str:
    return f"/workspaces/{seg(args.workspace)}/keys/{seg(args.id)}"


def _access(args: argparse.Namespace) -> dict[str, Any]:
    """``--role`` or ``--scope`` (argparse lets only one through) as body fields."""
    if getattr(args, "role", None) is not None:
        return {"role": args.role}
    if getattr(args, "scope", None) is not None:
        return {"scopes": args.scope}
    return {}


def cmd_keys_create(args: argparse.Namespace, client: AdminClient) -> int:
    body: dict[str, Any] = {"name": args.name, **_access(args),
                            **given(description=args.description), **(args.expires or {}),
                            **given(environment=args.env, rate_limit=args.rate_limit),
                            **key_controls.create_body(args)}
    answer = client.request("POST", f"/workspaces/{seg(args.workspace)}/keys", body)
    print_new_token(answer, args, client, "created")
    if args.rate_limit is not None:
        key_controls.note_rate_in_force(client, args.workspace, answer.get("key"))
    return 0


def _keys_table(items: list[dict]) -> str:
    rows = [[cell(k.get("id")), cell(k.get("name")), _key_access(k),
             human_time(k.get("created_at")), human_time(k.get("last_used_at")),
             human_time(k.get("expires_at")), _status(k)] for k in items]
    return format_table(["ID", "NAME", "ROLE/SCOPES", "CREATED", "LAST USED", "EXPIRES",
                         "STATUS"], rows)


def _status(key: dict) -> str:
    """The status, with ``disabled`` for an active key whose requests are refused (the API's
    status stays ``active``: disabling is not a revoke, and ``enabled`` says it)."""
    if key.get("status") == "active" and key.get("enabled") is False:
        return "disabled"
    return cell(key.get("status"))


def _key_access(key: dict) -> str:
    if key.get("role"):
        return f"role:{esc(key['role'])}"
    return words(key.get("scopes"), ",")


def cmd_keys_list(args: argparse.Namespace, client: AdminClient) -> int:
    query = {"status": args.status} if args.status else {}
    query.update(key_controls.list_query(args))
    items = client.listing(f"/workspaces/{seg(args.workspace)}/keys", query)
    return show(args, client, lambda: _keys_table(items))


def cmd_keys_show(args: argparse.Namespace, client: AdminClient) -> int:
    key = client.request("GET", _key_path(args))
    return show(args, client, lambda: fields(key, KEY_FIELDS))


def _new_expiry(args: argparse.Namespace, client: AdminClient) -> dict[str, Any]:
    if args.no_expiry:
        return {"expires_at": None}
    if args.expires is None:
        return {}
    if "expires_in" in args.expires:
        # PATCH takes a moment, not a duration (SPEC): counted from the admin API's clock, as
        # its Date reads it on the key's read (a 404 before anything else), not from this
        # machine's, which may be days off (a laptop's); to the second, as the API keeps it
        client.request("GET", _key_path(args))
        now = client.server_time
        if now is None:  # no Date (a proxy dropped it): this machine's clock is all there is
            now = time.time()
        moment = datetime.fromtimestamp(int(now) + args.expires["expires_in"], timezone.utc)
        return {"expires_at": moment.strftime("%Y-%m-%dT%H:%M:%SZ")}
    return args.expires


def cmd_keys_update(args: argparse.Namespace, client: AdminClient) -> int:
    body = {**given(name=args.name, description=args.description), **_access(args),
            **_new_expiry(args, client), **key_controls.update_body(args)}
    if not body:
        raise UsageError("nothing to change: give one or more of --name, --description, "
                         "--role, --scope, --expires, --no-expiry, --monthly-requests, "
                         "--rate-limit, --enable, --disable, --meta, --allow-ip, --any-ip")
    key = client.request("PATCH", _key_path(args), body)
    code = show(args, client, lambda: fields(key, KEY_FIELDS))
    if body.get("rate_limit") is not None:
        key_controls.note_rate_in_force(client, args.workspace, key)
    return code


def _confirm(question: str) -> bool | None:
    """True on y/yes, False on any other answer, None when there is no answer (end of input:
    a script that forgot --yes)."""
    # the ids in it as given (from a ticket, a form): escaped, as the API's answers are
    print(f"{printable(question)} [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin is None:  # closed (`<&-`): no answer can come, as at the end of input
        print("", file=sys.stderr)
        return None
    try:
        answer = sys.stdin.readline()
    except OSError:  # a terminal hung up (EIO): no answer came
        answer = ""
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
            print(printable(f"aborted: key {args.id} was not revoked"), file=sys.stderr)
            return 2
    key = client.request("POST", _key_path(args) + "/revoke")
    # the workspace the answer names: the key revoked is the one the API says it is
    return show(args, client, lambda: f"revoked key {esc(key.get('id', args.id))} of workspace "
                                      f"{esc(key.get('workspace', args.workspace))}")


def cmd_keys_rotate(args: argparse.Namespace, client: AdminClient) -> int:
    body = {"grace_seconds": args.grace} if args.grace is not None else {}
    answer = client.request("POST", _key_path(args) + "/rotate", body)
    print_new_token(answer, args, client, f"rotated {args.id} into")
    if not args.json:
        if args.grace:
            # its expires_at as the API sent it: human_time keeps what it cannot read as is
            print(printable(f"keygate: the old key {args.id} keeps working "
                            f"{_old_key_until(args, client)}"), file=sys.stderr)
        else:
            print(printable(f"keygate: the old key {args.id} is revoked"), file=sys.stderr)
    return 0


def _old_key_until(args: argparse.Namespace, client: AdminClient) -> str:
    """When the old key of a rotation with a grace stops: the grace never takes it past its
    own expiry, so it is read back rather than assumed to be now + grace."""
    try:
        old = client.request("GET", _key_path(args))
    except CliError:  # the new token is printed already: say what is known, fail nothing
        return f"for at most {args.grace}s (never past its own expiry)"
    return f"until {human_time(old.get('expires_at'))}"
