"""The web console: the machine's screen (noVNC) and serial console (xterm.js) in a browser.

``POST /v1/web-console`` (``vmkit console --web``) makes the supervisor serve a page on a loopback
port (127.0.0.1 only; the first call picks the port, later calls reuse it) and returns a URL with
a one-time token. Opening it trades the token for a session cookie (HttpOnly, SameSite=Strict,
named after the port) and redirects to the page; a token works once and for
:data:`TOKEN_LIFETIME` seconds. Everything else on the port needs the session cookie, a ``Host``
of ``127.0.0.1:PORT`` or ``localhost:PORT`` (no DNS rebinding), and, for WebSockets and POSTs, an
``Origin`` equal to the page's own. The page talks only to this server:

``/ws/vnc``      WebSocket <-> QEMU's VNC server on ``vnc.sock`` (bytes both ways; noVNC speaks RFB)
``/ws/serial``   WebSocket <-> the serial console (the recent log first, then live; input to the guest)
``/api/keys``    POST ``{"keys": [...]}``: key presses (the Ctrl-Alt-Del button)
``/api/type``    POST ``{"text": "..."}``: typed text (the paste box)
``/api/screenshot.png``  the screen as PNG (the screenshot button)

The page (``web/index.html``, ``console.js``, ``console.css``) is vmkit's; noVNC and xterm.js are
third-party code fetched from the npm registry at install time (``scripts/vendor_web.py``, pinned
versions and checksums) into ``web/vendor/`` (not in git), or found where ``VMKIT_WEB_ASSETS`` says.
Nothing is loaded from elsewhere at run time (the page's Content-Security-Policy says so too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from vmkit.api import models
from vmkit.config import validate_model
from vmkit.errors import ConfigError, HostError, VmkitError
from vmkit.runtime.serial import Backlog, read_log

log = logging.getLogger("vmkit.daemon.webconsole")

TOKEN_LIFETIME = 300.0
"""Seconds a web console URL's token stays valid (it works once)."""
SERIAL_HISTORY = 64 << 10
"""Bytes of the serial log a new serial pane starts with."""
SERIAL_BACKLOG = 256 << 10
WEB_DIR = Path(__file__).with_name("web")
VENDOR_FILES = ("novnc/core/rfb.js", "xterm/lib/xterm.js", "xterm/css/xterm.css", "xterm-addon-fit/lib/addon-fit.js")
"""What the page loads from the vendored packages (a missing one is reported before serving)."""


def vendor_dir() -> Path:
    """Where noVNC and xterm.js are: ``VMKIT_WEB_ASSETS``, else ``web/vendor`` beside this module."""
    env = os.environ.get("VMKIT_WEB_ASSETS")
    return Path(env) if env else WEB_DIR / "vendor"


def check_assets() -> Path:
    vendor = vendor_dir()
    missing = [f for f in VENDOR_FILES if not (vendor / f).is_file()]
    if missing:
        raise HostError(f"the web console's assets are missing in {vendor} ({', '.join(missing)})",
                               hint="run scripts/install.sh (it fetches noVNC and xterm.js from the npm registry: "
                                    "python scripts/vendor_web.py), or point VMKIT_WEB_ASSETS at them")
    return vendor


@dataclass(frozen=True)
class Actions:
    """What the page may do to the machine (the supervisor's own operations)."""

    serial_add_listener: Callable[[Callable[[bytes], None]], Callable[[], None]]
    serial_write: Callable[[bytes], Awaitable[None]]
    serial_log: Path
    vnc_socket: Path
    keys: Callable[[models.KeysRequest], Awaitable[models.KeysSent]]
    type_text: Callable[[models.TypeRequest], Awaitable[models.KeysSent]]
    screenshot: Callable[[], Awaitable[bytes]]


class WebConsole:
    """The loopback web server of one supervisor (started on the first request for a URL)."""

    def __init__(self, name: str, actions: Actions) -> None:
        self.name = name
        self.actions = actions
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self._sessions: set[str] = set()
        self._lock = asyncio.Lock()
        self._sockets: set[web.WebSocketResponse] = set()

    # -- the URL --------------------------------------------------------------------------------------
    async def url(self, port: int = 0) -> models.WebConsole:
        """Serve (once) and mint a one-time URL."""
        async with self._lock:
            if self._runner is None:
                check_assets()
                await self._serve(port)
        assert self.port is not None
        now = time.monotonic()
        self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
        token = secrets.token_urlsafe(32)
        self._tokens[token] = now + TOKEN_LIFETIME
        return models.WebConsole(url=f"http://127.0.0.1:{self.port}/?token={token}", port=self.port,
                                 expires_in=TOKEN_LIFETIME)

    async def _serve(self, port: int) -> None:
        app = web.Application(middlewares=[self._guard], client_max_size=64 << 10)
        app.add_routes([
            web.get("/", self._h_page),
            web.get("/assets/{path:.+}", self._h_asset),
            web.get("/ws/vnc", self._h_vnc),
            web.get("/ws/serial", self._h_serial),
            web.post("/api/keys", self._h_keys),
            web.post("/api/type", self._h_type),
            web.get("/api/screenshot.png", self._h_screenshot),
            web.get("/favicon.ico", self._h_no_icon),
        ])
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=False)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError.single("port", f"cannot listen on 127.0.0.1:{port}: {exc.strerror}: "
                                     "pick another port, or 0 for any free one") from None
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        self._runner = runner
        log.info("web console on http://127.0.0.1:%d/", self.port)

    async def close(self) -> None:
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- checks ---------------------------------------------------------------------------------------
    @property
    def cookie(self) -> str:
        return f"vmkit-console-{self.port}"

    def _origins(self) -> set[str]:
        return {f"http://127.0.0.1:{self.port}", f"http://localhost:{self.port}"}

    def _has_session(self, request: web.Request) -> bool:
        value = request.cookies.get(self.cookie, "")
        return any(secrets.compare_digest(value, s) for s in self._sessions) if value else False

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        if request.host not in {o.removeprefix("http://") for o in self._origins()}:
            return _refuse(421, "this server answers only to 127.0.0.1 and localhost")
        changes = request.method != "GET" or request.headers.get("Upgrade", "").lower() == "websocket"
        if changes and request.headers.get("Origin") not in self._origins():
            return _refuse(403, "requests from another origin are refused")
        if request.path != "/" and not self._has_session(request):
            return _refuse(403, "no session: open the URL that `vmkit console --web` printed")
        try:
            resp = await handler(request)
        except VmkitError as exc:
            return web.json_response({"error": {"type": type(exc).__name__, "message": exc.message}},
                                     status=_STATUS.get(int(exc.exit_code), 500))
        _harden(resp, self.port)
        return resp

    # -- the page ---------------------------------------------------------------------------------
    async def _h_page(self, request: web.Request) -> web.StreamResponse:
        token = request.query.get("token")
        if token is not None:
            expiry = self._tokens.pop(token, None)  # one use, whatever happens next
            if expiry is None or expiry < time.monotonic():
                return _refuse(403, "this console URL is not valid (each works once and for "
                                    f"{TOKEN_LIFETIME:.0f} s): run `vmkit console --web {self.name}` again")
            session = secrets.token_urlsafe(32)
            self._sessions.add(session)
            resp = web.HTTPSeeOther("/")  # the token leaves the address bar and the history
            resp.set_cookie(self.cookie, session, httponly=True, samesite="Strict", path="/")
            _harden(resp, self.port)
            return resp
        if not self._has_session(request):
            return _refuse(403, f"no session: run `vmkit console --web {self.name}` and open the URL it prints")
        html = (WEB_DIR / "index.html").read_text().replace("{{NAME}}", _html_escape(self.name))
        return web.Response(text=html, content_type="text/html")

    async def _h_asset(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        base, sub = (vendor_dir(), rel.removeprefix("vendor/")) if rel.startswith("vendor/") else (WEB_DIR, rel)
        root = base.resolve()
        path = (root / sub).resolve()
        if not path.is_relative_to(root) or not path.is_file() or path.name == "index.html":
            return _refuse(404, "no such asset")
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix in (".js", ".mjs"):
            ctype = "text/javascript"
        return web.Response(body=path.read_bytes(), content_type=ctype)

    # -- WebSockets -------------------------------------------------------------------------------
    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=1 << 20, heartbeat=30)
        await ws.prepare(request)
        self._sockets.add(ws)
        return ws

    async def _h_vnc(self, request: web.Request) -> web.StreamResponse:
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.actions.vnc_socket))
        except OSError as exc:
            return _refuse(503, f"the machine's VNC server does not answer: {exc}")
        ws = await self._websocket(request)

        async def to_browser() -> None:
            while data := await reader.read(1 << 16):
                await ws.send_bytes(data)
            await ws.close()

        pump = asyncio.create_task(to_browser())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    writer.write(msg.data)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._sockets.discard(ws)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            writer.close()
        return ws

    async def _h_serial(self, request: web.Request) -> web.StreamResponse:
        ws = await self._websocket(request)
        backlog = Backlog("a web console", SERIAL_BACKLOG)
        remove = self.actions.serial_add_listener(backlog.put)
        history = read_log(self.actions.serial_log)[-SERIAL_HISTORY:]  # no await since the listener: no gap

        async def to_browser() -> None:
            if history:
                await ws.send_bytes(history)
            while (data := await backlog.get()) is not None:
                await ws.send_bytes(data)

        pump = asyncio.create_task(to_browser())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    await self.actions.serial_write(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await self.actions.serial_write(msg.data.encode())
        except (ConnectionError, EOFError):
            pass
        finally:
            self._sockets.discard(ws)
            remove()
            backlog.close()
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        return ws

    # -- actions ----------------------------------------------------------------------------------
    async def _body(self, request: web.Request, model: type[Any]) -> Any:
        try:
            data = await request.json()
        except ValueError:
            raise ConfigError.single("<body>", "send a JSON object") from None
        return validate_model(model, data, context="request")

    async def _h_keys(self, request: web.Request) -> web.StreamResponse:
        sent = await self.actions.keys(await self._body(request, models.KeysRequest))
        return web.json_response(sent.model_dump(mode="json"))

    async def _h_type(self, request: web.Request) -> web.StreamResponse:
        sent = await self.actions.type_text(await self._body(request, models.TypeRequest))
        return web.json_response(sent.model_dump(mode="json"))

    async def _h_no_icon(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def _h_screenshot(self, request: web.Request) -> web.StreamResponse:
        png = await self.actions.screenshot()
        return web.Response(body=png, content_type="image/png", headers={
            "Content-Disposition": f'attachment; filename="{self.name}-{time.strftime("%Y%m%d-%H%M%S")}.png"'})


_STATUS = {2: 400, 3: 404, 4: 409, 8: 504}


def _refuse(status: int, message: str) -> web.Response:
    resp = web.json_response({"error": {"message": message}}, status=status)
    _harden(resp, None)
    return resp


def _harden(resp: web.StreamResponse, port: int | None) -> None:
    """No framing, no sniffing, no caching; scripts, styles and connections only from this server."""
    if resp.prepared:  # a WebSocket: its headers went with the handshake
        return
    connect = f" ws://127.0.0.1:{port} ws://localhost:{port}" if port else ""
    resp.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        f"connect-src 'self'{connect}; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-store"


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
