"""`vmkit list`'s one implementation (vmkit.backends.local.listing): the quick path (state.json, the
lock, the cache of each vm.yaml's size) gives what the full path (reconcile, parse, validate) gives,
and falls back to it whenever something is out of the ordinary."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkit.api.models import InstanceRow
from vmkit.backends.local import listing
from vmkit.config import parse_config
from vmkit.host import paths
from vmkit.host.instance import Instance, Status


def make(home: Path, name: str, *, cpus: int = 1, memory: str = "256M", age: float = 60.0) -> Instance:
    kernel = home / "vmlinuz"
    kernel.write_bytes(b"k")
    inst = Instance.create(parse_config({"name": name, "cpus": cpus, "memory": memory,
                                         "boot": {"kernel": str(kernel)}}), home / "instances")
    then = time.time() - age
    os.utime(inst.config_path, (then, then))
    return inst


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    tmp_path.chmod(0o700)
    with paths.using_home(tmp_path):
        yield tmp_path


def by_name(rows: list[listing.Row]) -> dict[str, listing.Row]:
    return {r["name"]: r for r in rows}


def test_rows_are_the_api_model(home: Path) -> None:
    make(home, "a")
    assert set(listing.Row.__annotations__) == set(InstanceRow.model_fields)
    rows = listing.rows()
    assert [InstanceRow.model_validate(r).model_dump(mode="json") for r in rows] == rows
    assert listing.list_instances() == [InstanceRow.model_validate(r) for r in rows]


def test_a_second_listing_reads_no_vm_yaml(home: Path) -> None:
    """With the cache filled, listing imports neither yaml nor pydantic (a fresh process)."""
    make(home, "a", cpus=2, memory="512M")
    make(home, "b")
    first = listing.rows()
    assert (home / "instances" / listing.CACHE_NAME).stat().st_mode & 0o777 == 0o600
    script = ("import json, sys\nfrom vmkit.backends.local import listing\nrows = listing.rows()\n"
              "print(json.dumps([rows, sorted(m for m in sys.modules if m.startswith(('yaml', 'pydantic')))]))")
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, "VMKIT_HOME": str(home)},
                       capture_output=True, text=True, timeout=60, check=True)
    rows, heavy = json.loads(r.stdout)
    assert heavy == []
    assert rows == first
    assert [(x["name"], x["cpus"], x["memory"]) for x in rows] == [("a", 2, "512M"), ("b", 1, "256M")]


def test_the_cache_follows_deletes(home: Path) -> None:
    a, b = make(home, "a"), make(home, "b")
    listing.rows()
    cache = home / "instances" / listing.CACHE_NAME
    assert set(json.loads(cache.read_text())) == {"a", "b"}
    a.delete()
    assert [r["name"] for r in listing.rows()] == ["b"] and set(json.loads(cache.read_text())) == {"b"}
    b.delete()
    assert listing.rows() == [] and not cache.exists()


def test_an_edited_vm_yaml_is_read_again(home: Path) -> None:
    inst = make(home, "a", cpus=2)
    assert by_name(listing.rows())["a"]["cpus"] == 2
    text = inst.config_path.read_text()
    inst.config_path.write_text(text.replace("cpus: 2", "cpus: 3"))  # same size, new mtime
    then = time.time() - 30
    os.utime(inst.config_path, (then, then))
    assert by_name(listing.rows())["a"]["cpus"] == 3
    inst.config_path.write_text(text.replace("cpus: 2", "cpus: lots"))  # broken after being cached
    row = by_name(listing.rows())["a"]
    assert row["state"] == listing.BROKEN and "cpus" in row["reason"] and row["cpus"] is None


def test_a_fresh_vm_yaml_is_not_cached(home: Path) -> None:
    """A vm.yaml changed within the last two seconds could change again unseen (timestamp granularity)."""
    make(home, "a", age=0)
    assert by_name(listing.rows())["a"]["cpus"] == 1
    assert not (home / "instances" / listing.CACHE_NAME).exists()


def test_a_dead_supervisor_is_cleaned_up(home: Path) -> None:
    """state.json says running but nobody holds the lock: the full path reconciles (state error)."""
    inst = make(home, "a")
    listing.rows()
    inst.write_status(Status(state="running", supervisor_pid=1, started_at=time.time()))
    row = by_name(listing.rows())["a"]
    assert row["state"] == "error" and "supervisor died" in row["reason"]
    assert inst.read_status().state == "error"  # recorded, as `vmkit list` always did


def test_a_supervised_machine_is_running(home: Path) -> None:
    inst = make(home, "a")
    inst.write_status(Status(state="running", accel="tcg", started_at=time.time() - 90, degraded="virtiofsd died"))
    fd = inst.open_lock()
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        row = by_name(listing.rows())["a"]
        assert row["state"] == "running" and row["accel"] == "tcg" and row["health"] == "degraded"
        assert row["uptime"] is not None and 89 < row["uptime"] < 120
        assert listing.view(inst).model_dump(mode="json") | {"uptime": None} == row | {"uptime": None}
    finally:
        os.close(fd)
    row = by_name(listing.rows())["a"]  # the lock went with its holder: the supervisor died
    assert row["state"] == "error"


def test_saved_and_damaged_state(home: Path) -> None:
    make(home, "s")
    (home / "instances" / "s" / "saved.vmstate").write_bytes(b"x")
    d = make(home, "d")
    listing.rows()
    d.state_path.write_text('{"state": "stopped", "reason": 5}')
    rows = by_name(listing.rows())
    assert rows["s"]["state"] == "saved"
    assert rows["d"]["state"] == listing.BROKEN and str(d.state_path) in rows["d"]["reason"]


def test_the_pipe_table_and_json(home: Path) -> None:
    make(home, "web", cpus=2, memory="1G")
    env = {**os.environ, "VMKIT_HOME": str(home)}
    table = subprocess.run([sys.executable, "-m", "vmkit.cli.main", "list"], env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout.splitlines()
    assert table[0].split() == ["name", "state", "cpus", "memory", "accelerator", "uptime"]
    assert table[1].split() == ["web", "stopped", "2", "1G", "-", "-"]
    out = subprocess.run([sys.executable, "-m", "vmkit.cli.main", "list", "--json"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert json.loads(out) == listing.rows()
