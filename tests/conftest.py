"""Shared fixtures: the micro guest image (built once, cached), throw-away vmkit homes, and a
finaliser that kills every QEMU a test left behind and shows its serial log on failure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmkit.host.images.micro import build_micro, build_micro_full
from vmkit.host.images.store import Image, ImageStore

REPO = Path(__file__).resolve().parent.parent


def image_cache_dir() -> Path:
    return Path(os.environ.get("VMKIT_IMAGE_CACHE") or REPO / ".cache" / "images")


@pytest.fixture(scope="session")
def micro_image() -> Image:
    """The micro guest, built through apt once and reused across test runs (.cache/ is gitignored)."""
    return build_micro(ImageStore(image_cache_dir()))


@pytest.fixture(scope="session")
def micro_full_image() -> Image:
    """The micro guest on Debian's generic kernel (USB storage, 9p)."""
    return build_micro_full(ImageStore(image_cache_dir()))


def build_current_debian(store: ImageStore, **kwargs: Any) -> Image:
    """``debian-12`` from the cache, rebuilt first if an older vmkit recipe made it."""
    from vmkit.host.images import debian

    outdated = store.exists("debian-12") and debian.is_outdated(store.get("debian-12"))
    return debian.build_debian(store, force=outdated, **kwargs)


@pytest.fixture(scope="session")
def debian12() -> Image:
    """The full Debian 12 guest (mmdebstrap, about a minute), built once and cached."""
    return build_current_debian(ImageStore(image_cache_dir()))


def vmkit(*args: str, check: bool = True, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess (wide output so JSON and messages are not wrapped)."""
    proc = subprocess.run([sys.executable, "-m", "vmkit.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "250"})
    if check and proc.returncode != 0:
        raise AssertionError(f"vmkit {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


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
        except OSError:
            continue
        if needle.encode() in cmd:
            pids.append(int(d.name))
    return pids


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
def vmkit_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh VMKIT_HOME; afterwards no process that mentions it may survive."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("VMKIT_HOME", str(home))
    monkeypatch.setenv("VMKIT_IMAGE_CACHE", str(image_cache_dir()))
    yield home
    leftovers = processes_mentioning(str(home))
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for log in sorted(home.glob("instances/*/*.log")):
            print(f"\n===== {log} (last 40 lines) =====")
            print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    assert not leftovers, f"processes outlived the test: {leftovers}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    rep.vmkit_layer = _layer(item)
    setattr(item, f"rep_{rep.when}", rep)


# -- one contract: every request and response in the tests is checked against docs/openapi.json ---------
SPEC_LOG = Path(tempfile.gettempdir()) / f"vmkit-api-violations-{os.getpid()}.ndjson"


def pytest_configure(config: pytest.Config) -> None:
    """Every SupervisorClient in this process and in the CLI subprocesses the tests run checks what it
    sends and receives against the committed OpenAPI document (see vmkit.api.speccheck)."""
    from vmkit.api import speccheck

    SPEC_LOG.unlink(missing_ok=True)
    os.environ[speccheck.ENV] = str(REPO / "docs" / "openapi.json")
    os.environ[speccheck.LOG_ENV] = str(SPEC_LOG)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if SPEC_LOG.exists() and SPEC_LOG.read_text().strip():
        lines = SPEC_LOG.read_text().splitlines()
        print(f"\n{len(lines)} request(s) or response(s) broke docs/openapi.json:\n" + "\n".join(lines[:20]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    SPEC_LOG.unlink(missing_ok=True)


# -- markers follow folders; a Debian boot is e2e wherever it is --------------------------------------
LAYERS = ("unit", "integration", "e2e")


def _layer(item: pytest.Item) -> str:
    if item.get_closest_marker("e2e"):
        return "e2e"
    return "integration" if item.get_closest_marker("integration") else "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder == "e2e" or "debian12" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
        elif folder == "integration":
            item.add_marker(pytest.mark.integration)


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


@pytest.fixture(scope="session")
def lab() -> Iterator[str]:
    """Two lab hosts (brought up for these tests unless a lab is already up); the target's URI."""
    brought = False
    if not (LAB / "ssh_config").exists():
        res = subprocess.run([str(REPO / "scripts" / "lab.sh"), "up", "2"], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.strip().splitlines()[-1] == LAB_TARGET
        brought = True
    old = os.environ.get("VMKIT_SSH_CONFIG")
    os.environ["VMKIT_SSH_CONFIG"] = str(LAB / "ssh_config")
    try:
        yield LAB_TARGET
    finally:
        if old is None:
            os.environ.pop("VMKIT_SSH_CONFIG", None)
        else:
            os.environ["VMKIT_SSH_CONFIG"] = old
        if brought:
            subprocess.run([str(REPO / "scripts" / "lab.sh"), "down"], capture_output=True, timeout=120)


@pytest.fixture
def on_target(lab: str) -> Iterator[list[str]]:
    """Names to remove from the target afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        vmkit("--host", lab, "delete", "--force", n, check=False)
