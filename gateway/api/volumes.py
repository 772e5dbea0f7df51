"""Volumes (``/v1/volumes``), as the official SDK's ``VolumesManager`` calls them: volumes, their files
without a VM (streamed both ways), and checkpoints.

Another key's volume answers 404, exactly like a volume that does not exist.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

from aiohttp import BodyPartReader, web

from gateway.api import volume_schemas as vs
from gateway.api.auth import authenticate
from gateway.api.context import ORCHESTRATOR
from gateway.api.responses import iso, json_response, stream_base64_json, stream_file
from gateway.api.validation import RequestValidationError, detail_item, parse_body, parse_query
from gateway.errors import Unsupported, UnsupportedMediaType
from gateway.orchestrator.model import VolumeCheckpointRecord, VolumeRecord
from gateway.orchestrator.volumes import API_HOLDER_PREFIX, VolumeService

routes = web.RouteTableDef()

BASE = "/v1/volumes/{volume_id}"
READ_BYTES = 256 * 1024
MAX_FIELD_BYTES = 8192


def _volumes(request: web.Request) -> VolumeService:
    volumes = request.app[ORCHESTRATOR].volumes
    if volumes is None:
        raise Unsupported("volumes are not available on this gateway (they need root, mkfs.xfs and losetup)")
    return volumes


async def volume_view(volumes: VolumeService, rec: VolumeRecord) -> vs.VolumeResponse:
    holders = sorted(h for h in (await volumes.view(rec)).holders if not h.startswith(API_HOLDER_PREFIX))
    return vs.VolumeResponse(
        id=rec.volume_id,
        volume_id=rec.volume_id,
        name=rec.name,
        quota_bytes=rec.quota_bytes,
        used_bytes=rec.used_bytes,
        capacity_bytes=rec.capacity_bytes,
        usage_updated_at=iso(rec.usage_updated_at),
        attached=bool(holders),
        holders=holders,
        created_at=iso(rec.created_at) or "",
        updated_at=iso(rec.updated_at),
    )


def checkpoint_view(rec: VolumeCheckpointRecord) -> vs.CheckpointResponse:
    return vs.CheckpointResponse(
        id=rec.checkpoint_id,
        checkpoint_id=rec.checkpoint_id,
        volume_id=rec.volume_id,
        name=rec.name,
        quota_bytes=rec.quota_bytes,
        used_bytes=rec.used_bytes,
        created_at=iso(rec.created_at) or "",
    )


# volumes ------------------------------------------------------------------------------------------


@routes.get("/v1/volumes")
async def list_volumes(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    query = parse_query(request, vs.VolumeQuery)
    volumes = _volumes(request)
    found = await volumes.list_owned(owner, query.refresh_usage)
    return json_response(vs.VolumeList([await volume_view(volumes, v) for v in found]))


@routes.post("/v1/volumes")
async def create_volume(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, vs.VolumeCreateRequest)
    volumes = _volumes(request)
    rec = await volumes.create(owner, body.name, body.quota_bytes)
    return json_response(await volume_view(volumes, rec), status=201)


@routes.get(BASE)
async def get_volume(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    query = parse_query(request, vs.VolumeQuery)
    volumes = _volumes(request)
    rec = await volumes.get(owner, request.match_info["volume_id"], query.refresh_usage)
    return json_response(await volume_view(volumes, rec))


@routes.patch(BASE)
async def update_volume(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, vs.VolumeUpdateRequest)
    volumes = _volumes(request)
    rec = await volumes.update(owner, request.match_info["volume_id"], body.name, body.quota_bytes)
    return json_response(await volume_view(volumes, rec))


@routes.delete(BASE)
async def delete_volume(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    await _volumes(request).delete(owner, request.match_info["volume_id"])
    return web.Response(status=204)


# checkpoints --------------------------------------------------------------------------------------


@routes.get(BASE + "/checkpoints")
async def list_checkpoints(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    found = await _volumes(request).checkpoints(owner, request.match_info["volume_id"])
    return json_response(vs.CheckpointList([checkpoint_view(c) for c in found]))


@routes.post(BASE + "/checkpoints")
async def create_checkpoint(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    body = await parse_body(request, vs.CheckpointCreateRequest)
    rec = await _volumes(request).create_checkpoint(owner, request.match_info["volume_id"], body.name)
    return json_response(checkpoint_view(rec), status=201)


@routes.delete(BASE + "/checkpoints/{checkpoint_id}")
async def delete_checkpoint(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    info = request.match_info
    await _volumes(request).delete_checkpoint(owner, info["volume_id"], info["checkpoint_id"])
    return web.Response(status=204)


# files --------------------------------------------------------------------------------------------


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None).isoformat(timespec="seconds")


@routes.get(BASE + "/files")
async def list_files(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    query = parse_query(request, vs.FileListQuery)
    entries = await _volumes(request).list_files(
        owner, request.match_info["volume_id"], query.prefix, recursive=query.recursive, limit=query.limit
    )
    return json_response(
        vs.FileList(
            [
                vs.FileEntry(path=e.path, type=e.type, size=e.size, modified_at=_when(e.modified_at))  # type: ignore[arg-type]
                for e in entries
            ]
        )
    )


@routes.delete(BASE + "/files")
async def delete_file(request: web.Request) -> web.Response:
    owner = await authenticate(request)
    query = parse_query(request, vs.FilePathQuery)
    await _volumes(request).delete_file(owner, request.match_info["volume_id"], query.path)
    return web.Response(status=204)


async def _field_text(part: BodyPartReader) -> str:
    raw = await part.read_chunk(MAX_FIELD_BYTES + 1)
    if len(raw) > MAX_FIELD_BYTES:
        raise RequestValidationError(
            [detail_item(["body", part.name or ""], f"at most {MAX_FIELD_BYTES} bytes", "string_too_long")]
        )
    return raw.decode("utf-8", "replace")


async def _part_bytes(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(READ_BYTES):
        yield chunk


def _flag(text: str | None) -> bool:
    if text is None or text.strip().lower() in ("", "false", "0", "no"):
        return False
    if text.strip().lower() in ("true", "1", "yes"):
        return True
    raise RequestValidationError(
        [detail_item(["body", "overwrite"], "Input should be a valid boolean", "bool_parsing")]
    )


@routes.post(BASE + "/files/upload")
async def upload_file(request: web.Request) -> web.Response:
    """multipart/form-data with ``path`` (and ``overwrite``) before ``file``, as the SDK sends them: the
    file is written to the volume as it arrives, so where it goes must be known first."""
    owner = await authenticate(request)
    if not request.content_type.startswith("multipart/"):
        raise UnsupportedMediaType("Content-Type must be multipart/form-data with a file part")
    volumes, volume_id = _volumes(request), request.match_info["volume_id"]
    reader = await request.multipart()
    fields: dict[str, str] = {}
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name != "file":
            fields[part.name or ""] = await _field_text(part)
            continue
        if not fields.get("path"):
            raise RequestValidationError(
                [detail_item(["body", "path"], "Field required (before the file part)", "missing")]
            )
        path, size = await volumes.upload(
            owner, volume_id, fields["path"], _part_bytes(part), overwrite=_flag(fields.get("overwrite"))
        )
        return json_response(vs.VolumeUploadResponse(success=True, volume_id=volume_id, path=path, size=size))
    missing = [n for n in ("path", "file") if not fields.get(n)]
    raise RequestValidationError([detail_item(["body", n], "Field required", "missing") for n in missing])


@routes.post(BASE + "/files/download")
async def download_file(request: web.Request) -> web.StreamResponse:
    """``{"path"}``; the answer is JSON with the content in base64 (as the SDK reads it), written as the
    file is read."""
    owner = await authenticate(request)
    body = await parse_body(request, vs.FileDownloadRequest)
    volume_id = request.match_info["volume_id"]
    file = await _volumes(request).download(owner, volume_id, body.path)
    try:
        return await stream_base64_json(
            request,
            {"volume_id": volume_id, "path": file.path, "size": file.size, "encoding": "base64"},
            file,
        )
    finally:
        await file.close()


@routes.get(BASE + "/files/download")
async def download_raw(request: web.Request) -> web.StreamResponse:
    """The file's bytes as they are (``?path=``), with its length, streamed."""
    owner = await authenticate(request)
    query = parse_query(request, vs.FilePathQuery)
    file = await _volumes(request).download(owner, request.match_info["volume_id"], query.path)
    try:
        return await stream_file(request, file)
    finally:
        await file.close()
