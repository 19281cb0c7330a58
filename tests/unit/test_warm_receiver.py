"""The warm receiver (vmkit.migrate.warm): the first `vmkit migrate-receive` runs cold and leaves a daemon of
this user behind; the next ones are served by a child of it, with the command's own descriptors, working
directory and exit status; it ends when idle, on SIGTERM and when a command of another build connects."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmkit.migrate import warm

REPO = Path(__file__).resolve().parents[2]


def receiver(home: Path, persist: str = "30", cwd: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "VMKIT_HOME": str(home), warm.PERSIST_ENV: persist,
           "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "migrate-receive"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd or home)


def daemons(home: Path) -> list[int]:
    """The warm receivers started for ``home`` (their environment names it)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().strip() != warm.NAME:
                continue
            if f"VMKIT_HOME={home}".encode() in (d / "environ").read_bytes().split(b"\0"):
                out.append(int(d.name))
        except OSError:
            continue
    return out


def children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError):
                continue
    return out


def wait_for(check: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    h = tmp_path / "home"
    h.mkdir(mode=0o700)
    yield h
    for pid in daemons(h):
        os.kill(pid, signal.SIGKILL)


BAD = json.dumps({"prepare": {"bogus": 1}}) + "\n"


def test_the_first_command_runs_cold_and_leaves_a_private_warm_receiver(home: Path) -> None:
    proc = receiver(home)
    out, err = proc.communicate(BAD, timeout=60)
    assert proc.returncode == 2, err
    assert "migration manifest" in json.loads(out.splitlines()[-1])["error"]["message"]
    assert wait_for(lambda: len(daemons(home)) == 1)
    sock = home / "run" / "migrate-receive.sock"
    assert wait_for(sock.exists)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700


def test_the_next_command_is_served_by_a_child_of_the_warm_receiver(home: Path, tmp_path: Path) -> None:
    first = receiver(home)
    first.communicate(BAD, timeout=60)
    assert wait_for(lambda: len(daemons(home)) == 1 and (home / "run" / "migrate-receive.sock").exists())
    (daemon,) = daemons(home)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    second = receiver(home, cwd=elsewhere)
    # it waits for its first line: a child of the warm receiver holds the command's stdin, in its cwd
    assert wait_for(lambda: len(children_of(daemon)) == 1)
    (child,) = children_of(daemon)

    def cwd() -> str:
        with contextlib.suppress(OSError):
            return os.readlink(f"/proc/{child}/cwd")
        return ""

    # just forked, it is still setting itself up: it moves to the command's directory last
    assert wait_for(lambda: cwd() == str(elsewhere)), cwd()
    assert os.readlink(f"/proc/{child}/fd/0") == os.readlink(f"/proc/{second.pid}/fd/0")
    # not the warm receiver's lock (a migration served after it ended would keep a new one from starting)
    held = {os.readlink(f"/proc/{child}/fd/{fd}") for fd in os.listdir(f"/proc/{child}/fd")}
    assert str(home / "run" / "migrate-receive.lock") not in held
    out, err = second.communicate(json.dumps({"abort": {}}) + "\n", timeout=30)
    assert json.loads(out.splitlines()[-1]) == {"aborted": {}}
    assert second.returncode == 1, err
    assert wait_for(lambda: not children_of(daemon))
    third = receiver(home)  # the exit status of an error comes back too
    _, err = third.communicate(BAD, timeout=30)
    assert third.returncode == 2, err
    assert daemons(home) == [daemon]  # the same one served both


def test_a_status_that_comes_with_the_serving_line_is_not_lost(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child whose migration ends at once (a refused manifest) can send "serving" and its status in one
    segment: the command takes both and exits with that status, and does not run cold on the stdin the child
    has already read (which gave a second, "aborted" answer and exit status 1)."""
    monkeypatch.setenv("VMKIT_HOME", str(home))
    run = home / "run"
    run.mkdir(mode=0o700)
    got: list[dict[str, object]] = []
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(run / warm.SOCKET))
        listener.listen(1)

        def child() -> None:
            conn, _ = listener.accept()
            with conn:
                data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                for fd in fds:
                    os.close(fd)
                got.append(json.loads(data))
                conn.sendall(b'{"serving": 4242}\n{"status": 2}\n')

        server = threading.Thread(target=child)
        server.start()
        status = warm.run_warm(30)
        server.join(10)
    assert status == 2
    assert got and got[0]["build"] == warm.build_id() and got[0]["cwd"] == os.getcwd()


def test_it_ends_when_idle_and_none_is_started_when_disabled(home: Path) -> None:
    proc = receiver(home, persist="1")
    proc.communicate(BAD, timeout=60)
    assert wait_for(lambda: len(daemons(home)) == 1)
    assert wait_for(lambda: not daemons(home), 15)
    assert not (home / "run" / "migrate-receive.sock").exists()
    off = receiver(home, persist="0")
    off.communicate(BAD, timeout=60)
    time.sleep(0.5)
    assert not daemons(home)


def test_sigterm_or_another_build_ends_it(home: Path) -> None:
    proc = receiver(home)
    proc.communicate(BAD, timeout=60)
    sock = home / "run" / "migrate-receive.sock"
    assert wait_for(lambda: len(daemons(home)) == 1 and sock.exists())
    # a command of another vmkit (upgraded on this host): told so, and the warm receiver ends
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        socket.send_fds(s, [(json.dumps({"build": "another", "env": {}, "cwd": "/"}) + "\n").encode()], [0, 1, 2])
        s.settimeout(10)
        assert "stale" in json.loads(s.recv(4096))
    assert wait_for(lambda: not daemons(home))
    assert not sock.exists()
    again = receiver(home)  # runs cold and starts a new one
    _, err = again.communicate(BAD, timeout=60)
    assert again.returncode == 2, err
    assert wait_for(lambda: len(daemons(home)) == 1 and sock.exists())
    (pid,) = daemons(home)
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not daemons(home))
    assert not sock.exists()


def test_a_changed_module_file_makes_its_code_stale(tmp_path: Path) -> None:
    """The warm receiver compares the files of the vmkit modules it loaded with what is on disk now: an edit
    (or an upgrade with the same version) makes it refuse the next command and end."""
    stamps = warm._code_stamps()
    assert warm.__file__ in stamps and not warm._changed(stamps)
    assert not any("pytest" in f for f in stamps)  # only vmkit's own modules
    f = tmp_path / "mod.py"
    f.write_text("x = 1\n")
    mine = {str(f): f.stat().st_mtime_ns}
    assert not warm._changed(mine)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    assert warm._changed(mine)
    f.unlink()
    assert warm._changed({str(f): 0})
