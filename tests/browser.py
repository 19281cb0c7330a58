"""Helpers for the web console's browser tests: Debian's chromium driven by Playwright (no browser
download), and the same pixel statistics of the page's canvas and of a ``screendump`` PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image as PilImage

CHROMIUM = "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)

CANVAS_STATS = """() => {
    const c = document.querySelector('#screen canvas');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let lit = 0, sum = 0;
    for (let i = 0; i < d.length; i += 4) {
        const l = (d[i] + d[i + 1] + d[i + 2]) / 3;
        sum += l;
        if (l > 64) lit++;
    }
    return {w: c.width, h: c.height, lit: lit, mean: sum / (d.length / 4)};
}"""
"""The canvas's size, its pixels brighter than 64 and its mean brightness (0-255)."""

SERIAL_TEXT = """() => { const b = window.vmkit.term.buffer.active; let t = '';
    for (let i = 0; i < b.length; i++) {
        const line = b.getLine(i);
        t += (line.isWrapped ? '' : '\\n') + line.translateToString(true);
    }
    return t; }"""
"""The serial pane's text (xterm.js's buffer, scrollback included; wrapped lines joined)."""

CANVAS_SIZE = "() => { const c = document.querySelector('#screen canvas'); return c ? [c.width, c.height] : null; }"


def png_stats(path: Path) -> dict[str, float]:
    """The same statistics as :data:`CANVAS_STATS`, of a PNG file."""
    with PilImage.open(path) as img:
        gray = img.convert("L")
    hist = gray.histogram()
    total = sum(hist)
    return {"w": gray.size[0], "h": gray.size[1], "lit": sum(hist[65:]),
            "mean": sum(i * n for i, n in enumerate(hist)) / total}


def assert_same_picture(canvas: dict[str, float], dump: dict[str, float]) -> None:
    assert (canvas["w"], canvas["h"]) == (dump["w"], dump["h"]), (canvas, dump)
    assert dump["lit"] > 0, "the screen is black"
    assert abs(canvas["lit"] - dump["lit"]) <= max(50, dump["lit"] * 0.05), (canvas, dump)
    assert abs(canvas["mean"] - dump["mean"]) < 3, (canvas, dump)


_US_SHIFTED = {"!": "Digit1", "@": "Digit2", "#": "Digit3", "$": "Digit4", "%": "Digit5", "^": "Digit6",
               "&": "Digit7", "*": "Digit8", "(": "Digit9", ")": "Digit0", "_": "Minus", "+": "Equal",
               "{": "BracketLeft", "}": "BracketRight", ":": "Semicolon", '"': "Quote", "~": "Backquote",
               "|": "Backslash", "<": "Comma", ">": "Period", "?": "Slash"}


def type_like_a_person(page: Any, text: str) -> None:
    """Type ``text`` as a person does on a US keyboard: Shift held for capitals and symbols.

    (Playwright's ``keyboard.type`` sends ``$`` as a Digit4 key without Shift; noVNC forwards the
    physical key to QEMU, so the guest would see ``4``.)"""
    for ch in text:
        if ch in _US_SHIFTED:
            page.keyboard.press(f"Shift+{_US_SHIFTED[ch]}")
        elif "A" <= ch <= "Z":
            page.keyboard.press(f"Shift+Key{ch}")
        else:
            page.keyboard.type(ch)
