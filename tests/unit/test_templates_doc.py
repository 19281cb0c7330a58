"""docs/TEMPLATES.md's examples work as written: every ``# file:`` YAML block is a template that
the template loader reads and `vmkit create` makes a machine from (not booted); the ``# merged:``
block is what `vmkit template show` prints for it; the error shown is the error vmkit gives."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import vmkit
from vmkit.errors import ExitCode
from vmkit.host.images.store import ImageManifest, ImageStore

DOC = Path(__file__).resolve().parents[2] / "docs" / "TEMPLATES.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def _blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(DOC.read_text()) if lang == kind]


def _files() -> dict[str, str]:
    files: dict[str, str] = {}
    for body in _blocks("yaml"):
        first = body.splitlines()[0]
        if m := re.fullmatch(r"# file: (\S+\.yaml)", first):
            files[m[1]] = body
    return files


def test_every_yaml_block_is_a_named_example() -> None:
    for body in _blocks("yaml"):
        assert re.match(r"# (file|merged): \S+\n", body), f"a YAML block in {DOC.name} is neither:\n{body}"
    assert {"web.yaml", "web-tls.yaml", "everything.yaml", "python-step.yaml"} <= set(_files())


@pytest.fixture
def templates_home(vmkit_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The doc's templates in the user's template directory, a host home with the folders the
    examples share, and an image cache with a stand-in ``debian-12`` (a real, empty qcow2 and a fake
    kernel: enough for `vmkit create`, which does not boot)."""
    store = ImageStore(tmp_path / "images")
    with store.staging("debian-12") as d:
        (d / "vmlinuz").write_bytes(b"fake kernel")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "disk.qcow2"), "64M"], check=True)
        store.commit(d, ImageManifest(name="debian-12", kind="disk", kernel="vmlinuz", disk="disk.qcow2",
                                      disk_format="qcow2", cmdline="root=/dev/vda"))
    monkeypatch.setenv("VMKIT_IMAGE_CACHE", str(store.root))
    tdir = vmkit_home / "config" / "templates"
    tdir.mkdir(parents=True)
    for name, body in _files().items():
        (tdir / name).write_text(body)
    home = tmp_path / "home"
    for d in ("src", "notes"):
        (home / d).mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    return tdir


def test_the_examples_load_and_make_machines(templates_home: Path) -> None:
    from vmkit import Client

    client = Client()
    listed = {name: where for name, where, _ in client.templates()}
    for name in _files():
        stem = name.removesuffix(".yaml")
        assert listed[stem] == "user"
        t = client.template(stem)  # bases merged, every field checked
        assert t.source == str(templates_home / name)
        # the whole create path (vm.yaml's own checks, image, disk, ports, mounts): not booted
        made = vmkit("create", f"m-{stem}", "--template", stem, check=False)
        assert made.returncode == 0, f"{name}: {made.stdout}{made.stderr}"
        vmkit("delete", f"m-{stem}")
    everything = client.template("everything")
    assert [p.when for p in everything.fields.provision] == ["boot", "once"]
    assert everything.vm["limits"] == {"cpu_weight": 200} and everything.fields.disk == "12G"


def test_the_merged_example_is_what_show_prints(templates_home: Path) -> None:
    merged = [b for b in _blocks("yaml") if b.startswith("# merged:")]
    assert len(merged) == 1
    name = merged[0].splitlines()[0].split(": ", 1)[1]
    shown = vmkit("template", "show", name).stdout
    assert yaml.safe_load(shown) == yaml.safe_load(merged[0])


def test_the_error_example_is_the_error_vmkit_gives(templates_home: Path) -> None:
    [shown] = [b for b in _blocks("text") if b.startswith("error: invalid template")]
    problem = shown.splitlines()[1].split(": ", 1)[1]  # after the file name
    web = yaml.safe_load((templates_home / "web.yaml").read_text())
    web["provision"][0]["when"] = "always"
    (templates_home / "web.yaml").write_text(yaml.safe_dump(web))
    res = vmkit("template", "show", "web", check=False)
    assert res.returncode == ExitCode.BAD_INPUT
    assert f"{templates_home / 'web.yaml'}: {problem}" in res.stdout + res.stderr
