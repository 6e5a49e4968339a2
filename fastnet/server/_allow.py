"""The servers' allow-list: the IP networks whose peers a server serves."""
from __future__ import annotations

import ipaddress
from typing import Any

Networks = dict[int, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]


def parse_allow(allow: Any) -> Networks | None:
    """``allow=`` (a network, an address, or an iterable of them) as networks by IP version; None: all."""
    if allow is None:
        return None
    if isinstance(allow, (str, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        allow = [allow]
    nets: Networks = {4: [], 6: []}
    for item in allow:
        net = ipaddress.ip_network(item, strict=False)
        nets[net.version].append(net)
    return nets


def allowed(nets: Networks | None, addr: Any) -> bool:
    """True if the peer address is in one of the networks (an IPv4-mapped IPv6 peer in an IPv4 one)."""
    if nets is None:
        return True
    try:
        ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    except (ValueError, TypeError, IndexError):
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        if any(ip.ipv4_mapped in n for n in nets[4]):
            return True
    return any(ip in n for n in nets[ip.version])
