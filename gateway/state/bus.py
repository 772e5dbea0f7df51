"""The events channel in Redis: the one publisher, and one subscription per process fanned out.

Before, the route cache, the certificate follower and the domain keeper each held a subscription with its
own subscribe / dispatch / resubscribe loop. Now a process holds one (``RedisEventFeed``) and hands each
event to every subscriber in turn (``gateway.state.ports.EventSubscriber``); subscribers also hear when
the subscription is up (anything they cached before may have missed events) and when it is down (a cache
must not be trusted meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis

from gateway.background import stop_loop
from gateway.state.connection import guarded
from gateway.state.events import Event, decode, encode
from gateway.state.keyspace import Keys
from gateway.state.ports import EventSubscriber

log = logging.getLogger(__name__)

RESUBSCRIBE_DELAY_S = 0.5
# How long one wait for a message lasts; only bounds how soon a stop is noticed if cancelling is lost.
POLL_S = 30.0


async def publish(client: aioredis.Redis, keys: Keys, event: Event) -> None:
    """Announce a change that is already written."""
    await guarded(client.publish(keys.events(), encode(event)))


def publish_in(pipe: aioredis.client.Pipeline, keys: Keys, event: Event) -> None:
    """Announce a change as part of the MULTI that writes it."""
    pipe.publish(keys.events(), encode(event))


class RedisEventFeed:
    """This process's subscription to the events channel, started once, shared by every subscriber.

    Subscribers' callbacks run on the feed's task, one after another, so they must not block: work that
    needs I/O is handed to the subscriber's own task. A callback that raises is logged and skipped; it
    never stops the others from hearing the event.
    """

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self.following = asyncio.Event()  # set while subscribed
        self._subscribers: list[EventSubscriber] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def add(self, subscriber: EventSubscriber) -> None:
        self._subscribers.append(subscriber)
        if self.following.is_set():
            subscriber.connected()

    def remove(self, subscriber: EventSubscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)
            subscriber.disconnected()

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="state-events")

    async def stop(self) -> None:
        self._stopping = True
        await stop_loop(self._task)
        self._task = None

    def _tell(self, call: str, *args: object) -> None:
        for subscriber in list(self._subscribers):
            try:
                getattr(subscriber, call)(*args)
            except Exception:
                log.exception("event subscriber %r failed on %s", subscriber, call)

    async def _follow(self) -> None:
        while not self._stopping:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await guarded(pubsub.subscribe(self.keys.events()))
                self.following.set()
                self._tell("connected")
                # Not `while True`: redis-py's get_message swallows a cancellation (returns None).
                while not self._stopping:
                    message = await guarded(pubsub.get_message(timeout=POLL_S))
                    event = decode(message["data"]) if message else None
                    if event is not None:
                        self._tell("handle", event)
            except Exception as exc:
                # redis-py may turn a cancellation mid-read into a connection error: stopping decides.
                if self._stopping:
                    return
                log.warning("state events unavailable (caches bypassed, resubscribing): %s", exc)
            finally:
                if self.following.is_set():
                    self.following.clear()
                    self._tell("disconnected")
                await pubsub.aclose()
            await asyncio.sleep(RESUBSCRIBE_DELAY_S)


@asynccontextmanager
async def following_events(client: aioredis.Redis, keys: Keys) -> AsyncIterator[RedisEventFeed]:
    """This process's one subscription, running until the context exits."""
    feed = RedisEventFeed(client, keys)
    feed.start()
    try:
        yield feed
    finally:
        await feed.stop()
