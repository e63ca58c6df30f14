"""The draw-a-digit page in a real browser: `fastconv serve` runs as a user starts it, headless
Chromium (Debian's package, driven by Playwright, never a downloaded browser) draws digits on the
canvas with pointer events -- a mouse, then a finger on a phone-sized screen -- and the top class
the page shows must be the digit drawn.

Screenshots go to $FASTCONV_SCREENSHOT_DIR when it is set (the README's come from
``FASTCONV_SCREENSHOT_DIR=docs pytest tests/test_browser.py``), else to the test's temporary
folder. The model is trained once and cached (see trained_models.good_model).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from itertools import pairwise
from pathlib import Path

import pytest
from trained_models import good_model

pytest.importorskip("starlette", reason='the web app needs: pip install "fastconv[serve]"')
pytest.importorskip("uvicorn", reason='the web app needs: pip install "fastconv[serve]"')
sync_api = pytest.importorskip(
    "playwright.sync_api", reason='Playwright is not installed (pip install "fastconv[test]")'
)

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium or chromium-browser on PATH (Debian: apt-get install chromium); "
    "Playwright's own browser downloads are not used",
)

# Strokes in the canvas's unit square (0..1 across and down): lists of points joined by lines.
ONE = [[(0.52, 0.15), (0.50, 0.85)]]
SEVEN = [[(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)]]
ZERO = [
    [
        (0.5 + 0.22 * math.sin(2 * math.pi * t / 48), 0.5 - 0.33 * math.cos(2 * math.pi * t / 48))
        for t in range(49)
    ]
]


@pytest.fixture(scope="module")
def url():
    """`fastconv serve MODEL --port 0` in a subprocess, until the module's tests are done. The
    server binds port 0 itself and prints its address once it listens: no free-port probe."""
    model = good_model()
    process = subprocess.Popen(
        [sys.executable, "-m", "fastconv", "serve", str(model), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = process.stdout.readline()  # "serving MODEL at http://127.0.0.1:PORT/ (...)"
        found = re.search(r" at (http://\S+)/ ", line)
        if not found:
            pytest.fail(f"fastconv serve did not start:\n{line}{process.stdout.read()}")
        urllib.request.urlopen(found.group(1) + "/api/model", timeout=60).close()
        yield found.group(1)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: Chromium refuses to run as root (CI) with its sandbox on.
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("FASTCONV_SCREENSHOT_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_page(browser, url, **context_options):
    page = browser.new_context(**context_options).new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("#bars li >> nth=9")
    page.wait_for_selector("body[data-state=idle]")
    return page, errors


def _steps(u0, v0, u1, v1):
    """Points every 2% of the canvas along a segment, as a hand moving at a steady speed."""
    count = max(2, math.ceil(math.hypot(u1 - u0, v1 - v0) / 0.02))
    return [(u0 + k / count * (u1 - u0), v0 + k / count * (v1 - v0)) for k in range(1, count + 1)]


def draw_with_mouse(page, strokes, step_ms=8, check_while_drawing=False):
    """Draw ``strokes`` with the mouse (pointer events of type "mouse")."""
    box = page.locator("#pad").bounding_box()

    def at(u, v):
        return box["x"] + u * box["width"], box["y"] + v * box["height"]

    seen_while_drawing = False
    for stroke in strokes:
        page.mouse.move(*at(*stroke[0]))
        page.mouse.down()
        for (u0, v0), (u1, v1) in pairwise(stroke):
            for u, v in _steps(u0, v0, u1, v1):
                page.mouse.move(*at(u, v))
                page.wait_for_timeout(step_ms)
            if check_while_drawing and page.get_attribute("body", "data-prediction"):
                seen_while_drawing = True
        page.mouse.up()
    return seen_while_drawing


def draw_with_finger(page, strokes):
    """Draw ``strokes`` with touch events (Chromium turns them into pointer events of type
    "touch"), through the DevTools protocol since Playwright's touchscreen only taps."""
    box = page.locator("#pad").bounding_box()
    cdp = page.context.new_cdp_session(page)

    def touch(kind, u=None, v=None):
        points = (
            []
            if u is None
            else [{"x": box["x"] + u * box["width"], "y": box["y"] + v * box["height"]}]
        )
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})

    for stroke in strokes:
        touch("touchStart", *stroke[0])
        for (u0, v0), (u1, v1) in pairwise(stroke):
            for u, v in _steps(u0, v0, u1, v1):
                touch("touchMove", u, v)
                page.wait_for_timeout(8)
        touch("touchEnd")


def shown_answer(page):
    page.wait_for_selector("body[data-state=idle]", timeout=15_000)
    top = page.inner_text("#top-class").strip()
    values = page.locator("#bars .value").all_inner_texts()
    best = page.locator("#bars li.best .name").all_inner_texts()
    return top, values, best


@pytest.mark.parametrize("digit, strokes", [("1", ONE), ("0", ZERO), ("7", SEVEN)])
def test_drawn_digit_is_recognised(browser, url, screenshots, digit, strokes):
    page, errors = open_page(browser, url, viewport={"width": 900, "height": 640})
    assert page.inner_text("#top-class").strip() == "–"  # nothing drawn, nothing claimed
    seen_early = draw_with_mouse(page, strokes, step_ms=12, check_while_drawing=True)
    top, values, best = shown_answer(page)
    assert top == digit, f"drew a {digit}, the page says {top}; bars {values}"
    assert best == [digit] and len(values) == 10 and all(v.endswith("%") for v in values)
    assert sum(float(v.rstrip("%")) for v in values) == pytest.approx(100, abs=1)
    assert seen_early, "the bars did not update while the stroke was being drawn"
    if digit == "7":
        page.screenshot(path=str(screenshots / "screenshot-serve.png"))
    page.click("#clear")
    page.wait_for_selector("body[data-state=idle]")
    assert page.inner_text("#top-class").strip() == "–"
    assert page.get_attribute("body", "data-prediction") is None
    assert not errors, errors
    page.context.close()


def test_finger_on_a_phone_sized_screen(browser, url, screenshots):
    page, errors = open_page(
        browser,
        url,
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide on a 390 px screen"
    box = page.locator("#pad").bounding_box()
    assert box["width"] >= 300 and box["x"] + box["width"] <= 390
    draw_with_finger(page, ONE)
    top, _, _ = shown_answer(page)
    assert top == "1"
    assert page.evaluate("window.scrollY") == 0  # the finger drew instead of scrolling
    page.screenshot(path=str(screenshots / "screenshot-serve-phone.png"), full_page=True)
    assert not errors, errors
    page.context.close()


def test_upload_shows_the_apis_answer_and_errors(browser, url, tmp_path):
    import json

    from trained_models import png_bytes, test_digits

    pixels, _ = test_digits(3)
    page, errors = open_page(browser, url, viewport={"width": 900, "height": 640})
    for k in range(3):
        image = tmp_path / f"digit-{k}.png"
        image.write_bytes(png_bytes(pixels[k], scale=4, invert=True))
        request = urllib.request.Request(
            url + "/api/predict", data=image.read_bytes(), headers={"Content-Type": "image/png"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            expected = json.loads(response.read())["label"]
        page.set_input_files("#upload", str(image))
        page.wait_for_function(f"document.body.dataset.prediction === {json.dumps(expected)}")
        assert shown_answer(page)[0] == expected
    bogus = tmp_path / "bogus.png"
    bogus.write_bytes(b"not a picture at all")
    page.set_input_files("#upload", str(bogus))
    page.wait_for_selector("#status.error")
    assert "decode" in page.inner_text("#status") or "not an image" in page.inner_text("#status")
    errors = [e for e in errors if "400" not in e]  # the browser logs the refused request
    assert not errors, errors
    page.context.close()
