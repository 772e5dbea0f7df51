"""Vaults: an API key's secrets, bound to hosts, that its VMs use without ever holding them.

A VM made with ``vault_ids`` gets, for each credential, an env variable holding a placeholder; the egress
proxy swaps the placeholder for the secret in requests to the credential's services (``VaultSource``,
implemented here). Secrets are sealed with the storage key before they reach Redis (the same ``Sealer``
that seals customers' DNS credentials), opened only for the proxy, and never returned, logged or shown
after they were given. Tenancy as elsewhere: another key's vault answers exactly like a missing one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.config import Config, ConfigError
from gateway.egress.inject import Service, VmVault, new_placeholder
from gateway.errors import Conflict, NotFound
from gateway.orchestrator import vault_rules as rules
from gateway.state.records import VaultCredentialRecord, VaultRecord, VaultServiceRecord, is_live
from gateway.state.store import RedisStore
from gateway.state.vault_store import ADDED, FULL, GONE, NAME_TAKEN, RedisVaultStore
from gateway.tls.local import StorageKeyError, storage_key
from gateway.tls.store import Sealer, Unsealable

log = logging.getLogger(__name__)

VAULT_PREFIX, CREDENTIAL_PREFIX, SERVICE_PREFIX = "vault-", "cred-", "svc-"
ID_RANDOM_BYTES = 10
# Ids come from URLs: anything else cannot exist (and must never be spliced into a key name).
_ID = re.compile(r"(?:vault|cred|svc)-[0-9a-f]{20}\Z")
MAX_PATH_CHARS = 2048


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(ID_RANDOM_BYTES)


class UnknownVaults(NotFound):
    """Some of the ``vault_ids`` a VM asked for are not this key's vaults (their positions)."""

    code = "vault_not_found"

    def __init__(self, positions: list[int]) -> None:
        super().__init__("no such vault")
        self.positions = positions


@dataclass(frozen=True)
class VaultBinding:
    """What a new VM gets from its vaults: env (name -> placeholder) and placeholder -> credential id."""

    vault_ids: tuple[str, ...]
    env: dict[str, str]
    placeholders: dict[str, str]


def sanitised_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A request log entry with only what may be kept: no headers, no bodies, no query string."""
    path = str(entry.get("path") or "")
    status = entry.get("status")
    at = entry.get("at")
    clean: dict[str, Any] = {
        "at": float(at) if isinstance(at, (int, float)) else time.time(),
        "vm_id": str(entry.get("vm_id") or ""),
        "host": str(entry.get("host") or "")[:253],
        "method": str(entry.get("method") or "")[:16],
        # The query string may hold anything (tokens of the VM's own): only the path is kept.
        "path": path.split("?", 1)[0].split("#", 1)[0][:MAX_PATH_CHARS],
        "status": status if isinstance(status, int) else None,
    }
    if entry.get("credential_id"):
        clean["credential_id"] = str(entry["credential_id"])
    return clean


class VaultService:
    """The vault use cases (the API's) and the egress proxy's ``VaultSource``."""

    def __init__(self, store: RedisStore, vaults: RedisVaultStore, sealer: Sealer) -> None:
        self.store = store
        self.vaults = vaults
        self.sealer = sealer

    # vaults -----------------------------------------------------------------------------------------

    async def create(self, owner: str, name: str, description: str | None) -> VaultRecord:
        if await self.vaults.count_owner_vaults(owner) >= rules.MAX_VAULTS_PER_OWNER:
            raise Conflict(f"at most {rules.MAX_VAULTS_PER_OWNER} vaults per API key", code="limit_reached")
        now = time.time()
        rec = VaultRecord(_new_id(VAULT_PREFIX), owner, name, now, description, now)
        await self.vaults.put_vault(rec)
        return rec

    async def list_owned(self, owner: str) -> list[VaultRecord]:
        found = await self.vaults.get_vaults(await self.vaults.owner_vault_ids(owner))
        return sorted((v for v in found if v.owner == owner), key=lambda v: v.created_at)

    async def get(self, owner: str, vault_id: str) -> VaultRecord:
        rec = await self.vaults.get_vault(vault_id) if _ID.match(vault_id) else None
        if rec is None or rec.owner != owner:
            raise NotFound("vault not found", code="vault_not_found")
        return rec

    async def update(
        self, owner: str, vault_id: str, name: str | None, description: str | None
    ) -> VaultRecord:
        rec = await self.get(owner, vault_id)
        values = {"updated_at": repr(time.time())}
        if name is not None:
            values["name"] = name
        if description is not None:
            values["description"] = description
        await self.vaults.update_vault(rec.vault_id, values)
        return await self.get(owner, vault_id)

    async def delete(self, owner: str, vault_id: str) -> None:
        """The vault and everything in it; VMs bound to it get no more secrets from it at once."""
        rec = await self.get(owner, vault_id)
        await self.vaults.delete_vault(rec)

    # credentials ------------------------------------------------------------------------------------

    async def credentials(self, owner: str, vault_id: str) -> list[VaultCredentialRecord]:
        rec = await self.get(owner, vault_id)
        return sorted(await self.vaults.credentials(rec.vault_id), key=lambda c: c.created_at)

    async def add_credential(
        self,
        owner: str,
        vault_id: str,
        *,
        name: str,
        value: str,
        credential_type: str,
        description: str | None,
    ) -> VaultCredentialRecord:
        vault = await self.get(owner, vault_id)
        now = time.time()
        rec = VaultCredentialRecord(
            credential_id=_new_id(CREDENTIAL_PREFIX), vault_id=vault.vault_id, name=name,
            credential_type=credential_type, created_at=now, value_sealed=self._seal(value),
            description=description, updated_at=now,
        )  # fmt: skip
        done = await self.vaults.add_credential(rec, rules.MAX_CREDENTIALS_PER_VAULT)
        if done == NAME_TAKEN:
            raise Conflict(f"the vault already has a credential named {name}", code="credential_exists")
        if done == FULL:
            limit = rules.MAX_CREDENTIALS_PER_VAULT
            raise Conflict(f"at most {limit} credentials per vault", code="limit_reached")
        if done == GONE:
            raise NotFound("vault not found", code="vault_not_found")
        return rec

    async def _credential(self, owner: str, vault_id: str, credential_id: str) -> VaultCredentialRecord:
        vault = await self.get(owner, vault_id)
        for rec in await self.vaults.credentials(vault.vault_id):
            if rec.credential_id == credential_id:
                return rec
        raise NotFound("credential not found", code="credential_not_found")

    async def rotate_credential(
        self, owner: str, vault_id: str, credential_id: str, value: str
    ) -> VaultCredentialRecord:
        """A new value under the same name and id: VMs bound to it send the new one from now on."""
        rec = await self._credential(owner, vault_id, credential_id)
        now = time.time()
        rec.value_sealed, rec.updated_at, rec.rotated_at = self._seal(value), now, now
        if not await self.vaults.replace_credential(rec):
            raise NotFound("credential not found", code="credential_not_found")
        return rec

    async def delete_credential(self, owner: str, vault_id: str, credential_id: str) -> None:
        rec = await self._credential(owner, vault_id, credential_id)
        await self.vaults.delete_credential(rec)

    def _seal(self, value: str) -> str:
        return self.sealer.seal(value.encode())

    # services ---------------------------------------------------------------------------------------

    async def services(self, owner: str, vault_id: str) -> list[VaultServiceRecord]:
        rec = await self.get(owner, vault_id)
        return sorted(await self.vaults.services(rec.vault_id), key=lambda s: s.created_at)

    async def add_services(
        self, owner: str, vault_id: str, wanted: Sequence[tuple[str, Mapping[str, Any], bool, str | None]]
    ) -> list[VaultServiceRecord]:
        """Bind hosts (checked: exact or ``*.suffix``) with checked ``auth_config``s; the credential a
        service names may be added later (until then it injects nothing)."""
        vault = await self.get(owner, vault_id)
        now = time.time()
        records = [
            VaultServiceRecord(
                service_id=_new_id(SERVICE_PREFIX), vault_id=vault.vault_id, host=host,
                auth_config=rules.normalised_auth_config(auth), enabled=enabled, created_at=now,
                description=description,
            )
            for host, auth, enabled, description in wanted
        ]  # fmt: skip
        done = await self.vaults.add_services(vault.vault_id, records, rules.MAX_SERVICES_PER_VAULT)
        if done == FULL:
            raise Conflict(f"at most {rules.MAX_SERVICES_PER_VAULT} services per vault", code="limit_reached")
        if done != ADDED:
            raise NotFound("vault not found", code="vault_not_found")
        return records

    async def add_templates(
        self, owner: str, vault_id: str, template_ids: Sequence[str]
    ) -> list[VaultServiceRecord]:
        templates = [rules.CATALOG_BY_ID[t] for t in dict.fromkeys(template_ids)]
        wanted = [(t.host, t.auth_config, True, f"{t.name} (catalog template {t.id})") for t in templates]
        return await self.add_services(owner, vault_id, wanted)

    async def delete_service(self, owner: str, vault_id: str, service_id: str) -> None:
        vault = await self.get(owner, vault_id)
        if not _ID.match(service_id) or not await self.vaults.delete_service(vault.vault_id, service_id):
            raise NotFound("service not found", code="service_not_found")

    async def request_log(self, owner: str, vault_id: str, limit: int) -> list[dict[str, Any]]:
        vault = await self.get(owner, vault_id)
        return await self.vaults.request_log(vault.vault_id, limit)

    # VMs --------------------------------------------------------------------------------------------

    async def bind(self, owner: str, vault_ids: Sequence[str]) -> VaultBinding:
        """Placeholders for a new VM, one per credential of these vaults (UnknownVaults naming the
        positions of ids that are not this key's vaults). Where two vaults have a credential of the same
        name, the later vault's wins."""
        ids = list(dict.fromkeys(vault_ids))
        owned = {
            v.vault_id
            for v in await self.vaults.get_vaults([i for i in ids if _ID.match(i)])
            if v.owner == owner
        }
        missing = [pos for pos, vault_id in enumerate(vault_ids) if vault_id not in owned]
        if missing:
            raise UnknownVaults(missing)
        env: dict[str, str] = {}
        by_name: dict[str, str] = {}
        for creds in (await self.vaults.credentials_of(ids)).values():
            for cred in sorted(creds, key=lambda c: c.created_at):
                env[cred.name] = new_placeholder()
                by_name[cred.name] = cred.credential_id
        placeholders = {placeholder: by_name[name] for name, placeholder in env.items()}
        return VaultBinding(tuple(ids), env, placeholders)

    # VaultSource (the egress proxy) -----------------------------------------------------------------

    async def vm_vault(self, vm_id: str) -> VmVault | None:
        vm = await self.store.get_vm(vm_id)
        if vm is None or not is_live(vm) or not vm.vault_ids:
            return None
        vaults = [v.vault_id for v in await self.vaults.get_vaults(vm.vault_ids) if v.owner == vm.owner]
        credentials = await self.vaults.credentials_of(vaults)
        bindings = await self.vaults.services_of(vaults)
        opened: dict[str, str] = {}
        vault_of: dict[str, str] = {}
        services: list[Service] = []
        for vault_id in vaults:
            by_name = {}
            for cred in credentials[vault_id]:
                try:
                    opened[cred.credential_id] = self.sealer.open(cred.value_sealed).decode()
                except (Unsealable, UnicodeDecodeError):
                    # Sealed with another storage key: it cannot be sent (and is never logged).
                    log.warning(
                        "vault %s: credential %s does not open with the storage key", vault_id, cred.name
                    )
                    continue
                vault_of[cred.credential_id] = vault_id
                by_name[cred.name] = cred.credential_id
            for binding in bindings[vault_id]:
                name = rules.credential_of(binding.auth_config) if binding.enabled else None
                service = (
                    rules.service_for(binding.host, binding.auth_config, by_name[name])
                    if name in by_name
                    else None
                )
                if service is not None:
                    services.append(service)
        placeholders = {p: cid for p, cid in vm.vault_placeholders.items() if cid in opened}
        return VmVault(tuple(services), placeholders, opened, vault_of)

    async def log_vault_request(self, vault_id: str, entry: Mapping[str, Any]) -> None:
        if _ID.match(vault_id):
            await self.vaults.log_request(vault_id, sanitised_entry(entry), rules.REQUEST_LOG_CAP)


def _sealer(config: Config) -> Sealer:
    try:
        key = storage_key(config.tls.storage_key, config.tls.storage_key_file, config.data_path)
    except StorageKeyError as exc:
        raise ConfigError(f"tls storage key: {exc}") from None
    return Sealer(key)


async def vault_service(config: Config, store: RedisStore) -> VaultService:
    """Vaults with this deployment's storage key (loaded, or made on a first start, in a thread)."""
    sealer = await asyncio.to_thread(_sealer, config)
    return VaultService(store, RedisVaultStore(store.client, store.keys), sealer)
