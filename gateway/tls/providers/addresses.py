"""Pure: which addresses a customer's DNS server may have.

A customer names their own RFC 2136 primary (``dns_credentials.server``). Left open, that is a way to make
the gateway open TCP connections to any host and port it can reach: its own Redis on loopback, the
control plane, the VM network, the cloud's metadata service; and the errors would tell which ports
answer. So by default a customer's server must be a globally routable unicast address, checked on the
address actually dialled (a name is resolved first, and its checked address is the one used, so a
second answer cannot rebind it). Operators whose customers' servers are on a private network turn this
off with ``acme.customer_dns_private_ok``.
"""

from __future__ import annotations

import ipaddress


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def refusal(address: str) -> str | None:
    """Why updates are not sent to ``address`` (an IP literal), or None when it is public unicast."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "the unspecified address"
    if not ip.is_global:
        return "a private or reserved address"
    return None


def refused_server(shown: str, address: str) -> str | None:
    """``refusal`` as the sentence both the API's 422 and the provider's error give, or None."""
    why = refusal(address)
    return f"{shown} is {why}: updates go only to public addresses" if why else None
