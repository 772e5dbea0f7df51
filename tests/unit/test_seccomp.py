"""moby's default seccomp profile resolved into the OCI object runc loads, as moby's setupSeccomp does.

Kernel versions are passed explicitly so the results do not depend on the machine running the tests.
Loading the result into a real runc is integration work and lives with the netns driver's tests.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.orchestrator.drivers.seccomp import (
    DEFAULT_CAPABILITIES,
    MOBY_DEFAULT_CAPABILITIES,
    allowed_syscalls,
    convert_profile,
    oci_seccomp,
)

NEW_KERNEL = (6, 1)
OLD_KERNEL = (4, 4)
ENOSYS = 38
EPERM = 1


def rules_for(seccomp: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [rule for rule in seccomp.get("syscalls", ()) if name in rule["names"]]


def profile_of(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": list(rules)}


def default_for(caps: tuple[str, ...] = DEFAULT_CAPABILITIES, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("kernel", NEW_KERNEL)
    return oci_seccomp(caps, **kwargs)


def test_default_capabilities_are_mobys_without_raw_sockets_or_mknod() -> None:
    assert "CAP_NET_RAW" not in DEFAULT_CAPABILITIES
    assert "CAP_MKNOD" not in DEFAULT_CAPABILITIES
    assert set(MOBY_DEFAULT_CAPABILITIES) - set(DEFAULT_CAPABILITIES) == {"CAP_NET_RAW", "CAP_MKNOD"}
    assert not {"CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_NET_ADMIN"} & set(DEFAULT_CAPABILITIES)


def test_denies_by_default_with_eperm_on_amd64_and_its_compat_abis() -> None:
    seccomp = default_for()
    assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO"
    assert seccomp["defaultErrnoRet"] == EPERM
    assert seccomp["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]


@pytest.mark.parametrize(
    ("arch", "architectures"),
    [
        ("amd64", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
        ("arm64", ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]),
        ("s390x", ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"]),
        ("riscv64", ["SCMP_ARCH_RISCV64"]),
        # Known to moby but not mapped by the profile: runc then filters the native arch only.
        ("ppc64le", None),
    ],
)
def test_architectures_follow_the_arch_map(arch: str, architectures: list[str] | None) -> None:
    assert default_for(arch=arch).get("architectures") == architectures


@pytest.mark.parametrize("arch", ["x86_64", "AMD64", "", "sparc"])
def test_unknown_arch_is_rejected(arch: str) -> None:
    with pytest.raises(ValueError, match="architecture"):
        oci_seccomp(DEFAULT_CAPABILITIES, arch, kernel=NEW_KERNEL)


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("read", True),
        ("write", True),
        ("openat", True),
        ("execve", True),
        ("io_uring_setup", False),  # moby dropped io_uring from the default profile
        ("chroot", True),  # CAP_SYS_CHROOT is kept
        ("arch_prctl", True),  # amd64 only
        ("socket", True),  # but not every family: see the AF_VSOCK test
        ("mount", False),
        ("umount2", False),
        ("unshare", False),
        ("setns", False),
        ("bpf", False),
        ("kexec_load", False),
        ("init_module", False),
        ("reboot", False),
        ("open_by_handle_at", False),
        ("clock_settime", False),
        ("kcmp", False),
        ("iopl", False),
        ("s390_runtime_instr", False),
        ("clone3", False),  # answered with ENOSYS instead: see below
    ],
)
def test_default_capabilities_allow(name: str, allowed: bool) -> None:
    assert (name in allowed_syscalls(default_for())) is allowed


@pytest.mark.parametrize(
    ("cap", "unlocks"),
    [
        ("CAP_SYS_ADMIN", {"mount", "umount2", "unshare", "setns", "sethostname", "bpf", "clone3"}),
        ("CAP_SYS_PTRACE", {"kcmp", "pidfd_getfd", "process_madvise"}),
        ("CAP_SYS_MODULE", {"init_module", "finit_module", "delete_module"}),
        ("CAP_SYS_TIME", {"settimeofday", "clock_settime"}),
        ("CAP_SYS_BOOT", {"reboot"}),
        ("CAP_DAC_READ_SEARCH", {"open_by_handle_at"}),
        ("CAP_SYS_RAWIO", {"iopl", "ioperm"}),
    ],
)
def test_capability_gated_syscalls_need_their_capability(cap: str, unlocks: set[str]) -> None:
    without = allowed_syscalls(default_for())
    with_cap = allowed_syscalls(default_for((*DEFAULT_CAPABILITIES, cap)))
    assert not unlocks & without
    assert unlocks <= with_cap


def test_chroot_follows_cap_sys_chroot() -> None:
    caps = tuple(cap for cap in DEFAULT_CAPABILITIES if cap != "CAP_SYS_CHROOT")
    assert "chroot" not in allowed_syscalls(default_for(caps))


def test_clone3_fails_with_enosys_without_sys_admin_so_libc_falls_back_to_clone() -> None:
    seccomp = default_for()
    assert rules_for(seccomp, "clone3") == [
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}
    ]
    # clone itself is allowed only without namespace flags (CLONE_NEWNS|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
    # |NEWCGROUP masked to 0), on argument 0 outside s390.
    (clone,) = rules_for(seccomp, "clone")
    assert clone["action"] == "SCMP_ACT_ALLOW"
    assert clone["args"] == [{"index": 0, "value": 0x7E020000, "op": "SCMP_CMP_MASKED_EQ"}]


def test_sys_admin_gets_clone3_and_unconditional_clone() -> None:
    seccomp = default_for((*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"))
    assert all(rule["action"] == "SCMP_ACT_ALLOW" for rule in rules_for(seccomp, "clone3"))
    assert [rule.get("args") for rule in rules_for(seccomp, "clone")] == [None]


def test_s390_checks_clone_flags_on_its_second_argument() -> None:
    (clone,) = rules_for(default_for(arch="s390x"), "clone")
    assert clone["args"][0]["index"] == 1


@pytest.mark.parametrize(
    ("caps", "kernel", "allowed"),
    [
        (DEFAULT_CAPABILITIES, NEW_KERNEL, True),
        (DEFAULT_CAPABILITIES, (4, 8), True),
        # Before 4.8 ptrace could bypass seccomp, so only CAP_SYS_PTRACE grants it.
        (DEFAULT_CAPABILITIES, (4, 7), False),
        (DEFAULT_CAPABILITIES, OLD_KERNEL, False),
        ((*DEFAULT_CAPABILITIES, "CAP_SYS_PTRACE"), OLD_KERNEL, True),
    ],
)
def test_ptrace_needs_kernel_4_8_or_cap_sys_ptrace(
    caps: tuple[str, ...], kernel: tuple[int, int], allowed: bool
) -> None:
    allowed_names = allowed_syscalls(oci_seccomp(caps, kernel=kernel))
    assert ({"ptrace", "process_vm_readv", "process_vm_writev"} <= allowed_names) is allowed


def test_socket_families_exclude_af_vsock() -> None:
    conditions = [rule["args"] for rule in rules_for(default_for(), "socket")]
    assert conditions == [
        [{"index": 0, "value": 38, "op": "SCMP_CMP_LT"}],
        [{"index": 0, "value": 39, "op": "SCMP_CMP_EQ"}],
        [{"index": 0, "value": 40, "op": "SCMP_CMP_GT"}],
    ]  # AF_VSOCK is 40 and AF_ALG 38: neither is allowed


@pytest.mark.parametrize(
    ("arch", "present", "absent"),
    [
        ("amd64", {"arch_prctl", "modify_ldt"}, {"arm_fadvise64_64", "s390_runtime_instr"}),
        ("arm64", {"arm_fadvise64_64", "breakpoint"}, {"arch_prctl", "modify_ldt"}),
        ("s390x", {"s390_runtime_instr"}, {"arch_prctl"}),
    ],
)
def test_arch_specific_syscalls(arch: str, present: set[str], absent: set[str]) -> None:
    allowed_names = allowed_syscalls(default_for(arch=arch))
    assert present <= allowed_names
    assert not absent & allowed_names


def test_output_is_pure_oci_and_serialisable() -> None:
    seccomp = default_for()
    assert set(seccomp) == {"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}
    for rule in seccomp["syscalls"]:
        assert set(rule) <= {"names", "action", "errnoRet", "args"}
        assert rule["names"]
    assert json.loads(json.dumps(seccomp)) == seccomp


def test_results_do_not_share_state() -> None:
    first = default_for()
    first["syscalls"][0]["names"].clear()
    first["architectures"].clear()
    second = default_for()
    assert second["syscalls"][0]["names"]
    assert second["architectures"]


def test_host_kernel_is_used_when_none_is_given() -> None:
    seccomp = oci_seccomp(DEFAULT_CAPABILITIES)
    assert "read" in allowed_syscalls(seccomp)


# The filter semantics on small profiles, one rule each, mirroring moby's conditional rules.
@pytest.mark.parametrize(
    ("rule", "caps", "arch", "kernel", "kept"),
    [
        ({}, (), "amd64", NEW_KERNEL, True),
        ({"includes": {"caps": ["CAP_A", "CAP_B"]}}, ("CAP_A",), "amd64", NEW_KERNEL, False),
        ({"includes": {"caps": ["CAP_A", "CAP_B"]}}, ("CAP_A", "CAP_B"), "amd64", NEW_KERNEL, True),
        ({"excludes": {"caps": ["CAP_A", "CAP_B"]}}, ("CAP_B",), "amd64", NEW_KERNEL, False),
        ({"excludes": {"caps": ["CAP_A", "CAP_B"]}}, ("CAP_C",), "amd64", NEW_KERNEL, True),
        ({"includes": {"arches": ["arm64"]}}, (), "amd64", NEW_KERNEL, False),
        ({"includes": {"arches": ["arm64"]}}, (), "arm64", NEW_KERNEL, True),
        ({"excludes": {"arches": ["arm64"]}}, (), "arm64", NEW_KERNEL, False),
        ({"includes": {"minKernel": "5.10"}}, (), "amd64", (5, 9), False),
        ({"includes": {"minKernel": "5.10"}}, (), "amd64", (5, 10), True),
        ({"includes": {"minKernel": "5.10"}}, (), "amd64", (6, 0), True),
        ({"excludes": {"minKernel": "5.10"}}, (), "amd64", (5, 10), False),
        ({"excludes": {"minKernel": "5.10"}}, (), "amd64", (5, 9), True),
        ({"includes": {"minKernel": ""}}, (), "amd64", OLD_KERNEL, True),
        # excludes win over includes
        (
            {"includes": {"caps": ["CAP_A"]}, "excludes": {"caps": ["CAP_A"]}},
            ("CAP_A",),
            "amd64",
            NEW_KERNEL,
            False,
        ),
    ],
)
def test_rule_filters(
    rule: dict[str, Any], caps: tuple[str, ...], arch: str, kernel: tuple[int, int], kept: bool
) -> None:
    result = convert_profile(
        profile_of({"names": ["x"], "action": "SCMP_ACT_ALLOW", **rule}), caps, arch, kernel=kernel
    )
    assert ("x" in allowed_syscalls(result)) is kept


def test_legacy_name_field_becomes_names() -> None:
    profile = profile_of({"name": "chmod", "action": "SCMP_ACT_ALLOW"})
    assert convert_profile(profile, (), kernel=NEW_KERNEL)["syscalls"] == [
        {"names": ["chmod"], "action": "SCMP_ACT_ALLOW"}
    ]


@pytest.mark.parametrize(
    "profile",
    [
        {"syscalls": []},
        {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["A"], "archMap": [{"architecture": "A"}]},
        profile_of({"name": "a", "names": ["b"], "action": "X"}),
        *(
            profile_of({"names": ["a"], "action": "X", "includes": {"minKernel": v}})
            for v in ("0.0", "3", ".3", "3.", "4.15abc", "3.12.1", 3)
        ),
    ],
)
def test_malformed_profiles_are_rejected(profile: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        convert_profile(profile, (), kernel=NEW_KERNEL)
