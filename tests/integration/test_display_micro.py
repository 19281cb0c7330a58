"""The screen of a micro guest (VGA text mode: no guest GPU driver) and the web console's door:
screenshots and key presses through the CLI, errors naming what is wrong, and the web console's
tokens, session cookie, Host and Origin checks on the page and on both WebSockets, against a real
supervisor. The page itself in headless Chromium: its canvas shows what ``screendump`` shows."""

from __future__ import annotations

import asyncio
import io
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from PIL import Image as PilImage

from browser import CANVAS_STATS, CHROMIUM, HAVE_CHROMIUM, SERIAL_TEXT, assert_same_picture, png_stats
from conftest import image_cache_dir, processes_mentioning, vmkit
from vmkit.host.images.store import Image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def micro_screen(micro_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One running micro guest with a display (and one without), shared by the module's tests."""
    home = tmp_path_factory.mktemp("display-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMKIT_HOME", str(home))
        mp.setenv("VMKIT_IMAGE_CACHE", str(image_cache_dir()))
        vmkit("create", "scr", "--image", "micro", "--display")
        vmkit("create", "headless", "--image", "micro")
        vmkit("start", "scr")
        vmkit("start", "headless")
        try:
            yield home
        finally:
            for name in ("scr", "headless"):
                vmkit("stop", "--force", name, check=False)
            assert not processes_mentioning(str(home)), "a process outlived the display tests"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    with PilImage.open(io.BytesIO(data)) as img:
        return img.size


def test_the_vnc_socket_is_private_and_the_config_says_display(micro_screen: Path) -> None:
    inst = micro_screen / "instances" / "scr"
    sock = inst / "vnc.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    config = json.loads(vmkit("inspect", "scr").stdout)["config"]
    assert config["display"] == {"type": "virtio-vga", "width": 1280, "height": 800}
    assert "console=tty0 console=ttyS0" in config["boot"]["cmdline"]  # the kernel writes to the screen too
    argv = vmkit("start", "scr", "--dry-run").stdout
    assert "-vnc unix:" in argv and "tcp" not in argv.split("-vnc", 1)[1].split()[0]


def test_screenshot_of_vga_text_mode(micro_screen: Path, tmp_path: Path) -> None:
    out = tmp_path / "shot.png"
    res = vmkit("screenshot", "scr", str(out))
    assert "wrote" in res.stdout
    assert png_size(out.read_bytes()) == (720, 400)  # VGA text mode: 80x25 cells of 9x16 pixels
    with PilImage.open(out) as img:
        assert img.convert("L").getextrema()[1] > 0, "the screen is all black: nothing was drawn"
    info = json.loads(vmkit("display", "scr", "--json").stdout)
    assert info == {"type": "virtio-vga", "width": 720, "height": 400, "boot_width": 1280, "boot_height": 800}


def test_keys_and_text_are_sent_and_bad_ones_refused(micro_screen: Path) -> None:
    assert "sent 2 key presses" in vmkit("send-keys", "scr", "shift-a", "ret").stdout
    assert "typed 6 key presses" in vmkit("type", "scr", "Hi! x", "--enter").stdout
    bad = vmkit("send-keys", "scr", "ctrl-alt-dele", check=False)
    assert bad.returncode == 2 and "KEY 1" in bad.stderr and "'dele'" in bad.stderr
    bad = vmkit("type", "scr", "naïve", check=False)
    assert bad.returncode == 2 and "TEXT" in bad.stderr and "character 3" in bad.stderr
    bad = vmkit("display", "scr", "--size", "big", check=False)
    assert bad.returncode == 2 and "--size" in bad.stderr


def test_a_machine_without_display_says_so(micro_screen: Path, tmp_path: Path) -> None:
    for args in (("screenshot", "headless", str(tmp_path / "x.png")), ("send-keys", "headless", "ret"),
                 ("console", "--web", "headless", "--no-browser")):
        res = vmkit(*args, check=False)
        assert res.returncode == 2, res
        assert "has no display" in res.stderr and "--display" in res.stderr
    assert not (tmp_path / "x.png").exists()
    bad = vmkit("create", "x", "--image", "micro", "--display-size", "800x600", check=False)
    assert bad.returncode == 2 and "--display-size" in bad.stderr and "--display" in bad.stderr


def web_url() -> str:
    url = vmkit("console", "--web", "scr", "--no-browser").stdout.strip()
    assert url.startswith("http://127.0.0.1:") and "?token=" in url, url
    return url


async def _door_checks(url: str) -> None:
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}"
    origin = base
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        # nothing without a session
        for path in ("/", "/assets/console.js", "/api/screenshot.png", "/ws/vnc", "/ws/serial"):
            async with s.get(base + path, headers={"Origin": origin}, allow_redirects=False) as r:
                assert r.status == 403, (path, r.status)
        async with s.get(base + "/?token=wrong", allow_redirects=False) as r:
            assert r.status == 403
        # the token: once, then a session cookie and a redirect that drops it from the address
        async with s.get(url, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/"
            cookie = r.cookies[f"vmkit-console-{parts.port}"]
            assert cookie["httponly"] and cookie["samesite"] == "Strict"
        async with s.get(url, allow_redirects=False) as r:
            assert r.status == 403, "a token worked twice"
        async with s.get(base + "/") as r:
            assert r.status == 200
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            assert "scr" in await r.text()
        async with s.get(base + "/assets/vendor/novnc/core/rfb.js") as r:
            assert r.status == 200 and r.content_type == "text/javascript"
        for sneaky in ("/assets/../webconsole.py", "/assets/vendor/../../webconsole.py",
                       "/assets/%2e%2e/webconsole.py"):
            async with s.get(base + sneaky) as r:
                assert r.status in (403, 404), sneaky
        # another Host (DNS rebinding) and another Origin are refused, on the page and the sockets
        async with s.get(base + "/", headers={"Host": f"evil.example:{parts.port}"}) as r:
            assert r.status == 421
        for path in ("/ws/vnc", "/ws/serial"):
            for bad in ({}, {"Origin": "http://evil.example"}, {"Origin": f"http://127.0.0.1:{parts.port + 1}"}):
                with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                    await s.ws_connect(base + path, headers=bad)
                assert exc.value.status == 403, (path, bad)
        async with s.post(base + "/api/type", json={"text": "x"}, headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403
        # with the session and the page's own origin: the screen's RFB greeting, the serial console's log
        async with s.ws_connect(base + "/ws/vnc", headers={"Origin": origin}) as ws:
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.BINARY and msg.data.startswith(b"RFB 003.")
        async with s.ws_connect(base + "/ws/serial", headers={"Origin": origin}) as ws:
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.BINARY and b"VMKIT-READY" in msg.data
        async with s.post(base + "/api/keys", json={"keys": ["ret"]}, headers={"Origin": origin}) as r:
            assert r.status == 200 and (await r.json()) == {"presses": 1}
        async with s.post(base + "/api/keys", json={"keys": ["nokey"]}, headers={"Origin": origin}) as r:
            assert r.status == 400 and "nokey" in (await r.json())["error"]["message"]
        async with s.get(base + "/api/screenshot.png") as r:
            assert r.status == 200 and png_size(await r.read()) == (720, 400)
    # a fresh browser without the cookie cannot reuse a spent token either
    async with aiohttp.ClientSession() as s2, s2.get(url, allow_redirects=False) as r:
        assert r.status == 403


def test_web_console_door(micro_screen: Path) -> None:
    url = web_url()
    asyncio.run(_door_checks(url))
    second = web_url()
    assert urlsplit(second).port == urlsplit(url).port and second != url  # one server, a new token each time
    # nothing listens beyond loopback
    port = urlsplit(url).port
    listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if line.split()[3] == "0A"]
    assert f"0100007F:{port:04X}" in listening
    assert not [a for a in listening if a.endswith(f":{port:04X}") and a != f"0100007F:{port:04X}"]


@pytest.mark.skipif(not HAVE_CHROMIUM, reason="Debian's chromium is not installed (scripts/install.sh)")
def test_the_page_shows_the_screen_in_chromium(micro_screen: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url = web_url()
    shot = tmp_path / "dump.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 800}, bypass_csp=True).new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('status').textContent === 'connected'", timeout=60_000)
            page.wait_for_function("window.vmkit.serialBytes > 0", timeout=30_000)
            page.wait_for_timeout(1500)  # the first full update
            vmkit("screenshot", "scr", str(shot))
            canvas = page.evaluate(CANVAS_STATS)
            serial = page.evaluate(SERIAL_TEXT)
        finally:
            browser.close()
    dump = png_stats(shot)
    assert (dump["w"], dump["h"]) == (720, 400)  # text mode cannot resize: the page shows it as it is
    assert_same_picture(canvas, dump)
    assert "VMKIT-READY" in serial  # the serial pane shows the boot
