"""Templates: YAML files that describe a ready machine (Lima's shape), resolved into what
``vmkit create`` needs and what ``vmkit start`` runs in the guest.

A template is a mapping with

* template keys: ``base`` (another template, or a list of them, that this one extends),
  ``description``, ``message`` (printed after the first ready start), ``image``, ``disk`` (root
  disk size), ``ports`` and ``mounts`` (the ``--port``/``--mount`` specs of ``vmkit create``),
  ``provision`` (scripts run in the guest) and ``probes`` (checks that must pass before ``vmkit
  start`` returns);
* any top-level vm.yaml field (``cpus``, ``memory``, ``limits``, ``readiness``, ...).

Where a template comes from (:func:`resolve`): a path (``./t.yaml``, anything with ``/`` or ending in
``.yaml``/``.yml``), an ``http(s)://`` URL, or a name: ``$VMKIT_HOME/config/templates/NAME.yaml``
(the user's own) before the ones shipped with vmkit (:data:`SHIPPED_DIR`).

Merging a template over its base (:func:`merge`, the rules the README documents): scalars of the
template replace the base's; mappings merge key by key (recursively); the lists ``provision``,
``probes``, ``ports`` and ``mounts`` are the base's followed by the template's; any other list is
replaced. ``base`` may be a list: bases are merged left to right, then the template over them.
``description`` and ``message`` are not inherited (each template describes itself).
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vmkit.errors import ConfigError, NotFoundError, Problem
from vmkit.host import paths

SHIPPED_DIR = Path(__file__).parent / "shipped"
SUFFIX = ".yaml"
APPENDED = ("provision", "probes", "ports", "mounts")
"""Lists a template adds to its base's (every other list replaces the base's)."""
NOT_INHERITED = ("description", "message")
MAX_DEPTH = 16
SIZE_PATTERN = r"^[0-9]+(\.[0-9]+)?\s*([KkMmGgTt]i?[Bb]?|[Bb])?$"
MAX_URL_BYTES = 1 << 20
TEMPLATE_KEYS = ("base", "description", "message", "image", "disk", "ports", "mounts", "provision", "probes")
VM_KEYS_REFUSED = ("name", "boot", "image")
"""vm.yaml fields a template cannot set directly: the name is the machine's, the boot comes from ``image``."""


class ProvisionStep(BaseModel):
    """One script run in the guest by ``vmkit start``, once the guest agent answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["system", "user"] = Field(
        default="system", description="system: as root; user: as the machine's user (vmkit), with a login shell")
    script: str = Field(min_length=1, description="a shell script (run by /bin/sh unless it starts with #!)")
    when: Literal["boot", "once"] = Field(
        default="boot", description="boot: at every boot (as Lima; write it to be run again), "
                                    "once: on the first boot that runs it to success only")
    timeout: float = Field(default=1800.0, gt=0, le=86400, description="seconds the script may run")


class Probe(BaseModel):
    """A check run in the guest after provisioning, until it exits 0 or its timeout passes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    script: str = Field(min_length=1, description="a shell script; exit code 0 means ready")
    hint: str = Field(default="", description="what to tell the user when it never passes")
    mode: Literal["system", "user"] = "system"
    timeout: float = Field(default=120.0, gt=0, le=86400, description="seconds to keep trying")
    description: str = ""


class TemplateFields(BaseModel):
    """The template-only keys (vm.yaml's fields are checked by vm.yaml's own model at create)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    base: str | list[str] | None = Field(default=None, description="template(s) this one extends: a name, "
                                         "a file (relative to this one) or a URL")
    description: str = ""
    message: str = Field(default="", description="printed after `vmkit start` ran the provisioning")
    image: str | None = Field(default=None, description="the image to boot (`vmkit image list`)")
    disk: str | None = Field(default=None, description="root disk size of a cloud image, e.g. 20G")
    ports: list[str] = Field(default_factory=list, description="port forwards, as `vmkit create --port`")
    mounts: list[str] = Field(default_factory=list, description="shares, as `vmkit create --mount` ('~' is the "
                                                                 "host user's home)")
    provision: list[ProvisionStep] = Field(default_factory=list)
    probes: list[Probe] = Field(default_factory=list)


class Template(BaseModel):
    """A resolved template: its base chain merged, validated."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str  # file or URL it was read from
    chain: list[str]  # the sources merged, bases first
    fields: TemplateFields
    vm: dict[str, Any]  # the vm.yaml fields it sets

    def provisioning(self) -> dict[str, Any]:
        """What the instance keeps for ``vmkit start`` (``provision.json``)."""
        return {"template": self.name, "source": self.source,
                "provision": [p.model_dump() for p in self.fields.provision],
                "probes": [p.model_dump() for p in self.fields.probes],
                "message": self.fields.message}


def user_dir() -> Path:
    return paths.config_dir() / "templates"


def _is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


def _is_path(ref: str) -> bool:
    return "/" in ref or ref.endswith((".yaml", ".yml"))


def locate(ref: str, *, relative_to: str | None = None) -> str:
    """The file or URL template reference ``ref`` means (NotFoundError naming where it looked)."""
    if _is_url(ref):
        return ref
    if _is_path(ref):
        if relative_to is not None and not Path(ref).expanduser().is_absolute():
            if _is_url(relative_to):
                return urllib.parse.urljoin(relative_to, ref)
            return str((Path(relative_to).parent / ref).resolve())
        return str(Path(ref).expanduser().resolve())
    for d in (user_dir(), SHIPPED_DIR):
        p = d / f"{ref}{SUFFIX}"
        if p.is_file():
            return str(p)
    raise NotFoundError("template", ref, hint=f"see `vmkit template list`, or give a file or URL "
                        f"(own templates go in {user_dir()}/NAME.yaml)")


def read(source: str) -> str:
    if _is_url(source):
        req = urllib.request.Request(source, headers={"User-Agent": "vmkit"})  # noqa: S310 - scheme checked
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
                data: bytes = resp.read(MAX_URL_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise ConfigError.single("--template", f"cannot fetch {source}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError.single("--template", f"cannot fetch {source}: {getattr(exc, 'reason', exc)}") from None
        if len(data) > MAX_URL_BYTES:
            raise ConfigError.single("--template", f"{source} is larger than {MAX_URL_BYTES} bytes")
        return data.decode("utf-8", errors="replace")
    try:
        return Path(source).read_text()
    except FileNotFoundError:
        raise NotFoundError("template file", source) from None
    except OSError as exc:
        raise ConfigError.single("--template", f"{source}: {exc.strerror}") from None


def load_raw(source: str) -> dict[str, Any]:
    """One template file as a mapping (ConfigError naming the file on bad YAML)."""
    try:
        data = yaml.safe_load(read(source))
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(source, f"not valid YAML: {exc}")], context="template") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem(source, "a template must be a mapping of settings")], context="template")
    return data


def merge(base: dict[str, Any], over: dict[str, Any], *, top: bool = True) -> dict[str, Any]:
    """``over`` merged onto ``base`` (see the module docstring for the rules)."""
    out = {k: v for k, v in base.items() if not (top and k in (*NOT_INHERITED, "base"))}
    for key, value in over.items():
        old = out.get(key)
        if top and key in APPENDED and isinstance(old, list) and isinstance(value, list):
            out[key] = [*old, *value]
        elif isinstance(old, dict) and isinstance(value, dict):
            out[key] = merge(old, value, top=False)
        else:
            out[key] = value
    return out


def _expand(source: str, seen: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    if source in seen:
        raise ConfigError([Problem(f"{source}: base", "templates extend each other in a circle: "
                                   + " -> ".join([*seen, source]))], context="template")
    if len(seen) >= MAX_DEPTH:
        raise ConfigError([Problem(f"{source}: base", f"more than {MAX_DEPTH} levels of base")], context="template")
    raw = load_raw(source)
    bases = raw.get("base")
    if bases is None:
        refs: list[str] = []
    elif isinstance(bases, str):
        refs = [bases]
    elif isinstance(bases, list) and all(isinstance(b, str) for b in bases):
        refs = list(bases)
    else:
        raise ConfigError([Problem(f"{source}: base", "give a template name, file or URL, or a list of them")],
                          context="template")
    merged: dict[str, Any] = {}
    chain: list[str] = []
    for ref in refs:
        try:
            where = locate(ref, relative_to=source)
        except NotFoundError as exc:
            raise ConfigError([Problem(f"{source}: base", f"{exc.message} ({exc.hint})")], context="template") from None
        data, sub = _expand(where, (*seen, source))
        merged = merge(merged, data)
        chain += [s for s in sub if s not in chain]
    _check(source, raw)
    return merge(merged, raw), [*chain, source]


def _check(source: str, raw: dict[str, Any]) -> None:
    """Problems of one file's own keys, each naming the file and the field."""
    from vmkit.config import MachineConfig

    problems: list[Problem] = []
    try:
        TemplateFields.model_validate(raw)
    except ValidationError as exc:
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"])
            problems.append(Problem(f"{source}: {loc}", e["msg"]))
    known = set(MachineConfig.model_fields) - set(VM_KEYS_REFUSED)
    for key in raw:
        if key in TEMPLATE_KEYS:
            continue
        if key in VM_KEYS_REFUSED:
            problems.append(Problem(f"{source}: {key}", "a template cannot set this vm.yaml field "
                                    "(the name is the machine's; the boot comes from `image:`)"))
        elif key not in known:
            problems.append(Problem(f"{source}: {key}", "unknown setting: remove it or check its spelling "
                                    "(see `vmkit template schema`)"))
    if problems:
        raise ConfigError(problems, context="template")


def resolve(ref: str) -> Template:
    """The template ``ref`` (a name, file or URL) with its bases merged and its fields checked."""
    source = locate(ref)
    data, chain = _expand(source, ())
    fields = TemplateFields.model_validate({k: v for k, v in data.items() if k in TEMPLATE_KEYS})
    vm = {k: v for k, v in data.items() if k not in TEMPLATE_KEYS}
    name = ref if not (_is_url(ref) or _is_path(ref)) else Path(urllib.parse.urlsplit(ref).path).stem
    return Template(name=name, source=source, chain=chain, fields=fields, vm=vm)


def available() -> list[tuple[str, str, str]]:
    """``(name, where, description)`` of every template found by name: the user's, then shipped ones
    (a user template hides a shipped one of the same name)."""
    found: dict[str, tuple[str, str, str]] = {}
    for d, where in ((user_dir(), "user"), (SHIPPED_DIR, "shipped")):
        if not d.is_dir():
            continue
        for p in sorted(d.glob(f"*{SUFFIX}")):
            if p.stem in found:
                continue
            try:
                desc = str(load_raw(str(p)).get("description") or "")
            except ConfigError:
                desc = "(unreadable: see `vmkit template show`)"
            found[p.stem] = (p.stem, where, desc.strip().splitlines()[0] if desc.strip() else "")
    return sorted(found.values())


def json_schema() -> dict[str, Any]:
    """The template's JSON schema: its own keys plus vm.yaml's top-level fields."""
    from vmkit.config import MachineConfig

    schema = TemplateFields.model_json_schema(mode="validation")
    vm = MachineConfig.model_json_schema(mode="validation")
    props = dict(schema.get("properties", {}))
    for key, value in vm.get("properties", {}).items():
        if key not in VM_KEYS_REFUSED and key not in props:
            field = MachineConfig.model_fields[key]
            if "parse_size" in repr((field.annotation, field.metadata)):  # sizes are written 2G in YAML
                size = [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": SIZE_PATTERN}]
                nullable = value.get("anyOf") and {"type": "null"} in value["anyOf"]
                value = {k: v for k, v in value.items() if k not in ("type", "anyOf")}
                value["anyOf"] = [*size, {"type": "null"}] if nullable else size
            props[key] = value
    defs = {**vm.get("$defs", {}), **schema.get("$defs", {})}
    schema["properties"] = props
    schema["$defs"] = defs
    schema["additionalProperties"] = False
    schema["title"] = "vmkit template"
    return schema


def digest(script: str) -> str:
    return hashlib.sha256(script.encode()).hexdigest()[:16]
