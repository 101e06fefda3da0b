"""Who is a trusted proxy: addresses and networks (``COMET_TRUSTED_PROXIES``,
``--trusted-proxies``) whose X-Forwarded-For / X-Forwarded-Proto are believed.

Pure: tested in memory.  Addresses are compared as addresses, not as text: a proxy
written ``0:0:0:0:0:0:0:1`` is ``::1``, and an IPv4 proxy reaching a server bound to
``::`` (``::ffff:10.0.0.1``) is its IPv4 address as well.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

# Peers looked up and remembered (a server sees few: its proxies, its clients).
_REMEMBERED = 1000
# IPv4 addresses as an IPv6 socket sees them (::ffff:a.b.c.d).
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def proxy_entry_error(entry: object) -> str | None:
    """What is wrong with a trusted-proxy entry (an address, or a network such as
    ``10.0.0.0/8``), as the end of a sentence naming it; None when it is fine."""
    if not isinstance(entry, str):
        return "which is no IP address or network"
    try:
        ipaddress.ip_network(entry.strip())
    except ValueError:
        try:
            wide = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            return "which is no IP address or network"
        return f"which has host bits set ({wide}?)"
    return None


class TrustedProxies:
    """``address in proxies``: whether a peer's (or a hop's) address is trusted.  A
    scope (``fe80::1%eth0``) is not compared."""

    def __init__(self, entries: Iterable[str] = ()):
        entries = list(entries)
        for entry in entries:
            error = proxy_entry_error(entry)
            if error:
                raise ValueError(f"{entry!r}, {error}")
        networks = [ipaddress.ip_network(entry.strip()) for entry in entries]
        for network in list(networks):  # (and the IPv4 one an IPv4-mapped one stands for)
            if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
                low = int(network.network_address) & 0xFFFFFFFF
                networks.append(ipaddress.IPv4Network((low, network.prefixlen - 96)))
        self.networks = tuple(networks)
        self._seen: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustedProxies) and set(self.networks) == set(other.networks)

    def __hash__(self) -> int:
        return hash(frozenset(self.networks))

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self.networks]!r})"

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        trusted = self._seen.get(address)
        if trusted is None:
            trusted = self._look_up(address)
            if len(self._seen) >= _REMEMBERED:
                self._seen.clear()
            self._seen[address] = trusted
        return trusted

    def _look_up(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:  # ("unknown", a hop with a port: never a trusted proxy)
            return False
        # An IPv4 peer of a server bound to "::" (::ffff:a.b.c.d) is in an IPv4 network
        # and in an IPv6 one (::ffff:0:0/96) alike.
        forms = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            forms.append(ip.ipv4_mapped)
        return any(form in network for form in forms for network in self.networks)
