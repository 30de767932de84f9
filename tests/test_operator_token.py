"""The operator token's strength: ``keygate serve`` warns once at start when it is weak (short,
or made of few distinct characters), never printing it, and starts all the same (a setup that
works keeps working). The tokens the docs and ``keygate demo`` make are not weak."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from gateway.admin.middleware import operator_token_weakness

from served import ADMIN_TOKEN as SERVED_TOKEN, Served, short_data_dir, write_config


@pytest.mark.parametrize("token", [
    "changeme", "admin", "test-operator-token-0123456", "x" * 31,
    "a" * 64, "abababababababababababababababababab", "0123456" * 6,
])
def test_a_short_or_repetitive_token_is_weak(token):
    reason = operator_token_weakness(token)
    assert reason and token not in reason, reason


@pytest.mark.parametrize("make", [
    lambda: secrets.token_urlsafe(32),   # README, deploy/: the recipe the docs give
    lambda: secrets.token_urlsafe(24),   # keygate demo's own (32 characters)
    lambda: secrets.token_hex(16),       # openssl rand -hex 16
    lambda: SERVED_TOKEN,
    lambda: "  " + secrets.token_urlsafe(32) + "\r",  # blanks around are not the token
], ids=["docs", "demo", "hex-16", "tests-serve", "blanks-around"])
def test_a_long_random_token_is_not_weak(make):
    assert operator_token_weakness(make()) is None


def test_none_of_many_generated_tokens_is_called_weak():
    assert not [t for t in (secrets.token_urlsafe(24) for _ in range(2000))
                if operator_token_weakness(t)]
    assert not [t for t in (secrets.token_hex(16) for _ in range(2000))
                if operator_token_weakness(t)]


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_serve_warns_once_of_a_weak_token_without_showing_it_and_starts(tmp_path, workers):
    config, pport, aport = write_config(tmp_path, data_dir=short_data_dir())
    gw = Served(config, pport, aport, "--workers", workers,
                environ={"KEYGATE_ADMIN_TOKEN": "changeme-please"})
    try:
        await gw.ready()
        assert gw.terminate() == 0
    finally:
        gw.close()
    err = gw.stderr()
    warned = [line for line in err.splitlines() if "operator token" in line and "weak" in line]
    assert len(warned) == 1, err
    assert "KEYGATE_ADMIN_TOKEN" in warned[0] and "32" in warned[0], warned
    assert "changeme-please" not in err


async def test_serve_says_nothing_of_a_strong_token(tmp_path):
    config, pport, aport = write_config(tmp_path, data_dir=short_data_dir())
    gw = Served(config, pport, aport)
    try:
        await gw.ready()
        assert gw.terminate() == 0
    finally:
        gw.close()
    assert "weak" not in gw.stderr(), gw.stderr()


def reload_commands() -> list[str]:
    """The commands docs/deployment-modes.md gives for a reload (its "Reload without restart"
    block), but for the SIGHUP, which needs a pid."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "deployment-modes.md").read_text()
    section = text.split("## Reload without restart", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("kill ")]


async def test_the_documented_reload_commands_work_and_keep_the_token_off_command_lines(
        tmp_path):
    """The operator token is full control of the admin API. A command that puts it on its own
    command line (`curl -H "Authorization: Bearer $KEYGATE_ADMIN_TOKEN"`, as the reload example
    was) shows it to every local user for as long as it runs (`ps`, /proc/PID/cmdline), and
    to the shell's process accounting. The documented commands are run as pasted, through
    bash, against a real ``keygate serve``; each program they start records the command line
    it was given (and then is the real program): each command reloads, and no command line
    holds the token."""
    import asyncio
    import shutil
    import subprocess
    import sys

    from served import env
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    config, pport, aport = write_config(tmp_path, data_dir=short_data_dir())
    commands = reload_commands()
    assert len(commands) >= 2, commands  # keygate reload, and curl
    # each program the commands run: a recorder of its command line, then the program itself
    seen, bin_dir = tmp_path / "argv", tmp_path / "bin"
    bin_dir.mkdir()
    for name, real in (("curl", shutil.which("curl")),
                       ("keygate", str(Path(sys.executable).parent / "keygate"))):
        (bin_dir / name).write_text(
            f'#!/bin/sh\nprintf "%s\\n" "$0 $*" >> {seen}\nexec {real} "$@"\n')
        (bin_dir / name).chmod(0o755)
    gw = Served(config, pport, aport)
    try:
        await gw.ready()
        shell_env = {**env(), "PATH": f"{bin_dir}:{os.environ['PATH']}",
                     "KEYGATE_ADMIN_URL": gw.admin}
        for command in commands:
            pasted = command.replace("127.0.0.1:8081", f"127.0.0.1:{aport}")
            done = await asyncio.to_thread(subprocess.run, ["bash", "-c", pasted], env=shell_env,
                                           capture_output=True, text=True, timeout=60)
            assert done.returncode == 0 and "reload" in done.stdout + done.stderr, (command, done)
            assert '"result": "ok"' in done.stdout or done.stdout.startswith("reloaded "), (
                command, done.stdout)
        assert gw.terminate() == 0
    finally:
        gw.close()
    argv = seen.read_text()
    assert argv.count("\n") >= len(commands), argv
    assert SERVED_TOKEN not in argv, (
        f"a documented reload command put the operator token on a command line: {argv!r}")


ROOT = Path(__file__).resolve().parent.parent


def test_the_images_docker_run_takes_the_token_by_name_off_the_command_line():
    """`docker run -e KEYGATE_ADMIN_TOKEN=<token>` shows the operator token to every local
    user in `ps` (and keeps it in the shell's history); `-e KEYGATE_ADMIN_TOKEN` passes the
    variable of the same name, exported as the README's recipe does."""
    import re
    runs = [line for line in (ROOT / "Dockerfile").read_text().splitlines()
            if line.startswith("#") and "docker run" in line and "KEYGATE_ADMIN_TOKEN" in line]
    assert runs
    for line in runs:
        assert re.search(r"-e KEYGATE_ADMIN_TOKEN(\s|$)", line), line


def secret_recipe() -> str:
    """deploy/k8s/secret.yaml's recipe for creating the Secret out of band, as a shell script
    (its comment lines from the first command to the last)."""
    lines = [line[1:] for line in (ROOT / "deploy" / "k8s" / "secret.yaml").read_text()
             .splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("   ") and line.strip())
    script = []
    for line in lines[start:]:
        if not line.startswith("   "):
            break
        script.append(line.strip())
    return "\n".join(script)


def test_the_k8s_secret_recipe_keeps_the_token_and_the_redis_password_off_command_lines(
        tmp_path):
    """deploy/k8s/secret.yaml's `kubectl create secret generic keygate --from-literal=...`
    put the operator token and the Redis password on kubectl's command line, which every
    local user reads in `ps`. The recipe is run as pasted (bash; kubectl with
    `--dry-run=client -o yaml`, so no cluster is needed), through a recorder of kubectl's
    command line: the Secret it makes holds the token the shell exported and the Redis URL,
    and kubectl's command line neither."""
    import base64
    import shutil
    import subprocess
    import yaml
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    script = secret_recipe()
    assert "kubectl create secret generic keygate" in script, script
    seen, bin_dir = tmp_path / "argv", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$0 $*" >> {seen}\nexec {kubectl} "$@" --dry-run=client -o yaml\n')
    (bin_dir / "kubectl").chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if k != "KEYGATE_ADMIN_TOKEN"}
    environ["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    # the recipe as pasted, then the token it exported, to compare with the Secret
    done = subprocess.run(["bash", "-c", script + '\nprintf "\\n---\\n%s" "$KEYGATE_ADMIN_TOKEN"'],
                          env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    made, token = done.stdout.rsplit("\n---\n", 1)
    secret = yaml.safe_load(made)
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert secret["metadata"]["name"] == "keygate"
    url = data["KEYGATE_REDIS_URL"]
    assert url.startswith("rediss://:") and "@" in url
    password = url.split("://:", 1)[1].split("@", 1)[0]
    argv = seen.read_text()
    assert data["KEYGATE_ADMIN_TOKEN"] not in argv and password not in argv, (
        f"kubectl was given a secret on its command line: {argv!r}")
    # and the operator keeps the token for the CLI (the shell exported it)
    assert len(token) >= 32 and data["KEYGATE_ADMIN_TOKEN"] == token
