"""The serving page (jobs/static/index.html) driven in real headless Chromium against the running app.

The ``serve_app`` fixture (tests/conftest.py) yields the base URL of the Serve app with a tiny model
(``DEEPFILL_SERVE_URL`` points the tests at another running app instead, route prefix included). A
person's steps are replayed with Selenium: the photo goes in through the file input, the hole is painted
with real pointer drags over the canvas, the buttons are clicked (or pressed with Enter). The result is
read back from the page (the PNG the page shows, decoded here) and compared with the photo pixel by pixel.

Chromium and its driver come from Debian (``chromium``, ``chromium-driver``), which ``make test`` installs;
without them these tests fail and say so: a page nobody opened is not a tested page.

Set ``DEEPFILL_SCREENSHOT=infra/docs/serve_page.png`` to also write a screenshot of the page with a filled
hole (the README's picture); a normal run writes nothing.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

WINDOW = (1280, 720)  # CSS px; three panels side by side
WAIT_S = 60  # the longest wait for the page (model load on a cold replica included)
# Two strokes over the spoon in the 384x256 coffee photo: (brush diameter, points), photo px.
STROKES = [
    (18, [(265, 46), (259, 75), (252, 105), (246, 135), (240, 158), (234, 176)]),  # the handle
    (52, [(229, 178), (237, 183)]),  # the bowl
]


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through its own chromedriver (Selenium Manager cannot download here)."""
    chromium = _find("chromium", "chromium-browser")
    driver_path = _find("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail(
            "Chromium or chromedriver is missing (looked for `chromium`/`chromium-browser` and `chromedriver` "
            "on PATH): run `make test`, which installs them, or as root "
            "`apt-get update && apt-get install -y chromium chromium-driver`",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--force-device-scale-factor=1",
                f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def app_url(request) -> str:
    """The app under test: ``DEEPFILL_SERVE_URL`` (a running ``deepfill serve``, e.g. with a trained model,
    route prefix included) when set, else the session's ``serve_app`` with its tiny model."""
    url = os.environ.get("DEEPFILL_SERVE_URL")
    return url.rstrip("/") if url else request.getfixturevalue("serve_app")


@pytest.fixture(scope="module")
def coffee(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """scikit-image's coffee photo at 384x256 as a PNG file; yields (path, (256, 384, 3) uint8 pixels)."""
    from skimage import data

    img = Image.fromarray(data.coffee()).resize((384, 256), Image.LANCZOS)
    path = tmp_path_factory.mktemp("page") / "coffee.png"
    img.save(path)
    return path, np.asarray(img)


def _open(driver, base_url: str, photo: Path) -> None:
    driver.get(base_url + "/")
    driver.find_element(By.ID, "photo").send_keys(str(photo))
    _wait_status(driver, "Loaded")


def _status(driver) -> str:
    return driver.find_element(By.ID, "status").text


def _wait_status(driver, words: str) -> str:
    """Wait until the status line holds ``words``; return its text."""
    WebDriverWait(driver, WAIT_S).until(lambda d: words in _status(d))
    return _status(driver)


def _set_brush(driver, size: int) -> None:
    driver.execute_script(
        "const b = document.getElementById('brush'); b.value = arguments[0];"
        "b.dispatchEvent(new Event('input', {bubbles: true}));", size)
    assert driver.find_element(By.ID, "brush-value").text == f"{size} px"


def _paint(driver, stroke_px: list[tuple[int, int]], photo_size: tuple[int, int]) -> np.ndarray:
    """Drag the mouse over the canvas along ``stroke_px`` (photo px); return the points it really hit (photo px).

    WebDriver moves in whole CSS px from the canvas centre, so the photo px it lands on are computed back.
    """
    canvas = driver.find_element(By.ID, "paint")
    rect = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", canvas)
    scale = photo_size[0] / rect[0]  # photo px per CSS px
    assert abs(photo_size[1] / rect[1] - scale) < 0.02, "the canvas is not displayed at the photo's aspect"
    offsets = [(round(x / scale - rect[0] / 2), round(y / scale - rect[1] / 2)) for x, y in stroke_px]
    chain = ActionChains(driver, duration=10).move_to_element_with_offset(canvas, *offsets[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(offsets, offsets[1:]):
        chain.move_by_offset(x1 - x0, y1 - y0)
    chain.release().perform()
    # The pointer sits on a pixel's corner; the page maps clientX to photo px by the exact scale.
    return np.array([((dx + rect[0] / 2) * scale, (dy + rect[1] / 2) * scale) for dx, dy in offsets])


def _distance_to_polyline(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) distance, in photo px, from each pixel's centre to the polyline through ``points`` (x, y)."""
    yy, xx = np.mgrid[0:height, 0:width]
    p = np.stack([xx + 0.5, yy + 0.5], axis=-1).astype(np.float64)  # (H, W, 2) pixel centres
    best = np.full((height, width), np.inf)
    for a, b in zip(points[:-1], points[1:]):
        ab = b - a
        t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)  # (H, W)
        best = np.minimum(best, np.linalg.norm(p - (a + t[..., None] * ab), axis=-1))
    return best


def _data_url_png(driver, element_id: str) -> np.ndarray:
    src = driver.find_element(By.ID, element_id).get_attribute("src")
    assert src.startswith("data:image/png;base64,"), src[:60]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def _fill(driver) -> str:
    """Press Fill; wait for the page's answer (the status line turns "done" or "error"); return its text."""
    fill = driver.find_element(By.ID, "fill")
    assert fill.is_enabled()
    fill.click()  # the click handler sets "Filling…" (no class) before it awaits anything
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.ID, "status").get_attribute("class") in ("done", "error"))
    return _status(driver)


def test_header_shows_the_served_model(browser, app_url):
    with urllib.request.urlopen(app_url + "/model", timeout=WAIT_S) as r:
        model = json.load(r)
    browser.get(app_url)  # no trailing slash: under a route prefix the page must still find the API
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "model").text != "Model: …")
    header = browser.find_element(By.ID, "model").text
    # A registered model by name (and version); a generator file by its file name.
    assert str(model.get("name") or Path(model["ref"]).name) in header, header
    if model.get("version") not in (None, ""):
        assert f"v{model['version']}" in header, header
    if model.get("step") is not None:
        assert f"step {model['step']}" in header, header
    assert not browser.find_element(By.ID, "fill").is_enabled()  # nothing to fill before a photo


def test_paint_fill_undo(browser, app_url, coffee):
    """Paint a stroke, Fill: the result is the photo's size, equal outside the stroke, changed inside it;
    the attention map and the download appear. Undo, Fill: the page says there is no hole."""
    path, photo = coffee
    h, w = photo.shape[:2]
    _open(browser, app_url, path)
    assert browser.find_element(By.ID, "photo-size").text == f"{w} × {h}"
    hits = []
    for size, points in STROKES:
        _set_brush(browser, size)
        hits.append((size, _paint(browser, points, (w, h))))
    assert browser.find_element(By.ID, "undo").is_enabled()

    status = _fill(browser)
    assert status.startswith("Done in"), status
    result = _data_url_png(browser, "result")
    assert result.shape == photo.shape
    # Beyond 2 px of a stroke's edge (its anti-aliased rim) nothing may change; well inside it is the hole.
    margin = np.stack([_distance_to_polyline(hit, h, w) - size / 2 for size, hit in hits]).min(axis=0)
    outside, inside = margin > 2, margin < -2
    assert inside.sum() > 500 and outside.sum() > 0.9 * h * w
    changed = np.any(result != photo, axis=-1)
    assert not changed[outside].any(), f"{changed[outside].sum()} pixels changed outside the stroke"
    assert changed[inside].mean() > 0.5, f"only {changed[inside].mean():.0%} of the stroke changed"

    attention = browser.find_element(By.ID, "attention")
    assert attention.is_displayed()
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", attention) > 0
    download = browser.find_element(By.ID, "download")
    assert download.is_displayed() and download.get_attribute("download").endswith(".png")
    downloaded = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {"
        "  let s = ''; for (const c of new Uint8Array(b)) s += String.fromCharCode(c); done(btoa(s)); });",
        download.get_attribute("href"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(downloaded))).convert("RGB")), result)

    shot = os.environ.get("DEEPFILL_SCREENSHOT")
    if shot:
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(WINDOW[0], max(WINDOW[1], height + 140))  # the window's frame included
        browser.find_element(By.TAG_NAME, "body").screenshot(shot)
        browser.set_window_size(*WINDOW)

    undo = browser.find_element(By.ID, "undo")
    undo.click()
    assert undo.is_enabled()  # one stroke left
    undo.send_keys(Keys.ENTER)  # the buttons work from the keyboard too
    assert not undo.is_enabled()  # both strokes are gone
    status = _fill(browser)
    assert "no_hole" in status and "Nothing to fill" in status, status
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")


def test_server_refusal_is_shown(browser, app_url, coffee, tmp_path):
    """A JPEG cut short still shows in Chromium (grey rows), but the server refuses it: the page says why.
    (Clear, then a new stroke, on the way.)"""
    _, photo = coffee
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    _open(browser, app_url, cut)
    size, points = STROKES[0]
    _set_brush(browser, size)
    _paint(browser, points, photo.shape[1::-1])
    browser.find_element(By.ID, "clear").click()
    assert not browser.find_element(By.ID, "undo").is_enabled()  # nothing left to undo
    _paint(browser, points, photo.shape[1::-1])
    status = _fill(browser)
    assert "The photo file is cut short (truncated)" in status, status
    assert browser.find_element(By.ID, "result").get_attribute("hidden") is not None
