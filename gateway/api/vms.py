"""VMs: create (the spec's POST /v1/vms), get, list with a metadata filter, kill."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from gateway.api.auth import authenticate
from gateway.api.context import CONFIG, EGRESS, LIFECYCLE, ORCHESTRATOR, SHARES, VM_VOLUMES
from gateway.api.responses import domain_view, json_response, share_view, vm_view
from gateway.api.schemas import (
    EgressPolicyRequest,
    VmCreateQuery,
    VMCreateRequest,
    VMCreateResponse,
    VmList,
    VmListQuery,
)
from gateway.api.sessions import lifetime_context, vm_params
from gateway.api.validation import RequestValidationError, detail_item, parse_body, parse_part, parse_query
from gateway.api.vm_volumes import create_time_mounts
from gateway.orchestrator.domains import DomainRequest, DomainService
from gateway.orchestrator.drivers.base import cannot_suspend
from gateway.orchestrator.egress import EGRESS_OFF
from gateway.orchestrator.model import HOST_PRESERVE, VM_FAILED, SnapshotRecord, is_live
from gateway.orchestrator.service import boot_failed
from gateway.orchestrator.shares import new_share_token
from gateway.orchestrator.snapshots import SnapshotService
from gateway.orchestrator.vaults import UnknownVaults, VaultBinding, VaultService

routes = web.RouteTableDef()

METADATA_FILTER_PREFIX = "metadata."


def refuse_unsupported(
    body: VMCreateRequest,
    driver: str,
    snapshots: bool = False,
    image_problem: str | None = None,
    suspends: bool = False,
    egress: bool = False,
    volumes: bool = False,
) -> None:
    """Fields the spec has but this deployment cannot honour get a 422 naming them, never a silent no-op.

    ``image_problem``: why the image_variant asked for cannot run here (``Orchestrator.image_problem``).
    """
    problems = []
    if (body.snapshot_id or body.snapshot_on_terminate or body.snapshot_name) and not snapshots:
        field = (
            "snapshot_id"
            if body.snapshot_id
            else ("snapshot_on_terminate" if body.snapshot_on_terminate else "snapshot_name")
        )
        problems.append((field, f"snapshots are not supported by the {driver!r} VM driver"))
    if body.volumes and not volumes:
        problems.append(("volumes", f"volumes cannot be mounted into {driver!r} VMs on this gateway"))
    if body.vault_ids and not egress:
        # The secrets go in at egress: a VM without egress could never use them.
        problems.append(
            ("vault_ids", "vaults need egress, which VMs do not have on this gateway (egress.enabled)")
        )
    if body.egress_policy and not egress:
        problems.append(("egress_policy", EGRESS_OFF))
    if image_problem:
        problems.append(("image_variant", image_problem))
    if (body.auto_suspend or body.auto_resume) and not suspends:
        field = "auto_suspend" if body.auto_suspend else "auto_resume"
        problems.append((field, cannot_suspend(driver)))
    if problems:
        raise RequestValidationError([detail_item(["body", f], msg, "unsupported") for f, msg in problems])


async def snapshot_to_restore(
    body: VMCreateRequest, snapshots: SnapshotService, owner: str, image: str
) -> SnapshotRecord | None:
    """The owner's snapshot named by ``snapshot_id`` (404 if none), checked against the request (422).

    A migration stream resumes only on the machine shape and image it was taken on, so memory_mb,
    vcpu_count and image_variant come from the snapshot; a request that asks for others is refused
    rather than silently overridden. ``image``: the image the request's image_variant names.
    """
    if not body.snapshot_id:
        return None
    snap = await snapshots.get(owner, body.snapshot_id)
    problems = []
    if snap.driver != snapshots.driver.name:
        problems.append(("snapshot_id", f"the snapshot was taken by the {snap.driver!r} driver"))
    for name in ("memory_mb", "vcpu_count"):
        asked, taken = getattr(body, name), getattr(snap, name)
        if asked is not None and asked != taken:
            problems.append(
                (name, f"the snapshot was taken with {name} {taken}; leave it out or ask {taken}")
            )
    if body.image_variant and snap.image_variant and image != snap.image_variant:
        problems.append(
            (
                "image_variant",
                f"the snapshot was taken on image {snap.image_variant!r}; leave it out or ask that one",
            )
        )
    if problems:
        raise RequestValidationError([detail_item(["body", f], msg, "value_error") for f, msg in problems])
    return snap


def domain_request(body: VMCreateRequest, domains: DomainService | None) -> DomainRequest | None:
    """The custom domain asked for, checked (422 naming the field), or None."""
    if body.custom_domain is None:
        return None
    requested = body.custom_domain
    request = DomainRequest(requested.domain, requested.dns_provider, requested.dns_credentials)
    if domains is None:
        problems = [("custom_domain", "custom domains are not available on this gateway")]
    else:
        problems = domains.problems(request)
    if problems:
        where: list[list[str | int]] = [
            ["body", "custom_domain", *([] if f == "custom_domain" else [f])] for f, _ in problems
        ]
        raise RequestValidationError(
            [detail_item(loc, msg, "value_error") for loc, (_, msg) in zip(where, problems, strict=True)]
        )
    return request


async def vault_binding(
    body: VMCreateRequest, vaults: VaultService | None, owner: str
) -> VaultBinding | None:
    """Placeholders for the credentials of the vaults asked for; a 422 naming each id that is not a
    vault of this key (another key's vault reads as one that does not exist)."""
    if not body.vault_ids:
        return None
    if vaults is None:
        raise RequestValidationError(
            [detail_item(["body", "vault_ids"], "vaults are not available on this gateway", "unsupported")]
        )
    try:
        return await vaults.bind(owner, body.vault_ids)
    except UnknownVaults as exc:
        raise RequestValidationError(
            [detail_item(["body", "vault_ids", pos], "no such vault", "value_error") for pos in exc.positions]
        ) from None


def share_for(requested: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    """The share to store, and for a private one its access token (stored only as a hash)."""
    if not requested:
        return None, None
    if requested.get("host") == HOST_PRESERVE:
        requested = {k: v for k, v in requested.items() if k != "host"}  # (the default: not stored)
    if requested.get("is_public"):
        return requested, None
    token, token_sha256 = new_share_token()
    return {**requested, "token_sha256": token_sha256}, token


@routes.post("/v1/vms")
async def create_vm(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    query = parse_query(request, VmCreateQuery)
    body = await parse_body(request, VMCreateRequest, lifetime_context(request.app[CONFIG]))
    orchestrator = request.app[ORCHESTRATOR]
    refuse_unsupported(
        body,
        orchestrator.driver.name,
        orchestrator.snapshots.available,
        orchestrator.image_problem(body.image_variant),
        suspends=request.app[LIFECYCLE].available,
        egress=request.app[EGRESS].available,
        volumes=request.app[VM_VOLUMES].available,
    )
    mounts = await create_time_mounts(orchestrator.volumes, owner, body.volumes) if body.volumes else ()
    # The SDK's shape, checked (a 422 naming the field).
    egress_policy = (
        parse_part(EgressPolicyRequest, body.egress_policy, "body", "egress_policy").model_dump()
        if body.egress_policy
        else {}
    )
    domain = domain_request(body, orchestrator.domains)
    vaults = await vault_binding(body, orchestrator.vaults, owner)
    restore = await snapshot_to_restore(
        body, orchestrator.snapshots, owner, orchestrator.images.resolve(body.image_variant)
    )
    share, token = share_for(body.share.model_dump() if body.share else None)
    params = dataclasses.replace(
        vm_params(body, share=share),
        custom_domain=domain,
        snapshot_on_terminate=bool(body.snapshot_on_terminate),
        snapshot_name=body.snapshot_name,
        restore=restore,
        # A restored VM runs on its snapshot's image.
        image=body.image_variant or (restore.image_variant if restore else None) or "",
        auto_suspend=bool(body.auto_suspend),
        auto_resume=bool(body.auto_resume),
        idle_timeout_s=body.idle_timeout_s or None,
        max_exchanges=body.max_exchanges or None,
        egress_policy=egress_policy,
        vaults=vaults,
        volumes=mounts,
    )
    session, vm = await orchestrator.create_vm(owner, body.session_id, params, wait=query.wait)
    if share is not None and vm.status != VM_FAILED:
        # The create-time share is a share like the others (an id to change or revoke it by).
        public, token_sha256 = bool(share.get("is_public")), share.get("token_sha256")
        host = share.get("host", HOST_PRESERVE)
        await request.app[SHARES].register(vm, share["port"], public, token_sha256, main=True, host=host)
    if vm.status == VM_FAILED and not body.env:
        # (With env the spec's answer carries the failure: env_status "failed" and env_error.)
        raise boot_failed(vm)
    domain_rec = (
        await orchestrator.domains.of_vm(vm.vm_id, vm.custom_domain) if orchestrator.domains else None
    )
    env_status = session.env_status
    if body.env:
        env_status = "configured" if vm.status in ("creating", "active") else "failed"
    return json_response(
        VMCreateResponse(
            vm_id=vm.vm_id,
            session_id=session.session_id,
            status=vm.status,
            share=share_view(request.app[CONFIG], vm, token),
            custom_domain=domain_view(request.app[CONFIG], domain_rec) if domain_rec else None,
            env_status=env_status,
            env_error=vm.error if env_status == "failed" else None,
        )
    )


@routes.get("/v1/vms/{vm_id}")
async def get_vm(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    orchestrator = request.app[ORCHESTRATOR]
    vm = await orchestrator.get_vm(owner, request.match_info["vm_id"])
    domain = await orchestrator.domains.of_vm(vm.vm_id, vm.custom_domain) if orchestrator.domains else None
    exposed = await orchestrator.exposed_ports(vm.vm_id)
    return json_response(vm_view(request.app[CONFIG], vm, exposed, domain))


def metadata_filter(request: web.Request) -> dict[str, str]:
    """?metadata.team=red -> {"team": "red"}."""
    return {
        name[len(METADATA_FILTER_PREFIX) :]: text
        for name, text in request.query.items()
        if name.startswith(METADATA_FILTER_PREFIX) and len(name) > len(METADATA_FILTER_PREFIX)
    }


async def listed_vms(request: web.Request, *, running_only: bool) -> web.Response:
    owner = await authenticate(request)
    query = parse_query(request, VmListQuery)
    records = await request.app[ORCHESTRATOR].list_vms(owner, metadata_filter(request))
    if query.status is not None:
        records = [r for r in records if r.status == query.status]
    elif running_only:
        records = [r for r in records if is_live(r)]
    return json_response(VmList([vm_view(request.app[CONFIG], r) for r in records]))


@routes.get("/v1/vms")
async def list_running_vms(request: web.Request) -> web.Response:
    """The key's running (and booting) VMs, as the official SDK's ``vms.list()`` reads them."""
    return await listed_vms(request, running_only=True)


@routes.get("/v1/vms/")
async def list_all_vms(request: web.Request) -> web.Response:
    """Every VM record of the key, ended ones still retained included (``vms.list_all_records()``)."""
    return await listed_vms(request, running_only=False)


@routes.delete("/v1/vms/{vm_id}")
async def kill_vm(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    vm = await request.app[ORCHESTRATOR].kill_vm(owner, request.match_info["vm_id"])
    return json_response(vm_view(request.app[CONFIG], vm))
