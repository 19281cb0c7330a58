"""A machine's screen and keyboard: ``screenshot``, ``send-keys``, ``type``, ``display``."""

from __future__ import annotations

from pathlib import Path

import typer

from vmkit.cli.output import machine, out, print_json


def register(app: typer.Typer) -> None:
    app.command("screenshot")(screenshot)
    app.command("send-keys")(send_keys)
    app.command("type")(type_)
    app.command("display")(display)


def screenshot(name: str, file: Path = typer.Argument(..., help="where to write the PNG image")) -> None:
    """Save the machine's screen now as a PNG image."""
    png = machine(name).screenshot(file)
    out.print(f"wrote {len(png)} bytes to {file}")


def send_keys(
    name: str,
    keys: list[str] = typer.Argument(..., help="QEMU key names pressed in turn: a, ret, f2, esc, up...; "
                                               "keys joined with '-' are pressed together (ctrl-alt-delete)"),
    hold_ms: int = typer.Option(50, "--hold", help="milliseconds each press is held"),
) -> None:
    """Press keys on the machine's keyboard, e.g. vmkit send-keys web ctrl-alt-f2 or ... ret."""
    sent = machine(name).send_keys(keys, hold_ms=hold_ms)
    out.print(f"sent {sent.presses} key press{'es' if sent.presses != 1 else ''}")


def type_(
    name: str,
    text: str = typer.Argument(..., help="the text (printable ASCII, newlines, tabs)"),
    enter: bool = typer.Option(False, "--enter", help="press Enter after the text"),
    hold_ms: int = typer.Option(50, "--hold", help="milliseconds each press is held"),
) -> None:
    """Type text on the machine's keyboard (US layout; shift for capitals and symbols)."""
    sent = machine(name).type(text + ("\n" if enter else ""), hold_ms=hold_ms)
    out.print(f"typed {sent.presses} key press{'es' if sent.presses != 1 else ''}")


def display(
    name: str,
    size: str | None = typer.Option(None, "--size", help="ask the guest for WIDTHxHEIGHT (at most the size it "
                                                          "booted with, for Linux's console)"),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds to wait for the guest to change mode"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Show the display's size, or change it with --size (as a VNC client's window would)."""
    handle = machine(name)
    if size is None:
        info = handle.display()
        if as_json:
            print_json(info.model_dump(mode="json"))
            return
        out.print(f"[bold]{name}[/]: {info.type} {info.width}x{info.height} (booted at "
                  f"{info.boot_width}x{info.boot_height})")
        return
    result = handle.resize_display(size, timeout=timeout)
    if as_json:
        print_json(result.model_dump(mode="json"))
        return
    if result.reached:
        out.print(f"[bold]{name}[/]: the display is {result.width}x{result.height}")
    else:
        out.print(f"[bold]{name}[/]: the display is {result.width}x{result.height} (asked for "
                  f"{result.requested_width}x{result.requested_height}: the guest shows at most what it can; "
                  "Linux's console no more than its boot-time size)")
