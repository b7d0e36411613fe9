"""examples/web/stream.html in a real browser (Debian's headless Chromium) against a real server:
the forecasts the page receives over its WebSocket equal the model run in-process, and so does
the next character its text box shows; an error frame is shown and the stream goes on; a
refused upgrade, a server that drains mid-stream and an absent one are reported, not hung on.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest

from tests.api.conftest import Reference
from tests.conftest import NATIVE_BUILT, ROOT
from tests.server import RunningServer, serving
from tests.web.chromium import Chromium

PAGE = ROOT / "examples" / "web" / "stream.html"
TOKEN = "web-token-0123"
STEPS = 24
"""The page streams the first 24 readings of examples/sst.csv."""
PAGE_TIMEOUT_S = 60.0

needs_server = pytest.mark.skipif(
    not NATIVE_BUILT, reason="the WebSocket stream is the native transport's HTTP port's"
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    running = Chromium(tmp_path_factory.mktemp("chromium"))
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server that wants tokens: the page must present one as ?access_token=."""
    workdir = tmp_path_factory.mktemp("web")
    tokens = workdir / "tokens"
    tokens.write_text(f"browser {hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
    with serving(workdir, "--auth-tokens", str(tokens), "--max-queue-delay-us", "500") as running:
        yield running


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


def run_page(browser: Chromium, **query: str | int) -> dict[str, Any]:
    """What the page recorded (its <pre id="results">) once it has finished."""
    page = browser.open(f"{PAGE.as_uri()}?{urlencode({'interval': 0, **query})}")
    try:
        page.wait_until("document.title === 'done'", PAGE_TIMEOUT_S)
        results: dict[str, Any] = json.loads(
            page.evaluate("document.getElementById('results').textContent")
        )
        results["shown_errors"] = page.evaluate(
            "[...document.querySelectorAll('#errors li')].map((li) => li.textContent)"
        )
        results["points_drawn"] = page.evaluate(
            "({reading: document.querySelectorAll('#chart circle.reading').length,"
            " forecast: document.querySelectorAll('#chart circle.forecast').length})"
        )
        return results
    finally:
        page.call("Page.close")


def http_get(server: RunningServer, path: str) -> tuple[int, dict[str, str], bytes]:
    host, port = server.http_target.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def upgrade_status(server: RunningServer, token: str) -> int:
    """The status a WebSocket handshake for sensor_gru's stream is answered with."""
    host, port = server.http_target.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    query = f"?{urlencode({'access_token': token})}" if token else ""
    try:
        connection.request(
            "GET",
            f"/v2/models/sensor_gru/stream{query}",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        )
        return connection.getresponse().status
    finally:
        connection.close()


def sst_readings() -> np.ndarray:
    """The series the page embeds, as examples/sst.csv has it: [1, STEPS, 1] FP32."""
    with (ROOT / "examples" / "sst.csv").open(newline="") as file:
        readings = [float(row["sst"]) for row in csv.DictReader(file)][:STEPS]
    return np.asarray(readings, np.float32).reshape(1, STEPS, 1)


@needs_server
def test_page_draws_the_forecasts_the_model_computes(
    browser: Chromium, web_server: RunningServer, reference: Reference
) -> None:
    results = run_page(browser, server=web_server.http_target, token=TOKEN, sequence=7101)
    x = sst_readings()
    assert results["readings"] == pytest.approx(x.ravel().tolist(), abs=1e-6)
    assert (results["status"], results["errors"]) == ("complete", [])
    expected = reference.run("sensor_gru", x).ravel()
    np.testing.assert_allclose(
        np.asarray(results["forecasts"], np.float32), expected, rtol=0, atol=1e-5
    )
    assert results["sequence_versions"] == sorted(results["sequence_versions"])
    assert results["shown_errors"] == []
    assert results["points_drawn"] == {"reading": STEPS, "forecast": STEPS}


@needs_server
def test_page_shows_error_frames_and_the_stream_goes_on(
    browser: Chromium, web_server: RunningServer
) -> None:
    # charlm_lstm takes INT64 `tokens`: each FP32 `reading` is answered with an error frame on
    # the socket that stays open, so every step is answered.
    results = run_page(
        browser, server=web_server.http_target, token=TOKEN, model="charlm_lstm", sequence=7102
    )
    assert results["status"] == "complete", results["errors"]
    assert results["forecasts"] == [None] * STEPS
    assert [e["step"] for e in results["errors"]] == list(range(STEPS)), results["errors"]
    for error in results["errors"]:
        assert error["error"].startswith("[INVALID_ARGUMENT] "), error
    assert len(results["shown_errors"]) == STEPS


@needs_server
@pytest.mark.parametrize("token", ["", "not-the-token"], ids=["no-token", "wrong-token"])
def test_page_reports_a_refused_upgrade(
    browser: Chromium, web_server: RunningServer, token: str
) -> None:
    # A browser hides why an upgrade failed: the server's status is asked for beside the page.
    assert upgrade_status(web_server, token) == 401
    results = run_page(browser, server=web_server.http_target, token=token, sequence=7103)
    assert results["status"] == "closed", results["errors"]
    assert results["answered"] == 0
    assert results["closed"]["code"] == 1006  # what a browser says of a refused upgrade
    [shown] = results["shown_errors"]
    assert "could not connect" in shown


@needs_server
def test_text_box_shows_the_next_character_the_model_predicts(
    browser: Chromium, web_server: RunningServer, reference: Reference
) -> None:
    status, _, body = http_get(web_server, "/v2/models/charlm_lstm/config")
    assert status == 200, body
    vocabulary: str = json.loads(body)["parameters"]["vocabulary"]["string_value"]
    page = browser.open(
        f"{PAGE.as_uri()}?{urlencode({'server': web_server.http_target})}&"
        f"{urlencode({'token': TOKEN, 'interval': 0})}"
    )
    try:
        # Opened as a file, the page cannot read the config (no CORS): its own copy must agree.
        assert page.evaluate("vocabulary") == vocabulary
        # Two edits that append: the second request carries only the new characters, on the
        # sequence the first started.
        for typed in ("The sea ", "The sea is warm"):
            page.evaluate(
                f"(() => {{ const box = document.getElementById('text'); box.value = "
                f"{json.dumps(typed)}; box.dispatchEvent(new Event('input')); }})()"
            )
            shown = json.loads(
                page.wait_until("document.getElementById('text-results').textContent", 30)
            )
            assert "error" not in shown and shown["text"] == typed, shown
        tokens = np.asarray([[vocabulary.index(c) for c in typed]], np.int64)
        logits = reference.run("charlm_lstm", tokens)[0, -1]
        assert shown["next_index"] == int(np.argmax(logits))
        assert shown["logit"] == pytest.approx(float(logits.max()), abs=1e-5)
        assert shown["next"] == vocabulary[int(np.argmax(logits))]
    finally:
        page.call("Page.close")


@needs_server
def test_page_reports_a_server_that_stops_mid_stream(
    browser: Chromium, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with serving(tmp_path_factory.mktemp("web-stopping")) as server:
        query = {"server": server.http_target, "sequence": 7104, "interval": 200}
        page = browser.open(f"{PAGE.as_uri()}?{urlencode(query)}")
        try:
            page.wait_until("document.getElementById('status').textContent.startsWith('3 of')", 30)
            assert server.stop() == 0, server.log_text()  # a drain: SIGTERM
            page.wait_until("document.title === 'done'", PAGE_TIMEOUT_S)
            results = json.loads(page.evaluate("document.getElementById('results').textContent"))
        finally:
            page.call("Page.close")
    assert results["status"] == "closed", results["errors"]
    assert 3 <= results["answered"] < STEPS
    answered = [f for f in results["forecasts"] if f is not None]
    assert len(answered) == results["answered"] and results["forecasts"][0] is not None
    [shown] = [e["error"] for e in results["errors"]]
    assert shown.startswith("the server closed the socket after"), shown
    # RFC 6455's "going away": a drain, not a fault.
    assert results["closed"]["code"] == 1001, results["closed"]


def test_page_reports_a_server_that_is_not_there(browser: Chromium) -> None:
    with socket.socket() as unused:  # a port nothing listens on once it is closed
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    results = run_page(browser, server=f"127.0.0.1:{port}")
    assert results["status"] == "closed", results["errors"]
    assert results["closed"]["code"] == 1006
    assert "could not connect" in results["shown_errors"][0]
