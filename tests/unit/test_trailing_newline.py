"""Every name, tag and id vmkit validates refuses a trailing newline (Python's ``$`` matches just
before a final "\\n", so ``re.match("^...$")`` let "web\\n" through)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from vmkit.config import (
    MachineConfig,
    Network,
    Share,
    StorageDevice,
    parse_config,
    validate_disk_id,
    validate_name,
)
from vmkit.errors import ConfigError, ImageError, VmkitError
from vmkit.host import cloudinit
from vmkit.host.images import debpkg
from vmkit.host.images.store import ImageStore, validate_image_name
from vmkit.host.instance import Instance
from vmkit.state import file as statefile
from vmkit.state import savestate


def _config(**extra: Any) -> MachineConfig:
    return parse_config({"name": "vm1", "boot": {"kernel": "/k"}, **extra})


def _seed(**extra: Any) -> None:
    spec = cloudinit.SeedSpec(**{"instance_id": "i-1", "hostname": "vm1", "authorized_keys": ("ssh-ed25519 AAAA x",),
                                 **extra})
    cloudinit.render_seed(spec)


CHECKS: dict[str, tuple[Callable[[str], object], str, type[Exception]]] = {
    # what: (validator, a valid value, the error it raises)
    "instance name": (validate_name, "web", ConfigError),
    "Instance()": (lambda v: Instance(v, Path("/nonexistent")), "web", ConfigError),
    "vm.yaml name": (lambda v: parse_config({"name": v, "boot": {"kernel": "/k"}}), "web", ConfigError),
    "snapshot tag": (savestate._check_tag, "before-upgrade", ConfigError),
    "disk id (vm.yaml)": (lambda v: StorageDevice.model_validate(
        {"attachment": {"type": "disk-image", "path": "/d"}, "id": v}), "data1", ValidationError),
    "disk id (detach)": (validate_disk_id, "data1", ConfigError),
    "share tag": (lambda v: Share.model_validate({"host_path": "/srv", "tag": v}), "src", ValidationError),
    "MAC (vm.yaml)": (lambda v: Network.model_validate({"mac": v}), "52:54:00:12:34:56", ValidationError),
    "cloud-init hostname": (lambda v: _seed(hostname=v), "vm1", ConfigError),
    "cloud-init user": (lambda v: _seed(user=v), "vmkit", ConfigError),
    "cloud-init MAC": (lambda v: _seed(mac=v), "52:54:00:12:34:56", ConfigError),
    "Debian package": (debpkg._check_name, "busybox-static", ImageError),
    "image name": (validate_image_name, "debian-12", ConfigError),
    "state-file salt": (lambda v: statefile._Encryption.model_validate(
        {"key_id": "k", "salt": v, "nonce_prefix": "00" * statefile.NONCE_PREFIX_SIZE,
         "chunk_size": statefile.MIN_CHUNK_SIZE}), "00" * statefile.SALT_SIZE, ValidationError),
}


@pytest.mark.parametrize("what", sorted(CHECKS))
def test_valid_value_passes_and_trailing_newline_is_refused(what: str) -> None:
    check, good, error = CHECKS[what]
    try:
        check(good)
    except VmkitError as exc:  # the seed needs more than a valid name (keys): only the name matters here
        assert "\n" not in good
        raise AssertionError(f"{what}: {good!r} refused: {exc}") from exc
    for bad in (good + "\n", good + "\r\n", "\n" + good):
        with pytest.raises(error):
            check(bad)


def test_snapshot_create_refuses_a_tag_with_a_newline_before_anything_else() -> None:
    with pytest.raises(ConfigError, match="tag"):
        asyncio.run(savestate.create_snapshot(None, "snap\n"))  # type: ignore[arg-type]


def test_cli_refuses_an_instance_name_with_a_newline(tmp_path: Path) -> None:
    from conftest import vmkit

    r = vmkit("create", "web\n", "--kernel", "/etc/hostname", check=False, env={"VMKIT_HOME": str(tmp_path / "home")})
    assert r.returncode == 2, r.stderr
    assert "not a valid name" in r.stderr
    assert not (tmp_path / "home" / "instances").exists() or not any((tmp_path / "home" / "instances").iterdir())


def test_image_store_refuses_a_name_with_a_newline(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        ImageStore(tmp_path).path("micro\n")
