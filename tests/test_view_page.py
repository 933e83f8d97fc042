"""`curate view` in a real headless Chromium, against a real server process."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CHROMIUM_ARGS, REPO, listening_addresses, port_of, request, run_cli
from tests.view_helpers import BOX


@pytest.fixture
def view_server(rich_dataset):
    """`curate view DS --port 0` in its own process; yields (port, process, dataset, what was written)."""
    ds, written = rich_dataset
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "curate", "view", str(ds.root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("view: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        yield port_of(line), proc, ds, written
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, port: int):
    page = browser.new_page(viewport={"width": 1500, "height": 950})
    page.goto(f"http://127.0.0.1:{port}/")
    page.wait_for_function("() => document.querySelector('#panel').dataset.image")
    return page


def set_filter(page, where: str) -> None:
    """Type a filter, press Enter, wait for the new grid and its first image's panel."""
    page.fill("#filter", where)
    settle(page, lambda: page.press("#filter", "Enter"))


def settle(page, action) -> None:
    """Do `action`, then wait for the grid it asked for and a panel drawn after it for the first image."""
    before = int(page.evaluate("document.querySelector('#panel').dataset.draws || 0"))
    action()  # a handler marks the page loading before it returns
    page.wait_for_function("() => !document.body.dataset.loading")
    page.wait_for_function("before => document.querySelector('.tile') === null || "
                           "(+document.querySelector('#panel').dataset.draws > before && "
                           "document.querySelector('#panel').dataset.image === "
                           "document.querySelectorAll('.tile')[0].dataset.id)", arg=before)


def tiles(page) -> list[str]:
    return page.eval_on_selector_all(".tile", "ts => ts.map(t => t.dataset.id)")


def manifest(ds, sql: str) -> list[dict]:
    return ds.query(sql).to_pylist()


def test_grid_loads_filters_and_moves_with_keys(view_server, browser):
    port, _, ds, written = view_server
    assert listening_addresses(port) == ["0100007F"]  # loopback only by default
    page = open_page(browser, port)
    assert page.evaluate("document.body.dataset.total") == "10" and len(tiles(page)) == 10
    page.wait_for_function("() => [...document.querySelectorAll('.tile img')].every(i => i.complete && "
                           "i.naturalWidth > 0)")
    assert len(list((ds.root / "cache" / "thumbs").rglob("*.jpg"))) == 10
    set_filter(page, "rank >= 5 AND NOT has_watermark")
    expected = {i for i, r, m in zip(written["ids"], written["ranks"], written["marked"]) if r >= 5 and not m}
    assert set(tiles(page)) == expected and page.evaluate("document.body.dataset.total") == str(len(expected))
    set_filter(page, "")
    page.select_option("#order", "rank")
    settle(page, lambda: page.select_option("#direction", "1"))
    by_rank = sorted(zip(written["ranks"], written["ids"]), key=lambda x: (-x[0], x[1]))
    assert tiles(page) == [i for _, i in by_rank]
    page.keyboard.press("Escape")  # from the sort menu back to the grid
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"() => document.querySelector('#panel').dataset.image === '{by_rank[1][1]}'")
    page.keyboard.press("ArrowDown")  # a row down: as many tiles on as fit in a row
    columns = page.evaluate("columnsPerRow()")
    assert columns > 1
    page.wait_for_function(f"() => document.querySelector('#panel').dataset.image === '{by_rank[1 + columns][1]}'")
    page.fill("#filter", "no_such_column > 1")  # a bad filter says why and keeps the grid
    page.press("#filter", "Enter")
    page.wait_for_function("() => !document.body.dataset.loading")
    assert "no_such_column" in page.inner_text("#message") and len(tiles(page)) == 10


def test_the_watermark_box_is_drawn_where_it_is_stored(view_server, browser):
    port, _, ds, written = view_server
    grey = written["ids"][0]  # a flat grey image with the forced box: only the drawing is magenta
    page = open_page(browser, port)
    set_filter(page, f"image_id = '{grey}'")
    page.wait_for_function("() => document.getElementById('full').complete && "
                           "document.getElementById('full').naturalWidth > 0")
    figure = page.locator("#figure")
    shot = np.asarray(Image.open(io.BytesIO(figure.screenshot())).convert("RGB")).astype(int)
    h, w = shot.shape[:2]
    magenta = (shot[..., 0] > 200) & (shot[..., 1] < 80) & (shot[..., 2] > 200)
    ys, xs = np.nonzero(magenta)
    assert len(xs) > 100
    # the stroke is 3 px wide, centred on the box's edge
    drawn = (xs.min() + 1, ys.min() + 1, xs.max() - 1, ys.max() - 1)
    stored = (BOX["x0"] * w, BOX["y0"] * h, BOX["x1"] * w, BOX["y1"] * h)
    assert all(abs(a - b) <= 2.5 for a, b in zip(drawn, stored)), (drawn, stored)
    assert page.locator(".crop-box").count() == 2  # the crop the encoder took, with its halo
    panel = page.inner_text("#panel")
    assert "process_failed" in panel and "the tagger failed here" in panel  # error rows
    assert "example prompts" in panel and page.locator(".prompt").count() == 4


def test_edits_in_the_page_reach_where_and_the_trainer(view_server, browser, sdxl_base):
    port, proc, ds, written = view_server
    base = sdxl_base
    # 9 of the 10 images: rank 0 is left out of training
    assert "dry run: 9 training rows" in run_cli("train", str(ds.root), "--base", base, "--dry-run").stdout
    page = open_page(browser, port)

    # exclude one image (not the rank 0 one) with the keyboard
    page.keyboard.press("ArrowRight")
    victim = tiles(page)[1]
    page.wait_for_function(f"() => document.querySelector('#panel').dataset.image === '{victim}'")
    assert written["ranks"][written["ids"].index(victim)] > 0
    page.keyboard.press("x")
    page.wait_for_function("() => document.body.dataset.lastEdit")
    page.wait_for_selector(f".tile[data-id='{victim}'].excluded")
    assert victim not in ds.select_ids() and len(ds.select_ids()) == 9
    assert victim not in run_cli("sql", str(ds.root), "SELECT image_id FROM manifest", "--format", "csv").stdout
    assert "dry run: 8 training rows" in run_cli("train", str(ds.root), "--base", base, "--dry-run").stdout

    # add a tag to every image of a filter, then undo it
    before = {r["image_id"]: r["tags"] for r in manifest(ds, "SELECT image_id, tags FROM manifest_all")}
    set_filter(page, "rank >= 5")
    chosen = set(tiles(page))
    page.fill("#tag", "hand_picked")
    first = page.evaluate("document.body.dataset.lastEdit")
    page.click("#add-tag-all")
    page.wait_for_function(f"() => document.body.dataset.lastEdit !== '{first}'")
    after = {r["image_id"]: r["tags"] for r in manifest(ds, "SELECT image_id, tags FROM manifest_all")}
    assert {i for i, tags in after.items() if "hand_picked" in tags} == chosen and len(chosen) == 5
    assert all(after[i] == before[i] + ["hand_picked"] for i in chosen)
    assert sorted(ds.select_ids("list_contains(tags, 'hand_picked')")) == sorted(chosen - {victim})
    page.click("#grid")
    page.keyboard.press("u")
    page.wait_for_function("() => document.body.dataset.lastUndo")
    assert {r["image_id"]: r["tags"] for r in manifest(ds, "SELECT image_id, tags FROM manifest_all")} == before

    # a caption edited by hand is what the trainer reads
    page.fill("#caption", "Painted by hand.")
    page.click("#save-caption")
    page.wait_for_function("() => document.querySelector('#message').textContent.startsWith('saved: caption')")
    edited = page.evaluate("document.querySelector('#panel').dataset.image")
    assert manifest(ds, f"SELECT caption FROM manifest WHERE image_id = '{edited}'") == [
        {"caption": "Painted by hand."}]

    # killed without warning, nothing answered is lost
    rows = ds.read("edits").num_rows
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert ds.read("edits").num_rows == rows and victim not in ds.select_ids()


def test_hostile_requests_are_refused(view_server, tmp_path):
    port, _, ds, written = view_server
    ok = written["ids"][1]
    target = tmp_path / "pwned.csv"
    for where in [f"1=1); COPY (SELECT 1) TO '{target}'; SELECT (1=1",
                  f"1=1; COPY (SELECT 1) TO '{target}'",
                  "1=1) UNION SELECT * FROM manifest_all WHERE (1=1",
                  "rank > 1; SELECT 1",
                  "(SELECT 1); DROP VIEW manifest_all",
                  f"1=1 /* */ ; ATTACH '{tmp_path / 'x.db'}' AS x",
                  "INSTALL httpfs"]:
        status, body = request(port, "GET", "/api/grid?where=" + quote(where))
        assert status == 400, (where, body)
        status, _ = request(port, "POST", "/api/edit", {"action": "exclude", "where": where})
        assert status == 400, where
    assert not target.exists() and not (tmp_path / "x.db").exists()
    assert request(port, "GET", "/api/grid?order=" + quote("rank; DROP TABLE x"))[0] == 400
    assert request(port, "GET", "/api/grid?limit=100000")[0] == 400
    missing = "0" * 64
    for path in [f"/api/image/{missing}", f"/thumb/{missing}", f"/image/{missing}", "/image/../../../../etc/passwd",
                 "/thumb/..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd", "/view.html", "//etc/passwd",
                 f"/image/{ok}/../../x", "/api/image/" + quote("' OR 1=1 --")]:
        status, body = request(port, "GET", path)
        assert status == 404 and b"root:" not in body, path
    assert request(port, "POST", "/api/edit", {"action": "exclude", "ids": [missing]})[0] == 404
    assert request(port, "POST", "/api/edit", {"action": "exclude", "ids": ["../../etc/passwd"]})[0] == 404
    assert request(port, "POST", "/api/undo", {"edit": "f" * 32})[0] == 404
    assert request(port, "POST", "/api/edit", {"action": "drop", "ids": [ok]})[0] == 400
    # another site: a rebound domain name, a form post that is not JSON, odd bodies
    assert request(port, "GET", f"/thumb/{ok}", Host="evil.example:80")[0] == 403
    assert request(port, "POST", "/api/edit", {"action": "exclude", "ids": [ok]}, Host="evil.example")[0] == 403
    assert request(port, "POST", "/api/edit", json.dumps({"action": "exclude", "ids": [ok]}),
                   **{"Content-Type": "text/plain"})[0] == 415
    assert request(port, "POST", "/api/edit", "{}", **{"Content-Length": "-5"})[0] == 400
    assert request(port, "POST", "/api/edit", "[" * 20_000 + "]" * 20_000)[0] == 400
    assert ds.read("edits").num_rows == 0
    # what is allowed still works, and thumbnails are cached for good
    status, body = request(port, "GET", f"/thumb/{ok}")
    assert status == 200 and body[:2] == b"\xff\xd8"
    assert request(port, "GET", f"/thumb/{ok}", **{"If-None-Match": f'"thumb-{ok}"'})[0] == 304
