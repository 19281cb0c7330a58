"""The public Python client (vmkit.Client, vmkit.aio.Client) on the micro guest: the same machines
as the CLI, typed results, errors as vmkit's classes, and usable inside a running event loop."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

import vmkit
import vmkit.aio
from conftest import image_cache_dir
from conftest import vmkit as cli
from vmkit.api import models
from vmkit.errors import ConfigError, NotFoundError, StateError
from vmkit.host.images.store import Image

pytestmark = pytest.mark.integration


def test_client_drives_the_same_machines_as_the_cli(micro_image: Image, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("VMKIT_IMAGE_CACHE", str(image_cache_dir()))
    monkeypatch.delenv("VMKIT_HOME", raising=False)
    client = vmkit.Client(home=home)
    box = client.create("box", image="micro", memory="256M", run="echo hello-from-the-client")
    assert isinstance(box, vmkit.Instance) and box.state == "stopped"
    with pytest.raises(NotFoundError):
        client.get("nope")
    with pytest.raises(ConfigError) as bad:
        client.create("bad", image="micro", memroy="1G")
    assert bad.value.problems[0].field == "memroy"

    started = box.start()
    assert isinstance(started, models.StartResult) and started.status.state == "running"
    assert started.status.qemu_pid and box.state == "running"
    # the CLI sees the machine the client made (same home, same supervisor)
    monkeypatch.setenv("VMKIT_HOME", str(home))
    rows = json.loads(cli("list", "--json").stdout)
    assert [(r["name"], r["state"], r["health"]) for r in rows] == [("box", "running", "ok")]
    monkeypatch.delenv("VMKIT_HOME")

    events = box.events()
    hello = next(events)
    assert isinstance(hello, models.Event) and (hello.kind, hello.state) == ("hello", "running")
    assert box.pause().state == "paused"
    with pytest.raises(StateError):
        box.pause()
    changed = next(e for e in events if e.kind == "state-changed" and e.state == "paused")
    assert changed.detail["previous"] in ("running", "pausing")
    resumed = box.resume()
    assert resumed.state == "running" and "no guest agent" in resumed.clock.message
    events.close()
    from conftest import wait_until

    assert wait_until(lambda: "hello-from-the-client" in box.console_log(), 60)

    saved = box.stop(save=True)
    assert saved.state == "stopped" and box.state == "saved"
    back = box.start()
    assert back.restored is not None and back.status.state == "running"
    assert box.stop(force=True).state == "stopped"
    box.delete()
    assert client.list() == []


def test_async_client_and_the_sync_client_inside_a_loop(micro_image: Image, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKIT_IMAGE_CACHE", str(image_cache_dir()))
    home = tmp_path / "home"

    async def main() -> list[str]:
        aclient = vmkit.aio.Client(home=home)
        a, b = await asyncio.gather(aclient.create("a", image="micro", memory="128M"),
                                    aclient.create("b", image="micro", memory="128M"))
        await asyncio.gather(a.start(), b.start())  # side by side, the loop stays free
        states = sorted([await a.state(), await b.state()])
        seen = []
        async for ev in a.events():
            seen.append(ev.kind)
            break
        # the synchronous client works inside a running loop too (runs in a worker thread)
        sync_rows = vmkit.Client(home=home).rows()
        assert sorted(r.name for r in sync_rows) == ["a", "b"]
        await asyncio.gather(a.stop(force=True), b.stop(force=True))
        await aclient.delete("a")
        await aclient.delete("b")
        return [*states, *seen]

    assert asyncio.run(main()) == ["running", "running", "hello"]
    assert [p for p in os.listdir(home / "instances") if not p.startswith(".")] == []  # (.list-cache.json)
