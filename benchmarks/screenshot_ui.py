"""Screenshot the `safediff ui` page after one real "Generate" click, with headless Chromium driven over the DevTools
protocol (offline; for the README).

    HF_HUB_OFFLINE=1 python benchmarks/screenshot_ui.py --out docs/ui.png

Needs gradio (``pip install safediff[ui]``), ``websockets`` and /usr/bin/chromium (or ``--chromium PATH``). The page
is served on 127.0.0.1 only; a throw-away browser profile is used and removed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from safediff.errors import run_script


def devtools_page_url(port: int, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as r:
                pages = [p for p in json.load(r) if p.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("chromium's DevTools endpoint did not come up")
        time.sleep(0.3)


async def capture(ws_url: str, page: str, width: int, height: int, wait_s: float) -> bytes:
    import websockets

    async with websockets.connect(ws_url, max_size=64 * 2**20) as ws:
        counter = 0

        async def call(method: str, **params):
            nonlocal counter
            counter += 1
            await ws.send(json.dumps({"id": counter, "method": method, "params": params}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("id") == counter:
                    return msg.get("result", {})

        async def js(expression: str):
            return (await call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

        await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                   mobile=False)
        await call("Page.navigate", url=page)
        deadline = time.monotonic() + wait_s
        while not await js("!!Array.from(document.querySelectorAll('button')).find(b => b.innerText.trim() == "
                           "'Generate')"):
            if time.monotonic() > deadline:
                raise SystemExit("the page did not load")
            await asyncio.sleep(0.5)
        await js("Array.from(document.querySelectorAll('button')).find(b => b.innerText.trim() == 'Generate').click()")
        while (await js("document.querySelectorAll('img').length") or 0) < 8:
            if time.monotonic() > deadline:
                raise SystemExit("no images appeared in the gallery")
            await asyncio.sleep(1.0)
        await asyncio.sleep(2.0)  # let the images finish drawing
        shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(shot["data"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/ui.png")
    ap.add_argument("--model", default="sandbox")
    ap.add_argument("--port", type=int, default=7862)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1100)
    ap.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the page and the images")
    args = ap.parse_args()

    from safediff.ui import build_app

    app = build_app(args.model)
    app.launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True, quiet=True)
    profile = tempfile.mkdtemp()
    browser = subprocess.Popen([args.chromium, "--headless", "--no-sandbox", "--disable-gpu",
                                "--disable-background-networking", "--no-first-run", "--hide-scrollbars",
                                f"--user-data-dir={profile}", "--remote-debugging-port=9333", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        png = asyncio.run(capture(devtools_page_url(9333), f"http://127.0.0.1:{args.port}/", args.width,
                                  args.height, args.wait))
    finally:
        browser.terminate()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)
        app.close()
    Path(args.out).write_bytes(png)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
