"""The key-control verbs of the CLI against a real admin API (fixtures from test_cli)."""

from __future__ import annotations

import pytest

from gateway.cli import main
from test_cli import admin_url, keygate, make_key, make_workspace  # noqa: F401 (fixtures)


@pytest.mark.parametrize("argv", [
    ["keys", "update", "--help"], ["keys", "usage", "--help"], ["keys", "delete", "--help"],
    ["workspaces", "limits", "--help"], ["keys", "list", "--help"], ["usage", "--help"]])
def test_every_new_command_answers_help(argv, capsys):
    assert main(argv) == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["keys", "update", "--workspace", "acme", "K", "--monthly-requests", "lots"],
    ["keys", "update", "--workspace", "acme", "K", "--enable", "--disable"],
    ["keys", "update", "--workspace", "acme", "K", "--meta", "[1]"],
    ["keys", "update", "--workspace", "acme", "K", "--allow-ip", "10.0.0.0/8", "--any-ip"],
    ["keys", "update", "--workspace", "acme", "K"],
    ["keys", "list", "--workspace", "acme", "--unused", "thirty"],
    ["workspaces", "limits", "acme", "--reset", "--max-keys", "3"]])
def test_bad_usage_of_the_new_commands_exits_2(argv, capsys):
    assert main(argv) == 2


async def test_keys_update_usage_and_list_unused(admin_url, keygate):
    await make_workspace(keygate)
    key = (await make_key(keygate, "acme", "--scope", "people:read"))["key"]
    run = await keygate("keys", "update", "--workspace", "acme", key["id"],
                        "--monthly-requests", "500", "--rate-limit", "5/s", "--disable",
                        "--meta", '{"crm": "c-9"}', "--allow-ip", "10.0.0.0/8", "192.0.2.1")
    assert run.code == 0, run.err
    assert "500" in run.out and "10.0.0.0/8" in run.out and "192.0.2.1/32" in run.out
    run = await keygate("keys", "update", "--workspace", "acme", key["id"], "--json",
                        "--name", "ci-2")
    body = run.json()
    assert (body["name"], body["monthly_requests"], body["enabled"], body["rate_limit"]) == \
        ("ci-2", 500, False, "5/s")
    run = await keygate("keys", "update", "--workspace", "acme", key["id"], "--json",
                        "--monthly-requests", "none", "--enable", "--any-ip")
    body = run.json()
    assert body["monthly_requests"] is None and body["enabled"] is True
    assert body["allowed_ips"] is None and body["meta"] == {"crm": "c-9"}
    assert body["rate_limit"] == "5/s"
    run = await keygate("keys", "update", "--workspace", "acme", key["id"],
                        "--rate-limit", "fast")
    assert run.code == 2 and "argument --rate-limit: a rate limit looks like" in run.err
    run = await keygate("keys", "usage", "--workspace", "acme", key["id"])
    assert run.code == 0 and "used 0 this month" in run.out
    run = await keygate("keys", "usage", "--workspace", "acme", key["id"], "--daily",
                        "--days", "3")
    assert run.code == 0 and run.out.splitlines()[0].split() == ["DATE", "REQUESTS"]
    assert len(run.out.splitlines()) == 4
    for days in ("91", "0", "-1", "x"):  # outside what the API takes: bad usage, no call
        run = await keygate("keys", "usage", "--workspace", "acme", key["id"], "--daily",
                            "--days", days)
        assert run.code == 2 and "from 1 to 90" in run.err and "Traceback" not in run.err
    run = await keygate("keys", "list", "--workspace", "acme", "--unused", "30d", "--json")
    listing = run.json()
    items = listing["items"] if isinstance(listing, dict) else listing
    assert run.code == 0 and [k["id"] for k in items] == [key["id"]]
    run = await keygate("usage", "--workspace", "acme", "--daily", "--days", "2", "--json")
    assert run.code == 0 and len(run.json()["items"]) == 2


async def test_days_without_daily_gives_the_days_asked_for(admin_url, keygate):
    """`--days 7` alone asked for seven days and silently got the month's one line (usage) or
    the key's month count (keys usage): the option was taken, and dropped."""
    await make_workspace(keygate)
    key = (await make_key(keygate, "acme", "--scope", "people:read"))["key"]
    run = await keygate("usage", "--workspace", "acme", "--days", "2")
    assert run.code == 0, run.err
    assert run.out.splitlines()[0].split() == ["DATE", "REQUESTS"]
    assert len(run.out.splitlines()) == 3
    run = await keygate("keys", "usage", "--workspace", "acme", key["id"], "--days", "3",
                        "--json")
    assert run.code == 0 and len(run.json()["items"]) == 3
    run = await keygate("usage", "--workspace", "acme", "--daily", "--json")  # default 30
    assert run.code == 0 and len(run.json()["items"]) == 30


async def test_keys_delete_refuses_an_active_key(admin_url, keygate):
    await make_workspace(keygate)
    key = (await make_key(keygate, "acme", "--scope", "people:read"))["key"]
    run = await keygate("keys", "delete", "--workspace", "acme", key["id"])
    assert run.code == 1 and "conflict" in run.err
    assert (await keygate("keys", "revoke", "--workspace", "acme", key["id"], "--yes")).code == 0
    run = await keygate("keys", "delete", "--workspace", "acme", key["id"])
    assert run.code == 0 and "deleted" in run.out


async def test_workspaces_limits_shows_sets_and_resets(admin_url, keygate):
    await make_workspace(keygate, "acme", "free")
    run = await keygate("workspaces", "limits", "acme")
    assert run.code == 0
    assert "monthly_requests  1000  (plan)" in run.out
    run = await keygate("workspaces", "limits", "acme", "--monthly-requests", "250000",
                        "--rate-limit", "none")
    assert run.code == 0, run.err
    assert "monthly_requests  250000  (custom)" in run.out
    assert "rate_limit        unlimited  (custom)" in run.out
    run = await keygate("workspaces", "limits", "acme", "--max-keys", "9", "--json")
    assert run.json()["limits"] == {"monthly_requests": 250000, "max_keys": 9,
                                    "rate_limit": None}
    run = await keygate("workspaces", "limits", "acme", "--reset", "--json")
    assert run.json()["custom_limits"] == {}
    run = await keygate("workspaces", "limits", "ghost")
    assert run.code == 1 and "not_found" in run.err


async def test_keys_create_sets_the_key_controls_in_the_create_call(admin_url, keygate):
    # else a key meant to be capped or bound to addresses works unbound until an update
    await make_workspace(keygate)
    run = await keygate("keys", "create", "--workspace", "acme", "--name", "ci", "--json",
                        "--scope", "people:read", "--monthly-requests", "500", "--disable",
                        "--meta", '{"crm": "c-9"}', "--allow-ip", "10.0.0.0/8", "192.0.2.1")
    assert run.code == 0, run.err
    key = run.json()["key"]
    assert (key["monthly_requests"], key["enabled"], key["meta"], key["allowed_ips"]) == \
        (500, False, {"crm": "c-9"}, ["10.0.0.0/8", "192.0.2.1/32"])
    run = await keygate("keys", "create", "--workspace", "acme", "--name", "plain", "--json",
                        "--scope", "people:read")
    key = run.json()["key"]
    assert (key["monthly_requests"], key["enabled"], key["meta"], key["allowed_ips"]) == \
        (None, True, {}, None)
    run = await keygate("keys", "create", "--workspace", "acme", "--name", "x",
                        "--scope", "people:read", "--allow-ip", "not-an-address")
    assert run.code == 2 and "not an IP address or CIDR" in run.err  # bad usage: never sent


async def test_keys_list_shows_a_disabled_key_as_disabled(admin_url, keygate):
    await make_workspace(keygate)
    off = (await make_key(keygate, "acme", "--scope", "people:read"))["key"]
    on = (await make_key(keygate, "acme", "--scope", "people:read"))["key"]
    run = await keygate("keys", "update", "--workspace", "acme", off["id"], "--disable")
    assert run.code == 0, run.err
    run = await keygate("keys", "list", "--workspace", "acme")
    status = {line.split()[0]: line.split()[-1] for line in run.out.strip().splitlines()[1:]}
    assert status == {off["id"]: "disabled", on["id"]: "active"}


def test_keys_update_says_it_changes_the_key_controls_too(capsys):
    """`keygate keys --help` summed up `update` as name, description, role/scopes or expiry
    only, so a reader looking for how to disable a key or cap it did not find it there."""
    assert main(["keys", "--help"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("update"))
    for word in ("limits", "disable", "allowed IPs"):
        assert word in line, line


async def test_a_key_rate_over_the_workspaces_says_what_is_in_force(admin_url, keygate):
    """The API takes a key's own rate above its workspace's rate in force and answers the key
    object with the rate as given (the key's own setting), while the gateway holds the key to
    the workspace's: an operator who asked for 10/s under a 3/s override was told nothing and
    saw 10/s. The CLI now says on stderr what is in force; stdout (--json: the body as is) is
    unchanged, and a rate within the workspace's says nothing."""
    await make_workspace(keygate)
    assert (await keygate("workspaces", "limits", "acme", "--rate-limit", "3/s")).code == 0
    run = await keygate("keys", "create", "--workspace", "acme", "--name", "fast", "--json",
                        "--scope", "people:read", "--rate-limit", "10/s")
    assert run.code == 0, run.err
    key = run.json()["key"]
    assert key["rate_limit"] == "10/s"  # the key's own setting, as SPEC has it
    note = [line for line in run.err.splitlines() if "rate" in line]
    assert len(note) == 1 and "10/s" in note[0] and "acme" in note[0], run.err
    assert "held to 3/s" in note[0] and "workspaces limits acme --rate-limit" in note[0]
    run = await keygate("keys", "update", "--workspace", "acme", key["id"], "--rate-limit", "50/m")
    assert run.code == 0, run.err
    assert "50/m" in run.out  # the key's fields as before
    assert "held to 50/m and 3/s" in run.err, run.err  # crossing: both hold
    for argv in (["--rate-limit", "2/s"], ["--rate-limit", "none"], ["--name", "slow"]):
        run = await keygate("keys", "update", "--workspace", "acme", key["id"], *argv)
        assert run.code == 0 and run.err == "", (argv, run.err)
    assert (await keygate("workspaces", "limits", "acme", "--rate-limit", "none")).code == 0
    run = await keygate("keys", "update", "--workspace", "acme", key["id"], "--rate-limit", "9/s")
    assert run.code == 0 and run.err == "", run.err  # no workspace rate: nothing to say
