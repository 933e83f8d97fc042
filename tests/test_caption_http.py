"""The OpenAI-compatible backend against a real server process on localhost (tests/openai_server.py)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.compute as pc

from curate.pipelines.caption import CaptionStage
from curate.pipelines.executor import run
from tests.conftest import run_cli

SERVER = Path(__file__).with_name("openai_server.py")


@contextmanager
def server(tmp_path, mode="ok", name="server", **opts):
    """Start the server process; yield (base_url, read_log); always stop it."""
    log = tmp_path / f"{name}.log"
    args = [sys.executable, str(SERVER), "--mode", mode, "--log", str(log)]
    for key, value in opts.items():
        args += [f"--{key}", str(value)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())

        def read_log():
            return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

        yield f"http://127.0.0.1:{port}/v1", read_log
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def captions(ds, model_key=None):
    table = ds.read("captions")
    if model_key:
        table = table.filter(pc.field("model") == model_key)
    return {r["image_id"]: r for r in table.to_pylist()}


def test_captions_concurrently_inline_and_cleaned(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with server(tmp_path, delay=0.3) as (url, read_log):
        stage = CaptionStage(f"openai:{url}#tiny-vlm", "Describe it.", 40, concurrency=4, timeout=10)
        summary = run(dataset, stage, show_progress=False)[0]
        log = read_log()
    assert summary.ok == 12 and not summary.errors
    assert len(log) == 12  # one request per image, nothing twice
    assert max(e["in_flight"] for e in log) > 1  # requests overlapped
    assert {e["path"] for e in log} == {"/v1/chat/completions"}
    assert {(e["model"], e["prompt"], e["max_tokens"], e["auth"]) for e in log} == {
        ("tiny-vlm", "Describe it.", 40, "Bearer sk-test")}
    assert {e["data_url_header"] for e in log} == {"data:image/jpeg;base64"}
    rows = captions(dataset)
    assert len(rows) == 12
    for row in rows.values():
        assert row["status"] == "ok" and row["prompt"] == "Describe it."
        assert row["raw"].startswith("The image shows a picture ")
        assert row["caption"].startswith("A picture ") and row["caption"].endswith("pixels.")  # preamble gone
    assert stage.captioner.generated_tokens == 12 * 12  # from the replies' usage
    again = run(dataset, CaptionStage(f"openai:{url}#tiny-vlm", "Describe it.", 40), show_progress=False)[0]
    assert again.todo == 0


def test_5xx_replies_are_retried(dataset, tmp_path):
    with server(tmp_path, mode="flaky") as (url, read_log):
        stage = CaptionStage(f"openai:{url}#m", None, 20, timeout=10, retries=2, backoff=0.05)
        summary = run(dataset, stage, show_progress=False)[0]
        log = read_log()
    assert summary.ok == 12 and not summary.errors
    attempts = {}
    for e in log:
        attempts[e["image"]] = max(attempts.get(e["image"], 0), e["attempt"])
    assert len(attempts) == 12 and set(attempts.values()) == {2}  # one 503, then success, for every image


def test_slow_replies_hit_the_timeout(dataset, tmp_path):
    ids = dataset.select_ids()[:4]
    with server(tmp_path, mode="slow", delay=5) as (url, read_log):
        stage = CaptionStage(f"openai:{url}#m", None, 20, timeout=0.5, retries=1, backoff=0.05)
        started = time.monotonic()
        summary = run(dataset, stage, ids=ids, show_progress=False)[0]
        elapsed = time.monotonic() - started
        log = read_log()
    assert summary.errors == {"process_failed": 4} and summary.ok == 0
    assert elapsed < 4  # the client gave up; it did not wait the server's 5 s
    assert len(log) == 8  # every image tried twice (one retry)
    for row in captions(dataset).values():
        assert row["status"] == "error" and "no reply within 0.5 s" in row["message"] and "2 tries" in row["message"]


def test_malformed_replies_become_error_rows(dataset, tmp_path):
    with server(tmp_path, mode="malformed") as (url, read_log):
        summary = run(dataset, CaptionStage(f"openai:{url}#m", None, 20, timeout=10), show_progress=False)[0]
        log = read_log()
    assert summary.errors == {"bad_output": 12} and summary.ok == 0
    assert len(log) == 12  # malformed replies are not retried
    messages = [r["message"] for r in captions(dataset).values()]
    assert any("malformed reply" in m for m in messages)
    assert any("empty caption" in m or "not text" in m for m in messages)


def test_nothing_is_sent_anywhere_but_the_configured_url(dataset, tmp_path, monkeypatch):
    """A redirect and proxy settings in the environment must not send images elsewhere."""
    with server(tmp_path, name="trap") as (trap_url, trap_log):
        with server(tmp_path, mode="redirect", redirect=trap_url + "/chat/completions") as (url, read_log):
            for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
                monkeypatch.setenv(var, trap_url.removesuffix("/v1"))
            proc = run_cli("caption", str(dataset.root), "--model", f"openai:{url}#m", "--retries", "0", "-q")
            log = read_log()
        assert trap_log() == []
    port = url.split(":")[2].split("/")[0]
    assert len(log) == 12 and {e["host"] for e in log} == {f"127.0.0.1:{port}"}
    assert "process_failed" in proc.stdout  # the summary counts the errors by code
    assert all("HTTP 307" in r["message"] for r in captions(dataset).values())


def test_bad_model_spec_says_what_would_be_right(dataset):
    proc = run_cli("caption", str(dataset.root), "--model", "openai:127.0.0.1:8000", check=False)
    assert proc.returncode == 2 and "openai:BASE_URL#MODEL" in proc.stderr
    proc = run_cli("caption", str(dataset.root), "--model", "gpt4v:foo", check=False)
    assert proc.returncode == 2 and "llava" in proc.stderr and "moondream" in proc.stderr


def test_unloadable_models_fail_with_a_clear_message(dataset, tmp_path):
    proc = run_cli("caption", str(dataset.root), "--model", f"llava:{tmp_path}/no-such-model", check=False)
    assert proc.returncode == 2 and "no such model directory" in proc.stderr
    proc = run_cli("caption", str(dataset.root), "--model", "moondream:vikhyatk/moondream2", check=False)
    assert proc.returncode == 2 and "transformers >=4.44,<5" in proc.stderr
    assert dataset.read("captions").num_rows == 0  # nothing half-done
