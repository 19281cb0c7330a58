"""``vmkit network ...``: virtual networks machines join with ``vmkit create --network NAME``."""

from __future__ import annotations

import typer

from vmkit.cli import groups
from vmkit.cli.output import client, err, out, print_json

app = typer.Typer(help=groups.help_of("network"), no_args_is_help=True)


@app.command()
def create(
    name: str = typer.Argument(..., help="network name (lower-case letters, digits, '-'); also its DNS domain"),
    subnet: str | None = typer.Option(None, "--subnet", help="IPv4 CIDR, e.g. 10.117.3.0/24 (default: a free /24)"),
    mode: str = typer.Option("nat", "--mode", help="nat, isolated, routed (these need root) or rootless"),
    dns_domain: str | None = typer.Option(None, "--dns-domain", help="machines are NAME.DOMAIN (default: the name)"),
) -> None:
    """Create a network and bring it up (bridge, dnsmasq, nftables; rootless: a switch)."""
    net = client().create_network(name, subnet=subnet, mode=mode, domain=dns_domain)
    where = f"bridge {net.bridge}, gateway {net.gateway}" if net.bridge else "rootless switch, no host address"
    out.print(f"created network [bold]{net.name}[/] ({net.mode}, {net.subnet}, {where}, domain {net.domain})")


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Every network, whether it is up, and how many machines are on it."""
    from rich.table import Table

    nets = client().networks()
    if as_json:
        print_json([n.model_dump(mode="json") for n in nets])
        return
    table = Table("name", "mode", "subnet", "domain", "bridge", "state", "machines")
    for n in nets:
        table.add_row(n.name, n.mode, n.subnet, n.domain, n.bridge or "-",
                      "[green]up[/]" if n.up else "[yellow]down[/]", str(len(n.machines)))
    out.print(table)


@app.command()
def inspect(name: str) -> None:
    """A network as JSON: definition, state, and its machines with MAC and address."""
    print_json(client().network(name).model_dump(mode="json"))


@app.command()
def delete(
    name: str,
    force: bool = typer.Option(False, "--force", "-f", help="stop the machines on it that run (hard stop) first"),
) -> None:
    """Take a network down and remove it (refused while machines on it run, unless --force)."""
    done = client().delete_network(name, force=force)
    out.print(f"deleted network [bold]{done.name}[/]")
    for item in done.removed:
        err.print(f"removed {item}")


@app.command()
def clean() -> None:
    """Remove what vmkit left on the host for networks that no longer exist (bridges, tables, dnsmasq)."""
    removed = client().clean_networks()
    for item in removed:
        out.print(f"removed {item}")
    if not removed:
        out.print("nothing to clean")
