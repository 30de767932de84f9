"""The operator token's strength: ``keygate serve`` warns once at start when it is weak (short,
or made of few distinct characters), never printing it, and starts all the same (a setup that
works keeps working). The tokens the docs and ``keygate demo`` make are not weak."""

from __future__ import annotations

import secrets

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
