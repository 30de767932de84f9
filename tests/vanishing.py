"""A peer that vanishes (power loss, a cut cable: no FIN, no RST), for the tests of
keygate's dropping of such peers: clients (test_vanished_client) and upstreams
(test_vanished_upstream).

A real vanish needs the kernel to stop answering, which only root can arrange: the peer runs
in a network namespace of its own, joined to this one by a veth pair on a private /30, and
vanishes when the test takes its end of the link down (what its kernel would have
acknowledged is lost, nothing is sent back). The namespace (and the veth pair with it) is
always removed."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys

import pytest


def _can_vanish() -> str | None:
    if sys.platform != "linux" or not hasattr(socket, "TCP_USER_TIMEOUT"):
        return "Linux only"
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 (ip netns, veth) to make a peer vanish"
    return None


needs_vanish = pytest.mark.skipif(_can_vanish() is not None, reason=str(_can_vanish()))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def vanishing_link():
    """(this side's address, the peer's address, the peer's namespace, a function that makes
    the peer vanish): a namespace joined to this one by a veth pair, both ends on a private
    /30."""
    tag = f"{os.getpid() % 100000}"
    ns, here, there = f"kgv{tag}", f"kgvh{tag}", f"kgvc{tag}"
    # a /30 of 10.213.0.0/16 of this process's own (xdist workers run tests of both vanishing
    # files at once: one subnet per pid, not one of 200 that two pids could share)
    base = os.getpid() % 16384 * 4
    ours = f"10.213.{base // 256}.{base % 256 + 1}"
    theirs = f"10.213.{base // 256}.{base % 256 + 2}"
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a network namespace here: {exc.stderr.decode().strip()}")
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there, "netns", ns)
        _ip("addr", "add", f"{ours}/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("-n", ns, "addr", "add", f"{theirs}/30", "dev", there)
        _ip("-n", ns, "link", "set", there, "up")
        _ip("-n", ns, "link", "set", "lo", "up")

        def vanish() -> None:  # the peer's kernel neither receives nor sends from now on
            _ip("-n", ns, "link", "set", there, "down")

        yield ours, theirs, ns, vanish
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)
