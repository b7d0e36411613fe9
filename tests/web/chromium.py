"""Debian's headless Chromium, driven through the DevTools protocol on a pipe.

`--dump-dom` cannot wait for a page's WebSocket answers: it dumps the DOM once the page has
loaded, and `--virtual-time-budget` does not count WebSocket traffic as pending work (measured
with Chromium 156: a page whose answers arrive within milliseconds is dumped before they do,
most runs). So the tests open the page through the DevTools protocol and ask it, until it says it
has finished, what its title is. `--remote-debugging-pipe` takes the protocol's messages on file
descriptor 3 and writes its own on 4, each JSON and ended by a NUL byte: no port, no WebSocket
client.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

NOT_INSTALLED = "chromium is not installed: `make system-deps` installs it (Debian's package)"


class DevToolsError(RuntimeError):
    """A protocol command the browser answered with an error, or did not answer in time."""


class Chromium:
    """One headless browser, its profile in `workdir`, until `close()`."""

    def __init__(self, workdir: Path) -> None:
        executable = shutil.which("chromium")
        assert executable, NOT_INSTALLED
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "chromium.log"
        commands, self._commands = os.pipe()  # the browser reads `commands` as fd 3
        self._events, events = os.pipe()  # and writes `events` as fd 4
        flags = [
            "--headless", "--disable-gpu", "--no-sandbox", "--remote-debugging-pipe",
            f"--user-data-dir={workdir / 'profile'}", "--no-first-run",
            "--no-default-browser-check", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "about:blank",
        ]  # fmt: skip
        with self.log_path.open("w") as log:
            # The pipes come in as stdin and stdout; the shell moves them to 3 and 4, where
            # Chromium looks for them, and gives its stdout to the log.
            self.process = subprocess.Popen(
                ["/bin/sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >&2', executable, *flags],
                stdin=commands,
                stdout=events,
                stderr=log,
            )
        os.close(commands)
        os.close(events)
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        """Every event the browser sent, in order (console messages, exceptions, ...)."""

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        """The result of one protocol command (`session`: a page's, from attachToTarget)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            answer = self._receive(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise DevToolsError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result
            self.events.append(answer)

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._events], [], [], left)[0]:
                raise DevToolsError(f"no answer from Chromium in time:\n{self.log_text()}")
            chunk = os.read(self._events, 1 << 20)
            if not chunk:
                raise DevToolsError(f"Chromium closed its pipe:\n{self.log_text()}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        document: dict[str, Any] = json.loads(message)
        return document

    def open(self, url: str) -> Page:
        """A new tab, its console recorded, that has loaded `url` (its scripts have run)."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        page = Page(self, session["sessionId"])
        page.call("Runtime.enable")
        page.call("Page.navigate", {"url": url})
        page.wait_until("location.href !== 'about:blank' && document.readyState === 'complete'", 30)
        return page

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.call("Browser.close")
            self.process.wait(10)
        except (DevToolsError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._commands)
            os.close(self._events)


class Page:
    """A tab of `browser`, attached as `session`."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser = browser
        self.session = session

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, self.session)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in answer:
            raise DevToolsError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_until(self, expression: str, timeout: float) -> Any:
        """The first truthy value of a JavaScript expression, asked every 50 ms; after
        `timeout` seconds, an error that shows the page's text and what it said on its
        console."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise DevToolsError(
                    f"{expression} is still {value!r} after {timeout:.0f} s; the page:\n"
                    f"{self.evaluate('document.body.innerText')}\nits console:\n{self.console()}"
                )
            time.sleep(0.05)
        return value

    def console(self) -> str:
        """What the page logged and threw, one line each."""
        lines = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            params = event.get("params", {})
            if event.get("method") == "Runtime.consoleAPICalled":
                values = [a.get("value", a.get("description")) for a in params.get("args", [])]
                lines.append(f"console.{params.get('type')}: {values}")
            elif event.get("method") == "Runtime.exceptionThrown":
                lines.append(f"exception: {params.get('exceptionDetails')}")
        return "\n".join(lines)
