"""
The status page in a real browser: headless Chromium (Debian's C{chromium})
loads it from a real twistd, and the test reads what the page rendered
after its live refresh, over the DevTools protocol (C{--remote-debugging-
pipe}: JSON messages ending in a NUL byte on descriptors 3 and 4, so no
websocket client is needed), and takes screenshots.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
from support import TCPEchoServer, UDPEchoServer, exchange, freePort, waitUntil

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian package chromium; .ci/run installs it)",
)


class Browser:
    """
    Headless Chromium driven over its DevTools pipe, with one page.
    """

    def __init__(self, url: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="portproxy-chromium-")
        toBrowser, self._commands = os.pipe()
        self._replies, fromBrowser = os.pipe()

        def pipes() -> None:
            copies = [os.dup(toBrowser), os.dup(fromBrowser)]
            os.dup2(copies[0], 3)
            os.dup2(copies[1], 4)

        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={self.profile}",
                "--remote-debugging-pipe",
                "--window-size=1280,800",
                url,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=pipes,
            pass_fds=(3, 4),
        )
        os.close(toBrowser)
        os.close(fromBrowser)
        self._buffer = b""
        self._nextId = 0
        self.session = None
        deadline = time.monotonic() + 30
        pages = waitUntil(
            lambda: [
                t
                for t in self.call("Target.getTargets")["targetInfos"]
                if t["type"] == "page"
            ],
            max(0.0, deadline - time.monotonic()),
            what="a page opened by Chromium",
            interval=0.1,
        )
        attached = self.call(
            "Target.attachToTarget", targetId=pages[0]["targetId"], flatten=True
        )
        self.session = attached["sessionId"]

    def call(self, method: str, timeout: float = 30.0, **params) -> dict:
        """
        Send one DevTools command (to the page once attached) and return
        its result.
        """
        self._nextId += 1
        message = {"id": self._nextId, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._nextId:
                    assert "error" not in reply, reply
                    return reply["result"]
            ready, _, _ = select.select(
                [self._replies], [], [], max(0, deadline - time.monotonic())
            )
            assert ready, f"no reply to {method}"
            chunk = os.read(self._replies, 1 << 20)
            assert chunk, "Chromium went away"
            self._buffer += chunk

    def evaluate(self, expression: str):
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True
        )
        return result["result"].get("value")

    def waitFor(self, expression: str, timeout: float = 30.0):
        """
        Evaluate C{expression} until it is truthy, and return its value.
        """
        return waitUntil(
            lambda: self.evaluate(expression), timeout, what=expression, interval=0.1
        )

    def screenshot(self, path, width: int, height: int, mobile: bool) -> bytes:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
        )
        png = base64.b64decode(
            self.call("Page.captureScreenshot", format="png")["data"]
        )
        path.write_bytes(png)
        return png

    def close(self) -> None:
        try:
            os.close(self._commands)
        except OSError:
            pass
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._replies)
        shutil.rmtree(self.profile, ignore_errors=True)


#: The rendered cells of each row, as the browser shows them.
ROWS = """
JSON.stringify(Array.from(document.querySelectorAll('#rows tr')).map(function (tr) {
  var row = {};
  tr.querySelectorAll('td').forEach(function (td) {
    row[td.dataset.field] = td.textContent;
    if (td.title) { row[td.dataset.field + 'Title'] = td.title; }
  });
  row.graph = tr.querySelectorAll('svg polyline').length;
  return row;
}))
"""


def humanBytes(count: int) -> str:
    """
    The page's rendering of a byte count.
    """
    value, unit = float(count), 0
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{round(value)} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def test_statusPageInChromium(proxy, tmp_path) -> None:
    """
    Chromium renders one row per mapping, and after traffic sent while the
    page is open, its live refresh (no page reload) shows exactly the
    flows and bytes the test sent, with a traffic graph; screenshots are
    taken at desktop and phone sizes.
    """
    http, web, dns = freePort(), freePort(), freePort("udp")
    with TCPEchoServer() as echo, UDPEchoServer() as udpEcho:
        proxy.start(
            f"""
http:
  listen: 127.0.0.1:{http}
mappings:
  - name: web
    listen: 127.0.0.1:{web}
    target: 127.0.0.1:{echo.port}
  - name: dns
    proto: udp
    listen: 127.0.0.1:{dns}
    target: 127.0.0.1:{udpEcho.port}
"""
        )
        assert exchange(web, b"a" * 1000) == b"a" * 1000
        browser = Browser(f"http://127.0.0.1:{http}/")
        try:
            browser.waitFor("document.querySelectorAll('#rows tr').length == 2")
            browser.evaluate("window.notReloaded = true")
            refreshes = int(
                browser.evaluate("document.getElementById('updated').dataset.refreshes")
            )

            # Traffic while the page is open.
            payloads = [b"b" * 5000, b"c" * 250000, b"d" * 7]
            for payload in payloads:
                assert exchange(web, payload) == payload
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(10)
                for size in (512, 64):
                    client.sendto(b"e" * size, ("127.0.0.1", dns))
                    assert client.recv(1000) == b"e" * size
            webBytes = 1000 + sum(len(p) for p in payloads)

            rendered = json.loads(
                browser.waitFor(
                    f"""(function () {{
                      var rows = {ROWS.strip()};
                      var web = JSON.parse(rows).filter(function (r) {{ return r.name == 'web'; }})[0];
                      return web && web.total == '4' && web.bytesInTitle == '{webBytes} bytes'
                        && web.graph == 2 ? rows : null;
                    }})()"""
                )
            )
            assert browser.evaluate("window.notReloaded") is True
            after = int(
                browser.evaluate("document.getElementById('updated').dataset.refreshes")
            )
            assert after > refreshes

            byName = {row["name"]: row for row in rendered}
            assert byName["web"]["total"] == "4"
            assert byName["web"]["open"] == "0"
            assert byName["web"]["rejected"] == "0"
            assert byName["web"]["listeners"] == "1"
            assert byName["web"]["bytesIn"] == humanBytes(webBytes)
            assert byName["web"]["bytesOut"] == humanBytes(webBytes)
            assert byName["web"]["bytesOutTitle"] == f"{webBytes} bytes"
            assert (
                byName["web"]["where"]
                == f"tcp 127.0.0.1:{web} \u2192 127.0.0.1:{echo.port}"
            )
            dnsRow = json.loads(
                browser.waitFor(
                    f"(function () {{ var rows = JSON.parse({ROWS.strip()});"
                    " var d = rows.filter(function (r) { return r.name == 'dns'; })[0];"
                    " return d.bytesInTitle == '576 bytes' ? JSON.stringify(d) : null; })()"
                )
            )
            assert (dnsRow["total"], dnsRow["open"], dnsRow["bytesOutTitle"]) == (
                "1",
                "1",
                "576 bytes",
            )

            desktop = browser.screenshot(
                tmp_path / "status-desktop.png", 1280, 800, False
            )
            phone = browser.screenshot(tmp_path / "status-phone.png", 390, 844, True)
            assert desktop.startswith(b"\x89PNG") and phone.startswith(b"\x89PNG")
            # On a phone the table becomes one card per mapping: no
            # sideways scrolling.
            assert browser.evaluate(
                "document.documentElement.scrollWidth <= window.innerWidth"
            )
            if os.environ.get("PORTPROXY_SCREENSHOTS"):
                for name in ("status-desktop.png", "status-phone.png"):
                    shutil.copy(
                        tmp_path / name,
                        os.path.join(os.environ["PORTPROXY_SCREENSHOTS"], name),
                    )
        finally:
            browser.close()
