"""One instance whose vm.yaml or state.json cannot be used never hides the others: through the
real CLI, `vmkit list` shows it as broken with a reason naming the file, other commands on it
fail with a clear error naming the file, and it can still be deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import conftest
from vmkit.errors import ExitCode

DAMAGE: dict[str, tuple[str, bytes, str]] = {
    # name: (file, content, what the reason says)
    "latin1": ("vm.yaml", "name: latin1\nboot: {kernel: /k}\n# caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    "badyaml": ("vm.yaml", b"name: badyaml\nboot: [unclosed\n", "not valid YAML"),
    "invalid": ("vm.yaml", b"name: invalid\ncpus: lots\nboot: {kernel: /k}\n", "cpus"),
    "deepyaml": ("vm.yaml", b"[" * 100000, "not valid YAML"),
    "nullstate": ("state.json", b"\xff\xfe garbage", "is not valid JSON"),
    "liststate": ("state.json", b"[1, 2]", "holds a JSON list"),
    "typestate": ("state.json", b'{"state": "running", "started_at": "yesterday"}', "started_at"),
}


def vmkit(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI, in-process."""
    return conftest.vmkit(*args, check=False, env={"VMKIT_HOME": str(home), "VMKIT_IMAGE_CACHE": None})


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Instance 'good' and one damaged instance per entry of DAMAGE (all created by `vmkit create`)."""
    home = tmp_path_factory.mktemp("home")
    kernel = home / "vmlinuz"
    kernel.write_bytes(b"fake kernel")
    procs = [subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "create", name, "--kernel", str(kernel)],
                              env={**os.environ, "VMKIT_HOME": str(home)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for name in ("good", *DAMAGE)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    for name, (file, content, _) in DAMAGE.items():
        (home / "instances" / name / file).write_bytes(content)
    return home


def test_list_json_shows_broken_instances_with_the_reason(home: Path) -> None:
    r = vmkit(home, "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"good", *DAMAGE}
    assert rows["good"]["state"] == "stopped" and rows["good"]["cpus"] == 1
    for name, (file, _, says) in DAMAGE.items():
        row = rows[name]
        assert row["state"] == "broken", row
        assert str(home / "instances" / name / file) in row["reason"], row
        assert says in row["reason"], row
        assert row["cpus"] is None and row["memory"] is None


def test_list_table_shows_them_too(home: Path) -> None:
    r = vmkit(home, "list")
    assert r.returncode == 0, r.stderr
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines()[1:]}  # a pipe: plain columns
    assert "stopped" in lines["good"]
    for name in DAMAGE:
        assert "broken" in lines[name]
        assert f"{name} is broken:" in one_line(r.stderr)


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_other_commands_name_the_file(home: Path, name: str) -> None:
    file, _, says = DAMAGE[name]
    for args in (["inspect", name], ["start", name]):
        r = vmkit(home, *args)
        assert r.returncode == ExitCode.BAD_INPUT, (args, r.stderr)
        err = one_line(r.stderr)
        assert str(home / "instances" / name / file) in err and says in err, (args, err)
        assert "Traceback" not in r.stderr


def test_a_broken_instance_can_be_deleted(home: Path) -> None:
    for name in ("latin1", "nullstate"):
        r = vmkit(home, "delete", name)
        assert r.returncode == 0, r.stderr
        assert not (home / "instances" / name).exists()
    r = vmkit(home, "list", "--json")
    assert {row["name"] for row in json.loads(r.stdout)} == {"good", *DAMAGE} - {"latin1", "nullstate"}
