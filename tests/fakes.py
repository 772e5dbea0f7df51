"""Plain fakes of the state's ports (``gateway.state.ports``) for tests: no Redis, no private attributes."""

from __future__ import annotations

import asyncio

from gateway.state.events import Event
from gateway.state.ports import EventSubscriber
from gateway.state.records import InstanceRecord, VmRecord


class EventQueue:
    """An EventSubscriber that queues what it hears, for a test to wait on."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def connected(self) -> None:
        pass

    def disconnected(self) -> None:
        pass

    def handle(self, event: Event) -> None:
        self.queue.put_nowait(event)

    async def get(self) -> Event:
        return await self.queue.get()


class FakeEventFeed:
    """An EventFeed the test drives: ``connect``, ``publish`` and ``disconnect`` reach every subscriber."""

    def __init__(self, *, connected: bool = True) -> None:
        self.subscribers: list[EventSubscriber] = []
        self.is_connected = connected

    def add(self, subscriber: EventSubscriber) -> None:
        self.subscribers.append(subscriber)
        if self.is_connected:
            subscriber.connected()

    def remove(self, subscriber: EventSubscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)
            subscriber.disconnected()

    def connect(self) -> None:
        self.is_connected = True
        for subscriber in list(self.subscribers):
            subscriber.connected()

    def disconnect(self) -> None:
        self.is_connected = False
        for subscriber in list(self.subscribers):
            subscriber.disconnected()

    def publish(self, event: Event) -> None:
        for subscriber in list(self.subscribers):
            subscriber.handle(event)


class NoRoutes:
    """A RouteSource that knows nothing: fakes override the lookups their test needs."""

    async def vm_and_port(self, vm_id: str, port: int) -> tuple[VmRecord | None, bool]:
        return None, False

    async def session_vm_and_port(self, session_id: str, port: int) -> tuple[VmRecord | None, bool]:
        return None, False

    async def domain_vm(self, domain: str) -> VmRecord | None:
        return None

    async def instance_route(
        self, instance_uuid: str
    ) -> tuple[InstanceRecord | None, VmRecord | None, frozenset[str]]:
        return None, None, frozenset()
