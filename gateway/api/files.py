"""Files in a session's VM, as the official SDK moves them: ``POST /upload`` (multipart) and
``POST /download`` (a form; JSON with the content in base64), plus ``GET /v1/sessions/{id}/files`` for
the raw bytes of a large file. Everything streams: neither direction holds a file in memory.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, web

from gateway.api.auth import authenticate
from gateway.api.context import FILES
from gateway.api.responses import stream_base64_json, stream_file
from gateway.api.validation import RequestValidationError, detail_item
from gateway.errors import UnsupportedMediaType

routes = web.RouteTableDef()

READ_BYTES = 256 * 1024
# Base64 turns 3 bytes into 4 characters: chunks of a multiple of 3 encode on their own.
MAX_FIELD_BYTES = 8192


def _missing(where: str, *names: str) -> RequestValidationError:
    return RequestValidationError([detail_item([where, n], "Field required", "missing") for n in names])


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


@routes.post("/upload")
async def upload(request: web.Request) -> web.Response:
    """multipart/form-data with ``session_id`` and ``remote_path`` before ``file`` (as the SDK sends them:
    the file is streamed into the VM as it arrives, so where it goes must be known first)."""
    owner = await authenticate(request)
    if not request.content_type.startswith("multipart/"):
        raise UnsupportedMediaType("Content-Type must be multipart/form-data with a file part")
    reader = await request.multipart()
    fields: dict[str, str] = {}
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name != "file":
            fields[part.name or ""] = await _field_text(part)
            continue
        missing = [n for n in ("session_id", "remote_path") if not fields.get(n)]
        if missing:
            raise RequestValidationError(
                [
                    detail_item(["body", n], "Field required (before the file part)", "missing")
                    for n in missing
                ]
            )
        answer = await request.app[FILES].upload(
            owner, fields["session_id"], fields["remote_path"], _part_bytes(part)
        )
        return web.json_response(
            {
                "success": True,
                "remote_path": fields["remote_path"],
                "path": answer["path"],
                "size": answer["size"],
                "filename": part.filename,
            }
        )
    raise _missing("body", *(n for n in ("session_id", "remote_path", "file") if not fields.get(n)))


async def _download_form(request: web.Request) -> tuple[str, str]:
    if request.content_type == "application/json":
        try:
            data = json.loads(await request.read())
        except ValueError:
            raise RequestValidationError(
                [detail_item(["body", 0], "JSON decode error", "json_invalid")]
            ) from None
        form = {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    else:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    missing = [n for n in ("session_id", "filename") if not form.get(n)]
    if missing:
        raise _missing("body", *missing)
    return form["session_id"], form["filename"]


@routes.post("/download")
async def download(request: web.Request) -> web.StreamResponse:
    """A form (``filename``, ``session_id``; JSON works too); the answer is JSON with the content in
    base64, written as it is read from the VM."""
    owner = await authenticate(request)
    session_id, filename = await _download_form(request)
    file = await request.app[FILES].download(owner, session_id, filename)
    try:
        return await stream_base64_json(request, {"filename": filename}, file)
    finally:
        await file.close()


@routes.get("/v1/sessions/{session_id}/files")
async def raw_file(request: web.Request) -> web.StreamResponse:
    """The file's bytes as they are (``?path=``), with its length: for files too large for JSON."""
    owner = await authenticate(request)
    path = request.query.get("path")
    if not path:
        raise _missing("query", "path")
    file = await request.app[FILES].download(owner, request.match_info["session_id"], path)
    try:
        return await stream_file(request, file)
    finally:
        await file.close()
