"""The one place that names every Redis key (pure)."""

from __future__ import annotations


class Keys:
    """Every Redis key the gateway uses. One prefix, so several deployments can share a Redis."""

    def __init__(self, prefix: str = "gw:") -> None:
        self.prefix = prefix

    def api_key(self, key_hash: str) -> str:
        return f"{self.prefix}apikey:{key_hash}"

    def api_key_index(self) -> str:
        """Hash: key id -> key hash, for listing and revoking."""
        return f"{self.prefix}apikeys"

    def org_keys(self, org: str) -> str:
        """Set of the key hashes of an organisation's API keys: what opens its instances at the edge."""
        return f"{self.prefix}org:{org}:keys"

    def org_instances(self, org: str) -> str:
        """Set of an organisation's browser-instance ids."""
        return f"{self.prefix}org:{org}:instances"

    def instance(self, instance_id: str) -> str:
        """Hash: a browser instance (``InstanceRecord``)."""
        return f"{self.prefix}instance:{instance_id}"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def vm(self, vm_id: str) -> str:
        return f"{self.prefix}vm:{vm_id}"

    def vm_ports(self, vm_id: str) -> str:
        """Set of ports of a VM exposed publicly (by the app-url call); dropped when the VM ends."""
        return f"{self.prefix}vm:{vm_id}:ports"

    def vm_resuming(self, vm_id: str) -> str:
        """String with an expiry: a resume of the VM is under way (one at a time)."""
        return f"{self.prefix}vm:{vm_id}:resuming"

    def vm_shares(self, vm_id: str) -> str:
        """Hash: port -> the share opening it (JSON, ``ShareRecord.route_entry``); the edge reads it."""
        return f"{self.prefix}vm:{vm_id}:shares"

    def vm_egress_denials(self, vm_id: str) -> str:
        """List: the VM's recent refused egress connections (JSON, newest first), capped."""
        return f"{self.prefix}vm:{vm_id}:egress-denials"

    def share(self, share_id: str) -> str:
        """Hash: a share (``ShareRecord``)."""
        return f"{self.prefix}share:{share_id}"

    def owner_vms(self, owner: str) -> str:
        """Set of VM ids created with one API key."""
        return f"{self.prefix}owner:{owner}:vms"

    def vm_expiry(self) -> str:
        """Sorted set: live VM id -> expiry (unix seconds). The reaper reads it."""
        return f"{self.prefix}vm-expiry"

    def edge_open(self, edge_id: str) -> str:
        """Hash: VM id -> "exchanges tunnels" open on that edge process now (its last report; expires
        when the edge stops reporting)."""
        return f"{self.prefix}edge-open:{edge_id}"

    def edges_open(self) -> str:
        """Sorted set: edge process id -> until when its edge_open report holds (unix seconds)."""
        return f"{self.prefix}edges-open"

    def vm_idle(self) -> str:
        """Sorted set: VM id -> when it is idle for its idle_timeout_s (unix seconds), for the active VMs
        that have one; the reaper reads it (entries of VMs that stopped being active go lazily)."""
        return f"{self.prefix}vm-idle"

    def live_vms(self) -> str:
        """Set of VM ids in a live state (creating or active): what restart recovery reconciles."""
        return f"{self.prefix}vms-live"

    def slots(self, driver: str) -> str:
        """Hash: slot number -> VM id holding it."""
        return f"{self.prefix}slots:{driver}"

    def slot_cursor(self, driver: str) -> str:
        return f"{self.prefix}slot-cursor:{driver}"

    def cert(self, cert_id: str) -> str:
        return f"{self.prefix}cert:{cert_id}"

    def cert_index(self) -> str:
        return f"{self.prefix}certs"

    def cert_lock(self, cert_id: str) -> str:
        return f"{self.prefix}cert-lock:{cert_id}"

    def cert_state(self, cert_id: str) -> str:
        return f"{self.prefix}cert-state:{cert_id}"

    def domain(self, name: str) -> str:
        """Hash: a customer's custom domain (``DomainRecord``)."""
        return f"{self.prefix}domain:{name}"

    def domains(self) -> str:
        """Set of every claimed custom domain: what the domain keeper issues and renews."""
        return f"{self.prefix}domains"

    def owner_domains(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}:domains"

    def retired_domains(self) -> str:
        """Sorted set: released domain -> when; its certificate is deleted after a grace period."""
        return f"{self.prefix}domains-retired"

    def snapshot(self, snapshot_id: str) -> str:
        """Hash: a VM snapshot (``SnapshotRecord``)."""
        return f"{self.prefix}snapshot:{snapshot_id}"

    def owner_snapshots(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}:snapshots"

    def vault(self, vault_id: str) -> str:
        """Hash: a vault (``VaultRecord``)."""
        return f"{self.prefix}vault:{vault_id}"

    def owner_vaults(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}:vaults"

    def vault_credentials(self, vault_id: str) -> str:
        """Hash: credential id -> the credential (``VaultCredentialRecord`` as JSON, its value sealed)."""
        return f"{self.prefix}vault:{vault_id}:credentials"

    def vault_credential_names(self, vault_id: str) -> str:
        """Hash: credential name -> credential id (a name is unique in its vault)."""
        return f"{self.prefix}vault:{vault_id}:credential-names"

    def vault_services(self, vault_id: str) -> str:
        """Hash: service id -> the service (``VaultServiceRecord`` as JSON)."""
        return f"{self.prefix}vault:{vault_id}:services"

    def vault_request_log(self, vault_id: str) -> str:
        """List: the vault's latest requests, newest first, capped (no headers, no bodies)."""
        return f"{self.prefix}vault:{vault_id}:request-log"

    def volume(self, volume_id: str) -> str:
        """Hash: a volume (``VolumeRecord``)."""
        return f"{self.prefix}volume:{volume_id}"

    def owner_volumes(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}:volumes"

    def volume_checkpoints(self, volume_id: str) -> str:
        """Hash: checkpoint id -> the checkpoint (``VolumeCheckpointRecord`` as JSON)."""
        return f"{self.prefix}volume:{volume_id}:checkpoints"

    def execution(self, execution_id: str) -> str:
        """Hash: an execution of POST /execute_async (``ExecutionRecord``); expires with the retention."""
        return f"{self.prefix}execution:{execution_id}"

    def running_executions(self) -> str:
        """Hash: execution id -> the runner (gateway process) running it; what a restart fails."""
        return f"{self.prefix}executions-running"

    def runner(self, runner: str) -> str:
        """String with an expiry: a gateway process that runs executions is alive while it exists."""
        return f"{self.prefix}runner:{runner}"

    def vm_executing(self, vm_id: str) -> str:
        """Counter: commands running in a VM now (the per-VM cap); expires if its holders vanish."""
        return f"{self.prefix}vm:{vm_id}:executing"

    def acme_account(self, directory_url: str) -> str:
        return f"{self.prefix}acme-account:{directory_url}"

    def egress_ca(self) -> str:
        """String: the deployment's egress CA (JSON: its certificate, its key sealed); set once (NX)."""
        return f"{self.prefix}egress-ca"

    def events(self) -> str:
        """Pub/sub channel: VM and route changes, for every edge's route cache."""
        return f"{self.prefix}events"
