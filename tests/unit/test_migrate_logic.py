"""Migration's pure logic: host URIs, which method is safe, the page comparison, progress figures,
the configuration moved to the target's directory, and `vmkit --host` in front of a command."""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkit.api import models
from vmkit.backends import resolve, ssh
from vmkit.cli.main import _remote_host
from vmkit.config import MachineConfig
from vmkit.errors import ConfigError
from vmkit.migrate import receive
from vmkit.runtime import migration


@pytest.mark.parametrize(("uri", "host", "user", "port"), [
    ("ssh://example.org", "example.org", None, None),
    ("ssh://root@10.231.0.11", "10.231.0.11", "root", None),
    ("ssh://alice@host-1.lan:2222", "host-1.lan", "alice", 2222),
    ("vmkit+ssh://bob@[fd00::1]:22", "[fd00::1]", "bob", 22),
    ("ssh://h/", "h", None, None),
])
def test_host_uris(uri: str, host: str, user: str | None, port: int | None) -> None:
    h = resolve(uri)
    assert h is not None and (h.host, h.user, h.port) == (host, user, port)


@pytest.mark.parametrize("uri", ["ftp://h", "ssh://", "ssh://h/path", "ssh://h:99999", "ssh://-oProxyCommand=x",
                                 "ssh://u:pw@h", "ssh://h?x=1", "ssh://h x", "ssh://bad user@h", "h"])
def test_bad_host_uris_name_the_option(uri: str) -> None:
    with pytest.raises(ConfigError) as exc:
        ssh.parse(uri)
    assert exc.value.problems[0].field == "--host"


def test_no_uri_is_this_host() -> None:
    assert resolve(None) is None and resolve("") is None and resolve("local://") is None


def test_ssh_argv_quotes_the_remote_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKIT_SSH_CONFIG", "/tmp/cfg")
    monkeypatch.delenv("VMKIT_REMOTE_VMKIT", raising=False)
    argv = ssh.parse("ssh://root@h:2200").vmkit_argv(["exec", "web", "--", "echo", "a b; rm -rf /"])
    assert argv[:3] == ["ssh", "-F", "/tmp/cfg"]
    assert argv[argv.index("-p") + 1] == "2200" and argv[argv.index("-l") + 1] == "root"
    assert argv[-3:-1] == ["--", "h"]
    assert argv[-1] == "vmkit exec web -- echo 'a b; rm -rf /'"
    assert "BatchMode=yes" in argv and "-T" in argv


@pytest.mark.parametrize(("args", "env", "host", "rest"), [
    (["--host", "ssh://h", "list"], None, "ssh://h", ["list"]),
    (["-H", "ssh://h", "list", "--json"], None, "ssh://h", ["list", "--json"]),
    (["--host=ssh://h", "list"], None, "ssh://h", ["list"]),
    (["list"], "ssh://e", "ssh://e", ["list"]),
    (["list"], None, None, ["list"]),
])
def test_host_option_in_front_of_the_command(monkeypatch: pytest.MonkeyPatch, args: list[str], env: str | None,
                                             host: str | None, rest: list[str]) -> None:
    if env is None:
        monkeypatch.delenv("VMKIT_HOST", raising=False)
    else:
        monkeypatch.setenv("VMKIT_HOST", env)
    assert _remote_host(args) == (host, rest)


GIB = 1 << 30
PAD = migration.RAM_PAD


@pytest.mark.parametrize(("accel", "version", "blocks", "method"), [
    ("kvm", (7, 2, 22), [GIB], "live"),
    ("tcg", (7, 2, 22), [GIB], "paused"),  # the 64-page sync fast path: QEMU loses pages
    ("tcg", (7, 2, 22), [GIB + PAD], "live"),  # synced page by page, TLB reset
    ("tcg", (8, 2, 0), [256 << 20], "paused"),
    ("tcg", (8, 2, 0), [(256 << 20) + PAD], "live"),
    ("tcg", (7, 2, 22), [GIB + PAD, GIB], "paused"),  # virtio-mem's backend is aligned
    ("tcg", (7, 2, 22), [], "paused"),
    ("tcg", None, [GIB], "paused"),
    ("tcg", (9, 0, 0), [GIB], "live"),
    ("tcg", (10, 1, 0), [GIB, 4 * GIB], "live"),
])
def test_live_precopy_only_where_dirty_tracking_is_exact(accel: str, version: tuple[int, int, int] | None,
                                                         blocks: list[int], method: str) -> None:
    s = migration.live_safety(accel, version, blocks)
    assert s.method == method
    if method == "paused":
        assert "9.0" in s.reason and "--live" in s.reason


@pytest.mark.parametrize(("accel", "version", "hotplug", "pad"), [
    ("tcg", (7, 2, 22), False, PAD),
    ("tcg", None, False, PAD),
    ("tcg", (7, 2, 22), True, 0),  # virtio-mem: no pad helps, the machine is copied paused
    ("tcg", (9, 0, 0), False, 0),
    ("kvm", (7, 2, 22), False, 0),
])
def test_ram_is_padded_where_qemu_loses_pages(accel: str, version: tuple[int, int, int] | None, hotplug: bool,
                                              pad: int) -> None:
    got = migration.ram_pad(accel, version, hotplug_memory=hotplug)
    assert got == pad
    if got:  # a padded RAM block is no multiple of the fast path's 64 pages, for any configured size
        assert all((m + got) % migration.SYNC_WORD for m in (256 << 20, GIB, 3 * GIB + (2 << 20)))


def test_versions() -> None:
    assert migration.parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)") == (7, 2, 22)
    assert migration.parse_version("9.0") == (9, 0, 0)
    assert migration.parse_version("?.?.?") is None


def _digest(pages: list[bytes]) -> bytes:
    return b"".join(hashlib.blake2b(p, digest_size=migration.DIGEST_BYTES).digest() for p in pages)


def test_bad_pages_are_the_ones_that_differ() -> None:
    pages = [bytes([i]) * migration.PAGE for i in range(10)]
    same = _digest(pages)
    assert migration.bad_pages(same, same) == []
    changed = list(pages)
    changed[3] = b"\1" + changed[3][1:]
    changed[7] = changed[7][:-1] + b"\xff"
    assert migration.bad_pages(same, _digest(changed)) == [3, 7]
    assert migration.bad_pages(same, _digest(pages[:8])) == [8, 9]  # a page one side lacks counts


def test_memory_hash_is_per_page(tmp_path: Path) -> None:
    data = bytearray(b"".join(bytes([i % 256]) * migration.PAGE for i in range(300)))
    f = tmp_path / "mem"
    f.write_bytes(data)
    digest = migration._hash_pages(f)
    assert len(digest) == 300 * migration.DIGEST_BYTES
    d = migration.DIGEST_BYTES
    assert digest[:d] == bytes(d) and digest[d:2 * d] != digest[2 * d:3 * d]
    assert digest[5 * d:6 * d] == digest[261 * d:262 * d]  # the same content, the same hash
    for page, offset, bit in ((7, 0, 1), (42, 4095, 128), (299, 2048, 4)):  # one bit anywhere in a page
        changed = bytearray(data)
        changed[page * migration.PAGE + offset] ^= bit
        f.write_bytes(changed)
        assert migration.bad_pages(digest, migration._hash_pages(f)) == [page]
    f.write_bytes(data[:-100])  # a short last page is padded with zeros
    assert len(migration._hash_pages(f)) == 300 * d


def test_progress_figures_from_query_migrate() -> None:
    info = {"status": "active", "expected-downtime": 312, "total-time": 1500, "cpu-throttle-percentage": 20,
            "ram": {"dirty-sync-count": 4, "transferred": 100, "remaining": 50, "total": 300,
                    "dirty-pages-rate": 1234, "mbps": 880.5}}
    p = models.MigrationProgress.model_validate(migration.progress_of(info))
    assert (p.status, p.rounds, p.remaining_bytes, p.dirty_pages_rate, p.expected_downtime_ms, p.throttle_percent) \
        == ("active", 4, 50, 1234, 312, 20)
    assert migration.progress_of({})["status"] == "none"


@pytest.mark.parametrize(("uri", "ok"), [("tcp:10.0.0.1:4444", True), ("tcp:[fd00::1]:1", True),
                                         ("tcp:host.lan:80", True), ("exec:rm -rf /", False),
                                         ("tcp:10.0.0.1:4444,x=1", False), ("unix:/tmp/s", False)])
def test_migration_uris_are_tcp_only(uri: str, ok: bool) -> None:
    if ok:
        assert models.MigrateRequest(uri=uri).uri == uri
        assert migration.URI_RE.match(uri)
    else:
        with pytest.raises(ValueError, match="uri"):
            models.MigrateRequest(uri=uri)


def test_tcp_uri() -> None:
    assert migration.tcp_uri("10.0.0.1", 5) == "tcp:10.0.0.1:5"
    assert migration.tcp_uri("fd00::1", 5) == "tcp:[fd00::1]:5"


def test_configuration_moves_to_the_target_directory(tmp_path: Path) -> None:
    src, dst = tmp_path / "a" / "web", tmp_path / "b" / "web"
    disk = src / "disk.qcow2"
    shared = tmp_path / "shared.raw"
    config = MachineConfig.model_validate({
        "name": "web", "boot": {"kind": "linux", "kernel": str(tmp_path / "vmlinuz")},
        "storage": [{"attachment": {"type": "disk-image", "path": str(disk)}},
                    {"attachment": {"type": "disk-image", "path": str(shared), "read_only": True}}]})
    moved = receive.rebase(config, src, dst)
    paths = [d.attachment.path for d in moved.storage]  # type: ignore[union-attr]
    assert paths == [dst / "disk.qcow2", shared]
    assert receive.needed_files(moved, dst) == [tmp_path / "vmlinuz", shared]


def test_receiver_aborts_on_end_of_input_and_refuses_garbage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKIT_HOME", str(tmp_path))
    out = io.StringIO()
    assert receive.serve(io.StringIO(""), out) == 1
    assert json.loads(out.getvalue()) == {"aborted": {}}
    out = io.StringIO()
    assert receive.serve(io.StringIO("not json\n"), out) == 2
    assert json.loads(out.getvalue())["error"]["field"] == "<stdin>"
    out = io.StringIO()
    man = {"name": "web", "config": {"name": "web", "boot": {"kind": "linux", "kernel": str(tmp_path / "nope")}},
           "source_dir": "/elsewhere/web"}
    assert receive.serve(io.StringIO(json.dumps({"prepare": man}) + "\n"), out) == 6
    err = json.loads(out.getvalue())["error"]
    assert err["type"] == "HostError" and "the target lacks" in err["message"]
    assert not (tmp_path / "instances" / "web").exists()


@pytest.mark.parametrize(("args", "field"), [
    (["--offline", "--live"], "--offline"),
    (["--offline", "--copy-storage"], "--offline"),
    (["--copy-storage", "--shared-storage"], "--copy-storage"),
    (["--live", "--paused"], "--live"),
])
def test_migrate_options_that_do_not_go_together(args: list[str], field: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "vmkit.cli.main", "migrate", "web", "ssh://h", *args],
                         capture_output=True, text=True, env={**os.environ, "VMKIT_HOME": str(tmp_path)}, timeout=60)
    assert res.returncode == 2 and field in res.stderr, res.stderr


def test_migrating_an_unknown_machine_or_to_a_bad_uri(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "VMKIT_HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "vmkit.cli.main", "migrate", "web", "ssh://h"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert res.returncode == 3 and "web" in res.stderr
    res = subprocess.run([sys.executable, "-m", "vmkit.cli.main", "--host", "ssh://a b", "list"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert res.returncode == 2 and "--host" in res.stderr


def test_the_target_checks_the_machines_networks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmkit.errors import AlreadyExistsError, NotFoundError
    from vmkit.net.store import NetworkStore

    monkeypatch.setenv("VMKIT_HOME", str(tmp_path))
    config = MachineConfig.model_validate({"name": "web", "boot": {"kind": "linux", "kernel": "/k"}, "networks": [
        {"network": "span", "mac": "52:54:00:12:34:56", "address": "10.119.3.2"}]})
    with pytest.raises(NotFoundError) as missing:
        receive.check_networks(config, {"span": "10.119.3.0/24"})
    assert "network 'span' does not exist on the target" in missing.value.message
    assert "--subnet 10.119.3.0/24" in str(missing.value.hint)

    store = NetworkStore()
    store.create("span", subnet="10.119.4.0/24", mode="rootless", up=False)
    with pytest.raises(ConfigError) as other:
        receive.check_networks(config, {"span": "10.119.3.0/24"})
    assert other.value.problems[0].field == "networks[0].network" and "10.119.4.0/24" in other.value.problems[0].message
    store.delete("span")

    store.create("span", subnet="10.119.3.0/24", mode="rootless", up=False)
    receive.check_networks(config, {"span": "10.119.3.0/24"})  # free there: fine
    store.join("span", "db", address="10.119.3.2")
    with pytest.raises(AlreadyExistsError) as taken:
        receive.check_networks(config, {"span": "10.119.3.0/24"})
    assert taken.value.message == "address 10.119.3.2 on network 'span' belongs to machine 'db' on the target"
    store.leave("span", "db")
    store.join("span", "db", mac="52:54:00:12:34:56", address="10.119.3.9")
    with pytest.raises(AlreadyExistsError, match="MAC 52:54:00:12:34:56 on network 'span' belongs to machine 'db'"):
        receive.check_networks(config, {"span": "10.119.3.0/24"})


def test_client_calls_cross_hosts_as_tagged_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vmkit
    from vmkit.client import remote
    from vmkit.client.sync import Instance, RemoteClient, RemoteInstance

    monkeypatch.setenv("VMKIT_HOME", str(tmp_path))
    status = models.MigrationInfo(state="running", status="none", query={})
    value = {"a": [status, Path("/x/y"), b"\0\1", (1, "two")], "n": None}
    wire = json.loads(json.dumps(remote.encode(value)))
    assert wire["a"][0]["$model"] == "vmkit.api.models:MigrationInfo"
    client = vmkit.Client(host="ssh://root@10.231.0.11")
    assert isinstance(client, RemoteClient)
    back = remote.decode(wire, client, Instance)
    assert back == {"a": [status, Path("/x/y"), b"\0\1", [1, "two"]], "n": None}
    handle = remote.decode({"$instance": "web"}, client, Instance)
    assert isinstance(handle, RemoteInstance) and handle.name == "web" and "on ssh://" in repr(handle)
    with pytest.raises(ConfigError, match="callback"):
        remote.encode(print)
    with pytest.raises(ConfigError, match="not a vmkit model"):
        remote.decode({"$model": "os:system", "data": "true"})
    with pytest.raises(ConfigError) as both:
        vmkit.Client(tmp_path, host="ssh://h")
    assert both.value.problems[0].field == "home"
    with pytest.raises(ConfigError) as bad:
        vmkit.Client(host="ftp://h")
    assert bad.value.problems[0].field == "host"
    assert type(vmkit.Client(host="local://")) is vmkit.Client

    # the other side: one request in, one answer out; only public methods
    def serve(request: str) -> tuple[int, dict[str, object]]:
        out = io.StringIO()
        code = remote.serve(vmkit.Client(), Instance, io.StringIO(request + "\n"), out)
        return code, json.loads(out.getvalue())

    assert serve(json.dumps({"instance": None, "method": "rows"})) == (0, {"result": []})
    code, answer = serve(json.dumps({"instance": None, "method": "_call", "args": ["x"]}))
    assert code == 2 and answer["error"]["field"] == "method"  # type: ignore[index]
    assert serve(json.dumps({"instance": "nope", "method": "start"}))[0] == 3
    assert serve("garbage")[0] == 2


def test_tls_certificates_for_one_migration(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from vmkit.migrate import tls

    files = tls.make("10.231.0.11")
    ca = x509.load_pem_x509_certificate(files["ca-cert.pem"])
    server = x509.load_pem_x509_certificate(files["server-cert.pem"])
    client = x509.load_pem_x509_certificate(files["client-cert.pem"])
    for cert, usage in ((server, ExtendedKeyUsageOID.SERVER_AUTH), (client, ExtendedKeyUsageOID.CLIENT_AUTH)):
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
        key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage)  # what QEMU 10.0 checks, critical
        assert key_usage.critical and key_usage.value.digital_signature and key_usage.value.key_encipherment
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.231.0.11"]
    assert isinstance(client.public_key(), ec.EllipticCurvePublicKey)
    assert tls.make("10.231.0.11")["ca-cert.pem"] != files["ca-cert.pem"]  # one CA per migration

    d = tls.write(tmp_path, files, tls.CLIENT_FILES)
    assert sorted(p.name for p in d.iterdir()) == sorted(tls.CLIENT_FILES)
    assert d.stat().st_mode & 0o777 == 0o700 and all(p.stat().st_mode & 0o777 == 0o600 for p in d.iterdir())
    tls.remove(tmp_path)
    assert not d.exists()


def test_pages_the_guest_reported_free_are_told_apart_from_lost_ones(tmp_path: Path) -> None:
    """A whole aligned 2 MiB block of zeros on the source (the guest reported it free, QEMU discarded it
    there) that differs on the target is given back, not lost; a zero page elsewhere that differs, or a
    block with one non-zero page, is lost."""
    n = migration.REPORT_BLOCK_PAGES
    source = bytearray(b"".join(bytes([1 + i % 200]) * migration.PAGE for i in range(3 * n)))
    source[n * migration.PAGE:2 * n * migration.PAGE] = bytes(n * migration.PAGE)  # block 1: discarded here
    target = bytearray(b"\x07" * len(source))  # what was sent before: differs everywhere
    target[:n * migration.PAGE] = source[:n * migration.PAGE]  # block 0 arrived whole
    target[2 * n * migration.PAGE:] = source[2 * n * migration.PAGE:]  # and block 2 too ...
    target[(2 * n + 5) * migration.PAGE] ^= 1  # ... but for one page the migration lost
    (tmp_path / "s").write_bytes(source)
    (tmp_path / "t").write_bytes(target)
    got = migration.compare_pages(migration._hash_pages(tmp_path / "s"), migration._hash_pages(tmp_path / "t"))
    assert got.given_back == list(range(n, 2 * n)) and got.lost == [2 * n + 5]
    digest = migration._hash_pages(tmp_path / "s")
    assert migration.describe_pages(digest, got.lost) == "0 of them zeros on the source, in 1 2 MiB block"
    assert migration.describe_pages(digest, [n, n + 1, 0]) == "2 of them zeros on the source, in 2 2 MiB blocks"
    source[(n + 9) * migration.PAGE] = 1  # the block is no longer all zeros: its differences are losses
    (tmp_path / "s").write_bytes(source)
    got = migration.compare_pages(migration._hash_pages(tmp_path / "s"), migration._hash_pages(tmp_path / "t"))
    assert got.given_back == [] and len(got.lost) == n + 1
    half = bytes(migration._hash_pages(tmp_path / "s"))[:(n // 2) * migration.DIGEST_BYTES]  # no whole block
    assert migration.compare_pages(bytes(len(half)), half).given_back == []


def test_the_phases_add_up_to_the_wait_when_the_receiver_was_prestarted() -> None:
    """A receiver started before the migration's clock (vmkit migrate spawns it while it loads) counts only the
    part of its start the source waited for; one started after it counts whole, and ssh is the rest."""
    from vmkit.migrate.send import _target_phases

    timings = {"prepare_s": 0.04, "qemu_start_s": 0.12, "receiver_up_s": 0.9}
    early = _target_phases({"timings": timings}, waited=0.36)
    assert early["receiver_start"] == pytest.approx(0.2) and early["ssh"] == pytest.approx(0.0)
    assert sum(early.values()) == pytest.approx(0.36)
    late = _target_phases({"timings": {**timings, "receiver_up_s": 0.05}}, waited=0.6)
    assert late["receiver_start"] == pytest.approx(0.05) and late["ssh"] == pytest.approx(0.39)
    assert _target_phases({}, waited=0.3) == {"ssh": 0.3, "receiver_start": 0.0, "prepare": 0.0, "qemu_start": 0.0}


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (a socket's path must fit in 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="vk", dir="/tmp") as d:
        yield Path(d)


def test_ssh_shares_one_connection_per_host_in_a_private_directory(monkeypatch: pytest.MonkeyPatch,
                                                                   short_tmp: Path) -> None:
    """Like ControlPersist: a master connection per host, its socket in a 0700 directory of this user;
    VMKIT_SSH_PERSIST sets how long it outlives its last command, 0 turns sharing off."""
    tmp_path = short_tmp
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("VMKIT_SSH_PERSIST", raising=False)
    argv = ssh.parse("ssh://h").ssh_argv(["true"])
    assert f"ControlPath={runtime}/vmkit/ssh/%C" in argv and "ControlMaster=auto" in argv
    assert "ControlPersist=60" in argv
    assert oct((runtime / "vmkit" / "ssh").stat().st_mode & 0o777) == oct(0o700)
    monkeypatch.setenv("VMKIT_SSH_PERSIST", "5")
    assert "ControlPersist=5" in ssh.parse("ssh://h").ssh_argv(["true"])
    monkeypatch.setenv("VMKIT_SSH_PERSIST", "0")
    assert not any(a.startswith("Control") for a in ssh.parse("ssh://h").ssh_argv(["true"]))
    monkeypatch.setenv("VMKIT_SSH_PERSIST", "a minute")
    with pytest.raises(ConfigError) as err:
        ssh.parse("ssh://h").ssh_argv(["true"])
    assert err.value.exit_code == 2 and "VMKIT_SSH_PERSIST" in str(err.value)
    monkeypatch.delenv("VMKIT_SSH_PERSIST")
    deep = tmp_path / ("d" * 60)  # the socket's path would not fit in a sockaddr_un: nothing shared
    deep.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    assert not any(a.startswith("Control") for a in ssh.parse("ssh://h").ssh_argv(["true"]))
    open_dir = tmp_path / "open"  # another user could plant sockets there: nothing shared
    (open_dir / "vmkit" / "ssh").mkdir(parents=True)
    open_dir.chmod(0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(open_dir))
    assert not any(a.startswith("Control") for a in ssh.parse("ssh://h").ssh_argv(["true"]))
