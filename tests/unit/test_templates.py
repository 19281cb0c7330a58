"""Templates: files, bases and their merge rules, errors naming the file and the field, the JSON
schema, and ``vmkit create --template`` making the machine the template describes."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from tests.conftest import vmkit

from vmkit.errors import ConfigError, ExitCode
from vmkit.host import templates


def write(path: Path, data: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_extension_merges_as_documented(tmp_path: Path, vmkit_home: Path) -> None:
    write(tmp_path / "base.yaml", {
        "description": "the base", "message": "base message", "image": "micro", "cpus": 1, "memory": "256M",
        "ports": ["8080:80"], "limits": {"cpu_weight": 50, "cpu_max": 80},
        "provision": [{"script": "echo base"}], "probes": [{"script": "true", "hint": "base probe"}]})
    write(tmp_path / "child.yaml", {
        "base": "base.yaml", "cpus": 2, "ports": ["2222:22"], "limits": {"cpu_max": 90},
        "provision": [{"mode": "user", "when": "once", "script": "echo child"}]})
    t = templates.resolve(str(tmp_path / "child.yaml"))
    assert t.chain == [str(tmp_path / "base.yaml"), str(tmp_path / "child.yaml")]
    assert t.vm["cpus"] == 2 and t.vm["memory"] == "256M"                  # scalars: the child's win
    assert t.vm["limits"] == {"cpu_weight": 50, "cpu_max": 90}               # mappings merge key by key
    assert t.fields.ports == ["8080:80", "2222:22"]                          # these lists append, base first
    assert [p.script for p in t.fields.provision] == ["echo base", "echo child"]
    assert t.fields.provision[1].mode == "user" and t.fields.provision[1].when == "once"
    assert [p.hint for p in t.fields.probes] == ["base probe"]
    assert t.fields.image == "micro"
    assert t.fields.description == "" and t.fields.message == ""             # not inherited


def test_shipped_templates_resolve_and_match_the_schema(vmkit_home: Path) -> None:
    names = [n for n, _, _ in templates.available()]
    assert {"default", "docker", "dev"} <= set(names)
    schema = templates.json_schema()
    for name in names:
        t = templates.resolve(name)
        jsonschema.validate(yaml.safe_load(Path(t.source).read_text()), schema)
    docker = templates.resolve("docker")
    assert docker.fields.image == "debian-12-docker" and docker.chain[0].endswith("default.yaml")
    assert any("docker info" in p.script for p in docker.fields.probes)


def test_a_user_template_hides_a_shipped_one(vmkit_home: Path) -> None:
    own = templates.user_dir()
    own.mkdir(parents=True)
    write(own / "docker.yaml", {"description": "mine", "base": "default"})
    rows = {n: (w, d) for n, w, d in templates.available()}
    assert rows["docker"] == ("user", "mine")
    assert templates.resolve("docker").fields.image == "debian-12"


def test_errors_name_the_file_and_the_field(tmp_path: Path, vmkit_home: Path) -> None:
    bad = write(tmp_path / "bad.yaml", {"cpu": 2, "provision": [{"mode": "admin", "script": "x"}],
                                        "probes": [{"hint": "no script"}]})
    with pytest.raises(ConfigError) as info:
        templates.resolve(str(bad))
    fields = [p.field for p in info.value.problems]
    assert f"{bad}: cpu" in fields
    assert f"{bad}: provision.0.mode" in fields
    assert f"{bad}: probes.0.script" in fields
    res = vmkit("create", "x", "--template", str(bad), check=False)
    assert res.returncode == ExitCode.BAD_INPUT
    assert f"{bad}: provision.0.mode" in res.stdout + res.stderr
    assert not (vmkit_home / "instances" / "x").exists()


def test_bases_in_a_circle_are_refused(tmp_path: Path, vmkit_home: Path) -> None:
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="circle"):
        templates.resolve(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="template"):
        templates.resolve(str(write(tmp_path / "c.yaml", {"base": "no-such-template"})))


def test_vm_field_errors_at_create_name_the_template(tmp_path: Path, vmkit_home: Path, micro_image: object) -> None:
    t = write(tmp_path / "t.yaml", {"image": "micro", "cpus": 0})
    res = vmkit("create", "y", "--template", str(t), check=False)
    assert res.returncode == ExitCode.BAD_INPUT
    assert f"{t}: cpus" in res.stdout + res.stderr
    assert not (vmkit_home / "instances" / "y").exists()


def test_create_from_a_template_with_overrides(tmp_path: Path, vmkit_home: Path, micro_image: object) -> None:
    t = write(tmp_path / "t.yaml", {"base": "default", "image": "micro", "cpus": 2, "memory": "256M",
                                    "ports": ["18080:80"], "provision": [{"script": "echo hi"}],
                                    "probes": [{"script": "true"}], "message": "hello {name}"})
    vmkit("create", "m", "--template", str(t), "--memory", "384M")
    d = vmkit_home / "instances" / "m"
    vm = yaml.safe_load((d / "vm.yaml").read_text())
    assert vm["cpus"] == 2 and vm["memory"] == "384M" and vm["image"] == "micro"
    assert [f["host_port"] for f in vm["network"]["forwards"]] == [18080]
    kept = json.loads((d / "provision.json").read_text())
    assert kept["provision"][0]["script"] == "echo hi" and kept["message"] == "hello {name}"
    assert (d / "provision.json").stat().st_mode & 0o777 == 0o600
    shown = vmkit("template", "show", str(t), "--json")
    assert json.loads(shown.stdout)["template"]["cpus"] == 2


def test_a_template_from_a_url_with_a_relative_base(tmp_path: Path, vmkit_home: Path) -> None:
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    write(www / "common.yaml", {"base": "default", "memory": "2G", "probes": [{"script": "true"}]})
    write(www / "web.yaml", {"base": "common.yaml", "ports": ["8080:80"]})
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *_a: None  # type: ignore[assignment,method-assign]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        t = templates.resolve(f"{url}/web.yaml")
        assert t.name == "web" and t.chain[1:] == [f"{url}/common.yaml", f"{url}/web.yaml"]
        assert t.vm["memory"] == "2G" and t.fields.image == "debian-12" and t.fields.ports == ["8080:80"]
        with pytest.raises(ConfigError, match="HTTP 404"):
            templates.resolve(f"{url}/missing.yaml")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
