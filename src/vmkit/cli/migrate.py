"""``vmkit migrate``: move a running machine to another host (and the target's hidden half), and
``vmkit client-call``, the other host's half of ``vmkit.Client(host=...)``."""

from __future__ import annotations

import typer

from vmkit.cli.output import err, machine, out, print_json


def register(app: typer.Typer) -> None:
    app.command("migrate")(migrate)
    app.command("migrate-receive", hidden=True)(migrate_receive)
    app.command("client-call", hidden=True)(client_call)


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def migrate(
    ctx: typer.Context,
    name: str,
    target: str | None = typer.Argument(None, metavar="ssh://[user@]HOST[:PORT]",
                                        help="the host to move it to (none with --cancel)"),
    cancel: bool = typer.Option(False, "--cancel", help="cancel its migration in flight, or take back a completed "
                                "one its target did not take over (`vmkit migrate` was killed): it runs here again"),
    force: bool = typer.Option(False, "--force", help="with --cancel: take it back without asking the target "
                               "(only if you know the target does not run it)"),
    offline: bool = typer.Option(False, "--offline",
                                 help="move a stopped or saved machine (disks; its saved state re-encrypted there)"),
    copy_storage: bool = typer.Option(False, "--copy-storage",
                                      help="copy its local disks while it runs (QEMU's NBD mirror)"),
    shared_storage: bool = typer.Option(False, "--shared-storage",
                                        help="its disks are at the same paths on the target (a shared filesystem)"),
    downtime_limit: int | None = typer.Option(None, "--downtime-limit", metavar="MS", min=1,
                                              help="the longest pause QEMU aims for at the switch-over"),
    bandwidth: int | None = typer.Option(None, "--bandwidth", metavar="MB/s", min=1,
                                         help="most MiB per second the migration may use"),
    auto_converge: bool = typer.Option(True, "--auto-converge/--no-auto-converge",
                                       help="throttle a guest that dirties memory faster than the link carries it "
                                       "(QEMU's auto-converge: it starts only then)"),
    max_rounds: int = typer.Option(30, "--max-rounds", min=2, max=100_000,
                                   help="if the copy has not converged after this many rounds, pause the guest so it "
                                   "completes (a migration never runs forever)"),
    postcopy: bool = typer.Option(False, "--postcopy", help="switch to post-copy after the first round (fast to "
                                  "converge; a failure after the switch loses the guest)"),
    paused: bool = typer.Option(False, "--paused", help="copy with the guest paused (no live pre-copy)"),
    live: bool = typer.Option(False, "--live", help="live pre-copy even where this QEMU can lose pages under TCG "
                              "(then verified page by page, and done again paused if a page was lost)"),
    verify: bool = typer.Option(False, "--verify", help="compare every memory page on both hosts before the target "
                                "runs it (adds downtime; a difference takes the migration back)"),
    tls: bool = typer.Option(False, "--tls", help="encrypt the memory stream and the disk copy of --copy-storage with "
                             "TLS (certificates made for this migration)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Move a running machine to another host; it keeps running (live migration)."""
    from vmkit.errors import ConfigError

    if cancel:
        if target is not None:
            raise ConfigError.single("--cancel", "give no target: the machine's own migration is cancelled")
        done = machine(name).cancel_migration(force=force)
        if as_json:
            print_json(done)
        else:
            out.print(f"{'took back' if done['taken_back'] else 'cancelled the migration of'} [bold]{name}[/]: it is "
                      f"{done['state']} here", highlight=False)
        return
    if force:
        raise ConfigError.single("--force", "only with --cancel")
    if target is None:
        raise ConfigError.single("TARGET", "give the host to move it to: ssh://[user@]HOST[:PORT]")
    # (auto-converge is on by default: it is simply unused by an offline move)
    if offline and (copy_storage or shared_storage or postcopy or paused or verify or live or tls):
        raise ConfigError.single("--offline", "an offline move copies the disks and the saved state; the live "
                                 "migration options do not apply")
    if live and paused:
        raise ConfigError.single("--live", "give --live or --paused, not both")
    if copy_storage and shared_storage:
        raise ConfigError.single("--copy-storage", "give --copy-storage or --shared-storage, not both")
    from vmkit.migrate import early

    early.prestart(target)  # the target's vmkit starts while this one loads the rest
    ctx.call_on_close(lambda: early.drop(target))  # not adopted (the command failed before reaching it): ended
    handle = machine(name)
    if offline:
        moved = handle.move(target, on_event=lambda line: None if as_json else err.print(str(line.get("step", "")),
                                                                                          highlight=False))
        if as_json:
            print_json(moved)
            return
        if moved.get("backend") == "libvirt":
            out.print(f"moved [bold]{name}[/] to {moved['target']} (libvirt, offline: its definition and disks); "
                      f"it is {moved['state']} there and gone from here", highlight=False)
            return
        out.print(f"moved [bold]{name}[/] to {moved['target']} in {moved['seconds']:.1f} s "
                  f"({_size(int(moved['bytes_sent']))} sent); `vmkit --host {moved['target']} start {name}` "
                  + ("resumes it" if moved["state"] else "boots it"), highlight=False)
        out.print(f"  here it is `migrated` until `vmkit delete {name}`", highlight=False)
        return
    last = [""]

    def on_event(line: dict[str, object]) -> None:
        if as_json:
            return
        if "step" in line or "note" in line:
            err.print(str(line.get("step") or line.get("note")), highlight=False)
        elif isinstance(p := line.get("progress"), dict):
            shown = (f"{p['status']}: round {p['rounds']}, {_size(int(p['remaining_bytes']))} left, "
                     f"{int(p['dirty_pages_rate'])} pages/s dirtied, {float(p['mbps']):.0f} Mbit/s"
                     + (f", expected downtime {p['expected_downtime_ms']} ms" if p.get("expected_downtime_ms")
                        is not None else "")
                     + (f", throttled {p['throttle_percent']}%" if p.get("throttle_percent") else ""))
            if shown != last[0]:
                last[0] = shown
                err.print(shown, highlight=False)

    method = "paused" if paused else "live" if live else "auto"
    result = handle.migrate(target, method=method, downtime_limit_ms=downtime_limit,
                            bandwidth_bytes=bandwidth << 20 if bandwidth else None, auto_converge=auto_converge,
                            postcopy=postcopy, max_rounds=max_rounds, verify=verify, shared_storage=shared_storage,
                            copy_storage=copy_storage, tls=tls, on_event=on_event)
    if as_json:
        print_json(result)
        return
    if result.get("backend") == "libvirt":  # vmkit --connect URI migrate: libvirt's own migration
        out.print(f"migrated [bold]{name}[/] to {result['target']} in {result['seconds']:.1f} s (libvirt, "
                  f"{result['method']}: {result['method_reason']}); it is {result['state']} there and gone from here",
                  highlight=False)
        return
    rep = result["report"]
    out.print(f"migrated [bold]{name}[/] to {result['target']} in {result['seconds']:.1f} s ({rep['method']}: "
              f"{rep['method_reason']})", highlight=False)
    downtime = rep["downtime_ms"] if rep["downtime_ms"] is not None else "?"
    out.print(f"  QEMU: total {rep['total_time_ms']} ms, downtime {downtime} ms (guest paused "
              f"{rep['paused_ms']} ms), setup "
              f"{rep['setup_time_ms']} ms, {rep['rounds']} rounds, {_size(rep['transferred_bytes'])} sent"
              + (f", throttled {rep['throttle_percent']}%" if rep.get("throttle_percent") else ""), highlight=False)
    if result.get("phases"):
        out.print("  time: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in result["phases"].items()),
                  highlight=False)
    if result["bad_pages"] is not None:
        out.print(f"  memory check: {result['bad_pages']} of {result['pages_checked']} pages differ", highlight=False)
    for note in [*result["notes"], *rep["notes"]]:
        out.print(f"  note: {note}", highlight=False)
    out.print(f"  here it is `migrated` until `vmkit delete {name}`", highlight=False)


def migrate_receive() -> None:
    """The target's half of `vmkit migrate` (JSON lines on stdin/stdout; run over SSH)."""
    import sys

    from vmkit.migrate import receive

    code = receive.serve()
    if code:
        sys.exit(code)


def client_call() -> None:
    """One call of ``vmkit.Client(host=...)`` from another host (a JSON line on stdin, one on stdout)."""
    import sys

    from vmkit.client import remote
    from vmkit.client.sync import Client, Instance

    code = remote.serve(Client(), Instance)
    if code:
        sys.exit(code)
