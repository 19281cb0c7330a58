"""``vmkit.Client(host="ssh://[user@]HOST[:PORT]")``: the Python client acting on another host's
machines, as ``vmkit --host`` does for the CLI.

Each call of a public method of :class:`~vmkit.client.sync.Client` or its
:class:`~vmkit.client.sync.Instance` runs that same method in the other host's vmkit: ``ssh HOST
vmkit client-call`` reads one JSON request on stdin (``{"instance": NAME | null, "method": NAME,
"args": [...], "kwargs": {...}}``), calls ``vmkit.Client()`` there (with that host's vmkit home) and
answers one JSON line, ``{"result": VALUE}`` or ``{"error": FIELDS}`` (the same error class and exit
code here as there). Values cross as JSON with tags for what JSON lacks: pydantic models of vmkit
(``{"$model": "module:Class", "data": ...}``, validated again on arrival), paths (on the host that
made them), bytes and machine handles (``{"$instance": NAME}``, a handle bound to the same host).

What cannot cross: callbacks (progress, ``on_event``), file descriptors, and iterators (``events()``,
``attach_console``): such a call is refused with a :class:`~vmkit.errors.ConfigError` naming the
argument or the method. One SSH connection per call (``ssh`` reads ``~/.ssh/config``;
``VMKIT_SSH_CONFIG`` names another file, see :mod:`vmkit.backends.ssh`).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import inspect
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import BaseModel

from vmkit.errors import ConfigError, VmkitError, error_fields, error_from_fields

if TYPE_CHECKING:
    from vmkit.backends.ssh import SshHost

LOCAL_ONLY = frozenset({"events", "attach_console", "write_bench_report", "bench_fs"})
"""Methods that stream or take callbacks throughout: not offered on another host."""
CALL_TIMEOUT = 3600.0


# -- values --------------------------------------------------------------------------------------------
def encode(value: Any, *, where: str = "value", handle: type | None = None) -> Any:
    """``value`` as JSON with tags (see the module's docstring); refuses what cannot cross hosts.
    ``handle``: the machine handle class (its objects cross as their name)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if handle is not None and isinstance(value, handle):
        return {"$instance": str(getattr(value, "name", ""))}
    if isinstance(value, BaseModel):
        cls = type(value)
        if not cls.__module__.startswith("vmkit."):
            raise ConfigError.single(where, f"a {cls.__name__} cannot be sent to another host")
        return {"$model": f"{cls.__module__}:{cls.__qualname__}", "data": value.model_dump(mode="json")}
    if isinstance(value, Path):
        return {"$path": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, list | tuple):
        return [encode(v, where=where, handle=handle) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError.single(where, "only mappings with string keys can be sent to another host")
        return {k: encode(v, where=where, handle=handle) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: encode(v, where=where, handle=handle) for k, v in dataclasses.asdict(value).items()}
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return encode(value.to_dict(), where=where, handle=handle)
    if callable(value):
        raise ConfigError.single(where, "a callback cannot be passed to another host's vmkit: leave it out")
    raise ConfigError.single(where, f"a {type(value).__name__} cannot be sent to another host")


def decode(value: Any, client: Any = None, handle: type | None = None) -> Any:
    """The value :func:`encode` made (machine handles made with ``handle(client, name)``)."""
    if isinstance(value, list):
        return [decode(v, client, handle) for v in value]
    if not isinstance(value, dict):
        return value
    if "$model" in value:
        return _model_class(str(value["$model"])).model_validate(value.get("data"))
    if "$path" in value:
        return Path(str(value["$path"]))
    if "$bytes" in value:
        return base64.b64decode(str(value["$bytes"]))
    if "$instance" in value:
        if client is None or handle is None:
            raise ConfigError.single("args", "a machine handle cannot be an argument")
        return handle(client, str(value["$instance"]))
    return {k: decode(v, client, handle) for k, v in value.items()}


def _model_class(name: str) -> type[BaseModel]:
    module, _, qualname = name.partition(":")
    if not module.startswith("vmkit.") or not qualname.isidentifier():
        raise ConfigError.single("$model", f"{name!r} is not a vmkit model")
    cls = getattr(importlib.import_module(module), qualname, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        raise ConfigError.single("$model", f"{name!r} is not a vmkit model")
    return cls


def _public(cls: type, name: str) -> bool:
    return not name.startswith("_") and name not in LOCAL_ONLY and name in vars(cls)


# -- this side -----------------------------------------------------------------------------------------
def call(host: SshHost, client: Any, handle: type, instance: str | None, method: str, args: tuple[Any, ...],
         kwargs: dict[str, Any]) -> Any:
    """Run ``method`` of the client (or of its machine ``instance``) on ``host``; its result here
    (machine handles made with ``handle(client, name)``)."""
    from vmkit.backends import ssh

    request = {"instance": instance, "method": method, "args": encode(list(args), where=f"{method}()", handle=handle),
               "kwargs": {k: encode(v, where=k, handle=handle) for k, v in kwargs.items()}}
    res = host.run(["client-call"], input=(json.dumps(request) + "\n").encode(), timeout=CALL_TIMEOUT)
    lines = [ln for ln in res.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
    if not lines:
        why = res.stderr.decode(errors="replace").strip()[-400:] or f"ssh exited with status {res.returncode}"
        raise ssh.unreachable(host, why)
    answer = json.loads(lines[-1])
    if "error" in answer:
        raise error_from_fields(answer["error"])
    return decode(answer.get("result"), client, handle)


def bind(host: SshHost, client: Any, handle: type, cls: type, instance: str | None, name: str) -> Any:
    """What ``getattr`` gives for ``name`` on a remote client (``cls``, ``instance`` None) or machine
    (``cls``, named ``instance``): a method that runs there, a property read there, or None (not
    one of the class's public methods: the caller looks it up as usual)."""
    if name in LOCAL_ONLY and name in vars(cls):
        raise ConfigError.single(name, f"{cls.__name__}.{name}() streams or takes callbacks: it is not available "
                                 "for another host (use `vmkit --host URI` for it)")
    if not _public(cls, name):
        return None
    attr = vars(cls)[name]
    if isinstance(attr, property):
        return call(host, client, handle, instance, name, (), {})
    if not inspect.isfunction(attr):
        return None

    def remote_method(*args: Any, **kwargs: Any) -> Any:
        return call(host, client, handle, instance, name, args, kwargs)

    remote_method.__name__ = name
    remote_method.__doc__ = attr.__doc__
    return remote_method


# -- the other side: ``vmkit client-call`` --------------------------------------------------------------
def serve(client: Any, handle: type, inp: IO[str] | None = None, out: IO[str] | None = None) -> int:
    """Run one request from ``inp`` with ``client`` (this host's ``vmkit.Client()``; ``handle`` its
    machine class); answer on ``out``."""
    inp, out = inp or sys.stdin, out or sys.stdout
    try:
        try:
            req = json.loads(inp.readline())
            method = str(req["method"])
            instance = req.get("instance")
            args, kwargs = list(req.get("args") or []), dict(req.get("kwargs") or {})
        except (ValueError, KeyError, TypeError):
            raise ConfigError.single("<stdin>", "not a client-call request (one JSON line)") from None
        cls: type = type(client) if instance is None else handle
        if not _public(cls, method):
            raise ConfigError.single("method", f"{method!r} is not a method of {cls.__name__} offered to other hosts")
        target: Any = client if instance is None else client.get(str(instance))
        attr = vars(cls)[method]
        if isinstance(attr, property):
            result = getattr(target, method)
        else:
            result = getattr(target, method)(*decode(args), **{k: decode(v) for k, v in kwargs.items()})
        if isinstance(result, Iterator):
            raise ConfigError.single("method", f"{method}() returns a stream: not available for another host")
        payload: dict[str, Any] = {"result": encode(result, where=method, handle=handle)}
        code = 0
    except VmkitError as exc:
        payload, code = {"error": error_fields(exc)}, int(exc.exit_code)
    out.write(json.dumps(payload) + "\n")
    out.flush()
    return code

