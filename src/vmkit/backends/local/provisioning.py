"""A template's provisioning and probes, run by ``vmkit start`` once the guest agent answers.

Why the start path and the agent, not cloud-init: the user must see the scripts' output while
``vmkit start`` waits, and the start must fail with the script's exit code. cloud-init runs
``runcmd`` in the background of the boot and reports nowhere but its own log; the agent is up
when the supervisor says "ready", so the client that waits for the start runs each script
through it (``POST /v1/exec``):

1. the script is written to ``/var/lib/vmkit/provision/<step>.sh`` in the guest;
2. it is started detached (``setsid -f``) under ``timeout``, as root (``mode: system``) or as the
   machine's user with a login shell (``mode: user``), its output going to ``<step>.log`` there;
3. the client polls: the log's new bytes go to the progress callback line by line and to
   ``provision.log`` in the instance directory; ``<step>.rc`` appears when the script ends;
4. a non-zero exit code raises :class:`~vmkit.errors.ProvisionError` with the code and the last
   lines; the machine keeps running so that the user can look (``vmkit shell``);
5. ``when: once`` steps leave ``done-<digest>`` behind and are skipped on later boots (a changed
   script runs again); ``when: boot`` steps run at every boot (not when a saved state is resumed);
6. probes run after the scripts, each until it exits 0 or its timeout passes (then its hint).

An interrupted start (Ctrl-C) leaves the machine running and the script running in the guest.
The instance keeps what to run in ``provision.json`` (0600), written by ``vmkit create --template``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmkit.backends.local import control
from vmkit.errors import ConfigError, Problem, ProvisionError, VmkitError
from vmkit.fsutil import atomic_write
from vmkit.host import provision as cloud
from vmkit.host.builder import CreateOptions
from vmkit.host.instance import Instance
from vmkit.host.templates import Probe, ProvisionStep, Template, digest, resolve

PROVISION_FILE = "provision.json"
LOG_FILE = "provision.log"
GUEST_DIR = "/var/lib/vmkit/provision"
POLL = 0.5
CHUNK = 256 << 10
TAIL_LINES = 15
AGENT_PATIENCE = 120.0

Progress = Callable[[str], None]


def save(inst_dir: Path, data: dict[str, Any]) -> None:
    atomic_write(inst_dir / PROVISION_FILE, json.dumps(data, indent=2), 0o600)


def load(inst_dir: Path) -> dict[str, Any] | None:
    p = inst_dir / PROVISION_FILE
    if not p.is_file():
        return None
    data: dict[str, Any] = json.loads(p.read_text())
    return data


def options_from_template(template: Template, opts: CreateOptions) -> CreateOptions:
    """``opts`` (the command line's) over ``template``: the template's vm.yaml fields are the start,
    its image, disk, ports and mounts are used unless the command line gives them (ports and mounts
    are added to the template's)."""
    f = template.fields
    return dataclasses.replace(
        opts,
        image=opts.image or f.image,
        disks=[*([f.disk] if f.disk else []), *opts.disks],  # the last size given is the root disk's
        ports=[*f.ports, *opts.ports],
        mounts=[*f.mounts, *opts.mounts],
        settings={**template.vm, **opts.settings},
    )


_OPTION_KEYS = {"--image": "image", "--disk": "disk", "--port": "ports", "--mount": "mounts"}


def _blame(template: Template, opts: CreateOptions, exc: ConfigError) -> list[Problem]:
    """The problems of a create, those of the template's settings named by its file and field."""
    given = {"--image": opts.image is not None, "--disk": bool(opts.disks), "--port": bool(opts.ports),
             "--mount": bool(opts.mounts)}
    fields = template.fields.model_dump(exclude_defaults=True)
    image_problem = any(p.field == "--image" for p in exc.problems)
    out: list[Problem] = []
    for p in exc.problems:
        if p.field == "--kernel" and image_problem:
            continue  # "no kernel" only repeats that the image is missing
        key = _OPTION_KEYS.get(p.field)
        if key is not None and key in fields and not given[p.field]:
            out.append(p._replace(field=f"{template.source}: {key}"))
        elif p.field.split(".")[0] in template.vm:
            out.append(p._replace(field=f"{template.source}: {p.field}"))
        else:
            out.append(p)
    return out


def create_from_template(ref: str, opts: CreateOptions) -> Instance:
    """``vmkit create NAME --template REF [options]``: the machine the template describes, with the
    options over it, and its provisioning kept for ``vmkit start``. All or nothing."""
    template = resolve(ref)
    merged = options_from_template(template, opts)
    try:
        inst = control.create_from_options(merged)
    except ConfigError as exc:
        raise ConfigError(_blame(template, opts, exc), context=f"machine from template {template.name}") from None
    try:
        save(inst.dir, template.provisioning())
    except BaseException:
        control.delete(inst.name, force=True)
        raise
    return inst


def _guest(name: str, script: str, *args: str, stdin: bytes | None = None,
           timeout: float = 60.0) -> tuple[int, bytes, bytes]:
    r = control.exec_in_guest(name, ["sh", "-c", script, "vmkit", *args], timeout=timeout, stdin=stdin)
    return r.exit_code, r.stdout, r.stderr


def _runner(mode: str, path: str, timeout: float) -> str:
    """The guest command line that runs script file ``path`` (no user text in it: paths are ours)."""
    run = f"timeout {int(timeout)} sh {path}"
    if mode == "user":
        run = f"timeout {int(timeout)} runuser -l {cloud.USER} -c 'VMKIT_USER={cloud.USER} sh {path}'"
    return f"VMKIT_USER={cloud.USER} {run}"


def _write_script(name: str, step_id: str, script: str) -> str:
    path = f"{GUEST_DIR}/{step_id}.sh"
    code, _, err = _guest(name, 'umask 022; mkdir -p "$1" && rm -f "$2.rc" "$2.log" && cat > "$2.sh"',
                          GUEST_DIR, f"{GUEST_DIR}/{step_id}", stdin=script.encode())
    if code != 0:
        raise ProvisionError(f"{name}: cannot write {path} in the guest: {err.decode(errors='replace').strip()}")
    return path


class _Log:
    """``provision.log`` in the instance directory plus the progress callback, line by line."""

    def __init__(self, path: Path, progress: Progress | None) -> None:
        self.fh = path.open("a")
        path.chmod(0o600)
        self.progress = progress
        self.pending = ""
        self.tail: list[str] = []
        self.prefix = ""

    def header(self, text: str) -> None:
        self.fh.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self.fh.flush()
        if self.progress is not None:
            self.progress(text)
        self.tail = []

    def feed(self, data: bytes, *, final: bool = False) -> None:
        self.fh.write(data.decode(errors="replace"))
        self.fh.flush()
        text = self.pending + data.decode(errors="replace")
        lines = text.split("\n")
        self.pending = "" if final else lines.pop()
        for line in lines:
            if not line and final:
                continue
            self.tail = [*self.tail, line][-TAIL_LINES:]
            if self.progress is not None:
                self.progress(f"{self.prefix}{line}")

    def close(self) -> None:
        self.fh.close()


def _run_step(name: str, index: int, count: int, step: ProvisionStep, log: _Log) -> None:
    step_id = f"{index}-{digest(step.script)}"
    if step.when == "once":
        code, _, _ = _guest(name, 'test -e "$1"', f"{GUEST_DIR}/done-{digest(step.script)}")
        if code == 0:
            log.header(f"provision {index}/{count} ({step.mode}, once): done on an earlier boot, skipped")
            return
    log.header(f"provision {index}/{count} ({step.mode}, {step.when}): running")
    log.prefix = f"[{index}/{count}] "
    path = _write_script(name, step_id, step.script)
    base = f"{GUEST_DIR}/{step_id}"
    inner = f'{_runner(step.mode, path, step.timeout)} > "$1.log" 2>&1; echo $? > "$1.rc.tmp"; mv "$1.rc.tmp" "$1.rc"'
    code, _, err = _guest(name, 'setsid -f sh -c "$2" vmkit-provision "$1" </dev/null >/dev/null 2>&1', base, inner)
    if code != 0:
        why = err.decode(errors="replace").strip()
        raise ProvisionError(f"{name}: cannot start provisioning script {index}: {why}")
    offset = 0
    deadline = time.monotonic() + step.timeout + 60
    failing_since: float | None = None
    while True:
        try:
            code, out, rc = _guest(name, 'rc=$(cat "$1.rc" 2>/dev/null); tail -c +"$2" "$1.log" 2>/dev/null '
                                   '| head -c "$3"; printf %s "$rc" >&2', base, str(offset + 1), str(CHUNK))
            failing_since = None
        except VmkitError as exc:
            # a guest busy with the script (apt under TCG) can keep its agent from answering for a
            # while: the script goes on, so keep asking; give up only after AGENT_PATIENCE seconds
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > AGENT_PATIENCE or not control.get(name).is_supervised():
                raise ProvisionError(f"{name}: lost touch with provisioning script {index} of {count}: {exc.message}",
                                     hint=f"it may still run in the guest; its output is in {base}.log there "
                                          f"and so far in {log.fh.name}") from exc
            time.sleep(POLL * 2)
            continue
        if out:
            offset += len(out)
            log.feed(out)
        if rc.strip() and len(out) < CHUNK:
            log.feed(b"", final=True)
            status = int(rc.strip())
            break
        if time.monotonic() > deadline:
            raise ProvisionError(f"{name}: provisioning script {index} of {count} did not finish within "
                                 f"{step.timeout:.0f} s")
        if not out:
            time.sleep(POLL)
    if status != 0:
        why = " (its timeout passed)" if status == 124 else ""
        last = "\n".join(log.tail) or "(no output)"
        err_ = ProvisionError(
            f"{name}: provisioning script {index} of {count} ({step.mode}) failed with exit code {status}{why}",
            hint=f"its last lines:\n{last}\nthe whole output is in {log.fh.name}; the machine is still running: "
                 f"look with `vmkit shell {name}`, or `vmkit stop {name}`")
        err_.script_exit_code = status  # type: ignore[attr-defined]
        raise err_
    log.header(f"provision {index}/{count}: done (exit code 0)")
    if step.when == "once":
        _guest(name, 'touch "$1"', f"{GUEST_DIR}/done-{digest(step.script)}")


def _run_probe(name: str, index: int, count: int, probe: Probe, log: _Log) -> None:
    label = probe.description or probe.script.strip().splitlines()[0][:60]
    log.header(f"probe {index}/{count}: {label}")
    path = _write_script(name, f"probe-{index}-{digest(probe.script)}", probe.script)
    deadline = time.monotonic() + probe.timeout
    last = b""
    while True:
        remaining = max(1.0, deadline - time.monotonic())
        attempt = min(remaining, 60.0)
        try:
            code, out, err = _guest(name, f"{_runner(probe.mode, path, attempt)} 2>&1", timeout=attempt + 15)
        except VmkitError as exc:  # the agent itself may be busy; try again until the deadline
            code, out, err = -1, str(exc).encode(), b""
        last = out + err
        if code == 0:
            log.feed(out, final=True)
            log.header(f"probe {index}/{count}: passed")
            return
        if time.monotonic() >= deadline:
            log.feed(last, final=True)
            tail = "\n".join(last.decode(errors="replace").splitlines()[-TAIL_LINES:]) or "(no output)"
            raise ProvisionError(
                f"{name}: probe {index} of {count} ({label}) did not pass within {probe.timeout:.0f} s "
                f"(last exit code {code})",
                hint=(f"{probe.hint}\n" if probe.hint else "") + f"its last output:\n{tail}\n"
                     f"the machine is still running: look with `vmkit shell {name}`")
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def run(name: str, *, progress: Progress | None = None) -> str | None:
    """Run the instance's provisioning and probes (if its template has any); return its message."""
    inst = Instance(name).require()
    data = load(inst.dir)
    if data is None:
        return None
    steps = [ProvisionStep.model_validate(s) for s in data.get("provision", [])]
    probes = [Probe.model_validate(p) for p in data.get("probes", [])]
    if steps or probes:
        log = _Log(inst.dir / LOG_FILE, progress)
        try:
            log.header(f"template {data.get('template')}: {len(steps)} script(s), {len(probes)} probe(s)")
            for i, step in enumerate(steps, 1):
                _run_step(name, i, len(steps), step, log)
            log.prefix = ""
            for i, probe in enumerate(probes, 1):
                _run_probe(name, i, len(probes), probe, log)
        finally:
            with contextlib.suppress(OSError):
                log.close()
    message = str(data.get("message") or "").strip()
    return message.replace("{name}", name) or None
