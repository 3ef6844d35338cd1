"""End to end in a real headless browser (Playwright driving Debian's Chromium) against a
server on a free loopback port: segment, correct + fine-tune, generate, inpaint.

Set UNETKIT_WEB_SCREENSHOTS=docs/img to (re)write the README's screenshots, and for
pictures of useful models UNETKIT_WEB_SEG_RUN / UNETKIT_WEB_DIFFUSION_RUN to a trained
segmentation run and diffusion run (the tests' tiny models are barely trained / random).
"""

from __future__ import annotations

import base64
import csv
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from unetkit.cli.main import main

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
]
LONG = 300_000  # ms: fine-tuning on 2 shared cores


def seg_run(models_root: Path) -> Path:
    return Path(os.environ.get("UNETKIT_WEB_SEG_RUN") or models_root / "seg")


def diffusion_run(models_root: Path) -> Path:
    return Path(
        os.environ.get("UNETKIT_WEB_DIFFUSION_RUN") or models_root / "diffusion.safetensors"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from unetkit.data.synthetic import write_synthetic_folder

    root = tmp_path_factory.mktemp("browser_cells")
    write_synthetic_folder(root, 1, shape=(160, 200), seed=11)
    return sorted((root / "images").iterdir())[0]


@pytest.fixture(scope="module")
def server(models_root, tmp_path_factory):
    uvicorn = pytest.importorskip("uvicorn")
    from unetkit.cli.serve import LOOPBACK_HOSTS
    from unetkit.web.app import create_app
    from unetkit.web.models import ModelList

    models = ModelList([seg_run(models_root), diffusion_run(models_root)])
    app = create_app(
        models, work_dir=tmp_path_factory.mktemp("web_work"), allowed_hosts=LOOPBACK_HOSTS
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=60)


@pytest.fixture(scope="module")
def browser_page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        urls: list[str] = []
        page.on("request", lambda request: urls.append(request.url))
        page.goto(server)
        page.wait_for_selector("body[data-ready='1']")
        yield page, urls
        browser.close()
    outside = [u for u in urls if not u.startswith(server + "/") and not u.startswith("data:")]
    assert urls and not outside, outside


def wait_js(page, expression: str, timeout_s: float = LONG / 1000) -> None:
    """Poll a JS expression until true (``page.evaluate`` runs outside the page's CSP, which
    forbids the eval that ``wait_for_function`` needs)."""
    for _ in range(int(timeout_s / 0.1)):
        if page.evaluate(expression):
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {expression}")


def drop_file(page, selector: str, path: Path) -> None:
    """Drop ``path`` on ``selector`` the way a browser delivers a dragged file."""
    data = base64.b64encode(path.read_bytes()).decode()
    transfer = page.evaluate_handle(
        "([name, b64]) => { const dt = new DataTransfer();"
        " const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));"
        " dt.items.add(new File([bytes], name)); return dt; }",
        [path.name, data],
    )
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def click_object(page, box: dict, label: int) -> None:
    """Click the first pixel of object ``label`` on the correction canvas."""
    x, y, width, height = page.evaluate(
        f"(() => {{ const i = cor.labels.indexOf({label});"
        " return [i % cor.w, (i / cor.w) | 0, cor.w, cor.h]; })()"
    )
    page.mouse.click(
        box["x"] + (x + 0.5) * box["width"] / width, box["y"] + (y + 0.5) * box["height"] / height
    )


def screenshot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("UNETKIT_WEB_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)


def predict_count(run: Path, image: Path, out: Path) -> int:
    assert main(["predict", str(run), str(image), "--out", str(out)]) == 0
    with open(out / "counts.csv", newline="") as f:
        return int(next(csv.DictReader(f))["objects"])


def test_segment_shows_the_count_predict_gives(browser_page, models_root, image, tmp_path):
    page, _ = browser_page
    from unetkit.workflows.adapt import base_checkpoint

    run = base_checkpoint(seg_run(models_root))
    expected = predict_count(run, image, tmp_path / "predicted")
    drop_file(page, "#drop", image)  # as a user drags it from the file manager
    assert page.inner_text("#seg-chosen") == image.name
    page.click("#seg-run")
    page.wait_for_selector(".result .count", timeout=LONG)
    assert int(page.inner_text(".result .count")) == expected > 0
    rows = page.locator(".result table.objects tbody tr")
    assert rows.count() == expected
    # the table sorts by a clicked column
    page.click(".result th[data-col='area']")
    areas = [float(a) for a in page.locator(".result tbody tr td:nth-child(2)").all_inner_texts()]
    assert areas == sorted(areas)
    wait_js(page, "document.querySelector('canvas.overlay').width > 1")
    screenshot(page, "web_segment.png", tmp_path)


def test_correct_and_finetune_changes_the_result(browser_page, tmp_path):
    page, _ = browser_page
    page.click(".tab[data-screen='correct']")
    wait_js(page, "Number(document.getElementById('cor-count').textContent) > 0")
    before = int(page.inner_text("#cor-count"))
    box = page.locator("#cor-canvas").bounding_box()
    assert page.evaluate("state.segmented[0].count") == before >= 3
    labels = page.evaluate("[...new Set(cor.labels)].filter((v) => v > 0).sort((a, b) => a - b)")
    # delete one object, merge two others, then paint a new one
    page.check("input[name=tool][value=delete]")
    click_object(page, box, labels[0])
    assert int(page.inner_text("#cor-count")) == before - 1
    page.check("input[name=tool][value=merge]")
    click_object(page, box, labels[1])
    click_object(page, box, labels[2])
    assert int(page.inner_text("#cor-count")) == before - 2
    assert page.evaluate(f"cor.labels.indexOf({labels[2]})") == -1  # now part of labels[1]
    page.check("input[name=tool][value=brush]")
    page.click("#cor-new")
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.1)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.2, steps=8)
    page.mouse.up()
    after_paint = int(page.inner_text("#cor-count"))
    assert after_paint in (before - 2, before - 1)  # a new object, or one grown into
    page.fill("#ft-steps", "12")
    models_before = page.locator("#seg-model option").count()
    page.click("#ft-run")
    page.wait_for_selector("#ft-count", timeout=LONG)
    assert float(page.inner_text("#ft-loss-text")) > 0
    assert int(page.inner_text("#ft-changed")) > 0  # the re-segmented result changed
    assert page.locator("#seg-model option").count() == models_before + 1  # adapter listed
    screenshot(page, "web_correct.png", tmp_path)


def test_generate_and_inpaint_give_the_requested_images(browser_page, models_root, image, tmp_path):
    from unetkit.formats.checkpoint import read_metadata
    from unetkit.workflows.adapt import base_checkpoint

    page, _ = browser_page
    meta = read_metadata(base_checkpoint(diffusion_run(models_root)))["diffusion"]
    page.click(".tab[data-screen='generate']")
    page.fill("#gen-n", "3")
    page.fill("#gen-steps", "4")
    page.select_option("#gen-sampler", "dpmpp-2m")
    page.click("#gen-run")
    wait_js(page, "document.querySelectorAll('#gen-grid img.sample').length === 3")
    wait_js(
        page,
        "[...document.querySelectorAll('#gen-grid img.sample')].every(i => i.naturalWidth === "
        f"{meta['image_size']})",
    )
    screenshot(page, "web_generate.png", tmp_path)
    page.click("#inpaint summary")
    page.set_input_files("#inp-file", str(image))
    wait_js(page, "document.getElementById('inp-canvas').width > 1")
    box = page.locator("#inp-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6, steps=8)
    page.mouse.up()
    page.fill("#gen-n", "2")
    old = page.evaluate("document.querySelector('#gen-grid img.sample').src")
    page.click("#inp-run")
    wait_js(
        page,
        f"(() => {{ const s = document.querySelectorAll('#gen-grid img.sample');"
        f" return s.length === 2 && s[0].src !== {old!r}; }})()",
    )
    assert page.inner_text("#gen-error") == ""
