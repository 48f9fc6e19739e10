"""Render a local HTML file in headless Chromium: what loaded, what failed, what the images decoded to, a screenshot.

Used to check `report.html` the way a person sees it and to make the README's screenshot. It
speaks the Chrome DevTools Protocol over `--remote-debugging-pipe` (JSON messages separated by NUL
bytes on file descriptors 3 and 4), with nothing but the standard library:

* no port is opened and no extra package is needed (Playwright would bring its own Node driver
  and is tied to its own browser builds; Selenium needs a matching chromedriver), and the
  protocol calls used here (Target, Page, Network, Runtime, Log) have been stable for years;
* the Network domain reports every request the page makes, `data:` URIs included, and every
  failure with its reason (a CSP block, a missing file), which `--dump-dom` cannot tell.

Chromium runs with the flags a closed, headless root machine needs: `--headless --no-sandbox
(as root) --disable-gpu` and background networking, component updates and sync switched off,
so the only requests are the page's own.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..utils.stamp import stamp_png

PathLike = Union[str, Path]
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ("--headless", "--disable-gpu", "--disable-quic", "--no-first-run", "--no-default-browser-check",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
         "--disable-features=Translate,MediaRouter,OptimizationHints", "--remote-debugging-pipe")


class BrowserError(RuntimeError):
    """Chromium is missing, did not start, or did not answer in time."""


def find_chromium() -> Optional[str]:
    """The Chromium executable: $CHROMIUM if set, else the first of CANDIDATES on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageLoad:
    """What happened when the page loaded."""

    url: str
    requests: list[str] = field(default_factory=list)          # every URL requested (document, data: URIs, ...)
    failed: list[dict] = field(default_factory=list)           # {url, error, blocked}
    errors: list[str] = field(default_factory=list)            # console errors, exceptions, CSP violations
    images: list[dict] = field(default_factory=list)           # {src, naturalWidth, naturalHeight, complete}
    values: dict = field(default_factory=dict)                 # results of the `evaluate` expressions
    screenshot: bytes = b""                                    # PNG

    @property
    def external_requests(self) -> list[str]:
        """Requests for anything but the page itself and data: URIs (a self-contained page has none)."""
        return [u for u in self.requests if u != self.url and not u.startswith("data:")]


class _Pipe:
    """DevTools protocol over the two pipes: `call` sends a command and waits for its answer,
    events are kept in order for `events`."""

    def __init__(self, proc: subprocess.Popen, w: int, r: int) -> None:
        self.proc, self.w, self.r = proc, w, r
        self.next_id = 0
        self.answers: "queue.Queue[dict]" = queue.Queue()
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self.r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.answers.put({"closed": True})
                return
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            for m in msgs:
                msg = json.loads(m)
                if "id" in msg:
                    self.answers.put(msg)
                else:
                    with self.lock:
                        self.events.append(msg)

    def call(self, method: str, params: Optional[dict] = None, session: Optional[str] = None,
             timeout: float = 30.0) -> dict:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            try:
                ans = self.answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BrowserError(f"Chromium did not answer {method} within {timeout:.0f} s") from None
            if ans.get("closed"):
                self.answers.put(ans)       # every later call fails the same way
                raise BrowserError(f"Chromium closed the DevTools pipe during {method}")
            if ans.get("id") == self.next_id:
                if "error" in ans:
                    raise BrowserError(f"{method}: {ans['error']}")
                return ans.get("result", {})



def _high_fd(fd: int) -> int:
    """A copy of `fd` numbered 10 or above (so moving it to 3 or 4 cannot clobber the other pipe end), close-on-exec."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


def _tail(profile: str, n: int = 2000) -> str:
    try:
        return (Path(profile) / "chromium-stderr.log").read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


_IMAGES_JS = """Promise.all(Array.from(document.images).map(i => (i.decode ? i.decode() : Promise.resolve())
  .catch(() => null).then(() => ({src: i.currentSrc.slice(0, 64), naturalWidth: i.naturalWidth,
  naturalHeight: i.naturalHeight, complete: i.complete}))))"""


# long: one headless-Chromium session over the DevTools protocol, in the order it happens (start, load, wait, read, screenshot, stop)
def render(page: PathLike, *, width: int = 1280, height: int = 900, full_page: bool = True,
           max_height: Optional[int] = None, evaluate: Optional[Mapping[str, str]] = None,
           files: Optional[Mapping[str, Sequence[PathLike]]] = None,
           chromium: Optional[str] = None, timeout: float = 60.0) -> PageLoad:
    """Open `page` (a local file, or an http(s) URL such as `serve`'s page) in headless Chromium and report
    what happened (see PageLoad).

    `files`: {CSS selector of an <input type=file>: paths}, chosen in that input once the page has loaded, as
    a user would (the input's change event fires), before `evaluate` runs.

    `evaluate`: {name: JavaScript expression}; each result (JSON-able, promises awaited) lands in
    `PageLoad.values[name]`. The screenshot covers the whole page (`full_page`), cut at
    `max_height` CSS pixels when given.
    """
    exe = chromium or find_chromium()
    if not exe:
        raise BrowserError("no Chromium found: install it (Debian: apt-get install chromium) or set $CHROMIUM")
    url = str(page) if str(page).startswith(("http://", "https://")) else Path(page).resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="spinal-chromium-")
    to_chrome_r, to_chrome_w = (_high_fd(f) for f in os.pipe())
    from_chrome_r, from_chrome_w = (_high_fd(f) for f in os.pipe())
    args = [exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")      # Chromium refuses to start its sandbox as root
    # A tiny trampoline puts our pipe ends on the descriptors Chromium expects (it reads 3, writes 4)
    # and becomes Chromium: no preexec_fn (unsafe with threads), no shell (dash only knows fds 0-9).
    tramp = "import os,sys; os.dup2(int(sys.argv[1]),3); os.dup2(int(sys.argv[2]),4); os.execv(sys.argv[3],sys.argv[3:])"
    log = open(Path(profile) / "chromium-stderr.log", "wb")      # a file, not a pipe: it cannot fill up and block
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", tramp, str(to_chrome_r), str(from_chrome_w), *args],
                            pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    cdp = _Pipe(proc, to_chrome_w, from_chrome_r)
    try:
        target = cdp.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        s = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            cdp.call(f"{domain}.enable", session=s)
        cdp.call("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=s)
        nav = cdp.call("Page.navigate", {"url": url}, session=s, timeout=timeout)
        if nav.get("errorText"):
            raise BrowserError(f"cannot open {url}: {nav['errorText']}")
        # Loaded = this URL's document has fired `load` (all images in); polling the document itself
        # cannot be fooled by the about:blank load event that may arrive late.
        deadline = time.monotonic() + timeout
        while True:
            state = cdp.call("Runtime.evaluate", {"expression": "document.readyState === 'complete' && "
                                                                "location.href !== 'about:blank'",
                                                  "returnByValue": True}, session=s)
            if state.get("result", {}).get("value") is True:
                break
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not finish loading within {timeout:.0f} s (last state: {state})")
            time.sleep(0.05)
        result = PageLoad(url=url)
        images = cdp.call("Runtime.evaluate", {"expression": _IMAGES_JS, "awaitPromise": True,
                                               "returnByValue": True}, session=s, timeout=timeout)
        result.images = images.get("result", {}).get("value", [])
        for selector, paths in (files or {}).items():
            root = cdp.call("DOM.getDocument", session=s)["root"]["nodeId"]
            node = cdp.call("DOM.querySelector", {"nodeId": root, "selector": selector}, session=s)["nodeId"]
            if not node:
                raise BrowserError(f"no element of {url} matches {selector!r}")
            cdp.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(Path(f).resolve()) for f in paths]},
                     session=s)
        for name, expr in (evaluate or {}).items():
            ans = cdp.call("Runtime.evaluate", {"expression": expr, "awaitPromise": True, "returnByValue": True},
                           session=s, timeout=timeout)
            if "exceptionDetails" in ans:
                raise BrowserError(f"evaluate {name!r}: {ans['exceptionDetails'].get('text')} "
                                   f"{ans['exceptionDetails'].get('exception', {}).get('description', '')}")
            result.values[name] = ans.get("result", {}).get("value")
        shot: dict[str, Any] = {"format": "png"}
        if full_page:
            size = cdp.call("Page.getLayoutMetrics", session=s)
            content = size.get("cssContentSize") or size["contentSize"]
            h = int(content["height"]) if max_height is None else min(int(content["height"]), max_height)
            shot.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": width, "height": max(h, 1),
                                                          "scale": 1})
        result.screenshot = base64.b64decode(cdp.call("Page.captureScreenshot", shot, session=s,
                                                      timeout=timeout)["data"])
        time.sleep(0.1)        # let late events (a failed request after load) arrive
        with cdp.lock:
            events = [e for e in cdp.events if e.get("sessionId") == s]
        urls: dict[str, str] = {}
        for e in events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Network.requestWillBeSent":
                urls[p["requestId"]] = p["request"]["url"]
                result.requests.append(p["request"]["url"])
            elif m == "Network.loadingFailed":
                result.failed.append({"url": urls.get(p["requestId"], "?"), "error": p.get("errorText"),
                                      "blocked": p.get("blockedReason")})
            elif m == "Network.responseReceived" and p["response"].get("status", 200) >= 400:
                result.failed.append({"url": p["response"]["url"], "error": f"HTTP {p['response']['status']}",
                                      "blocked": None})
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                result.errors.append(f"{p['entry'].get('source')}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Runtime.exceptionThrown":
                result.errors.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
                result.errors.append("console: " + " ".join(str(a.get("value")) for a in p.get("args", [])))
        return result
    except BrowserError as e:
        tail = _tail(profile)
        raise BrowserError(f"{e}" + (f"\nChromium's last output:\n{tail}" if tail else "")) from None
    except Exception as e:       # a protocol surprise: say which browser and what it printed
        raise BrowserError(f"{exe}: {type(e).__name__}: {e}\n{_tail(profile)}") from e
    finally:
        try:
            cdp.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for fd in (to_chrome_w, from_chrome_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(page: PathLike, png: PathLike, *, width: int = 1280, max_height: Optional[int] = None,
               chromium: Optional[str] = None) -> Path:
    """Write a PNG of `page` as Chromium draws it (the README's picture of report.html)."""
    shot = render(page, width=width, max_height=max_height, chromium=chromium).screenshot
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(stamp_png(shot))
    return out
