"""The demo page in a real headless Chromium: open it, upload a photo, read the top label, screenshot it."""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import first_known
from kit.config import COMPETITION_CLASSES, Workdir
from kit.predict import load_model, weights_path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
websocket = pytest.importorskip("websocket", reason="websocket-client is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


class DevTools:
    """A minimal Chrome DevTools Protocol client over the page's websocket."""

    def __init__(self, url: str):
        self.socket = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)

    def __call__(self, method: str, **params):
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}")


@pytest.fixture
def browser(tmp_path):
    process = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                "--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'profile'}",
                                "--window-size=1280,900", "about:blank"], stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if match:
                break
        else:
            pytest.skip("chromium did not start its DevTools endpoint")
        port = match.group(1)
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = next(p for p in pages if p["type"] == "page")
        yield DevTools(page["webSocketDebuggerUrl"])
    finally:
        process.kill()
        process.wait()


def upload_and_read(browser, url: str, photo: Path, answers: list[str]) -> str:
    """Open the page, upload the photo, and return the answer's headline once it is one of `answers`."""
    browser("Page.navigate", url=url)
    browser.wait_for("document.querySelector('input[type=file]') !== null")
    root = browser("DOM.getDocument", depth=-1, pierce=True)["root"]["nodeId"]
    node = browser("DOM.querySelector", nodeId=root, selector="input[type=file]")["nodeId"]
    browser("DOM.setFileInputFiles", files=[str(photo)], nodeId=node)
    return browser.wait_for(f"""(() => {{
        const output = document.querySelector('[data-testid="label-output-value"]');
        const text = output ? output.innerText.trim() : '';
        return {json.dumps(answers)}.includes(text) ? text : null; }})()""")


def test_upload_a_photo_and_read_the_top_label(browser, smoke_run, real_photos, tmp_path):
    """A picture like the ones it was taught gets its class; a real car, which the smoke model never saw (it
    learnt synthetic pictures), gets the page's "not one of the models it knows"."""
    from kit import demo
    from kit.predict import learn_known

    workdir = Workdir(smoke_run)
    loaded = load_model(weights_path(workdir))
    assert learn_known(workdir, loaded) is not None
    taught = first_known(loaded, sorted(workdir.test_dir.iterdir()))
    page = demo.build_demo(loaded, tta=4)
    _, url, _ = demo.launch(page, port=None, block=False)
    answers = [*COMPETITION_CLASSES, demo.unknown_headline(COMPETITION_CLASSES)]
    try:
        browser("Page.enable")
        assert upload_and_read(browser, url, taught, answers) == demo.Predictor(loaded, 1).rank(taught)[0][0]
        assert upload_and_read(browser, url, real_photos[0], answers) == demo.unknown_headline(COMPETITION_CLASSES)
        shot = browser("Page.captureScreenshot", format="png")["data"]
        screenshot = tmp_path / "demo.png"
        screenshot.write_bytes(base64.b64decode(shot))
        assert screenshot.read_bytes()[:4] == b"\x89PNG" and screenshot.stat().st_size > 10_000
        shutil.copy(screenshot, Path(__file__).resolve().parents[1] / "submissions" / "demo-screenshot.png")
    finally:
        page.close()
