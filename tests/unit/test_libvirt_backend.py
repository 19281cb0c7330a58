"""The libvirt backend's pure parts: which URIs ``--connect`` takes, libvirt's error codes as vmkit's
error classes, and the CLI's handling of ``--connect`` / ``VMKIT_CONNECT`` (no daemon needed: a
URI whose socket nobody serves is refused as unreachable)."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from conftest import vmkit
from vmkit.backends import resolve_connect
from vmkit.backends.libvirt.connection import check_uri, translate
from vmkit.errors import (
    AlreadyExistsError,
    ConfigError,
    ExitCode,
    HostError,
    MigrationError,
    NotFoundError,
    StateError,
    UnreachableError,
)


@pytest.mark.parametrize("uri", ["qemu:///system", "qemu:///session", "qemu+ssh://root@h1/system",
                                 "qemu+tcp://10.0.0.2/system", "qemu:///system?socket=/tmp/x/libvirt-sock"])
def test_libvirt_uris_are_taken(uri: str) -> None:
    assert resolve_connect(uri) == uri


@pytest.mark.parametrize(("uri", "words"), [
    ("ssh://h1", "use --host"), ("xen:///system", "only libvirt's QEMU driver"),
    ("qemu://h1/", "/system or /session"), ("qemu:///system\n", "control characters"),
    ("qemu+ssh://u:pw@h/system", "no password"), ("qemu:///sys tem", "no spaces"),
])
def test_other_uris_are_refused_naming_the_option(uri: str, words: str) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve_connect(uri)
    assert exc.value.problems[0].field == "--connect" and words in exc.value.message


def _err(code: int, message: str = "it failed") -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, 0, message, 2, None, None, None, 0, 0)
    return exc


@pytest.mark.parametrize(("code", "cls", "exit_code"), [
    (libvirt.VIR_ERR_NO_DOMAIN, NotFoundError, ExitCode.NOT_FOUND),
    (libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT, NotFoundError, ExitCode.NOT_FOUND),
    (libvirt.VIR_ERR_OPERATION_INVALID, StateError, ExitCode.WRONG_STATE),
    (libvirt.VIR_ERR_DOM_EXIST, AlreadyExistsError, ExitCode.CONFLICT),
    (libvirt.VIR_ERR_NO_SUPPORT, HostError, ExitCode.HOST_MISSING),
    (libvirt.VIR_ERR_OPERATION_UNSUPPORTED, HostError, ExitCode.HOST_MISSING),
    (libvirt.VIR_ERR_RPC, UnreachableError, ExitCode.UNREACHABLE),
    (libvirt.VIR_ERR_AUTH_FAILED, UnreachableError, ExitCode.UNREACHABLE),
])
def test_libvirt_errors_become_vmkits(code: int, cls: type, exit_code: ExitCode) -> None:
    out = translate(_err(code), operation="start", name="web", uri="qemu:///system")
    assert isinstance(out, cls) and out.exit_code == exit_code


def test_a_failed_migration_is_a_migration_error() -> None:
    out = translate(_err(libvirt.VIR_ERR_OPERATION_FAILED, "migration job: unexpectedly failed"),
                    operation="migrate", name="web")
    assert isinstance(out, MigrationError) and "unexpectedly failed" in out.message


def test_check_uri_keeps_the_query() -> None:
    assert check_uri("qemu+ssh://h/system?keyfile=/k&no_verify=1").endswith("no_verify=1")


def test_cli_connect_unreachable_and_env(tmp_path: Path, vmkit_home: Path) -> None:
    uri = f"qemu:///system?socket={tmp_path}/none"
    res = vmkit("--connect", uri, "list", check=False)
    assert res.returncode == ExitCode.UNREACHABLE and "cannot connect" in res.stderr
    # VMKIT_CONNECT too: `vmkit list` into a pipe must not answer with this host's machines
    res = vmkit("list", check=False, env={"VMKIT_CONNECT": uri})
    assert res.returncode == ExitCode.UNREACHABLE
    res = vmkit("--host", "ssh://h", "--connect", uri, "list", check=False)
    assert res.returncode == ExitCode.BAD_INPUT
    res = vmkit("--connect", "ssh://h", "list", check=False)
    assert res.returncode == ExitCode.BAD_INPUT and "--host" in res.stderr


@pytest.mark.parametrize(("event_id", "args", "qmp", "data"), [
    (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, (), "RESET", {"guest": True}),
    (libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, (204800,), "BALLOON_CHANGE", {"actual": 200 << 20}),
    (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, ("ua-disk1",), "DEVICE_DELETED", {"device": "ua-disk1"}),
    (libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, (1, 2), "VSERPORT_CHANGE", {"id": "qga0-port", "open": True}),
    (libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, (2, 0), "VSERPORT_CHANGE", {"id": "qga0-port", "open": False}),
    (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, ("vda", 2, 3), "BLOCK_JOB_READY", {"device": "vda", "type": "mirror"}),
    (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, ("vda", 3, 1), "BLOCK_JOB_COMPLETED",
     {"device": "vda", "type": "commit", "error": "the block job failed"}),
    (libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, ("/x", "ua-disk0", 1, "enospc"), "BLOCK_IO_ERROR",
     {"device": "ua-disk0", "action": "stop", "reason": "enospc"}),
    (libvirt.VIR_DOMAIN_EVENT_ID_RTC_CHANGE, (3600,), "RTC_CHANGE", {"offset": 3600}),
])
def test_libvirt_events_map_to_vmkits_qmp_events(event_id: int, args: tuple[object, ...], qmp: str,
                                                  data: dict[str, object]) -> None:
    """libvirt's events are reported as vmkit's supervisor reports QEMU's: ``qmp`` with QEMU's name and fields."""
    from vmkit.backends.libvirt.machines import _QMP_EQUIVALENTS

    _name, convert = _QMP_EQUIVALENTS[event_id]
    assert convert(*args) == (qmp, data)


def test_aio_client_takes_connect_and_refuses_host_with_it() -> None:
    import vmkit.aio

    with pytest.raises(ConfigError) as exc:
        vmkit.aio.Client(connect="qemu:///system", host="ssh://h1")
    assert "connect" in str(exc.value.problems)
    assert vmkit.aio.Client(connect="qemu:///system").connect == "qemu:///system"
    assert vmkit.aio.Client().connect is None


class _Conn:
    def getVersion(self) -> int:
        return 7_002_000  # QEMU 7.2.0


class _Dom:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def name(self) -> str:
        return "web"

    def XMLDesc(self, _flags: int) -> str:
        return f"<domain type='{self.kind}'><name>web</name></domain>"

    def maxMemory(self) -> int:
        return 1 << 20  # KiB: libvirt keeps a domain's memory in whole MiB, so vmkit's RAM pad cannot apply


@pytest.mark.parametrize(("kind", "method", "live"), [
    ("qemu", "auto", False), ("qemu", "paused", False), ("kvm", "auto", True), ("kvm", "live", True),
    ("kvm", "paused", False),
])
def test_libvirt_migration_method_follows_vmkits_safety(kind: str, method: str, live: bool) -> None:
    """Under TCG on QEMU < 9.0 a libvirt migration copies with the guest paused (its RAM cannot be padded:
    pre-copy may lose pages, with one vCPU too); KVM migrates live."""
    from vmkit.backends.libvirt.machines import LibvirtHost

    host = LibvirtHost("qemu:///system")
    host._conn = _Conn()  # type: ignore[assignment]
    got, reason = host._live_method(_Dom(kind), method)  # type: ignore[arg-type]
    assert got is live and reason


def test_libvirt_live_migration_under_tcg_is_refused() -> None:
    from vmkit.backends.libvirt.machines import LibvirtHost

    host = LibvirtHost("qemu:///system")
    host._conn = _Conn()  # type: ignore[assignment]
    with pytest.raises(ConfigError) as exc:
        host._live_method(_Dom("qemu"), "live")  # type: ignore[arg-type]
    assert "--live" in str(exc.value.problems) and "verified page by page" in str(exc.value.problems)
