"""Addressing of qemu VMs (pure): guests in the lower half of the CIDR, the host's veth ends in the upper.

Why halves and not the netns driver's /30s: the guest treats its whole half as its own (an "AnyIP"
local route), so it answers on any slot's address without being told which one it has, and a VM
restored from a snapshot into another slot needs no reconfiguration. For that, no host-side address
may fall inside the guest half: a guest that thought the host's address was its own would reply to
itself. Each slot is then a point-to-point pair: host ``upper + 1 + s`` peer guest ``lower + 1 + s``.
"""

from __future__ import annotations

import ipaddress

from gateway.errors import DriverError
from gateway.orchestrator.drivers.netns import NetnsSlot


def guest_half(cidr: str) -> ipaddress.IPv4Network:
    lower, _ = ipaddress.IPv4Network(cidr).subnets(prefixlen_diff=1)
    return lower


def host_half(cidr: str) -> ipaddress.IPv4Network:
    _, upper = ipaddress.IPv4Network(cidr).subnets(prefixlen_diff=1)
    return upper


def slot_capacity(cidr: str) -> int:
    """Addresses of a half, less its first and last (kept unused, as network and broadcast would be)."""
    return max(0, guest_half(cidr).num_addresses - 2)


def plan_slot(cidr: str, name_prefix: str, slot: int) -> NetnsSlot:
    if not 0 <= slot < slot_capacity(cidr):
        raise DriverError(f"slot {slot} outside 0..{slot_capacity(cidr) - 1} for {cidr}")
    return NetnsSlot(
        slot=slot,
        namespace=f"{name_prefix}-{slot}",
        veth=f"{name_prefix}h{slot}",
        host_ip=str(host_half(cidr).network_address + 1 + slot),
        vm_ip=str(guest_half(cidr).network_address + 1 + slot),
    )
