"""Finding a peer whose machine vanished (power loss, a cut cable, a NAT that forgot the
connection: no FIN, no RST), for client connections (``server.drop_vanished_peers``, on the
listening sockets) and upstream connections (``upstream.UpstreamPool``, at connect) alike.

Without it such a connection lives until TCP gives up retransmitting (~15 minutes on Linux):
a few bytes now and then (a trickling answer, a WebSocket's pings, a trickled upload) never
fill the send buffer, so no write stall timer starts, and they keep a tunnel from ever being
idle; with nothing to send at all, nothing would ever notice."""

from __future__ import annotations

import math
import socket

Options = list[tuple[int, int, int]]


def vanish_options(timeout: float) -> Options:
    """The socket options that end a connection once its peer has acknowledged nothing for
    ``timeout`` seconds (``server.timeouts.body``), as ``(level, option, value)``.
    ``TCP_USER_TIMEOUT`` aborts a connection whose sent bytes stay unacknowledged that long;
    keep-alive probes (the first after half of it without a byte from the peer, then every
    tenth of it) give a connection with nothing to send something to go unacknowledged, and
    a live peer's kernel answers them (its application need not send a byte). Options a
    platform lacks are left out."""
    tcp = socket.IPPROTO_TCP
    idle = min(32767, max(1, math.ceil(timeout / 2)))
    every = min(32767, max(1, math.ceil(timeout / 10)))
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_USER_TIMEOUT", max(1, round(timeout * 1000))),
                        ("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", every),
                        # only where there is no user timeout (which then decides alone)
                        ("TCP_KEEPCNT", min(127, max(1, math.ceil((timeout - idle) / every))))):
        if hasattr(socket, name):
            options.append((tcp, getattr(socket, name), value))
    return options


def set_vanish_options(sock, options: Options) -> None:
    """Set ``options`` (``vanish_options``) on ``sock``, a TCP socket (any other, a unix
    socket, or none: nothing)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    for level, option, value in options:
        sock.setsockopt(level, option, value)
