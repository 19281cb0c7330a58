"""The NoCloud seed: meta-data, user-data and network-config on an ISO labelled ``cidata``.

The ISO is written with :mod:`pycdlib` (ISO 9660 + Joliet + Rock Ridge, like ``cloud-localds``)
and attached to the guest as a second virtio-blk disk; cloud-init's NoCloud datasource finds it by
its volume label.

What the user-data does (see :func:`base_user_data`):

* one user (``vmkit`` by default) with passwordless sudo, a locked password and the instance's
  SSH public key;
* the guest's SSH host keys (``ssh_keys``), generated on the host, so ``known_hosts`` is pinned
  from the first boot; no other host key types are generated;
* ``locale: false`` (else ``update-locale`` fails and cloud-init reports ``error``) and
  ``manage_etc_hosts: true``;
* settings that make first boot cheaper on any image: no key fingerprints or host keys printed to
  the console (each runs ``ssh-keygen``), no package update/upgrade;
* ``final_message`` starting with :data:`FINAL_MARKER`, a console line that says cloud-init is done;
* shared folders mounted at every boot (:class:`FstabEntry`): a ``bootcmd`` adds their lines to
  ``/etc/fstab`` (once), creates the mount points and mounts them. It runs in cloud-init's init
  stage, before SSH and the guest agent, so a guest that answers has its shares mounted; later
  boots mount them from ``/etc/fstab`` (systemd) already. Not cloud-init's ``mounts:``: cloud-init
  22.4 (Debian 12) keeps an entry only if its device is a block device or ``host:path``, and drops
  a virtiofs or 9p tag ("Ignoring nonexistent named mount").

Settings that must live in the image (``datasource_list``, trimmed module lists) are written by
:mod:`vmkit.host.images.debian` into ``/etc/cloud/cloud.cfg.d``: module names differ between cloud-init
versions, and an unknown module in a list is reported as an error, so a seed that may boot a
pulled image does not carry them.

**Merging extra user-data** (:func:`merge_user_data`): extra ``#cloud-config`` (text or mapping) is
merged into the generated one key by key: two mappings merge recursively, two lists are
concatenated (generated items first, so a ``users`` list *adds* users and a ``runcmd`` list adds
commands), anything else is replaced by the user's value (user values win). The user can therefore
override ``ssh_keys`` or the default user's settings, which breaks what vmkit relies on (pinned host
key, SSH login): do that knowingly. Extra user-data that is a script (``#!``) or a boothook
(``#cloud-boothook``) is not merged but sent beside the cloud-config as a MIME multipart message,
which cloud-init runs as usual.
"""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any, BinaryIO, cast

import yaml

from vmkit.errors import ConfigError, ImageError, Problem
from vmkit.fsutil import atomic_open
from vmkit.host.sshkeys import HostKeys

VOLUME_LABEL = "cidata"
# cloud-init prints this on the console when its last stage is done (final_message in user-data).
FINAL_MARKER = "vmkit: cloud-init final done"
DEFAULT_USER = "vmkit"
META_DATA = "meta-data"
USER_DATA = "user-data"
NETWORK_CONFIG = "network-config"
VENDOR_DATA = "vendor-data"

# ISO 9660 names (level 3 allows 30 d-characters); Rock Ridge and Joliet carry the real names.
_ISO_NAMES = {
    META_DATA: "/METADATA.;1",
    USER_DATA: "/USERDATA.;1",
    NETWORK_CONFIG: "/NETWORKCONFIG.;1",
    VENDOR_DATA: "/VENDORDATA.;1",
}

# used with fullmatch: ``$`` would accept a trailing newline (a second line in the seed)
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")

# Other user-data formats cloud-init understands that are passed through as MIME parts.
_PASSTHROUGH = {
    "#!": "text/x-shellscript",
    "#cloud-boothook": "text/cloud-boothook",
}


_FSTAB_ESCAPES = {" ": "\\040", "\t": "\\011", "\n": "\\012", "\\": "\\134"}


@dataclass(frozen=True)
class FstabEntry:
    """One ``/etc/fstab`` line: what (a share's tag), where, file system type, options."""

    spec: str
    file: str
    vfstype: str
    options: str

    def line(self) -> str:
        fields = [self.spec, self.file, self.vfstype, self.options]
        return " ".join("".join(_FSTAB_ESCAPES.get(c, c) for c in f) for f in fields) + " 0 0"


# bootcmd (every boot, in cloud-init's init stage, before SSH and the guest agent start): for each
# (fstab line, mount point) pair, add the line to /etc/fstab if it is not there, create the mount
# point, and mount it unless it is mounted (later boots: systemd mounted it from /etc/fstab).
_BOOT_MOUNTS = """\
while [ "$#" -ge 2 ]; do
  grep -qxF -- "$1" /etc/fstab || printf '%s\\n' "$1" >> /etc/fstab
  mkdir -p -- "$2"
  mountpoint -q -- "$2" || mount -- "$2" || echo "vmkit: could not mount $2" >&2
  shift 2
done
"""


def boot_mounts_cmd(mounts: Sequence[FstabEntry]) -> list[str]:
    """The bootcmd entry that installs ``mounts`` in /etc/fstab and mounts them (idempotent)."""
    args = [x for m in mounts for x in (m.line(), m.file)]
    return ["sh", "-c", _BOOT_MOUNTS, "vmkit-mounts", *args]


@dataclass(frozen=True)
class SeedSpec:
    """Everything the seed depends on."""

    instance_id: str
    hostname: str
    authorized_keys: tuple[str, ...]
    host_keys: HostKeys | None = None
    user: str = DEFAULT_USER
    mac: str | None = None  # the NAT NIC's MAC; None: match any ethernet by name
    extra_user_data: str | Mapping[str, Any] | None = None
    mounts: tuple[FstabEntry, ...] = ()  # shared folders mounted at every boot
    uid: int | None = None  # the user's uid; None: the first free one (1000)
    resolv_conf: str | None = None  # /etc/resolv.conf written at every boot (machines on vmkit networks)
    login_screen: bool = False  # a machine with a display: a login prompt on its screen (tty1)


@dataclass(frozen=True)
class SeedFiles:
    """The rendered text of each seed file."""

    meta_data: str
    user_data: str
    network_config: str

    def as_dict(self) -> dict[str, str]:
        return {META_DATA: self.meta_data, USER_DATA: self.user_data, NETWORK_CONFIG: self.network_config}


def new_instance_id() -> str:
    """A fresh cloud-init instance-id (a new one makes cloud-init run its per-instance modules again)."""
    return f"i-{uuid.uuid4().hex}"


class _Dumper(yaml.SafeDumper):
    """YAML that keeps multi-line strings (private keys) readable as ``|`` blocks."""


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_presenter)


def dump_yaml(data: Mapping[str, Any]) -> str:
    return yaml.dump(dict(data), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=1000)


def _check(spec: SeedSpec) -> None:
    problems = []
    if not _HOSTNAME_RE.fullmatch(spec.hostname):
        problems.append(("hostname", f"{spec.hostname!r} is not a valid host name: use letters, digits "
                                     "and inner '-', at most 63 characters"))
    if not _USER_RE.fullmatch(spec.user):
        problems.append(("user", f"{spec.user!r} is not a valid user name: start with a lower-case letter "
                                 "or '_', then lower-case letters, digits, '_' or '-'"))
    if not spec.instance_id or any(c.isspace() for c in spec.instance_id):
        problems.append(("instance_id", f"{spec.instance_id!r} is not an instance-id: use a non-empty "
                                        "word without spaces"))
    if spec.uid is not None and not 1000 <= spec.uid < 60000:
        problems.append(("uid", f"{spec.uid} is not a uid for a normal user: use 1000-59999"))
    if spec.mac is not None and not _MAC_RE.fullmatch(spec.mac):
        problems.append(("mac", f"{spec.mac!r} is not a MAC address: use six lower-case hex pairs"))
    for i, key in enumerate(spec.authorized_keys):
        if len(key.split()) < 2 or "\n" in key.strip():
            problems.append((f"authorized_keys[{i}]", "not an OpenSSH public key line"))
    if problems:
        raise ConfigError([Problem(f, m) for f, m in problems], context="cloud-init seed")


def meta_data(instance_id: str, hostname: str) -> dict[str, Any]:
    return {"instance-id": instance_id, "local-hostname": hostname}


def network_config(mac: str | None = None) -> dict[str, Any]:
    """Network config v2: DHCPv4 on the NAT NIC, matched by MAC (or any ``en*``/``eth*`` NIC)."""
    match: dict[str, str] = {"macaddress": mac} if mac else {"name": "e*"}
    return {
        "version": 2,
        "ethernets": {
            "nat0": {"match": match, "dhcp4": True, "dhcp6": False},
        },
    }


LOGIN_SCREEN_CMD = ["sh", "-c", "systemctl unmask getty@tty1.service && systemctl start --no-block getty@tty1.service"]
"""bootcmd of a machine with a display: vmkit's Debian image masks the screen's getty (a headless
machine has no use for it); this brings the login prompt back on tty1 (every boot, idempotent)."""


def base_user_data(*, hostname: str, user: str, authorized_keys: Sequence[str],
                   host_keys: HostKeys | None, mounts: Sequence[FstabEntry] = (),
                   uid: int | None = None, login_screen: bool = False) -> dict[str, Any]:
    """The cloud-config vmkit generates, before extra user-data is merged in."""
    cfg: dict[str, Any] = {
        "hostname": hostname,
        "preserve_hostname": False,
        "manage_etc_hosts": True,
        "locale": False,
        "users": [
            {
                "name": user,
                "gecos": "vmkit user",
                "shell": "/bin/bash",
                "groups": ["sudo"],
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "lock_passwd": True,
                "ssh_authorized_keys": list(authorized_keys),
            }
        ],
        "disable_root": True,
        "ssh_deletekeys": True,
    }
    if uid is not None:
        cfg["users"][0]["uid"] = uid
    if mounts:
        cfg["bootcmd"] = [boot_mounts_cmd(mounts)]
    if login_screen:
        cfg["bootcmd"] = [*cfg.get("bootcmd", []), LOGIN_SCREEN_CMD]
    if host_keys is not None:
        cfg["ssh_keys"] = host_keys.cloud_config()
    # Only used when no ssh_keys are given (cloud-init then generates host keys): ed25519 only.
    cfg["ssh_genkeytypes"] = ["ed25519"]
    cfg.update({
        # First-boot trims that are valid on any cloud-init: no ssh-keygen runs to print keys.
        "no_ssh_fingerprints": True,
        "ssh": {"emit_keys_to_console": False},
        "package_update": False,
        "package_upgrade": False,
        # A fixed console line that says cloud-init is done, on any image.
        "final_message": f"{FINAL_MARKER} after $UPTIME s",
    })
    return cfg


def merge_user_data(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into ``base``: mappings recursively, lists concatenated, else ``extra`` wins.

    Neither argument is modified.
    """
    out: dict[str, Any] = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = merge_user_data(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            out[key] = [*old, *value]
        else:
            out[key] = value
    return out


def parse_extra_user_data(extra: str | Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Split extra user-data into a cloud-config mapping to merge and MIME parts to pass through.

    Returns ``(cloud_config, [(mime_type, text), ...])``.
    """
    if isinstance(extra, Mapping):
        return dict(extra), []
    text = extra.lstrip("\ufeff")
    if text.startswith("#cloud-config"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError.single("user_data", f"the extra #cloud-config is not valid YAML: {exc}") from exc
        if data is None:
            return {}, []
        if not isinstance(data, dict):
            raise ConfigError.single("user_data", "the extra #cloud-config must be a YAML mapping "
                                                  f"(key: value), not a {type(data).__name__}")
        return data, []
    for prefix, mime in _PASSTHROUGH.items():
        if text.startswith(prefix):
            return {}, [(mime, text)]
    first = text.splitlines()[0] if text.strip() else "(empty)"
    raise ConfigError.single(
        "user_data",
        f"unsupported user-data starting with {first[:40]!r}: use '#cloud-config' YAML, "
        "a '#!' script or a '#cloud-boothook'",
    )


def render_user_data(cloud_config: Mapping[str, Any], parts: Sequence[tuple[str, str]] = ()) -> str:
    """``#cloud-config`` text, or a MIME multipart message if there are pass-through parts."""
    text = "#cloud-config\n" + dump_yaml(cloud_config)
    if not parts:
        return text
    msg = MIMEMultipart(boundary="==vmkit-user-data==")
    sub = MIMEText(text, "cloud-config", "utf-8")
    sub.add_header("Content-Disposition", 'attachment; filename="vmkit.cfg"')
    msg.attach(sub)
    for i, (mime, body) in enumerate(parts):
        maintype, subtype = mime.split("/", 1)
        assert maintype == "text"
        part = MIMEText(body, subtype, "utf-8")
        part.add_header("Content-Disposition", f'attachment; filename="part-{i:03d}"')
        msg.attach(part)
    return msg.as_string()


def render_seed(spec: SeedSpec) -> SeedFiles:
    """The three seed files for ``spec`` (validated first; raises :class:`ConfigError`)."""
    _check(spec)
    cfg = base_user_data(hostname=spec.hostname, user=spec.user, authorized_keys=spec.authorized_keys,
                         host_keys=spec.host_keys, mounts=spec.mounts, uid=spec.uid,
                         login_screen=spec.login_screen)
    if spec.resolv_conf is not None:  # the image's resolv.conf names QEMU's user-mode DNS
        cfg["bootcmd"] = [["sh", "-c", 'printf "%s" "$1" > /etc/resolv.conf', "vmkit-resolv", spec.resolv_conf],
                          *cfg.get("bootcmd", [])]
    parts: list[tuple[str, str]] = []
    if spec.extra_user_data is not None:
        extra, parts = parse_extra_user_data(spec.extra_user_data)
        cfg = merge_user_data(cfg, extra)
    return SeedFiles(
        meta_data=dump_yaml(meta_data(spec.instance_id, spec.hostname)),
        user_data=render_user_data(cfg, parts),
        network_config=dump_yaml(network_config(spec.mac)),
    )


def write_seed_iso(path: Path, files: SeedFiles | Mapping[str, str | bytes]) -> None:
    """Write a NoCloud ISO (label ``cidata``) holding ``files`` to ``path``, atomically, mode 0600.

    ``files`` maps seed file names (``meta-data``, ``user-data``, ``network-config``,
    ``vendor-data``) to their content. The ISO holds private host keys: keep it private.
    """
    entries = files.as_dict() if isinstance(files, SeedFiles) else dict(files)
    if META_DATA not in entries or USER_DATA not in entries:
        raise ConfigError.single("seed", "a NoCloud seed needs at least meta-data and user-data")
    import pycdlib  # imported here: a command that only reads configurations does not load it

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=VOLUME_LABEL, joliet=3, rock_ridge="1.09")
    try:
        for name, content in entries.items():
            if name not in _ISO_NAMES:
                raise ConfigError.single("seed", f"{name!r} is not a NoCloud seed file: use "
                                                 f"{', '.join(_ISO_NAMES)}")
            data = content.encode() if isinstance(content, str) else content
            iso.add_fp(io.BytesIO(data), len(data), _ISO_NAMES[name], rr_name=name, joliet_path=f"/{name}")
        with atomic_open(path, 0o600) as fh:
            iso.write_fp(cast(BinaryIO, fh))
    except pycdlib.pycdlibexception.PyCdlibException as exc:
        raise ImageError(f"cannot write the cloud-init seed {path}: {exc}") from exc
    finally:
        iso.close()


def make_seed_iso(path: Path, spec: SeedSpec) -> SeedFiles:
    """Render the seed for ``spec`` and write it to ``path``; return what was written."""
    files = render_seed(spec)
    write_seed_iso(path, files)
    return files


def read_seed_iso(path: Path) -> dict[str, bytes]:
    """Read a seed ISO back: ``{name: content}`` by Rock Ridge name (Joliet if there is no RR)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    try:
        iso.open(str(path))
    except (OSError, pycdlib.pycdlibexception.PyCdlibException) as exc:
        raise ImageError(f"{path} is not a readable ISO image: {exc}") from exc
    try:
        out: dict[str, bytes] = {}
        facade_rr = iso.has_rock_ridge()
        listing = iso.list_children(rr_path="/") if facade_rr else iso.list_children(joliet_path="/")
        for child in listing:
            if child is None or child.is_dot() or child.is_dotdot() or child.is_dir():
                continue
            if facade_rr:
                name = child.rock_ridge.name().decode()
                kwargs = {"rr_path": f"/{name}"}
            else:
                name = child.file_identifier().decode("utf-16_be")
                kwargs = {"joliet_path": f"/{name}"}
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, **kwargs)
            out[name] = buf.getvalue()
        return out
    finally:
        iso.close()


def volume_label(path: Path) -> tuple[str, str | None]:
    """The ISO's primary volume identifier and its Joliet one (None without Joliet)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        pvd = iso.pvd.volume_identifier.decode().rstrip()
        joliet = None
        if iso.joliet_vd is not None:
            joliet = iso.joliet_vd.volume_identifier.decode("utf-16_be").rstrip()
        return pvd, joliet
    finally:
        iso.close()
