"""``vmkit nbd serve``: argument checking and what it hands to the library (serving is faked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import vmkit.cli.nbd as cli
import vmkit.nbd
from vmkit.errors import ConfigError, ExitCode, NotFoundError
from vmkit.nbd import Export, NbdAddress

runner = CliRunner()


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake_serve(export: Export, **kw: Any) -> None:
        calls.append({"export": export, **kw})
        if "unix_path" in kw:
            address = NbdAddress(unix_path=Path(kw["unix_path"]))
        else:
            address = NbdAddress(host=kw["host"], port=kw["port"])
        kw["on_ready"](address)
        export.backend.write(0, b"served") if export.writable else None

    monkeypatch.setattr(vmkit.nbd, "serve", fake_serve)  # the command imports it when it runs
    return calls


def test_parse_size() -> None:
    assert cli.parse_size("4096") == 4096
    assert cli.parse_size("512M") == 512 << 20
    assert cli.parse_size("1G") == 1 << 30
    assert cli.parse_size("1GiB") == 1 << 30
    assert cli.parse_size("1.5k") == 1536
    for bad in ("", "x", "1Q", "-1G", "0.3"):
        with pytest.raises(ConfigError):
            cli.parse_size(bad)


def test_serve_file_on_a_unix_socket(served: list[dict[str, Any]], tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(8192))
    result = runner.invoke(cli.app, ["serve", str(image), "--socket", str(tmp_path / "s"), "-x", "disk"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"nbd+unix:///disk?socket={tmp_path / 's'}"
    (call,) = served
    export = call["export"]
    assert export.name == "disk" and export.writable and export.backend.size == 8192
    assert call["unix_path"] == tmp_path / "s"
    assert image.read_bytes()[:6] == b"served"


def test_serve_memory_read_only_on_tcp(served: list[dict[str, Any]]) -> None:
    result = runner.invoke(cli.app, ["serve", "--memory", "1M", "--port", "0", "--read-only", "--description", "d"])
    assert result.exit_code == 0, result.output
    (call,) = served
    assert (call["host"], call["port"]) == ("127.0.0.1", 0)
    assert not call["export"].writable and call["export"].description == "d"
    assert result.stdout.startswith("nbd://127.0.0.1:0/")
    assert "warning: plain TCP" in result.stderr and "every local user" in result.stderr
    assert call["tls"] is None


def test_default_address_and_backends(
    served: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMKIT_HOME", str(tmp_path / "home"))
    image = tmp_path / "disk.raw"
    image.write_bytes(b"base" + bytes(4092))
    result = runner.invoke(cli.app, ["serve", str(image), "--backend", "cow"])
    assert result.exit_code == 0, result.output
    # the default is a unix socket in a private directory, not TCP
    sock = tmp_path / "home" / "run" / "nbd.sock"
    assert served[-1]["unix_path"] == sock and "port" not in served[-1]
    assert result.stdout.splitlines()[0] == f"nbd+unix:///?socket={sock}"
    assert (sock.parent.stat().st_mode & 0o777) == 0o700
    assert "warning" not in result.output
    assert image.read_bytes()[:4] == b"base"  # cow: the write went to the overlay
    result = runner.invoke(cli.app, ["serve", str(image), "--backend", "dedup"])
    assert result.exit_code == 0
    assert "store_ratio" in result.output  # the saving is reported on exit
    listing = runner.invoke(cli.app, ["backends"])
    assert {"file", "memory", "cow", "dedup"} <= set(listing.stdout.split())


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--memory", "1M", "somefile"],
        ["--memory", "lots"],
        ["--memory", "1M", "--socket", "s", "--port", "1"],
        ["--memory", "1M", "--port", "70000"],
        ["--memory", "1M", "--backend", "nope"],
        ["--memory", "1M", "--backend", "file"],
        ["--memory", "1M", "--tls-verify-peer"],
        ["--memory", "1M", "--max-buffer-memory", "lots"],
        ["--memory", "1M", "--max-connections", "0"],
        ["--memory", "1M", "--handshake-timeout", "0"],
    ],
)
def test_bad_arguments_are_config_errors(served: list[dict[str, Any]], args: list[str]) -> None:
    result = runner.invoke(cli.app, ["serve", *args])
    assert isinstance(result.exception, ConfigError), result.output
    assert result.exception.exit_code == ExitCode.BAD_INPUT
    assert not served


def test_missing_file_is_not_found(served: list[dict[str, Any]], tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["serve", str(tmp_path / "nope.raw")])
    assert isinstance(result.exception, NotFoundError)
    assert result.exception.exit_code == ExitCode.NOT_FOUND
