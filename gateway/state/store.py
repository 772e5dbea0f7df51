"""Session and VM state in Redis, shared by every gateway process.

Writes that must agree (a VM and its indexes, a slot claim) go through one MULTI or one Lua script, so a
crash between two commands never leaves an index that points at nothing. Redis failures surface as
``StoreUnavailable``; callers never see a redis-py exception.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis

from gateway.state.bus import publish
from gateway.state.connection import guarded, hash_fields, text_list
from gateway.state.events import (
    DomainChanged,
    Event,
    PortExposed,
    ShareChanged,
    UrlKeyChanged,
    VmChanged,
    VmReleased,
    WakeRequested,
)
from gateway.state.keyspace import Keys
from gateway.state.records import (
    DomainRecord,
    ExecutionRecord,
    InstanceRecord,
    SessionRecord,
    ShareRecord,
    SnapshotRecord,
    VmRecord,
    dump_field,
)
from gateway.tokens import URL_KEY_BYTES

# Claim the next free slot after a rotating cursor, so a just-freed slot (and its IP) is reused last.
_CLAIM_SLOT = """
local cap = tonumber(ARGV[1])
local start = tonumber(redis.call('INCR', KEYS[2])) % cap
for i = 0, cap - 1 do
  local s = (start + i) % cap
  if redis.call('HSETNX', KEYS[1], s, ARGV[2]) == 1 then return s end
end
return -1
"""

# Release a slot only if it is still held by this VM.
_RELEASE_SLOT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""

# The edge's route lookup by session (or custom domain) in one round trip: the VM record named by the
# hash's vm_id field, whether the port is exposed and the share that opens it. The VM's keys are made here
# from the templates Keys gives (ARGV 1-4, 6-7), so Keys stays the one place that spells them. Returns
# false for no session (domain), else {flat VM hash, exposed (0/1), share entry JSON or ''}.
_HELD_VM_AND_PORT = """
local vm_id = redis.call('HGET', KEYS[1], 'vm_id')
if not vm_id then return false end
local vm = redis.call('HGETALL', ARGV[1] .. vm_id .. ARGV[2])
local exposed = redis.call('SISMEMBER', ARGV[3] .. vm_id .. ARGV[4], ARGV[5])
local share = redis.call('HGET', ARGV[6] .. vm_id .. ARGV[7], ARGV[5]) or ''
return {vm, exposed, share}
"""

# The edge's route lookup for a browser instance in one round trip: the instance, its VM, and the key
# hashes of its organisation (who may open it). ARGV 1-4: VM and org-keys key templates. Returns false
# for no instance, else {flat instance hash, flat VM hash, key hashes}.
_INSTANCE_ROUTE = """
local inst = redis.call('HGETALL', KEYS[1])
if #inst == 0 then return false end
local vm_id = redis.call('HGET', KEYS[1], 'vm_id') or ''
local org = redis.call('HGET', KEYS[1], 'org') or ''
local vm = redis.call('HGETALL', ARGV[1] .. vm_id .. ARGV[2])
local keys = redis.call('SMEMBERS', ARGV[3] .. org .. ARGV[4])
return {inst, vm, keys}
"""

# Claim a custom domain for a VM: refused (0) while another owner holds it; the same owner moves it.
# KEYS: domain hash, all-domains set, owner's domains set, retired set. ARGV: owner, domain, fields...
_CLAIM_DOMAIN = """
local holder = redis.call('HGET', KEYS[1], 'owner')
if holder and holder ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
return 1
"""
# Release a custom domain if it is still held for this VM (or for any VM when ARGV[1] is empty), and
# mark it retired (its certificate goes after a grace period). Same KEYS; ARGV: VM id, domain, now.
_RELEASE_DOMAIN = """
local vm_id = redis.call('HGET', KEYS[1], 'vm_id')
if not vm_id or (ARGV[1] ~= '' and vm_id ~= ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
return 1
"""
# Set fields of a hash only while its vm_id is ARGV[1]. KEYS: the hash. ARGV: VM id, fields...
_UPDATE_IF_HELD = """
if redis.call('HGET', KEYS[1], 'vm_id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""
# creating -> active only: a VM killed while it booted stays killed.
_ACTIVATE_VM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'creating' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'active', 'ip', ARGV[1], 'handle', ARGV[2], 'started_at', ARGV[3])
return 1
"""

# Move a VM to an end state once: returns 0 if it had already ended (another process won the race).
_END_VM = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or (status ~= 'creating' and status ~= 'active' and status ~= 'suspended') then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'ended_at', ARGV[2], 'error', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('SREM', KEYS[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('DEL', KEYS[4], KEYS[5])
redis.call('ZREM', KEYS[6], ARGV[4])
return 1
"""

# Add counters to VM records, skipping records that are gone (never recreating one): the edge's bytes
# and requests, the egress proxy's bytes. ARGV: the number of fields n, their n names, then n increments
# per key in KEYS order.
_ADD_COUNTS = """
local n = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    for f = 1, n do
      redis.call('HINCRBY', key, ARGV[1 + f], ARGV[1 + n + (i - 1) * n + f])
    end
  end
end
return 1
"""
EGRESS_DENIALS_KEPT = 100

# Record activity on active VMs (the idle clock): the latest wins, whichever process writes first; a VM
# with an idle_timeout_s gets its new idle deadline in the queue. Records that are gone are never
# recreated, nor are VMs that are not active touched. KEYS: the idle queue, then one VM hash per VM.
# ARGV: when (unix seconds), then the VM id and the source of its activity, per VM hash in KEYS order.
_MARK_ACTIVE = """
local at = tonumber(ARGV[1])
for i = 2, #KEYS do
  local key = KEYS[i]
  if redis.call('HGET', key, 'status') == 'active' then
    local last = tonumber(redis.call('HGET', key, 'last_activity_at') or '')
    if not last or last < at then
      redis.call('HSET', key, 'last_activity_at', ARGV[1], 'last_activity_source', ARGV[2 * i - 1])
      local timeout = tonumber(redis.call('HGET', key, 'idle_timeout_s') or '')
      if timeout and timeout > 0 then
        redis.call('ZADD', KEYS[1], at + timeout, ARGV[2 * i - 2])
      end
    end
  end
end
return 1
"""

# Take one of a VM's execution places: the count after, or -1 when all ARGV[1] are taken. ARGV[2]: an
# expiry (seconds) so the count of a gateway that died holding places cannot stay up forever; only ever
# lengthened, so a short command cannot make the count vanish under a long one still running.
_TAKE_EXECUTION = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(ARGV[1]) then redis.call('DECR', KEYS[1]) return -1 end
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return n
"""

# Give a place back. A count that expired meanwhile is not recreated (a bare DECR would leave it at -1,
# without an expiry: one place too many for good); one that reaches 0 goes.
_RELEASE_EXECUTION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = redis.call('DECR', KEYS[1])
if n <= 0 then redis.call('DEL', KEYS[1]) end
return n
"""

# Revoke a share: mark it, drop its port's entry if it is still this share's, and the port's app-URL
# exposure. KEYS: share hash, VM's shares hash, VM's exposed ports. ARGV: port, share id, now.
_REVOKE_SHARE = """
redis.call('HSET', KEYS[1], 'revoked_at', ARGV[3])
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if entry and string.find(entry, '"share_id":"' .. ARGV[2] .. '"', 1, true) then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

# A VM's URL-signing key: made if it has none (or replaced, ARGV[2] = '1': a rotation, with the next
# version). KEYS: VM hash. ARGV: a new key (hex), replace. Returns false for no VM, else {key, version,
# changed (0/1)}.
_URL_KEY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local key = redis.call('HGET', KEYS[1], 'url_key') or ''
local version = tonumber(redis.call('HGET', KEYS[1], 'url_key_version') or '') or 0
if ARGV[2] == '1' or key == '' then
  key = ARGV[1]
  version = version + 1
  redis.call('HSET', KEYS[1], 'url_key', key, 'url_key_version', version)
  return {key, version, 1}
end
return {key, version, 0}
"""

# Move a VM from one state to another (suspend, resume) once, with its new expiry and fields.
# KEYS: VM hash, expiry zset. ARGV: from, to, VM id, expires at, field, value, ...
_TRANSITION = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'expires_at', ARGV[4], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
return 1
"""

_ID_MARK = "\x00id\x00"  # stands for an id in a key template (never in a real id: ids are validated)


class RedisStore:
    def __init__(self, client: aioredis.Redis, keys: Keys, retention_s: int) -> None:
        self.client = client
        self.keys = keys
        self.retention_s = retention_s
        self._claim_slot = client.register_script(_CLAIM_SLOT)
        self._release_slot = client.register_script(_RELEASE_SLOT)
        self._activate_vm = client.register_script(_ACTIVATE_VM)
        self._end_vm = client.register_script(_END_VM)
        self._held_vm_and_port = client.register_script(_HELD_VM_AND_PORT)
        self._claim_domain = client.register_script(_CLAIM_DOMAIN)
        self._update_if_held = client.register_script(_UPDATE_IF_HELD)
        self._release_domain = client.register_script(_RELEASE_DOMAIN)
        self._instance_route = client.register_script(_INSTANCE_ROUTE)
        self._add_counts = client.register_script(_ADD_COUNTS)
        self._mark_active = client.register_script(_MARK_ACTIVE)
        self._take_execution = client.register_script(_TAKE_EXECUTION)
        self._release_execution = client.register_script(_RELEASE_EXECUTION)
        self._revoke_share = client.register_script(_REVOKE_SHARE)
        self._transition = client.register_script(_TRANSITION)
        self._url_key = client.register_script(_URL_KEY)
        vm_key, ports_key, shares_key = keys.vm(_ID_MARK), keys.vm_ports(_ID_MARK), keys.vm_shares(_ID_MARK)
        self._vm_key_templates = [*vm_key.split(_ID_MARK), *ports_key.split(_ID_MARK)]
        self._shares_key_template = shares_key.split(_ID_MARK)
        self._instance_key_templates = [*vm_key.split(_ID_MARK), *keys.org_keys(_ID_MARK).split(_ID_MARK)]

    # sessions -------------------------------------------------------------------------------------

    async def put_session(self, rec: SessionRecord) -> None:
        await guarded(self.client.hset(self.keys.session(rec.session_id), mapping=hash_fields(rec.to_hash())))

    async def get_session(self, session_id: str) -> SessionRecord | None:
        raw = await guarded(self.client.hgetall(self.keys.session(session_id)))
        return SessionRecord.from_hash(raw) if raw else None

    async def update_session(self, session_id: str, **values: Any) -> None:
        mapping = {k: dump_field(v) for k, v in values.items()}
        await guarded(self.client.hset(self.keys.session(session_id), mapping=hash_fields(mapping)))

    async def count_execution(self, session_id: str) -> None:
        await guarded(self.client.hincrby(self.keys.session(session_id), "executions", 1))

    # VMs ------------------------------------------------------------------------------------------

    async def add_vm(self, rec: VmRecord) -> None:
        """Store a new VM with its indexes and its expiry, atomically."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.vm(rec.vm_id), mapping=hash_fields(rec.to_hash()))
        pipe.sadd(self.keys.owner_vms(rec.owner), rec.vm_id)
        pipe.sadd(self.keys.live_vms(), rec.vm_id)
        pipe.zadd(self.keys.vm_expiry(), {rec.vm_id: rec.expires_at or time.time()})
        pipe.hset(self.keys.session(rec.session_id), "vm_id", rec.vm_id)
        await guarded(pipe.execute())

    async def get_vm(self, vm_id: str) -> VmRecord | None:
        raw = await guarded(self.client.hgetall(self.keys.vm(vm_id)))
        return VmRecord.from_hash(raw) if raw else None

    async def update_vm(self, vm_id: str, **values: Any) -> None:
        mapping = {k: dump_field(v) for k, v in values.items()}
        await guarded(self.client.hset(self.keys.vm(vm_id), mapping=hash_fields(mapping)))

    async def activate_vm(self, vm_id: str, *, ip: str, handle: dict[str, Any], started_at: float) -> bool:
        """creating -> active, unless the VM ended meanwhile (killed during boot). Returns success."""
        done = await guarded(
            self._activate_vm(keys=[self.keys.vm(vm_id)], args=[ip, dump_field(handle), str(started_at)])
        )
        return bool(done)

    async def end_vm(self, rec: VmRecord, status: str, error: str | None = None) -> bool:
        """Mark a live VM killed or failed, drop it from the live indexes; True if this call did it."""
        done = await guarded(
            self._end_vm(
                keys=[
                    self.keys.vm(rec.vm_id),
                    self.keys.vm_expiry(),
                    self.keys.live_vms(),
                    self.keys.vm_ports(rec.vm_id),
                    self.keys.vm_shares(rec.vm_id),
                    self.keys.vm_idle(),
                ],
                args=[status, str(time.time()), error or "", rec.vm_id, self.retention_s],
            )
        )
        if done:
            await guarded(self.client.expire(self.keys.session(rec.session_id), self.retention_s))
            if rec.custom_domain:
                await self.release_domain(rec.custom_domain, rec.owner, rec.vm_id)
            await self.publish(VmChanged(rec.vm_id, rec.session_id, status))
        return bool(done)

    async def transition_vm(
        self, rec: VmRecord, old: str, new: str, expires_at: float, **values: Any
    ) -> bool:
        """``old`` -> ``new`` (suspend, resume) if the VM is still ``old``, with its new expiry; announced."""
        fields = [x for name, value in values.items() for x in (name, dump_field(value))]
        done = await guarded(
            self._transition(
                keys=[self.keys.vm(rec.vm_id), self.keys.vm_expiry()],
                args=[old, new, rec.vm_id, str(expires_at), *fields],
            )
        )
        if done:
            await self.publish(VmChanged(rec.vm_id, rec.session_id, new))
        return bool(done)

    async def routes_changed(self, rec: VmRecord) -> None:
        """Something the edges route by changed on a live VM (its max_exchanges): every edge drops the
        VM's cached routes (a VmChanged with its status as it is)."""
        await self.publish(VmChanged(rec.vm_id, rec.session_id, rec.status))

    async def claim_resume(self, vm_id: str, hold_s: int) -> bool:
        """One resume of a VM at a time, across every gateway process (edges ask, the API asks)."""
        return bool(await guarded(self.client.set(self.keys.vm_resuming(vm_id), "1", nx=True, ex=hold_s)))

    async def release_resume(self, vm_id: str) -> None:
        await guarded(self.client.delete(self.keys.vm_resuming(vm_id)))

    async def request_wake(self, vm_id: str) -> None:
        """An edge has a request for a suspended VM that resumes on demand (``Waker``)."""
        await self.publish(WakeRequested(vm_id))

    async def add_traffic(self, counts: dict[str, tuple[int, int, int]]) -> None:
        """The edge's bytes and requests per VM, added to the VM records that still exist
        (``TrafficSink``)."""
        await self._add_to_vms(("bytes_in", "bytes_out", "requests"), counts)

    async def mark_active(self, sources: Mapping[str, str], at: float) -> None:
        """The last activity (source) per VM id at ``at``, on the active VMs whose recorded one is older;
        moves the idle deadline of those with an idle_timeout_s (``TrafficSink``). One round trip."""
        if not sources:
            return
        ids = list(sources)
        args: list[str] = [repr(at), *(x for vm_id in ids for x in (vm_id, sources[vm_id]))]
        keys = [self.keys.vm_idle(), *(self.keys.vm(vm_id) for vm_id in ids)]
        await guarded(self._mark_active(keys=keys, args=args))

    async def report_open(
        self, edge_id: str, open_counts: Mapping[str, tuple[int, int]], ttl_s: float
    ) -> None:
        """An edge process's open exchanges and tunnels per VM, replacing its last report (``TrafficSink``);
        the report lasts ``ttl_s``. One round trip."""
        key = self.keys.edge_open(edge_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(key)
        if open_counts:
            pipe.hset(key, mapping={vm_id: f"{e} {t}" for vm_id, (e, t) in open_counts.items()})
            pipe.pexpire(key, int(ttl_s * 1000))
            pipe.zadd(self.keys.edges_open(), {edge_id: time.time() + ttl_s})
        else:
            pipe.zrem(self.keys.edges_open(), edge_id)
        await guarded(pipe.execute())

    async def open_counts(self, vm_ids: list[str]) -> dict[str, tuple[int, int]]:
        """Exchanges and tunnels open to each VM now, summed over the edges' current reports."""
        if not vm_ids:
            return {}
        # The reports that lapsed (their edges died) go; the others are read. One round trip.
        pipe = self.client.pipeline(transaction=False)
        pipe.zremrangebyscore(self.keys.edges_open(), "-inf", time.time())
        pipe.zrange(self.keys.edges_open(), 0, -1)
        _, edges = await guarded(pipe.execute())
        totals = {vm_id: (0, 0) for vm_id in vm_ids}
        if not edges:
            return totals
        pipe = self.client.pipeline(transaction=False)
        for edge_id in edges:
            pipe.hmget(self.keys.edge_open(edge_id), vm_ids)
        for found in await guarded(pipe.execute()):
            for vm_id, raw in zip(vm_ids, found, strict=True):
                if raw:
                    exchanges, _, tunnels = raw.partition(" ")  # (a decoded client: see guarded)
                    e, t = totals[vm_id]
                    totals[vm_id] = (e + int(exchanges), t + int(tunnels))
        return totals

    async def set_idle_deadline(self, vm_id: str, at: float | None) -> None:
        """Queue the VM to be looked at for idleness at ``at`` (None: not at all)."""
        if at is None:
            await guarded(self.client.zrem(self.keys.vm_idle(), vm_id))
        else:
            await guarded(self.client.zadd(self.keys.vm_idle(), {vm_id: at}))

    async def claim_idle(self, vm_id: str) -> bool:
        """Take the VM off the idle queue; True for the one process that did (it acts on it)."""
        return bool(await guarded(self.client.zrem(self.keys.vm_idle(), vm_id)))

    async def idle_due_ids(self, now: float, limit: int = 100) -> list[str]:
        """VMs whose idle deadline (as last queued) has passed."""
        due = await guarded(self.client.zrangebyscore(self.keys.vm_idle(), "-inf", now, 0, limit))
        return text_list(due)

    async def next_idle_deadline(self) -> float | None:
        first = await guarded(self.client.zrange(self.keys.vm_idle(), 0, 0, withscores=True))
        return float(first[0][1]) if first else None

    async def _add_to_vms(self, fields: tuple[str, ...], counts: Mapping[str, tuple[int, ...]]) -> None:
        """Add the counts per VM id (one per field, in order) to those fields of the VM records that
        still exist."""
        if not counts:
            return
        ids = list(counts)
        args: list[str | int] = [len(fields), *fields, *(n for vm_id in ids for n in counts[vm_id])]
        await guarded(self._add_counts(keys=[self.keys.vm(vm_id) for vm_id in ids], args=args))

    async def egress_policies(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """The active VMs by address, each with the policy that applies: its own, else its session's
        (``PolicySource``)."""
        records = [r for r in await self.get_vms(await self.live_vm_ids()) if r.status == "active" and r.ip]
        inherit = sorted({r.session_id for r in records if not r.egress_policy})
        by_session = await self.session_egress_policies(inherit)
        return {r.ip: (r.vm_id, dict(r.egress_policy or by_session.get(r.session_id, {}))) for r in records}

    async def session_egress_policies(self, session_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not session_ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for session_id in session_ids:
            pipe.hget(self.keys.session(session_id), "egress_policy")
        found = await guarded(pipe.execute())
        return {sid: json.loads(raw) for sid, raw in zip(session_ids, found, strict=True) if raw}

    async def add_egress(self, counts: dict[str, tuple[int, int]], denials: dict[str, list[str]]) -> None:
        """The egress proxy's bytes (out, in) per VM and its new denials (JSON, oldest first) per VM
        (``EgressSink``); VM records that are gone are not recreated."""
        await self._add_to_vms(("egress_bytes_out", "egress_bytes_in"), counts)
        if denials:
            pipe = self.client.pipeline(transaction=False)
            for vm_id, entries in denials.items():
                key = self.keys.vm_egress_denials(vm_id)
                pipe.lpush(key, *entries)
                pipe.ltrim(key, 0, EGRESS_DENIALS_KEPT - 1)
                pipe.expire(key, self.retention_s)
            await guarded(pipe.execute())

    async def egress_denials(self, vm_id: str) -> list[dict[str, Any]]:
        """The VM's recent refused egress connections, newest first."""
        key = self.keys.vm_egress_denials(vm_id)
        raw = await guarded(self.client.lrange(key, 0, EGRESS_DENIALS_KEPT - 1))
        return [json.loads(entry) for entry in raw]

    async def owner_vm_ids(self, owner: str) -> list[str]:
        return sorted(await guarded(self.client.smembers(self.keys.owner_vms(owner))))

    async def get_vms(self, vm_ids: list[str]) -> list[VmRecord]:
        if not vm_ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for vm_id in vm_ids:
            pipe.hgetall(self.keys.vm(vm_id))
        raws = await guarded(pipe.execute())
        return [VmRecord.from_hash(raw) for raw in raws if raw]

    async def forget_owner_vm(self, owner: str, vm_id: str) -> None:
        await guarded(self.client.srem(self.keys.owner_vms(owner), vm_id))

    # shares -----------------------------------------------------------------------------------------

    async def put_share(self, rec: ShareRecord, ttl_s: int) -> None:
        """Store a share and, unless revoked, open its port at the edge (the VM's shares hash)."""
        pipe = self.client.pipeline(transaction=True)
        key = self.keys.share(rec.share_id)
        pipe.delete(key)
        pipe.hset(key, mapping=hash_fields(rec.to_hash()))
        pipe.expire(key, max(1, ttl_s))
        if rec.revoked_at is None:
            pipe.hset(self.keys.vm_shares(rec.vm_id), str(rec.port), dump_field(rec.route_entry()))
        await guarded(pipe.execute())
        await self.publish(ShareChanged(rec.vm_id, rec.port))

    async def get_share(self, share_id: str) -> ShareRecord | None:
        raw = await guarded(self.client.hgetall(self.keys.share(share_id)))
        return ShareRecord.from_hash(raw) if raw else None

    async def revoke_share(self, rec: ShareRecord) -> None:
        """Close the share's port at the edge (if the port is still this share's) and every app-URL
        exposure of it; edges close its open connections when they hear of it."""
        script = self._revoke_share
        await guarded(
            script(
                keys=[
                    self.keys.share(rec.share_id),
                    self.keys.vm_shares(rec.vm_id),
                    self.keys.vm_ports(rec.vm_id),
                ],
                args=[str(rec.port), rec.share_id, str(time.time())],
            )
        )
        await self.publish(ShareChanged(rec.vm_id, rec.port, revoked=True))

    # signed URLs ------------------------------------------------------------------------------------

    async def url_key(self, vm: VmRecord, *, rotate: bool = False) -> tuple[bytes, int] | None:
        """The VM's URL-signing key and its version, made at first use; with ``rotate`` a new key (and
        version) replaces it. None when the VM's record is gone. A new key is announced, so every edge
        drops the routes it cached with the old one (and "no route" answers) at once."""
        fresh = secrets.token_hex(URL_KEY_BYTES)
        script = self._url_key
        found = await guarded(script(keys=[self.keys.vm(vm.vm_id)], args=[fresh, "1" if rotate else "0"]))
        if not found:
            return None
        key, version, changed = found
        if int(changed):
            await self.publish(UrlKeyChanged(vm.vm_id, vm.session_id))
        return bytes.fromhex(key), int(version)

    # executions -------------------------------------------------------------------------------------

    async def take_execution_place(self, vm_id: str, cap: int, expiry_s: int) -> bool:
        """One of the VM's ``cap`` places for a running command; False when all are taken."""
        taken = await guarded(
            self._take_execution(keys=[self.keys.vm_executing(vm_id)], args=[cap, expiry_s])
        )
        return int(taken) >= 0

    async def execution_places_taken(self, vm_id: str) -> int:
        return int(await guarded(self.client.get(self.keys.vm_executing(vm_id))) or 0)

    async def release_execution_place(self, vm_id: str) -> None:
        await guarded(self._release_execution(keys=[self.keys.vm_executing(vm_id)]))

    async def put_execution(self, rec: ExecutionRecord) -> None:
        """Store an execution; a running one is indexed (for restart), a finished one expires."""
        pipe = self.client.pipeline(transaction=True)
        key = self.keys.execution(rec.execution_id)
        pipe.hset(key, mapping=hash_fields(rec.to_hash()))
        if rec.completed_at is None:
            pipe.hset(self.keys.running_executions(), rec.execution_id, rec.runner)
            pipe.persist(key)
        else:
            pipe.hdel(self.keys.running_executions(), rec.execution_id)
            pipe.expire(key, self.retention_s)
        await guarded(pipe.execute())

    async def get_execution(self, execution_id: str) -> ExecutionRecord | None:
        raw = await guarded(self.client.hgetall(self.keys.execution(execution_id)))
        return ExecutionRecord.from_hash(raw) if raw else None

    async def forget_running_execution(self, execution_id: str) -> None:
        await guarded(self.client.hdel(self.keys.running_executions(), execution_id))

    async def mark_runner_alive(self, runner: str, ttl_s: int) -> None:
        await guarded(self.client.set(self.keys.runner(runner), "1", ex=ttl_s))

    async def forget_runner(self, runner: str) -> None:
        await guarded(self.client.delete(self.keys.runner(runner)))

    async def live_runners(self, runners: set[str]) -> set[str]:
        """Those of ``runners`` that said they are alive within their expiry."""
        ordered = sorted(runners)
        if not ordered:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for runner in ordered:
            pipe.exists(self.keys.runner(runner))
        found = await guarded(pipe.execute())
        return {runner for runner, exists in zip(ordered, found, strict=True) if exists}

    async def running_executions(self) -> dict[str, str]:
        """Execution id -> runner, of every execution not finished."""
        return dict(await guarded(self.client.hgetall(self.keys.running_executions())))

    # snapshots --------------------------------------------------------------------------------------

    async def put_snapshot(self, rec: SnapshotRecord) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.snapshot(rec.snapshot_id), mapping=hash_fields(rec.to_hash()))
        pipe.sadd(self.keys.owner_snapshots(rec.owner), rec.snapshot_id)
        await guarded(pipe.execute())

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        raw = await guarded(self.client.hgetall(self.keys.snapshot(snapshot_id)))
        return SnapshotRecord.from_hash(raw) if raw else None

    async def owner_snapshots(self, owner: str) -> list[SnapshotRecord]:
        ids = sorted(await guarded(self.client.smembers(self.keys.owner_snapshots(owner))))
        found = [await self.get_snapshot(snapshot_id) for snapshot_id in ids]
        return sorted((r for r in found if r is not None), key=lambda r: r.created_at)

    async def delete_snapshot(self, rec: SnapshotRecord) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.snapshot(rec.snapshot_id))
        pipe.srem(self.keys.owner_snapshots(rec.owner), rec.snapshot_id)
        deleted, _ = await guarded(pipe.execute())
        return bool(deleted)

    async def live_vm_ids(self) -> list[str]:
        return sorted(await guarded(self.client.smembers(self.keys.live_vms())))

    async def due_vm_ids(self, now: float, limit: int = 100) -> list[str]:
        due = await guarded(self.client.zrangebyscore(self.keys.vm_expiry(), "-inf", now, 0, limit))
        return text_list(due)

    async def drop_expiry(self, vm_id: str) -> None:
        await guarded(self.client.zrem(self.keys.vm_expiry(), vm_id))

    async def expose_port(self, vm_id: str, port: int) -> None:
        """Make a port public; announced so that edges drop a cached "not exposed" answer at once."""
        if await guarded(self.client.sadd(self.keys.vm_ports(vm_id), port)):
            await self.publish(PortExposed(vm_id, port))

    async def vm_and_port(self, vm_id: str, port: int) -> tuple[VmRecord | None, bool]:
        """The VM and whether ``port`` is exposed, in one round trip (the edge's route lookup)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.vm(vm_id))
        pipe.sismember(self.keys.vm_ports(vm_id), str(port))
        pipe.hget(self.keys.vm_shares(vm_id), str(port))
        raw, exposed, share = await guarded(pipe.execute())
        return (_with_share(VmRecord.from_hash(raw), share) if raw else None), bool(exposed)

    async def session_vm_and_port(self, session_id: str, port: int) -> tuple[VmRecord | None, bool]:
        """``vm_and_port`` for the session's VM, also in one round trip (a server-side script)."""
        return await self._held_vm(self.keys.session(session_id), port)

    async def domain_vm(self, domain: str) -> VmRecord | None:
        """The VM a custom domain is routed to, in one round trip."""
        vm, _ = await self._held_vm(self.keys.domain(domain), 0)
        return vm

    async def _held_vm(self, holder_key: str, port: int) -> tuple[VmRecord | None, bool]:
        args = [*self._vm_key_templates, str(port), *self._shares_key_template]
        found = await guarded(self._held_vm_and_port(keys=[holder_key], args=args))
        if not found:
            return None, False
        flat, exposed, share = found
        raw = _pairs(flat)
        return (_with_share(VmRecord.from_hash(raw), share) if raw else None), bool(exposed)

    async def exposed_ports(self, vm_id: str) -> set[int]:
        return {int(p) for p in await guarded(self.client.smembers(self.keys.vm_ports(vm_id)))}

    async def next_expiry(self) -> float | None:
        first = await guarded(self.client.zrange(self.keys.vm_expiry(), 0, 0, withscores=True))
        return float(first[0][1]) if first else None

    # custom domains -------------------------------------------------------------------------------

    def _domain_keys(self, domain: str, owner: str) -> list[str]:
        k = self.keys
        return [k.domain(domain), k.domains(), k.owner_domains(owner), k.retired_domains()]

    async def claim_domain(self, rec: DomainRecord) -> bool:
        """Store a domain for ``rec.owner``; False when another owner holds it. Edges hear of it."""
        fields = [text for pair in rec.to_hash().items() for text in pair]
        claimed = await guarded(
            self._claim_domain(
                keys=self._domain_keys(rec.domain, rec.owner), args=[rec.owner, rec.domain, *fields]
            )
        )
        if claimed:
            await self.publish(DomainChanged(rec.domain))
        return bool(claimed)

    async def release_domain(self, domain: str, owner: str, vm_id: str | None = None) -> bool:
        """Drop a domain (only if still held for ``vm_id``, when given) and retire its certificate."""
        released = await guarded(
            self._release_domain(
                keys=self._domain_keys(domain, owner), args=[vm_id or "", domain, repr(time.time())]
            )
        )
        if released:
            await self.publish(DomainChanged(domain))
        return bool(released)

    async def get_domain(self, domain: str) -> DomainRecord | None:
        raw = await guarded(self.client.hgetall(self.keys.domain(domain)))
        return DomainRecord.from_hash(raw) if raw else None

    async def get_domains(self, domains: list[str]) -> list[DomainRecord]:
        pipe = self.client.pipeline(transaction=False)
        for domain in domains:
            pipe.hgetall(self.keys.domain(domain))
        raws = await guarded(pipe.execute()) if domains else []
        return [DomainRecord.from_hash(raw) for raw in raws if raw]

    async def update_domain(self, domain: str, vm_id: str, **values: Any) -> bool:
        """Set fields of a domain still held for ``vm_id`` (a released or moved one is left alone)."""
        mapping = {k: dump_field(v) for k, v in values.items()}
        return bool(
            await guarded(
                self._update_if_held(
                    keys=[self.keys.domain(domain)], args=[vm_id, *[t for kv in mapping.items() for t in kv]]
                )
            )
        )

    async def domain_names(self) -> list[str]:
        return sorted(await guarded(self.client.smembers(self.keys.domains())))

    async def owner_domain_names(self, owner: str) -> list[str]:
        return sorted(await guarded(self.client.smembers(self.keys.owner_domains(owner))))

    async def retired_domains(self, before: float) -> list[str]:
        retired = await guarded(self.client.zrangebyscore(self.keys.retired_domains(), "-inf", before))
        return text_list(retired)

    async def forget_retired_domain(self, domain: str) -> None:
        await guarded(self.client.zrem(self.keys.retired_domains(), domain))

    # browser instances ----------------------------------------------------------------------------

    async def put_instance(self, rec: InstanceRecord) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.instance(rec.instance_uuid), mapping=hash_fields(rec.to_hash()))
        pipe.sadd(self.keys.org_instances(rec.org), rec.instance_uuid)
        await guarded(pipe.execute())

    async def get_instance(self, instance_uuid: str) -> InstanceRecord | None:
        raw = await guarded(self.client.hgetall(self.keys.instance(instance_uuid)))
        return InstanceRecord.from_hash(raw) if raw else None

    async def get_instances(self, ids: list[str]) -> list[InstanceRecord]:
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for instance_uuid in ids:
            pipe.hgetall(self.keys.instance(instance_uuid))
        return [InstanceRecord.from_hash(raw) for raw in await guarded(pipe.execute()) if raw]

    async def org_instance_ids(self, org: str) -> list[str]:
        return sorted(await guarded(self.client.smembers(self.keys.org_instances(org))))

    async def delete_instance(self, org: str, instance_uuid: str) -> bool:
        """Forget an instance; False when it was already gone (so only one of two deletes proceeds)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.instance(instance_uuid))
        pipe.srem(self.keys.org_instances(org), instance_uuid)
        deleted, _ = await guarded(pipe.execute())
        return bool(deleted)

    async def instance_route(
        self, instance_uuid: str
    ) -> tuple[InstanceRecord | None, VmRecord | None, frozenset[str]]:
        """An instance, its VM and its organisation's key hashes, in one round trip (the edge's lookup)."""
        found = await guarded(
            self._instance_route(keys=[self.keys.instance(instance_uuid)], args=self._instance_key_templates)
        )
        if not found:
            return None, None, frozenset()
        inst, vm, key_hashes = found
        vm_raw = _pairs(vm)
        return (
            InstanceRecord.from_hash(_pairs(inst)),
            VmRecord.from_hash(vm_raw) if vm_raw else None,
            frozenset(key_hashes),
        )

    # slots ----------------------------------------------------------------------------------------

    async def claim_slot(self, driver: str, capacity: int, vm_id: str) -> int | None:
        slot = await guarded(
            self._claim_slot(
                keys=[self.keys.slots(driver), self.keys.slot_cursor(driver)], args=[capacity, vm_id]
            )
        )
        return None if int(slot) < 0 else int(slot)

    async def release_slot(self, driver: str, slot: int, vm_id: str) -> None:
        """Free a destroyed VM's slot (its IP may be reused from now on) and announce it."""
        await guarded(self._release_slot(keys=[self.keys.slots(driver)], args=[slot, vm_id]))
        await self.publish(VmReleased(vm_id, driver, slot))

    async def held_slots(self, driver: str) -> dict[int, str]:
        raw = await guarded(self.client.hgetall(self.keys.slots(driver)))
        return {int(k): v for k, v in raw.items()}

    # events ---------------------------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        await publish(self.client, self.keys, event)


def _with_share(vm: VmRecord, entry: str | None) -> VmRecord:
    """The VM as the edge sees one port of it: the share opening that port (if any) as its share."""
    if entry:
        try:
            share = json.loads(entry)
        except ValueError:
            share = None
        if isinstance(share, dict):
            vm.share = share
    return vm


def _pairs(flat: list[str]) -> dict[str, str]:
    """A hash as HGETALL answers inside a script: [field, value, field, value, ...]."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
