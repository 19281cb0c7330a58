// vmkit web console: the screen (noVNC over /ws/vnc) and the serial console (xterm.js over
// /ws/serial), side by side. The screen's size follows its pane (noVNC's resizeSession: VNC
// SetDesktopSize, which QEMU passes to the display device); what the guest cannot show is scaled.
import RFB from "./vendor/novnc/core/rfb.js";

const base = `ws://${location.host}`;
const $ = (id) => document.getElementById(id);
const status = (text, ok) => { $("status").textContent = text; $("status").className = ok ? "status ok" : "status"; };
const vmkit = { rfb: null, term: null, serialSocket: null, serialBytes: 0 };
window.vmkit = vmkit;  // for scripts and tests

function connectScreen() {
  const rfb = new RFB($("screen"), `${base}/ws/vnc`, { wsProtocols: ["binary"] });
  rfb.resizeSession = true;
  rfb.scaleViewport = true;
  rfb.focusOnClick = true;
  rfb.addEventListener("connect", () => { status("connected", true); rfb.focus(); });
  rfb.addEventListener("disconnect", () => { status("disconnected: reconnecting"); setTimeout(connectScreen, 2000); });
  vmkit.rfb = rfb;
}

function showSize() {
  const canvas = $("screen").querySelector("canvas");
  $("size").textContent = canvas && canvas.width ? `${canvas.width}x${canvas.height}` : "";
}

function connectSerial() {
  const term = vmkit.term;
  const ws = new WebSocket(`${base}/ws/serial`, ["binary"]);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (ev) => { const data = new Uint8Array(ev.data); vmkit.serialBytes += data.length; term.write(data); };
  ws.onclose = () => { term.write("\r\n[vmkit: serial console disconnected, reconnecting]\r\n"); setTimeout(connectSerial, 2000); };
  vmkit.serialSocket = ws;
}

async function post(path, body) {
  const resp = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                   body: JSON.stringify(body), credentials: "same-origin" });
  if (!resp.ok) { const err = await resp.json().catch(() => ({})); status(err.error ? err.error.message : resp.statusText); }
  return resp.ok;
}

function start() {
  const term = new Terminal({ scrollback: 5000, fontSize: 13, convertEol: false });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open($("serial"));
  fit.fit();
  window.addEventListener("resize", () => fit.fit());
  term.onData((text) => {
    const ws = vmkit.serialSocket;
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(new TextEncoder().encode(text));
  });
  vmkit.term = term;
  connectSerial();
  connectScreen();
  setInterval(showSize, 500);

  $("cad").addEventListener("click", () => vmkit.rfb && vmkit.rfb.sendCtrlAltDel());
  // the box keeps pasted newlines (each types Enter); Enter in the box types the text and then Enter
  const typeIt = async (suffix) => {
    const text = $("paste").value + suffix;
    if (text && await post("/api/type", { text })) $("paste").value = "";
  };
  $("type").addEventListener("click", () => typeIt(""));
  $("paste").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); typeIt("\n"); }
  });
  $("shot").addEventListener("click", () => {
    const a = document.createElement("a");
    a.href = "/api/screenshot.png";
    a.download = "";
    document.body.appendChild(a);
    a.click();
    a.remove();
  });
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
