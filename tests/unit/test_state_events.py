"""The events channel's vocabulary: what decode makes of what a publisher (any version) sends."""

from __future__ import annotations

import pytest

from gateway.state.events import PortExposed, ShareChanged, UrlKeyChanged, VmChanged, decode, encode


def test_an_event_survives_the_wire() -> None:
    events = (
        VmChanged("vm-1", "s-1", "killed"),
        PortExposed("vm-1", 3000),
        ShareChanged("vm-1", 3000),
        ShareChanged("vm-1", 3000, revoked=True),  # a boolean field (was dropped as malformed)
        UrlKeyChanged("vm-1", "s-1"),
    )
    for event in events:
        assert decode(encode(event)) == event


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"vm_id": "vm-1", "port": 3000}',  # no type
        '{"type": "no-such-event"}',
        '{"type": ["vm_ports"], "vm_id": "vm-1", "port": 3000}',  # a type that is no dict key
        '{"type": {"vm_ports": 1}, "vm_id": "vm-1", "port": 3000}',
        '{"type": "vm_ports", "vm_id": "vm-1"}',  # a field missing
        '{"type": "vm_ports", "vm_id": "vm-1", "port": "3000"}',  # a field of the wrong type
        '{"type": "vm_ports", "vm_id": "vm-1", "port": true}',
        '{"type": "share", "vm_id": "vm-1", "port": 3000, "revoked": 1}',  # a number is no boolean
    ],
)
def test_anything_else_is_ignored_not_raised(text: str) -> None:
    assert decode(text) is None
