"""Which peers are our own proxies, and who the client is behind them: decided once.

``server.trusted_proxies`` lists the load balancers in front of keygate. Their
``X-Forwarded-*`` headers are kept when forwarding (``gateway.proxying.headers``), and the client address
the failure throttle and IP allow-lists use is read through them (``gateway.pipeline``). Both
ask this one object, so they can never disagree about a peer.

A dual-stack listener sees IPv4 peers as ``::ffff:a.b.c.d``; they are compared as IPv4, and a
``trusted_proxies`` entry written in that mapped form is taken as the IPv4 network it names.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_CACHE_MAX = 10_000
# X-Forwarded-For entries read from the right for the client address (client_address)
MAX_HOPS = 64


def parse_ip(text: str) -> Address | None:
    """The address in ``text`` (IPv4-mapped IPv6 as IPv4, an IPv6 zone dropped), or None if
    it is not one. ``ipaddress`` keeps a zone (``fe80::1%eth0``) of any text, control
    characters included, in the string of the address."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if ip.version == 4:
        return ip
    if ip.scope_id is not None:
        ip = ipaddress.IPv6Address(ip.packed)
    return ip.ipv4_mapped or ip


def parse_hop(text: str) -> Address | None:
    """The address of an ``X-Forwarded-For`` hop, which some proxies write with the client's
    port: ``203.0.113.7:51234`` (Azure Application Gateway, IIS ARR) or ``[2001:db8::1]:443``
    (RFC 7239's form). An unbracketed IPv6 address is all address (its last group is no
    port); anything else that is not an address with an optional port is None."""
    text = text.strip()
    if text.startswith("["):
        addr, bracket, port = text[1:].partition("]")
        if not bracket or (port and not _is_port(port)):
            return None
        ip = parse_ip(addr)
        return ip if ip is not None and ":" in addr else None
    if text.count(":") == 1:
        addr, _, port = text.partition(":")
        if not _is_port(":" + port):
            return None
        ip = parse_ip(addr)
        return ip if ip is not None and ip.version == 4 else None
    return parse_ip(text)


def _is_port(text: str) -> bool:
    """``:N`` with N a TCP port (1-5 ASCII digits, at most 65535)."""
    digits = text[1:]
    return (text[:1] == ":" and 0 < len(digits) <= 5 and digits.isascii() and digits.isdigit()
            and int(digits) <= 65535)


def throttle_client(address: str) -> str:
    """Who the failed-verification throttle and the verification queue count an address as:
    an IPv4 address itself, an IPv6 address its /64 (a subscriber is handed a whole /64, and
    an attacker rotating addresses inside it is one client, as a NAT'd IPv4 site is). An
    address in the NAT64 well-known prefix 64:ff9b::/96 (RFC 6052: how an IPv6-only
    deployment behind SIIT-DC or NAT46 sees each IPv4 client) is the IPv4 address it carries:
    by its /64, the whole IPv4 Internet was one client there."""
    if ":" not in address:
        return address
    ip = parse_ip(address)
    if ip is None or ip.version == 4:
        return address if ip is None else str(ip)
    if int(ip) >> 32 == _NAT64_WKP:
        return str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


_NAT64_WKP = int(ipaddress.IPv6Address("64:ff9b::")) >> 32  # 64:ff9b::/96, as its top 96 bits


def as_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The network ``text`` names; an IPv4-mapped one (``::ffff:10.0.0.5``,
    ``::ffff:10.0.0.0/104``) as the IPv4 network it is, since addresses are compared as IPv4
    (a key's ``allowed_ips`` are read the same way)."""
    net = ipaddress.ip_network(text.strip(), strict=False)
    if net.version == 6 and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((int(mapped), net.prefixlen - 96))
    return net


def allowed_network(item: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An entry of a key's ``allowed_ips`` (the admin API's and the CLI's ``--allow-ip``): an
    address or CIDR as written, at most 64 characters; ValueError otherwise. ::ffff:a.b.c.d/n
    is the IPv4 network it names: clients are compared as IPv4 (as the failure throttle and
    trusted_proxies see them)."""
    if not isinstance(item, str) or len(item) > 64 or item != item.strip() \
            or "%" in item:  # a zone ("fe80::1%eth0") names one host's interface,
        raise ValueError     # and ipaddress keeps any text there, escapes included
    return as_network(item)


class TrustedProxies:
    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(as_network(n) for n in networks)
        self._peers: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def _contains(self, ip: Address | None) -> bool:
        return ip is not None and any(ip in net for net in self.networks)

    def is_trusted(self, peer: str | None) -> bool:
        """Whether the connection's peer is one of our proxies (cached per peer address)."""
        if not self.networks or peer is None:
            return False
        trusted = self._peers.get(peer)
        if trusted is None:
            trusted = self._contains(parse_ip(peer))
            if len(self._peers) >= _CACHE_MAX:
                self._peers.clear()
            self._peers[peer] = trusted
        return trusted

    def client_address(self, peer: str, forwarded_for: Sequence[str]) -> str:
        """The client's IP: the peer, unless the peer is a trusted proxy; then the nearest
        ``X-Forwarded-For`` hop that is not one of ours (hops further left were written by
        whoever sent the request and prove nothing).

        Read from the right, hop by hop, at most ``MAX_HOPS`` of them: the header can be as
        long as a request head (32 KiB, thousands of hops), and splitting and parsing all of it
        cost a request up to 10 ms of the event loop. No real chain of proxies is that long;
        past it, as past a hop that is not an address, nothing further left is believed."""
        if not self.is_trusted(peer):
            return peer
        read = 0
        for value in reversed(forwarded_for):  # repeated headers are one list, in order
            end = len(value)
            while end >= 0:
                start = value.rfind(",", 0, end)
                hop = value[start + 1:end].strip()
                end = start if start >= 0 else -1
                read += 1
                if read > MAX_HOPS:
                    return peer
                if not hop:
                    continue
                ip = parse_hop(hop)
                if ip is None:  # not an address: our proxy did not write it; trust nothing left
                    return peer
                if not self._contains(ip):
                    return str(ip)
        return peer
