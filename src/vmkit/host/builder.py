"""From what a user asks for (``vmkit create`` options, a YAML file, an image) to a configuration.

All problems in the options are collected and reported together, each naming the option.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vmkit.config import ARCHES, MachineConfig, PortForward, parse_config, parse_size
from vmkit.errors import ConfigError, NotFoundError, Problem
from vmkit.host import cgroups
from vmkit.host.images import micro
from vmkit.host.images.store import ImageStore
from vmkit.host.instance import Instance
from vmkit.host.provision import config_additions, free_port


@dataclass
class CreateOptions:
    name: str
    cpus: int | None = None
    memory: str | None = None
    max_cpus: int | None = None
    max_memory: str | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    disks: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    user_data: Path | None = None  # cloud images: extra user-data merged into vmkit's
    image: str | None = None
    run: str | None = None
    accel: str | None = None
    from_file: Path | None = None
    limits: dict[str, str] = field(default_factory=dict)
    """cgroup limits by field (``cpu_max``: ``"50"``, ``memory_max``: ``"1G"``), as ``vmkit set`` takes them."""
    balloon_min: str | None = None  # automatic ballooning: the least usable memory (a size)
    balloon_shares: int | None = None
    networks: list[str] = field(default_factory=list)
    """``--network NAME[,model=MODEL][,mac=MAC]`` (repeatable); ``user`` is QEMU's user-mode NAT."""
    display: str | None = None
    """A screen (``vmkit create --display``): ``default`` (1280x800) or ``WIDTHxHEIGHT``; None: headless."""
    arch: str | None = None
    """The guest's architecture (``--arch aarch64``): picks the image built for it (``debian-12`` ->
    ``debian-12-aarch64``); default: the image's own, else x86_64."""
    binfmt: list[str] = field(default_factory=list)
    """Foreign architectures the guest runs programs of (``--binfmt aarch64``, repeatable)."""


def image_for_arch(image: str, arch: str | None) -> str:
    """The store name of ``image`` built for ``arch``: ``debian-12`` -> ``debian-12-aarch64`` (x86_64
    images carry no suffix; a name that already ends in ``-<arch>`` stays as it is)."""
    if arch is None or arch == "x86_64" or image.endswith(f"-{arch}"):
        return image
    return f"{image}-{arch}"


def _micro_names() -> set[str]:
    return {micro.NAME, micro.FULL_NAME, *(micro.image_name(micro.NAME, a) for a in ARCHES)}


def display_config(spec: str) -> dict[str, Any]:
    """``--display``'s value as vm.yaml's ``display:`` (ValueError saying what to give)."""
    if spec == "default":
        return {"type": "virtio-vga"}
    m = re.fullmatch(r"(\d{1,5})[xX](\d{1,5})", spec.strip())
    if not m:
        raise ValueError(f"{spec!r} is not a display size: use WIDTHxHEIGHT, e.g. 1920x1080")
    return {"type": "virtio-vga", "width": int(m.group(1)), "height": int(m.group(2))}


def with_screen_console(cmdline: str) -> str:
    """The kernel also writes to the screen (``console=tty0`` before ``console=ttyS0``: the serial
    port stays ``/dev/console``, where systemd's messages and the readiness marker go)."""
    words = cmdline.split()
    if "console=tty0" in words:
        return cmdline
    for i, w in enumerate(words):
        if w.startswith("console=ttyS"):
            return " ".join([*words[:i], "console=tty0", *words[i:]])
    return " ".join([*words, "console=tty0"])


def disk_size_option(opts: CreateOptions) -> str | None:
    """``--disk 20G`` with a cloud image is the size of its root disk, not a file to attach."""
    sizes = [d for d in opts.disks if _is_size(d)]
    return sizes[-1] if sizes else None


def _is_size(spec: str) -> bool:
    try:
        parse_size(spec)
    except ValueError:
        return False
    return not Path(spec).exists()


def random_mac() -> str:
    """A locally administered unicast MAC in QEMU's 52:54:00 range."""
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def parse_disk(spec: str) -> dict[str, Any]:
    """A ``--disk`` value.

    Files: ``PATH[:ro][:format=raw|qcow2][:cache=MODE][:kind=KIND][:serial=S]``.
    NBD: ``URL[,ro][,kind=KIND][,serial=S][,on-error=pause|report][,reconnect-delay=S]`` with URL
    ``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``.
    KIND is virtio-blk (default), nvme, usb-storage, sata or ide; S the serial number the guest sees.
    """
    device: dict[str, Any] = {"kind": "virtio-blk"}
    if spec.startswith(("nbd://", "nbd+unix://")):
        url, *flags = spec.split(",")
        att: dict[str, Any] = {"type": "nbd", "url": url}
        keys = {"on-error": "on_error", "reconnect-delay": "reconnect_delay"}
        usage = "use URL[,ro][,kind=KIND][,on-error=pause|report][,reconnect-delay=S]"
    else:
        path, *flags = spec.split(":")
        att = {"type": "disk-image", "path": str(Path(path).expanduser().resolve())}
        keys = {"format": "format", "cache": "cache"}
        usage = "use PATH[:ro][:format=raw|qcow2][:cache=MODE][:kind=virtio-blk|nvme|usb-storage|sata|ide][:serial=S]"
    for flag in flags:
        key, _, value = flag.partition("=")
        if flag == "ro":
            att["read_only"] = True
        elif key == "kind" and value:
            device["kind"] = value
        elif key == "serial" and value:
            device["serial"] = value
        elif key in keys and value:
            att[keys[key]] = value
        else:
            raise ValueError(f"unknown disk flag {flag!r}: {usage}")
    return {**device, "attachment": att}


def parse_mount(spec: str) -> dict[str, Any]:
    """``HOST[:GUEST][:ro][,type=virtiofs|9p|sshfs][,tag=T][,cache=auto|always|none]``.

    GUEST defaults to the same path as HOST (as Lima does); ``~`` is expanded on the host.
    """
    body, *opts = spec.split(",")
    parts = body.split(":")
    share: dict[str, Any] = {"host_path": str(Path(parts[0]).expanduser().resolve())}
    rest = parts[1:]
    if rest and rest[-1] == "ro":
        share["read_only"] = True
        rest = rest[:-1]
    if len(rest) > 1:
        raise ValueError(f"{spec!r} is not a mount: use HOST[:GUEST][:ro][,type=virtiofs|9p|sshfs]")
    if rest and rest[0]:
        share["guest_path"] = rest[0]
    for opt in opts:
        key, _, value = opt.partition("=")
        if key in ("type", "tag", "cache") and value:
            share[key] = value
        else:
            raise ValueError(f"unknown mount option {opt!r}: use type=, tag= or cache=")
    return share


NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139")


def parse_network(spec: str) -> dict[str, Any]:
    """``NAME[,model=MODEL][,mac=MAC]`` -> ``{"network": NAME, ...}`` (``user``: the user-mode NIC)."""
    name, *opts = spec.split(",")
    out: dict[str, Any] = {"network": name}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in ("model", "mac"):
            raise ValueError(f"{opt!r} in {spec!r} is not a NIC option: use NAME[,model=MODEL][,mac=MAC]")
        if key == "model" and value not in NIC_MODELS:
            raise ValueError(f"{value!r} is not a NIC model: use one of {', '.join(NIC_MODELS)}")
        out[key] = value
    if not name:
        raise ValueError(f"{spec!r} names no network: use NAME[,model=MODEL] (see `vmkit network list`)")
    return out


def config_from_options(opts: CreateOptions, store: ImageStore | None = None) -> MachineConfig:
    problems: list[Problem] = []
    data: dict[str, Any] = {}
    if opts.from_file is not None:
        try:
            loaded = yaml.safe_load(opts.from_file.read_text())
        except FileNotFoundError:
            raise ConfigError.single("--from", f"{opts.from_file} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError.single("--from", f"{opts.from_file} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError.single("--from", f"{opts.from_file} must hold a mapping of settings")
        data = loaded
    data["name"] = opts.name
    for key, option, size in (("memory", "--memory", opts.memory), ("max_memory", "--max-memory", opts.max_memory),
                              ("balloon_min", "--balloon-min", opts.balloon_min)):
        if size is not None:
            try:
                data[key] = parse_size(size)
            except ValueError as exc:
                problems.append(Problem(option, str(exc)))
    if opts.cpus is not None:
        data["cpus"] = opts.cpus
    if opts.max_cpus is not None:
        data["max_cpus"] = opts.max_cpus
    if opts.accel is not None:
        data["accel"] = opts.accel
    if opts.limits:
        try:
            data["limits"] = {**(data.get("limits") or {}), **cgroups.parse_limit_changes(dict(opts.limits))}
        except ConfigError as exc:
            problems += [Problem(cgroups.option_name(p.field), p.message) for p in exc.problems]
    if opts.balloon_shares is not None:
        data["balloon_shares"] = opts.balloon_shares
    if opts.arch is not None:
        if opts.arch not in ARCHES:
            problems.append(Problem("--arch", f"{opts.arch!r} is not an architecture vmkit runs: use "
                                    f"{', '.join(ARCHES)}"))
        else:
            data["arch"] = opts.arch
    if opts.binfmt:
        data["binfmt"] = [*(data.get("binfmt") or []), *opts.binfmt]

    boot: dict[str, Any] = dict(data.get("boot") or {})
    extra_cmdline = [opts.cmdline] if opts.cmdline else []
    if opts.image is not None:
        if opts.kernel is not None:
            problems.append(Problem("--kernel", "give either --image or --kernel, not both"))
        image_name = image_for_arch(opts.image, opts.arch)
        try:
            image = (store or ImageStore()).get(image_name)
        except NotFoundError as exc:
            base = image_name.removesuffix(f"-{opts.arch}")
            hint = (f"build it: vmkit image build {base} --arch {opts.arch}" if image_name != opts.image
                    else exc.hint)
            problems.append(Problem("--image", f"{exc.message}: {hint}"))
        else:
            image_arch = str(image.manifest.extra.get("arch", "x86_64"))
            if opts.arch is not None and opts.arch != image_arch:
                problems.append(Problem("--arch", f"image {image_name!r} is an {image_arch} image, not "
                                        f"{opts.arch}: give --arch {image_arch} or another image"))
            data["arch"] = image_arch
            if image.kernel is None:
                problems.append(Problem("--image", f"image {opts.image!r} has no kernel for direct boot"))
            elif image.manifest.kind == "disk":
                if image.disk is None:
                    problems.append(Problem("--image", f"image {opts.image!r} has no disk"))
                else:
                    add = config_additions(Instance(opts.name).dir, image, ssh_port=free_port())
                    boot = add.pop("boot")
                    data["storage"] = [*add.pop("storage"), *(data.get("storage") or [])]
                    net = dict(data.get("network") or {"mode": "user"})
                    net["forwards"] = [*add.pop("forwards"), *(net.get("forwards") or [])]
                    data["network"] = net
                    data.update(add)
                    data["image"] = image_name
                    data.setdefault("memory", 1 << 30)  # cloud-init and systemd want more than the 512M default
            else:
                boot = {"kind": "linux", "kernel": str(image.kernel),
                        "initrd": str(image.initrd) if image.initrd else None, "cmdline": image.manifest.cmdline}
                data["image"] = image_name
                if image.manifest.ready_marker:
                    data["readiness"] = {**(data.get("readiness") or {}),
                                         "serial_marker": image.manifest.ready_marker}
    if opts.kernel is not None:
        boot["kernel"] = str(opts.kernel.expanduser().resolve())
    if opts.initrd is not None:
        boot["initrd"] = str(opts.initrd.expanduser().resolve())
    if opts.run is not None:
        if data.get("image") not in _micro_names():
            problems.append(Problem("--run", f"--run needs --image {micro.NAME} or {micro.FULL_NAME} "
                                    "(their init runs the command)"))
        else:
            try:
                extra_cmdline.append(micro.run_parameter(opts.run))
            except ConfigError as exc:
                problems += [Problem("--run", p.message) for p in exc.problems]
    if extra_cmdline:
        boot["cmdline"] = " ".join(filter(None, [boot.get("cmdline", ""), *extra_cmdline]))
    if opts.display is not None:
        try:
            data["display"] = display_config(opts.display)
        except ValueError as exc:
            problems.append(Problem("--display", str(exc)))
        else:
            boot["cmdline"] = with_screen_console(boot.get("cmdline") or "")
    if not boot.get("kernel"):
        problems.append(Problem("--kernel", "no kernel: give --kernel PATH or --image NAME "
                                "(build one with `vmkit image build micro`)"))
    data["boot"] = boot

    shares = list(data.get("shares") or [])
    for spec in opts.mounts:
        try:
            shares.append(parse_mount(spec))
        except ValueError as exc:
            problems.append(Problem("--mount", str(exc)))
    data["shares"] = shares

    storage = list(data.get("storage") or [])
    is_cloud = data.get("agent") is True and opts.image is not None
    if opts.user_data is not None and not is_cloud:
        problems.append(Problem("--user-data", "user-data needs a cloud image (e.g. --image debian-12)"))
    for spec in opts.disks:
        if is_cloud and _is_size(spec):
            continue  # the root disk's size (see disk_size_option)
        try:
            storage.append(parse_disk(spec))
        except ValueError as exc:
            problems.append(Problem("--disk", str(exc)))
    data["storage"] = storage

    network = dict(data.get("network") or {"mode": "user"}) if data.get("network", {}) is not None else None
    if opts.networks:
        nics: list[dict[str, Any]] = []
        user: dict[str, Any] | None = None
        for spec in opts.networks:
            try:
                nic = parse_network(spec)
            except ValueError as exc:
                problems.append(Problem("--network", str(exc)))
                continue
            if nic["network"] == "user":
                user = nic
            else:
                nics.append(nic)
        data["networks"] = [*(data.get("networks") or []), *nics]
        network = dict(network or {})
        if user is not None:
            network["mode"] = "user"
            network.update({k: v for k, v in user.items() if k != "network"})
        else:
            network["mode"] = "none"  # only vmkit networks: forwards go to the machine's address there
    if network is not None:
        forwards = list(network.get("forwards") or [])
        for spec in opts.ports:
            try:
                forwards.append(PortForward.parse(spec).model_dump(mode="json"))
            except ValueError as exc:
                problems.append(Problem("--port", str(exc)))
        network["forwards"] = forwards
        network.setdefault("mac", random_mac())
        data["network"] = network
    elif opts.ports:
        problems.append(Problem("--port", "the configuration has no network: port forwards need one"))

    if problems:
        # also report what the structure check finds, so the user sees everything at once
        try:
            parse_config(data)
        except ConfigError as exc:
            problems += [p for p in exc.problems if p.field not in ("boot.kernel", "boot")]
        raise ConfigError(problems, context="options")
    try:
        return parse_config(data)
    except ConfigError as exc:  # the settings given as options are the options' problems
        raise ConfigError([Problem(_OPTION_FIELDS.get(p.field, p.field), p.message) for p in exc.problems],
                          context="options") from None


_OPTION_FIELDS = {"balloon_min": "--balloon-min", "balloon_shares": "--balloon-shares"}
