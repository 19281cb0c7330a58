"""Instance lifecycle commands: create, start, stop, pause, resume, list, inspect, console, events, delete,
export."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import typer

from vmkit.cli import state as state_cli
from vmkit.cli.output import client, err, machine, out, print_json, print_json_line, spinner


def register(app: typer.Typer) -> None:
    for fn in (clone, create, start, stop, pause, resume, list_, inspect, console, events, delete, export):
        name = fn.__name__.rstrip("_")
        app.command(name)(fn)


def create(
    name: str = typer.Argument(..., help="instance name (letters, digits, '.', '_', '-')"),
    cpus: int | None = typer.Option(None, "--cpus", help="number of virtual CPUs"),
    memory: str | None = typer.Option(None, "--memory", help="guest RAM, e.g. 512M or 2G"),
    max_cpus: int | None = typer.Option(None, "--max-cpus", help="most vCPUs `vmkit set --cpus` can give it "
                                        "while it runs (default: twice --cpus, at least 4, at most 64)"),
    max_memory: str | None = typer.Option(None, "--max-memory", help="memory `vmkit set --memory` can grow it "
                                          "to while it runs (a virtio-mem region; --memory + a multiple of 128M)"),
    image: str | None = typer.Option(None, "--image", help="boot an image from the cache (e.g. micro)"),
    kernel: Path | None = typer.Option(None, "--kernel", help="Linux kernel to boot directly"),
    initrd: Path | None = typer.Option(None, "--initrd", help="initrd for --kernel"),
    cmdline: str | None = typer.Option(None, "--cmdline", help="kernel command line (added to the image's)"),
    disk: list[str] = typer.Option(
        [], "--disk", help="PATH[:ro][:format=F][:kind=K] or nbd://HOST:PORT/EXPORT[,ro][,kind=K] (repeatable)"),
    port: list[str] = typer.Option([], "--port", help="forward [ADDR:]HOST:GUEST\\[/udp] (repeatable)"),
    mount: list[str] = typer.Option(
        [], "--mount", help="share HOST[:GUEST][:ro][,type=virtiofs|9p|sshfs] into the guest (repeatable)"),
    run: str | None = typer.Option(None, "--run", help="micro image: shell command the guest runs at boot"),
    accel: str | None = typer.Option(None, "--accel", help="auto, kvm or tcg"),
    from_file: Path | None = typer.Option(None, "--from", help="start from this vm.yaml"),
    user_data: Path | None = typer.Option(None, "--user-data", help="cloud images: extra cloud-config to merge"),
    cpu_weight: str | None = typer.Option(None, "--cpu-weight", help="cgroup CPU weight 1-10000 (default 100)"),
    cpu_max: str | None = typer.Option(None, "--cpu-max", help="CPU cap, percent of one host core"),
    cpu_pin: str | None = typer.Option(None, "--cpu-pin", help="host CPUs to run on, e.g. 0-1,3"),
    memory_min: str | None = typer.Option(None, "--memory-min", help="memory reservation (cgroup)"),
    memory_high: str | None = typer.Option(None, "--memory-high", help="memory throttle point (cgroup)"),
    memory_max: str | None = typer.Option(None, "--memory-max", help="hard memory limit of QEMU and helpers"),
    swap_max: str | None = typer.Option(None, "--swap-max", help="host swap the machine may use"),
    balloon_min: str | None = typer.Option(None, "--balloon-min", help="automatic ballooning leaves the guest at "
                                                                       "least this much memory (default: half)"),
    balloon_shares: int | None = typer.Option(None, "--balloon-shares", help="automatic ballooning: its share of "
                                              "the host's memory (default 1000; 0: leave its balloon alone)"),
    network: list[str] = typer.Option(
        [], "--network", help="join a vmkit network: NAME[,model=virtio|e1000|e1000e|rtl8139] (repeatable; "
                              "'user' is QEMU's user-mode NAT, the default when none is given)"),
    display: bool = typer.Option(False, "--display", help="a screen and keyboard (virtio-vga, VNC on vnc.sock; "
                                                          "see vmkit console --web)"),
    arch: str | None = typer.Option(None, "--arch", help="guest architecture: x86_64 or aarch64 (emulated by "
                                    "TCG); picks the image built for it, e.g. debian-12-aarch64"),
    binfmt: list[str] = typer.Option([], "--binfmt", help="run another architecture's programs in the guest "
                                     "through qemu-user-static, e.g. aarch64 (repeatable; needs the guest agent)"),
    display_size: str | None = typer.Option(None, "--display-size",
                                            help="with --display: the boot-time size WIDTHxHEIGHT (default "
                                                 "1280x800), also the largest Linux's console can show later"),
) -> None:
    """Create a virtual machine (does not start it)."""
    if display_size is not None and not display:
        from vmkit.errors import ConfigError

        raise ConfigError.single("--display-size", "give --display too (a size needs a display)")
    limits = {k: v for k, v in {"cpu_weight": cpu_weight, "cpu_max": cpu_max, "cpu_pin": cpu_pin,
                                "memory_min": memory_min, "memory_high": memory_high, "memory_max": memory_max,
                                "swap_max": swap_max}.items() if v is not None}
    inst = client().create(name, cpus=cpus, memory=memory, kernel=kernel, initrd=initrd, cmdline=cmdline,
                           disks=disk, ports=port, mounts=mount, image=image, run=run, accel=accel,
                           from_file=from_file, user_data=user_data, limits=limits or None,
                           max_cpus=max_cpus, max_memory=max_memory,
                           balloon_min=balloon_min, balloon_shares=balloon_shares,
                           networks=network or None, display=(display_size or True) if display else None,
                           arch=arch, binfmt=binfmt or None)
    out.print(f"created [bold]{name}[/] in {inst.directory}")
    for n in inst.row().addresses.items():
        out.print(f"  on network {n[0]}: {n[1]}")


def start(
    name: str,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the QEMU command line and exit"),
    timeout: float | None = typer.Option(None, "--timeout", help="seconds to wait for the guest to be ready"),
    cold: bool = typer.Option(False, "--cold", help="boot afresh even if there is a saved state (it is kept aside)"),
) -> None:
    """Start a virtual machine; returns when the guest is ready. It keeps running after this exits.

    A machine stopped with `stop --save` resumes from its saved state (falling back to a boot).
    """
    if dry_run:
        from vmkit.runtime.qemu.cmdline import render

        out.print(render(machine(name).qemu_argv()), markup=False, highlight=False, soft_wrap=True)
        return
    state_cli.start_instance(name, timeout=timeout, cold=cold)


def stop(
    name: str,
    force: bool = typer.Option(False, "--force", "-f", help="hard stop now, without asking the guest"),
    timeout: float = typer.Option(30.0, "--timeout", help="seconds the guest gets to power off"),
    save: bool = typer.Option(False, "--save", help="save the machine state first; `start` resumes it"),
) -> None:
    """Stop a virtual machine: ACPI power button, then a hard stop after --timeout (or --save its state)."""
    if save:
        state_cli.save_instance(name, None, keep_running=False)
        return
    handle = machine(name)
    with spinner(f"stopping {name}"):
        status = handle.stop(force=force, timeout=timeout)
    out.print(f"[bold]{name}[/] is {status.state}" + (f" ({status.reason})" if status.reason else ""))


def pause(name: str) -> None:
    """Pause a running virtual machine (its vCPUs stop; memory stays)."""
    machine(name).pause()
    out.print(f"[bold]{name}[/] is paused")


def resume(name: str) -> None:
    """Resume a paused virtual machine."""
    resumed = machine(name).resume()
    out.print(f"[bold]{name}[/] is running")
    state_cli.describe_clock(resumed.clock)


def list_(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List virtual machines."""
    from rich.markup import escape
    from rich.table import Table

    from vmkit.backends.local.listing import BROKEN
    from vmkit.cli.plain import LIST_COLUMNS, list_cells, list_columns

    rows = client().rows()
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
        return
    # a pipe gets the same cells without rich (vmkit.cli.main serves it before this module loads)
    plain_rows = [r.model_dump() for r in rows]
    columns = list_columns(plain_rows)  # type: ignore[arg-type]
    table = Table(*columns)
    colors = {"running": "green", "paused": "yellow", "error": "red", BROKEN: "red"}
    for r, plain in zip(rows, plain_rows, strict=True):
        c = "yellow" if r.health == "degraded" else colors.get(r.state)
        cells = list_cells(plain, addresses=len(columns) > len(LIST_COLUMNS))  # type: ignore[arg-type]
        name, state, *rest = (escape(cell) for cell in cells)
        table.add_row(name, f"[{c}]{state}[/]" if c else state, *rest)
    out.print(table)
    for r in rows:
        if r.state == BROKEN:
            err.print(f"[red]{escape(r.name)} is broken:[/] {escape(r.reason)}", highlight=False, soft_wrap=True)


def inspect(name: str) -> None:
    """Configuration and runtime state of a virtual machine, as JSON."""
    print_json(machine(name).info())


def console(
    name: str,
    log: bool = typer.Option(False, "--log", help="print the console log instead of attaching"),
    until: str | None = typer.Option(
        None, "--until",
        help="with --log: first wait until the log matches this regex (multiline; it can match a line "
             "still being written: end it with \\n to wait for the whole line)"),
    timeout: float = typer.Option(60.0, "--timeout", help="seconds --until waits"),
    web: bool = typer.Option(False, "--web", help="screen and serial console in a browser: print a one-time "
                                                  "URL on 127.0.0.1 (and open it when a browser is at hand)"),
    port: int = typer.Option(0, "--port", help="with --web: the loopback port, the first time (0: any free one)"),
    no_browser: bool = typer.Option(False, "--no-browser", help="with --web: only print the URL"),
) -> None:
    """Attach to the serial console (detach with Ctrl-]); --log prints what the guest has printed;
    --web opens the screen and the serial console in a browser."""
    handle = machine(name)
    if web:
        _web_console(name, port=port, open_browser=not no_browser)
        return
    if until is not None:
        sys.stdout.write(handle.wait_console(until, timeout=timeout))
        sys.stdout.flush()
        return
    if log:
        sys.stdout.buffer.write(handle.console_bytes())  # with serial.log.1, its older part
        sys.stdout.buffer.flush()
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    interactive = sys.stdin.isatty()
    saved: list[Any] = []

    def on_connected() -> None:  # the terminal goes raw only once the console is there
        if interactive:
            err.print(f"attached to {name}'s console; detach with Ctrl-]")
            saved.append(termios.tcgetattr(fd))
            tty.setraw(fd)

    def on_output(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    try:
        handle.attach_console(fd, on_output, on_connected=on_connected)
    finally:
        if saved:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved[0])
    if interactive:
        err.print("\ndetached")


def _web_console(name: str, *, port: int, open_browser: bool) -> None:
    import os

    console = machine(name).web_console(port=port)
    out.print(console.url, markup=False, highlight=False, soft_wrap=True)
    err.print(f"the link works once, within {console.expires_in:.0f} s; the supervisor serves the page on "
              f"127.0.0.1:{console.port} while {name} runs")
    if open_browser and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        import webbrowser

        with contextlib.suppress(webbrowser.Error):
            webbrowser.open(console.url)


def events(name: str) -> None:
    """Print the machine's events as they happen, one JSON object per line (NDJSON), until it stops."""
    for ev in machine(name).events():
        print_json_line(ev.model_dump(mode="json", exclude_unset=True))


def delete(
    name: str,
    force: bool = typer.Option(False, "--force", "-f", help="stop it first if it is running"),
) -> None:
    """Delete a virtual machine and its directory (disks, logs, state)."""
    client().delete(name, force=force)
    out.print(f"deleted [bold]{name}[/]")


def export(
    name: str,
    libvirt: bool = typer.Option(False, "--libvirt", help="the libvirt domain XML (virsh define FILE)"),
    output: Path | None = typer.Option(None, "--output", "-o", help="write it to this file (0600) instead of "
                                       "printing it", show_default=False),
    hostfwd: bool = typer.Option(False, "--hostfwd", help="leave the port forwards out (libvirt 9.0 cannot "
                                 "express them) and print the virsh commands that add them once it runs"),
) -> None:
    """A machine in another tool's format: --libvirt prints its libvirt domain XML."""
    if not libvirt:
        raise typer.BadParameter("say which format: --libvirt", param_hint="--libvirt")
    inst = machine(name)
    xml = inst.libvirt_xml(hostfwd=hostfwd)
    if output is None:
        sys.stdout.write(xml)
    else:
        from vmkit.fsutil import atomic_write

        atomic_write(output, xml, 0o600)
        err.print(f"wrote the libvirt domain of [bold]{name}[/] to {output}", highlight=False)
    commands = inst.libvirt_hostfwd() if hostfwd else []
    if commands:
        from shlex import join

        err.print("after `virsh start`, add the port forwards with:", highlight=False)
        for argv in commands:
            err.print(f"  {join(argv)}", markup=False, highlight=False, soft_wrap=True)


def clone(src: str, dst: str) -> None:
    """Make an independent copy of a stopped machine (new identity, keys and MAC); both can run at once."""
    inst = client().clone(src, dst, notice=lambda note: err.print(f"note: {note}"))
    out.print(f"cloned [bold]{src}[/] to [bold]{dst}[/] in {inst.directory}")
