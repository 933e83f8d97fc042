"""`curate report`: one HTML file that opens offline, in a real headless Chromium."""
from __future__ import annotations

import json

import numpy as np

from curate.pipelines.quality.fit import plot_ranks
from tests.conftest import CHROMIUM_ARGS, run_cli

PLOTS = {"ranks", "tags", "tags-0", "tags-1", "ratings", "captions", "aspect", "resolution", "buckets", "watermarks",
         "elo", "padded", "tag-counts"}


def write_quality_fit(ds) -> None:
    """What `curate quality fit` leaves in DS/heads/quality, with its own plot function."""
    head = ds.root / "heads" / "quality"
    head.mkdir(parents=True)
    elo = np.random.default_rng(0).normal(1000, 120, 500)
    edges = np.linspace(elo.min(), elo.max(), 11)
    plot_ranks(head / "ranks.png", elo, edges, np.clip(np.digitize(elo, edges[1:-1]), 0, 9))
    (head / "head.json").write_text(json.dumps({"fit": {"ratings": 400, "pair_model_accuracy": 0.71}}))


def test_report_opens_offline_and_shows_every_plot(rich_dataset, chromium, sdxl_base, tmp_path):
    from playwright.sync_api import sync_playwright

    ds, written = rich_dataset
    write_quality_fit(ds)
    out = tmp_path / "full.html"
    said = run_cli("report", str(ds.root), "-o", str(out), "--base", sdxl_base).stdout
    assert "plots" in said and out.is_file()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.as_uri())
            page.wait_for_load_state("networkidle")
            assert [u for u in requests if not u.startswith("data:")] == [out.as_uri()]  # nothing else, ever
            plots = page.eval_on_selector_all("figure.plot", "fs => fs.map(f => { const r = f.getBoundingClientRect();"
                                                             " return [f.dataset.plot, r.width, r.height]; })")
            assert {name for name, _, _ in plots} == PLOTS
            assert all(w > 200 and h > 100 for _, w, h in plots), plots
            assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator(".thumb").count() >= 10 + 4 + 2  # per rank, watermarks with boxes, a near group
            assert page.locator(".pic svg rect").count() == sum(written["marked"])
            text = page.inner_text("body")
            assert "process_failed: 1" in text and "unidentified: 1" in text  # error codes per table
            assert "pair_model_accuracy" in text and "example prompt per rule" in text
        finally:
            browser.close()

    chosen = tmp_path / "chosen.html"
    said = run_cli("report", str(ds.root), "-o", str(chosen), "--where", "rank >= 5").stdout
    assert "│ images     │ 5 " in said
    assert "pass <code>--base MODEL</code>" in chosen.read_text()
    bad = run_cli("report", str(ds.root), "--where", "1=1); COPY (SELECT 1) TO 'x.csv'; SELECT (1=1", check=False,
                  cwd=tmp_path)
    assert bad.returncode == 2 and "bad --where" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "report.html").exists()
