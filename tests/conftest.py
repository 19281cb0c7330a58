"""Shared fixtures: the micro guest image (built once, cached), throw-away vmkit homes, and a
finaliser that kills every QEMU a test left behind and shows its serial log on failure.

Runs serially or under pytest-xdist (``-n 2 --dist loadfile``, what ``VMKIT_TEST_WORKERS`` in
scripts/test.sh sets): the tests of one file run on one worker, so a guest a file shares between
its tests (a module-scoped fixture of that file: the only kind of shared guest here; keep it so)
boots once; image builds take a file lock (two workers never build the same image at once); the
spec-violation log and the time per layer are gathered by the controller from every worker.
(``--dist loadgroup`` with ``xdist_group`` markers would spread a file's other tests, but
pytest-xdist 3.8 cannot mark pytest 9.2's node ids with the group: the tests ran anywhere.)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from libvirt_daemon import LibvirtDaemon, client_home, libvirt_daemon
from vmkit.host.images.micro import build_micro, build_micro_full
from vmkit.host.images.store import Image, ImageStore

if TYPE_CHECKING:
    from vmkit.api.models import WarmTemplate

REPO = Path(__file__).resolve().parent.parent


def image_cache_dir() -> Path:
    return Path(os.environ.get("VMKIT_IMAGE_CACHE") or REPO / ".cache" / "images")


@contextlib.contextmanager
def image_build_lock(name: str) -> Iterator[None]:
    """Held while a session fixture builds (or finds) image ``name``: test processes running side by
    side (pytest-xdist workers, two test runs) build it once, the others wait and find it built."""
    cache = image_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / f".{name}.build-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def warm_template(image: str) -> Iterator[WarmTemplate]:
    """``image``'s warm template in the test image cache (made once, then found current by later runs)."""
    from vmkit import Client

    saved = os.environ.get("VMKIT_IMAGE_CACHE")
    os.environ["VMKIT_IMAGE_CACHE"] = str(image_cache_dir())
    try:
        tpl, _ = Client().warm_image(image)
        yield tpl
    finally:
        if saved is None:
            os.environ.pop("VMKIT_IMAGE_CACHE", None)
        else:
            os.environ["VMKIT_IMAGE_CACHE"] = saved


@pytest.fixture(scope="session")
def micro_image() -> Image:
    """The micro guest, built through apt once and reused across test runs (.cache/ is gitignored)."""
    with image_build_lock("micro"):
        return build_micro(ImageStore(image_cache_dir()))


@pytest.fixture(scope="session")
def micro_full_image() -> Image:
    """The micro guest on Debian's generic kernel (USB storage, 9p)."""
    with image_build_lock("micro-full"):
        return build_micro_full(ImageStore(image_cache_dir()))


@pytest.fixture(scope="session")
def micro_aarch64_image() -> Image:
    """The micro guest for aarch64 (Debian's arm64 cloud kernel and busybox; `micro-aarch64`), rebuilt
    first if an older recipe made it (its /init did not see the virt machine's GPIO power key)."""
    from vmkit.host.images import micro

    with image_build_lock("micro-aarch64"):
        store = ImageStore(image_cache_dir())
        outdated = store.exists("micro-aarch64") and micro.is_outdated(store.get("micro-aarch64"))
        return build_micro(store, arch="aarch64", force=outdated)


@pytest.fixture(scope="session")
def debian12_aarch64() -> Image:
    """Debian 12 for aarch64 (`debian-12-aarch64`: mmdebstrap --architectures=arm64, maintainer scripts
    under qemu-user-static; 54 min on a loaded 2-core host), built once and cached."""
    from vmkit.host.images import debian

    with image_build_lock("debian-12-aarch64"):
        return debian.build_debian(ImageStore(image_cache_dir()), arch="aarch64")


def build_current_debian(store: ImageStore, **kwargs: Any) -> Image:
    """``debian-12`` from the cache, rebuilt first if an older vmkit recipe made it."""
    from vmkit.host.images import debian

    with image_build_lock("debian-12"):
        outdated = store.exists("debian-12") and debian.is_outdated(store.get("debian-12"))
        return debian.build_debian(store, force=outdated, **kwargs)


def build_current_derived(name: str) -> Image:
    """A template's derived image (``debian-12-docker``, ``debian-12-dev``: debian-12's recipe plus
    :data:`catalogue.DERIVED` packages) from the test cache, built first (mmdebstrap on the host: a
    few minutes) if missing, made by an older recipe, or built before a package joined its list."""
    from vmkit.host.images import catalogue, debian

    store = ImageStore(image_cache_dir())
    with image_build_lock(name):
        outdated = store.exists(name) and (debian.is_outdated(store.get(name)) or any(
            f" {p}" not in store.get(name).manifest.source for p in catalogue.DERIVED[name]))
        return debian.build_debian(store, name=name, extra_packages=catalogue.DERIVED[name], force=outdated)


@pytest.fixture(scope="session")
def debian12() -> Image:
    """The full Debian 12 guest (mmdebstrap, about a minute), built once and cached."""
    return build_current_debian(ImageStore(image_cache_dir()))


def vmkit_process(*args: str, check: bool = True, timeout: float = 400,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess (wide output so JSON and messages are not wrapped): for what
    needs a process boundary (the entry point, exit codes as a shell sees them, signals, stdin)."""
    proc = subprocess.run([sys.executable, "-m", "vmkit.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "250", **(env or {})},
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"vmkit {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def follow_events(name: str) -> subprocess.Popen[str]:
    """``vmkit events NAME`` in a process of its own, returned once it is subscribed (its first line,
    ``hello``, has arrived): nothing that happens to the machine after this is missed. Kill it when done."""
    proc = subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "events", name], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "250"})
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if not first.startswith("{") or json.loads(first).get("kind") != "hello":
        proc.kill()
        proc.wait()
        raise AssertionError(f"vmkit events {name} did not start with hello: {first!r}")
    return proc


def vmkit(*args: str, check: bool = True, env: dict[str, str | None] | None = None,
          input: str | None = None, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """Run the CLI in this process, as the ``vmkit`` command would (``vmkit.cli.main.main``: the same
    parsing, rendering, messages and exit codes), and return what it printed and its exit code.

    ``env`` changes the environment for the call (None removes a variable). Output is not a
    terminal and 250 columns wide, so JSON and messages are not wrapped. No fresh interpreter
    and imports for each call; :func:`vmkit_process` runs a real one. ``timeout`` bounds only a call
    that needs a process of its own (another host's vmkit); in this process the command's own
    timeouts and pytest's per-test timeout apply."""
    if args[:1] in (("--host",), ("-H",)) or (env or {}).get("VMKIT_HOST") or os.environ.get("VMKIT_HOST"):
        # another host's vmkit: the command becomes ssh (exec), which must not replace the test process
        return vmkit_process(*args, check=check, timeout=timeout,
                             env={k: v for k, v in (env or {}).items() if v is not None})
    from click.testing import CliRunner

    from vmkit.cli import output
    from vmkit.cli.main import main

    saved_env = dict(os.environ)
    widths = (output.out._width, output.err._width)  # what they were made with (None: the terminal's)
    code: int = 0
    runner = CliRunner()
    try:
        with runner.isolation(input=input, env={"COLUMNS": "250", **(env or {})}) as (stdout, stderr, _):
            output.out.width = output.err.width = 250
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
            out, err = stdout.getvalue().decode(), stderr.getvalue().decode("utf-8", "backslashreplace")
    finally:
        output.out._width, output.err._width = widths
        for key in os.environ.keys() - saved_env.keys():  # what the command set (never clear(): threads read it)
            del os.environ[key]
        for key, value in saved_env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
    proc = subprocess.CompletedProcess(["vmkit", *args], code, out, err)
    if check and code != 0:
        raise AssertionError(f"vmkit {' '.join(args)} exited {code}:\n{out}\n{err}")
    return proc


GOLDEN = REPO / "tests" / "unit" / "golden"


def check_golden(name: str, argv: list[str]) -> None:
    """``argv`` equals the golden file tests/unit/golden/NAME.txt (one argument a line)."""
    assert all(isinstance(a, str) and "\n" not in a for a in argv), argv
    path = GOLDEN / f"{name}.txt"
    text = "".join(f"{a}\n" for a in argv)
    if os.environ.get("VMKIT_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.is_file(), f"{path} is missing: run with VMKIT_UPDATE_GOLDEN=1 to create it"
    expected = path.read_text().splitlines()
    assert argv == expected, f"argv differs from {path} (VMKIT_UPDATE_GOLDEN=1 regenerates it)"


class NbdServerProcess:
    """``vmkit nbd serve`` as a separate process, so a test can kill it like a crash."""

    def __init__(self, image: Path, sock: Path) -> None:
        self.image, self.sock = image, sock
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmkit.cli.main", "nbd", "serve", str(self.image), "--export", "data",
             "--socket", str(self.sock)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the URI: the server is listening
        assert line.startswith(b"nbd"), line

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"nbd+unix:///data?socket={self.sock}"


@contextlib.asynccontextmanager
async def serving_unix(handler: Any, path: Path) -> AsyncIterator[None]:
    """A protocol-level fake (a guest agent, an NBD peer...) serving ``handler`` on a unix socket."""
    server = await asyncio.start_unix_server(handler, path=str(path))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def processes_mentioning(needle: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            cwd = os.readlink(d / "cwd") if needle.encode() not in cmd else ""
        except OSError:
            continue
        # a forked supervisor has its caller's command line, but runs in its instance's directory
        if needle.encode() in cmd or needle in cwd:
            pids.append(int(d.name))
    return pids


def command_line(pid: int) -> str:
    """A process's command line and working directory, for a message ("?" once it is gone)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return f"{' '.join(a.decode(errors='replace') for a in argv)[:300]} (in {os.readlink(f'/proc/{pid}/cwd')})"
    except OSError:
        return "?"


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return ") Z" not in stat


def wait_until(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(interval)
    return bool(callable(predicate) and predicate())


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (pytest's tmp_path can exceed the 108-byte socket path limit)."""
    path = Path(tempfile.mkdtemp(prefix="nbd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vmkit_home(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh VMKIT_HOME; afterwards no process that mentions it may survive.

    It is a short directory in /tmp, not under tmp_path: an instance's sockets must fit the 108
    bytes of a unix socket address, and pytest-xdist's tmp_path is longer (``popen-gwN/``)."""
    home = Path(tempfile.mkdtemp(prefix="vmkit-home-", dir="/tmp"))
    monkeypatch.setenv("VMKIT_HOME", str(home))
    monkeypatch.setenv("VMKIT_IMAGE_CACHE", str(image_cache_dir()))
    for elsewhere in ("VMKIT_CONNECT", "VMKIT_HOST"):  # this host's vmkit, whatever another test left set
        monkeypatch.delenv(elsewhere, raising=False)
    yield home
    # a process still ending (a helper its supervisor has just signalled) gets a moment; one still there is an orphan
    deadline = time.monotonic() + 5
    while (leftovers := processes_mentioning(str(home))) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = [f"{pid} {command_line(pid)}" for pid in leftovers]
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for log in sorted(home.glob("instances/*/*.log")):
            print(f"\n===== {log} (last 40 lines) =====")
            print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    shutil.rmtree(home, ignore_errors=True)
    assert not leftovers, f"processes outlived the test: {described}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    rep.vmkit_layer = _layer(item)
    setattr(item, f"rep_{rep.when}", rep)


# -- one contract: every request and response in the tests is checked against docs/openapi.json ---------
# Each test process (the controller, or every xdist worker) and the CLI subprocesses it runs append
# to a file of their own in one directory; the controller reads them all at the end.
def _spec_log_dir(config: pytest.Config) -> Path:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return Path(workerinput["vmkit_spec_log_dir"])
    return Path(tempfile.gettempdir()) / f"vmkit-api-violations-{os.getpid()}"


def pytest_configure(config: pytest.Config) -> None:
    """Every SupervisorClient in this process and in the CLI subprocesses the tests run checks what it
    sends and receives against the committed OpenAPI document (see vmkit.api.speccheck)."""
    from vmkit.api import speccheck

    log_dir = _spec_log_dir(config)
    if not hasattr(config, "workerinput"):
        shutil.rmtree(log_dir, ignore_errors=True)
        log_dir.mkdir(mode=0o700)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.environ[speccheck.ENV] = str(REPO / "docs" / "openapi.json")
    os.environ[speccheck.LOG_ENV] = str(log_dir / f"{worker}.ndjson")


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the tests also run without xdist
def pytest_configure_node(node: Any) -> None:
    """(xdist controller) tell each worker where the violation logs go."""
    node.workerinput["vmkit_spec_log_dir"] = str(_spec_log_dir(node.config))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        return  # the controller reports for every worker
    log_dir = _spec_log_dir(session.config)
    lines = [line for log in sorted(log_dir.glob("*.ndjson")) for line in log.read_text().splitlines() if line]
    if lines:
        print(f"\n{len(lines)} request(s) or response(s) broke docs/openapi.json:\n" + "\n".join(lines[:20]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(log_dir, ignore_errors=True)


# -- markers follow folders; a Debian boot is e2e wherever it is --------------------------------------
LAYERS = ("unit", "integration", "e2e")


def _layer(item: pytest.Item) -> str:
    if item.get_closest_marker("e2e"):
        return "e2e"
    return "integration" if item.get_closest_marker("integration") else "unit"


@pytest.hookimpl(wrapper=True)  # before every other plugin's (xdist's reads the node ids)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Iterator[None]:
    # Schemathesis gives every operation's test one node id: xdist tells tests apart by node id, and
    # ran only one of them (the rest out of order). Each gets its name (`...[GET /v1/state]`).
    seen: dict[str, int] = {}
    for item in items:
        seen[item.nodeid] = seen.get(item.nodeid, 0) + 1
    for item in items:
        if seen[item.nodeid] > 1 and item.parent is not None and not item.nodeid.endswith(f"::{item.name}"):
            if hasattr(item, "_id"):  # pytest >= 9: structured node ids
                item._id = item.parent.id.child(item.name)
            else:
                item._nodeid = f"{item.parent.nodeid}::{item.name}"
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder == "e2e" or "debian12" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
        elif folder == "integration":
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("slow") is not None and not os.environ.get("VMKIT_SLOW_TESTS"):
            item.add_marker(pytest.mark.skip(reason="slow: beyond CI's 40-minute budget (the Debian aarch64 image "
                                             "builds for most of an hour under qemu-user); VMKIT_SLOW_TESTS=1 runs it"))
    yield


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Time per layer (setup + call + teardown of every test), to see where the run goes."""
    spent = dict.fromkeys(LAYERS, 0.0)
    counts = dict.fromkeys(LAYERS, 0)
    for reports in terminalreporter.stats.values():
        for rep in reports:
            layer = getattr(rep, "vmkit_layer", None)
            if layer in spent:
                spent[layer] += getattr(rep, "duration", 0.0)
                if rep.when == "call":
                    counts[layer] += 1
    terminalreporter.write_sep("-", "time per layer")
    for layer in LAYERS:
        terminalreporter.write_line(f"{layer:12} {counts[layer]:4d} tests  {spent[layer]:8.1f} s")


LAB = Path(os.environ.get("VMKIT_LAB_DIR", "/tmp/vmklab"))
"""Where scripts/lab.sh keeps its hosts' files."""
LAB_TARGET = "ssh://root@10.231.0.11"


@pytest.fixture(scope="module")
def lv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtDaemon]:
    """A libvirtd (with its virtlogd) of the test module's own, stopped after the module."""
    with libvirt_daemon(tmp_path_factory.mktemp("libvirtd")) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def lv_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A vmkit home of the module's own for its libvirt tests (``VMKIT_HOME``, the test image cache)."""
    with client_home(tmp_path_factory.mktemp("home"), image_cache_dir()) as path:
        yield path


@pytest.fixture(scope="session")
def lab() -> Iterator[str]:
    """Two lab hosts (brought up for these tests unless a lab is already up); the target's URI.

    Test processes running side by side (pytest-xdist workers) share one lab: each holds a shared
    lock on it while it runs; the last one to leave takes down a lab the tests brought up."""
    LAB.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{LAB}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    marker = Path(f"{LAB}.brought-by-tests")
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # users of a lab that is up hold it shared
        if not (LAB / "ssh_config").exists():
            # down: nobody uses it; bring it up alone (the lock taken exclusively, then shared again)
            fcntl.flock(fd, fcntl.LOCK_UN)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not (LAB / "ssh_config").exists():
                res = subprocess.run([str(REPO / "scripts" / "lab.sh"), "up", "2"], capture_output=True,
                                     text=True, timeout=120)
                assert res.returncode == 0, res.stdout + res.stderr
                assert res.stdout.strip().splitlines()[-1] == LAB_TARGET
                marker.touch()
            fcntl.flock(fd, fcntl.LOCK_SH)
        old = os.environ.get("VMKIT_SSH_CONFIG")
        os.environ["VMKIT_SSH_CONFIG"] = str(LAB / "ssh_config")
        try:
            yield LAB_TARGET
        finally:
            if old is None:
                os.environ.pop("VMKIT_SSH_CONFIG", None)
            else:
                os.environ["VMKIT_SSH_CONFIG"] = old
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last user of the lab
            except BlockingIOError:
                pass
            else:
                if marker.exists():
                    subprocess.run([str(REPO / "scripts" / "lab.sh"), "down"], capture_output=True, timeout=120)
                    marker.unlink(missing_ok=True)
    finally:
        os.close(fd)


@pytest.fixture
def on_target(lab: str) -> Iterator[list[str]]:
    """Names to remove from the target afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        vmkit("--host", lab, "delete", "--force", n, check=False)
