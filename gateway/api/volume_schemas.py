"""Request and response models of ``/v1/volumes`` (the official SDK's ``VolumesManager``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from gateway.orchestrator import volumes as rules

MAX_NAME = 128


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


QUOTA = Field(
    ge=rules.MIN_QUOTA_BYTES,
    le=rules.MAX_QUOTA_BYTES,
    description="The volume's size in bytes: its file system's size, so writes past it fail with ENOSPC "
    "(the file system's own overhead, a few percent, comes out of it)",
)


class VolumeCreateRequest(_Model):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    quota_bytes: int = QUOTA


class VolumeUpdateRequest(_Model):
    """Grow the quota any time (on hosts that can resize a mounted file system; else while detached);
    shrink it only while detached and not below what the files use."""

    name: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    quota_bytes: int | None = Field(None, ge=rules.MIN_QUOTA_BYTES, le=rules.MAX_QUOTA_BYTES)


class VolumeQuery(_Model):
    refresh_usage: bool = Field(False, description="Measure usage now (else: as last measured)")


class VolumeResponse(_Model):
    id: str
    volume_id: str
    name: str
    quota_bytes: int
    used_bytes: int | None = Field(None, description="Bytes the files use, as of usage_updated_at")
    capacity_bytes: int | None = Field(None, description="Bytes files may use: the quota less overhead")
    usage_updated_at: str | None = None
    attached: bool
    holders: list[str] = Field(description="Who has it attached (VM ids); delete is refused meanwhile")
    status: Literal["ready"] = "ready"
    created_at: str
    updated_at: str | None = None


class VolumeList(RootModel[list[VolumeResponse]]):
    """A bare JSON array, as the official SDK reads it."""


class CheckpointCreateRequest(_Model):
    name: str | None = Field(None, max_length=MAX_NAME)


class CheckpointResponse(_Model):
    id: str
    checkpoint_id: str
    volume_id: str
    name: str | None = None
    quota_bytes: int
    used_bytes: int | None = None
    created_at: str


class CheckpointList(RootModel[list[CheckpointResponse]]):
    """A bare JSON array."""


class FileListQuery(_Model):
    prefix: str = Field("", max_length=4096, description="Paths that start with this ('' for all)")
    recursive: bool = True
    limit: int = Field(1000, ge=1, le=rules.MAX_LIST_LIMIT)


class FileEntry(_Model):
    path: str
    type: Literal["file", "directory", "symlink", "other"]
    size: int
    modified_at: str | None = None


class FileList(RootModel[list[FileEntry]]):
    """A bare JSON array; symlinks are listed, never followed."""


class FilePathQuery(_Model):
    path: str = Field(min_length=1, max_length=4096, description="A path in the volume ('..' refused)")


class FileDownloadRequest(_Model):
    path: str = Field(min_length=1, max_length=4096)


class VolumeUploadResponse(_Model):
    """``POST .../files/upload`` takes multipart/form-data: ``path`` and ``overwrite`` (before) ``file``;
    missing folders are made; without ``overwrite`` an existing file is a 409."""

    success: bool
    volume_id: str
    path: str
    size: int


class VolumeDownloadResponse(_Model):
    volume_id: str
    path: str
    size: int
    encoding: Literal["base64"]
    content: str
