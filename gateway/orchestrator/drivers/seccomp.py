"""The seccomp filter every netns VM runs under: moby's default profile as the OCI ``linux.seccomp`` object.

The profile is data (``seccomp_default.json``, copied verbatim from moby/profiles; source and commit in
``seccomp_default.NOTICE``). Its rules are conditional on the container's capabilities, the CPU
architecture and the host kernel, so it cannot go into a runc bundle as it is: ``oci_seccomp`` resolves
those conditions the way moby's ``setupSeccomp`` (moby/profiles ``seccomp/seccomp_linux.go``) does and
returns the runtime-spec object. Pure apart from reading the packaged JSON (once) and, unless a kernel
version is given, ``uname``: the filter is enforced by the kernel that runs runc, which is this host's.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

PROFILE_PACKAGE = "gateway.orchestrator.drivers"
PROFILE_RESOURCE = "seccomp_default.json"

# moby/moby daemon/pkg/oci/caps/defaults.go: what Docker (and runc's spec template) give a container's root.
MOBY_DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
# CAP_NET_RAW is dropped on purpose: raw and packet sockets would let a VM forge packets (any source
# address or MAC) towards other VMs and the host, and a tenant boundary must not allow that.
# CAP_MKNOD: a VM gets the default /dev of the bundle and no device nodes beyond it.
DROPPED_CAPABILITIES = frozenset({"CAP_NET_RAW", "CAP_MKNOD"})
DEFAULT_CAPABILITIES: tuple[str, ...] = tuple(
    cap for cap in MOBY_DEFAULT_CAPABILITIES if cap not in DROPPED_CAPABILITIES
)

# moby's nativeToSeccomp: the libseccomp/native arch names the profile's "arches" filters use -> OCI arch.
NATIVE_TO_SECCOMP_ARCH: Mapping[str, str] = {
    "x86": "SCMP_ARCH_X86",
    "amd64": "SCMP_ARCH_X86_64",
    "arm": "SCMP_ARCH_ARM",
    "arm64": "SCMP_ARCH_AARCH64",
    "loong64": "SCMP_ARCH_LOONGARCH64",
    "mips64": "SCMP_ARCH_MIPS64",
    "mips64n32": "SCMP_ARCH_MIPS64N32",
    "mipsel64": "SCMP_ARCH_MIPSEL64",
    "mips3l64n32": "SCMP_ARCH_MIPSEL64N32",
    "mipsle": "SCMP_ARCH_MIPSEL",
    "ppc": "SCMP_ARCH_PPC",
    "ppc64": "SCMP_ARCH_PPC64",
    "ppc64le": "SCMP_ARCH_PPC64LE",
    "riscv64": "SCMP_ARCH_RISCV64",
    "s390": "SCMP_ARCH_S390",
    "s390x": "SCMP_ARCH_S390X",
}

# runtime-spec LinuxSeccomp fields that moby copies through unchanged ("defaultAction" is required).
_SECCOMP_FIELDS = ("defaultAction", "defaultErrnoRet", "flags", "listenerPath", "listenerMetadata")
_RELEASE = re.compile(r"\s*(\d+)\.(\d+)")
_MIN_KERNEL = re.compile(r"(\d+)\.(\d+)")

KernelVersion = tuple[int, int]


def oci_seccomp(
    capabilities: Iterable[str], arch: str = "amd64", *, kernel: KernelVersion | None = None
) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` object of moby's default profile for a process with ``capabilities``.

    ``capabilities`` is the process's bounding set (names like ``CAP_CHOWN``), ``arch`` a native name as in
    ``NATIVE_TO_SECCOMP_ARCH`` (unknown names raise ``ValueError``), ``kernel`` the (version, major) of the
    kernel that will enforce the filter, this host's when ``None``. Returns a new dict on every call.
    """
    return convert_profile(_default_profile(), capabilities, arch, kernel=kernel)


def convert_profile(
    profile: Mapping[str, Any],
    capabilities: Iterable[str],
    arch: str = "amd64",
    *,
    kernel: KernelVersion | None = None,
) -> dict[str, Any]:
    """Resolve a moby-format seccomp profile into the runtime-spec object, as moby's ``setupSeccomp``.

    A rule is kept unless its ``excludes`` match (the arch is listed, any listed capability is held, or
    the kernel is at least ``minKernel``) or its ``includes`` don't (the arch is not listed, some listed
    capability is missing, or the kernel is older than ``minKernel``). Raises ``ValueError`` for an unknown
    arch and for the malformed profiles moby rejects.
    """
    seccomp_arch = NATIVE_TO_SECCOMP_ARCH.get(arch)
    if seccomp_arch is None:
        known = ", ".join(sorted(NATIVE_TO_SECCOMP_ARCH))
        raise ValueError(f"unknown seccomp architecture {arch!r}; expected one of {known}")
    if not profile.get("defaultAction"):
        raise ValueError("seccomp profile has no defaultAction")
    if profile.get("architectures") and profile.get("archMap"):
        raise ValueError("seccomp profile specifies both 'architectures' and 'archMap'")
    caps = frozenset(capabilities)
    kernel_version = kernel if kernel is not None else _host_kernel()

    result: dict[str, Any] = {
        field: copy.deepcopy(profile[field])
        for field in _SECCOMP_FIELDS
        if profile.get(field) not in (None, "", [], {})  # Go's omitempty; errno 0 is a value
    }
    architectures = list(profile.get("architectures") or ())
    # Like moby, only the first archMap entry for the arch counts, and an arch the profile does not map
    # leaves the list empty (runc then filters the native arch only).
    for entry in profile.get("archMap") or ():
        if entry["architecture"] == seccomp_arch:
            architectures.append(entry["architecture"])
            architectures.extend(entry.get("subArchitectures") or ())
            break
    if architectures:
        result["architectures"] = architectures

    syscalls = [
        _oci_syscall(rule)
        for rule in profile.get("syscalls") or ()
        if _applies(rule, caps, arch, kernel_version)
    ]
    if syscalls:
        result["syscalls"] = syscalls
    return result


def allowed_syscalls(seccomp: Mapping[str, Any]) -> frozenset[str]:
    """Names some ``SCMP_ACT_ALLOW`` rule of an OCI seccomp object allows (maybe only for some args)."""
    return frozenset(
        name
        for rule in seccomp.get("syscalls", ())
        if rule["action"] == "SCMP_ACT_ALLOW"
        for name in rule["names"]
    )


def _applies(rule: Mapping[str, Any], caps: frozenset[str], arch: str, kernel: KernelVersion) -> bool:
    excludes = rule.get("excludes") or {}
    if arch in (excludes.get("arches") or ()):
        return False
    if any(cap in caps for cap in excludes.get("caps") or ()):
        return False
    if excludes.get("minKernel") and kernel >= _parse_min_kernel(excludes["minKernel"]):
        return False
    includes = rule.get("includes") or {}
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if not all(cap in caps for cap in includes.get("caps") or ()):
        return False
    return not (includes.get("minKernel") and kernel < _parse_min_kernel(includes["minKernel"]))


def _oci_syscall(rule: Mapping[str, Any]) -> dict[str, Any]:
    names = rule.get("names") or []
    if rule.get("name"):
        if names:
            raise ValueError("seccomp rule specifies both 'name' and 'names'")
        names = [rule["name"]]  # the pre-"names" profile format
    syscall: dict[str, Any] = {"names": list(names), "action": rule["action"]}
    if rule.get("errnoRet") is not None:
        syscall["errnoRet"] = rule["errnoRet"]
    if rule.get("args"):
        syscall["args"] = [_oci_arg(arg) for arg in rule["args"]]
    return syscall


def _oci_arg(arg: Mapping[str, Any]) -> dict[str, Any]:
    oci = {"index": arg["index"], "value": arg.get("value", 0), "op": arg["op"]}
    if arg.get("valueTwo"):  # omitted when 0, as runtime-spec's Go type marshals it
        oci["valueTwo"] = arg["valueTwo"]
    return oci


def _parse_min_kernel(text: object) -> KernelVersion:
    match = _MIN_KERNEL.fullmatch(text) if isinstance(text, str) else None
    if match is None or (int(match[1]), int(match[2])) == (0, 0):
        raise ValueError(f'invalid minKernel {text!r}, expected "<kernel>.<major>" other than 0.0')
    return int(match[1]), int(match[2])


def _host_kernel() -> KernelVersion:
    # As moby: "6.1.0-18-amd64", "3.12.25-gentoo" and "3.12-rc5" are compared by version and major only.
    release = os.uname().release
    match = _RELEASE.match(release)
    if match is None:
        raise ValueError(f"cannot parse the kernel release {release!r}")
    return int(match[1]), int(match[2])


@functools.cache
def _default_profile() -> Mapping[str, Any]:
    text = resources.files(PROFILE_PACKAGE).joinpath(PROFILE_RESOURCE).read_text(encoding="utf-8")
    profile: Mapping[str, Any] = json.loads(text)
    return profile
