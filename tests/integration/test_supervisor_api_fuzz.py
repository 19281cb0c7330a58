"""Hostile input against a live supervisor (one micro guest, booted once for the module): every
answer is JSON, either a success or the one error object, never a 5xx for bad input, and the
machine keeps running through all of it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import image_cache_dir, pid_alive, processes_mentioning, vmkit, wait_until
from vmkit.host.images.store import Image
from vmkit.host.instance import Instance
from vmkit.state import file as statefile
from vmkit.state import key as keys

pytestmark = pytest.mark.integration

MiB = 1 << 20


@dataclass
class Answer:
    status: int
    content_type: str
    body: Any
    lines: list[dict[str, Any]]


async def _request(sock: Path, method: str, path: str, data: bytes | None, timeout: float) -> Answer:
    conn = aiohttp.UnixConnector(path=str(sock))
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
            s.request(method, f"http://vmkit{path}", data=data,
                      headers={"Content-Type": "application/json"} if data is not None else {}) as r:
        raw = await r.read()
        ctype = r.content_type
    if ctype == "application/x-ndjson":
        lines = [json.loads(ln) for ln in raw.splitlines() if ln.strip()]
        return Answer(r.status, ctype, None, lines)
    body = json.loads(raw) if ctype == "application/json" else raw.decode(errors="replace")
    return Answer(r.status, ctype, body, [])


def call(sock: Path, method: str, path: str, data: bytes | None = None, timeout: float = 120) -> Answer:
    return asyncio.run(_request(sock, method, path, data, timeout))


def check(ans: Answer, *, bad: bool = False) -> Answer:
    """A well-formed answer: JSON, a success or the one error object (4xx for bad input)."""
    assert ans.content_type in ("application/json", "application/x-ndjson"), (ans.status, ans.body)
    assert ans.status < 500, f"{ans.status}: {ans.body}"
    if ans.status >= 400:
        err = ans.body["error"]
        assert isinstance(err["message"], str) and err["message"]
        assert isinstance(err["type"], str) and isinstance(err["exit_code"], int) and err["exit_code"] > 0
        assert set(err) <= {"type", "message", "field", "hint", "exit_code"}
    elif ans.content_type == "application/x-ndjson":
        assert ans.lines and ("result" in ans.lines[-1] or "error" in ans.lines[-1]), ans.lines
    if bad:
        assert 400 <= ans.status < 500 or (ans.lines and "error" in ans.lines[-1]), (ans.status, ans.body, ans.lines)
    return ans


@dataclass
class Live:
    inst: Instance
    home: Path

    @property
    def sock(self) -> Path:
        return self.inst.api_socket

    def state(self) -> str:
        return str(call(self.sock, "GET", "/v1/state").body["state"])

    def assert_running(self) -> None:
        if self.state() == "paused":
            check(call(self.sock, "POST", "/v1/resume"))
        status = self.inst.read_status()
        assert self.state() == "running"
        assert status.qemu_pid is not None and pid_alive(status.qemu_pid)
        assert status.supervisor_pid is not None and pid_alive(status.supervisor_pid)


@pytest.fixture(scope="module")
def live(micro_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    home = tmp_path_factory.mktemp("fuzz") / "home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMKIT_HOME", str(home))
        mp.setenv("VMKIT_IMAGE_CACHE", str(image_cache_dir()))
        vmkit("create", "fz", "--image", "micro", "--memory", "384M")
        vmkit("start", "fz")
        inst = Instance("fz", home / "instances")
        try:
            yield Live(inst, home)
        finally:
            if inst.is_supervised():
                vmkit("stop", "--force", "fz", check=False)
            for pid in processes_mentioning(str(home)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


NOT_JSON = [b"not json", b"{", b"\xff\xfe\x00", b"[" * 60_000, b'{"timeout": NaN}', b'{"a": Infinity}',
            b"{\"timeout\": 1" + b"0" * 5000 + b"}"]
NOT_OBJECTS = [b"[]", b"null", b"1", b'"x"', b"true"]
OVERSIZE = b'{"x": "' + b"x" * (256 << 10) + b'"}'
WRONG_FIELDS = [b'{"unknown": 1}', b'{"timeout": true}', b'{"timeout": "10"}', b'{"timeout": -1}',
                b'{"timeout": 1e400}', b'{"timeout": 1e300}', b'{"timeout": [1]}', b'{"timeout": {"a": 1}}',
                '{"\u00fc\u202e\U0001f600": "\u0000"}'.encode()]
HOSTILE = NOT_JSON + NOT_OBJECTS + [OVERSIZE] + WRONG_FIELDS

# routes that must never succeed with these bodies (a valid call would stop or save the machine)
DANGEROUS = [("POST", "/v1/stop"), ("POST", "/v1/request-stop"), ("POST", "/v1/save"),
             ("POST", "/v1/snapshots"), ("POST", "/v1/snapshots/x/revert"), ("DELETE", "/v1/disks/x"),
             ("DELETE", "/v1/snapshots/x"), ("POST", "/v1/disks"), ("POST", "/v1/ports")]


@pytest.mark.parametrize(("method", "path"), DANGEROUS)
def test_hostile_bodies_are_refused_as_json(live: Live, method: str, path: str) -> None:
    for body in HOSTILE:
        ans = check(call(live.sock, method, path, body), bad=True)
        if body == OVERSIZE:
            assert ans.status == 413 and ans.body["error"]["field"] == "<body>"
    live.assert_running()


def test_pause_and_resume_take_no_body(live: Live) -> None:
    for body in HOSTILE:
        for route in ("/v1/pause", "/v1/resume"):
            check(call(live.sock, "POST", route, body), bad=True)
    check(call(live.sock, "POST", "/v1/pause", b"{}"))
    assert check(call(live.sock, "POST", "/v1/pause")).status == 409  # already paused: StateError
    check(call(live.sock, "POST", "/v1/resume"))
    live.assert_running()


def test_unknown_paths_methods_and_traversal(live: Live) -> None:
    for method, path, status in [("GET", "/v1/nope", 404), ("GET", "/", 404), ("PUT", "/v1/state", 405),
                                 ("DELETE", "/v1/pause", 405), ("GET", "/v1/disks/../../etc/passwd", 404),
                                 ("DELETE", "/v1/disks/..%2F..%2Fetc%2Fpasswd", 404),
                                 ("DELETE", "/v1/disks/disk0%00", 404),
                                 ("POST", "/v1/snapshots/..%2F..%2Fx/revert", 400),
                                 ("DELETE", "/v1/snapshots/%E2%80%AE%F0%9F%98%80", 400),
                                 ("GET", "/v1/console", 400)]:  # not a websocket handshake
        ans = check(call(live.sock, method, path), bad=True)
        assert ans.status == status, (method, path, ans.status, ans.body)
    live.assert_running()


def test_disk_attach_is_checked_like_vm_yaml(live: Live, tmp_path: Path) -> None:
    def attach(body: dict[str, Any]) -> dict[str, Any]:
        ans = check(call(live.sock, "POST", "/v1/disks", json.dumps(body).encode()), bad=True)
        assert ans.status == 400, ans.body
        return dict(ans.body["error"])

    # a relative path was opened by QEMU against the supervisor's working directory
    err = attach({"attachment": {"type": "disk-image", "path": "../../etc/passwd", "read_only": True}})
    assert err["field"] == "attachment.path" and "relative" in err["message"] and err["exit_code"] == 2
    assert Path(f"/proc/{live.inst.read_status().supervisor_pid}/cwd").resolve() == live.inst.dir
    assert attach({"attachment": {"type": "disk-image", "path": "/nonexistent/x.raw"}})["field"] == "attachment.path"
    assert attach({"attachment": {"type": "disk-image", "path": "/tmp/a\u0000b"}})["field"] == "attachment.path"
    assert "NUL" in attach({"attachment": {"type": "disk-image", "path": "/tmp/a\u0000b"}})["message"]
    assert attach({"attachment": {"type": "disk-image", "path": str(tmp_path), "read_only": 1}})["field"] \
        == "attachment.read_only"
    assert attach({"attachment": {"type": "nbd", "url": "nbd://h:99999/e"}})["field"] == "attachment.url"
    assert attach({"kind": "scsi", "attachment": {"type": "disk-image", "path": "/x"}})["field"] == "kind"
    assert attach({"id": "x" * 500, "attachment": {"type": "disk-image", "path": "/x"}})["field"] == "id"
    assert attach({"attachment": {"path": "/x"}})["field"] == "attachment"
    assert attach({"attachment": {"type": "disk-image", "path": "/x"}, "extra": 1})["field"] == "extra"
    raw = tmp_path / "fmt.raw"
    raw.write_bytes(b"\0" * 4096)
    # QEMU cannot open a raw file as qcow2: bad input, said as such (and nothing is left attached)
    assert attach({"attachment": {"type": "disk-image", "path": str(raw), "format": "qcow2"}})["field"] \
        == "attachment.path"
    assert check(call(live.sock, "GET", "/v1/disks")).body == []
    live.assert_running()


def test_port_forward_is_checked_like_vm_yaml(live: Live) -> None:
    def add(body: dict[str, Any]) -> dict[str, Any]:
        ans = check(call(live.sock, "POST", "/v1/ports", json.dumps(body).encode()), bad=True)
        assert ans.status == 400, ans.body
        return dict(ans.body["error"])

    assert add({"host_port": True, "guest_port": 80})["field"] == "host_port"  # was port 1
    assert add({"host_port": 8080, "guest_port": False})["field"] == "guest_port"
    assert add({"host_port": 10**30, "guest_port": 80})["field"] == "host_port"
    assert add({"host_port": 8080.5, "guest_port": 80})["field"] == "host_port"
    assert add({"host_port": 8080, "guest_port": 80, "host_addr": "0.0.0.0,hostfwd=tcp::1-:2"})["field"] \
        == "host_addr"
    assert add({"host_port": 8080, "guest_port": 80, "protocol": "sctp"})["field"] == "protocol"
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert "taken" in add({"host_port": port, "guest_port": 80})["message"]
    live.assert_running()


def test_detach_body_is_checked(live: Live) -> None:
    # a wrong-typed detach body was an HTTP 500 in text/plain
    for body in (b'{"timeout": "soon"}', b'{"timeout": true}', b'{"timeout": null}', b"[1]"):
        ans = check(call(live.sock, "DELETE", "/v1/disks/nope", body), bad=True)
        assert ans.status == 400
    assert check(call(live.sock, "DELETE", "/v1/disks/nope", b'{"timeout": 5}')).status == 404
    live.assert_running()


def test_limits_body_is_checked(live: Live) -> None:
    for body in HOSTILE:
        check(call(live.sock, "PUT", "/v1/limits", body), bad=True)
    for fields, field in (({"cpu_weight": "200"}, "cpu_weight"), ({"cpu_weight": 0}, "cpu_weight"),
                          ({"cpu_max": True}, "cpu_max"), ({"cpu_pin": "0-4095"}, "cpu_pin"),
                          ({"cpu_pin": "0;reboot"}, "cpu_pin"), ({"memory_max": 1}, "memory_max"),
                          ({"memory_max": 1 << 70}, "memory_max"), ({"swap_max": 1 << 30}, "swap_max"),
                          ({"memory_min": 1 << 40, "memory_max": 1 << 30}, "memory_min")):
        ans = check(call(live.sock, "PUT", "/v1/limits", json.dumps(fields).encode()), bad=True)
        assert ans.status == 400 and ans.body["error"]["field"] == field, (fields, ans.body)
    same = check(call(live.sock, "PUT", "/v1/limits", b"{}"))
    assert same.status == 200 and same.body["limits"]["cpu_max"] is None
    live.assert_running()


def test_save_and_snapshot_bodies(live: Live) -> None:
    for body in ({"path": "relative/state"}, {"path": "/tmp/x\u0000y"}, {"path": 5}, {"keep_running": "yes"},
                 {"keep_running": 1}, {"force": "yes"}, {"path": "/tmp/x", "keep_running": True, "forced": True}):
        ans = check(call(live.sock, "POST", "/v1/save", json.dumps(body).encode()), bad=True)
        assert ans.status == 400 and ans.body["error"]["field"] in ("path", "keep_running", "force", "forced"), \
            ans.body
    for tag in ("../../x", "", "x" * 100, 5, None, "\u202e"):
        ans = check(call(live.sock, "POST", "/v1/snapshots", json.dumps({"tag": tag}).encode()), bad=True)
        assert ans.status == 400 and ans.body["error"]["field"] == "tag", ans.body
    # a save that cannot be written says so on its last line; the machine runs on
    ans = check(call(live.sock, "POST", "/v1/save",
                     json.dumps({"path": "/proc/nope/state", "keep_running": True}).encode()), bad=True)
    live.assert_running()


def fill_guest_memory(live: Live, mib: int) -> None:
    """Incompressible data in the guest's RAM: a save of it takes a moment."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(live.inst.console_socket))
        s.sendall(f"head -c $(({mib}*1024*1024)) /dev/urandom > /root/fill; echo FILLED-$((40+2))\n".encode())
    vmkit("console", "fz", "--log", "--until", r"^FILLED-42", "--timeout", "120")


def test_lifecycle_calls_during_a_save_are_refused(live: Live, tmp_path: Path) -> None:
    fill_guest_memory(live, 120)
    target = tmp_path / "during.state"

    with socket.socket() as probe:  # a free port (another test's machine may hold a fixed one, e.g. 1)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def scenario() -> tuple[list[dict[str, Any]], list[Answer]]:
        conn = aiohttp.UnixConnector(path=str(live.sock))
        async with aiohttp.ClientSession(connector=conn) as s, \
                s.post("http://vmkit/v1/save", json={"path": str(target), "keep_running": True}) as r:
            assert r.status == 200
            lines = [json.loads(await r.content.readline())]  # the first progress line: the save runs
            others = await asyncio.gather(*(_request(live.sock, "POST", p, None, 60) for p in
                                            ("/v1/resume", "/v1/pause", "/v1/stop", "/v1/request-stop")),
                                          _request(live.sock, "POST", "/v1/ports",
                                                   json.dumps({"host_port": port, "guest_port": 2}).encode(), 60),
                                          _request(live.sock, "POST", "/v1/snapshots", b'{"tag": "t"}', 60),
                                          _request(live.sock, "POST", "/v1/save", b'{"keep_running": true}', 60))
            async for line in r.content:
                if line.strip():
                    lines.append(json.loads(line))
        return lines, list(others)

    lines, others = asyncio.run(scenario())
    assert "progress" in lines[0] and "result" in lines[-1], lines
    for ans in others:
        check(ans, bad=True)
        assert ans.status == 409 and "saving its state" in ans.body["error"]["message"], ans.body
    live.assert_running()
    payload = sum(len(c) for c in statefile.iter_payload(target, keys.load_or_create_key()))
    assert payload == lines[-1]["result"]["payload_bytes"] and payload > 100 * MiB


def test_concurrent_conflicting_calls(live: Live, tmp_path: Path) -> None:
    async def burst(i: int) -> list[Answer]:
        save = json.dumps({"path": str(tmp_path / f"b{i}.state"), "keep_running": True}).encode()
        return list(await asyncio.gather(*(_request(live.sock, m, p, b, 120) for m, p, b in [
            ("POST", "/v1/pause", None), ("POST", "/v1/resume", None), ("POST", "/v1/save", save),
            ("POST", "/v1/pause", None), ("GET", "/v1/snapshots", None), ("POST", "/v1/resume", None),
            ("DELETE", "/v1/disks/nope", b'{"timeout": 1}'), ("GET", "/v1/disks", None)])))

    for i in range(3):
        for ans in asyncio.run(burst(i)):
            check(ans)
        live.assert_running()


def test_last_pause_resume_save_and_stop_at_once(live: Live, tmp_path: Path) -> None:
    """Runs last: the machine may stop here. Whatever wins, every answer is well-formed and the
    outcome consistent: a save that succeeded left a valid file; a stop left nothing running."""
    target = tmp_path / "last.state"

    async def burst() -> list[Answer]:
        return list(await asyncio.gather(
            _request(live.sock, "POST", "/v1/pause", None, 120), _request(live.sock, "POST", "/v1/resume", None, 120),
            _request(live.sock, "POST", "/v1/save", json.dumps({"path": str(target)}).encode(), 120),
            _request(live.sock, "POST", "/v1/stop", None, 120)))

    answers = asyncio.run(burst())
    for ans in answers:
        check(ans)
    save = answers[2]
    if save.status == 200 and "result" in save.lines[-1]:
        assert sum(len(c) for c in statefile.iter_payload(target, keys.load_or_create_key())) \
            == save.lines[-1]["result"]["payload_bytes"]
    if any(a.status == 200 and ((a.lines and "result" in a.lines[-1]) or "exit" in (a.body or {})) for a in answers):
        assert wait_until(lambda: not live.inst.is_supervised(), 30)
        assert wait_until(lambda: processes_mentioning(str(live.home)) == [], 15)
    else:
        live.assert_running()
