"""The rating page in a real headless Chromium, against a real `curate quality rate` server."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from curate.pipelines.quality.ratings import load_ratings
from tests.conftest import CHROMIUM_ARGS, REPO, listening_addresses, port_of, request


@pytest.fixture
def rating_server(dataset):
    """`curate quality rate DS --port 0` in its own process; yields (port, process)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "curate", "quality", "rate", str(dataset.root), "--port", "0",
                             "--rater", "tester"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # the server prints its address once it listens
        assert line.startswith("rating page: http://127.0.0.1:"), (
            line, proc.stderr.read() if proc.poll() is not None else "")
        yield port_of(line), proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_rating_page_with_keyboard(dataset, rating_server, chromium):
    from playwright.sync_api import sync_playwright

    port, proc = rating_server
    assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1, loopback only by default

    def rows():
        return [(r["left"], r["right"], r["winner"], r["rater"])
                for r in load_ratings(dataset).sort_by("created_at").to_pylist()]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            # wait for both images: the left one may finish after the right one
            page.wait_for_function("() => document.body.dataset.pair && "
                                   "['left', 'right'].every(id => document.getElementById(id).complete)")
            assert page.evaluate("document.getElementById('left').naturalWidth > 0 && "
                                 "document.getElementById('right').naturalWidth > 0")

            def press(key: str) -> tuple[str, str]:
                """Press a key; wait for the next pair; return the pair that was on show."""
                before = page.evaluate("document.body.dataset.pair")
                page.keyboard.press(key)
                page.wait_for_function("before => document.body.dataset.pair !== before", arg=before)
                return tuple(before.split(":"))

            first = press("ArrowLeft")
            assert rows() == [(*first, "left", "tester")]  # saved before the next pair showed
            second = press("d")
            third = press("ArrowDown")
            assert rows() == [(*first, "left", "tester"), (*second, "right", "tester"), (*third, "tie", "tester")]
            assert "3 judgements" in page.inner_text("#progress")
            skipped = press(" ")
            # a skip saves nothing and counts nothing (press() already waited for a new pair)
            assert len(rows()) == 3 and skipped not in [r[:2] for r in rows()]
            assert (page.evaluate("document.body.dataset.rated") == "3"
                    and "3 judgements" in page.inner_text("#progress"))
            page.keyboard.press("Backspace")  # undo removes the tie and shows its pair again
            page.wait_for_function("() => document.body.dataset.rated === '2'")
            assert page.evaluate("document.body.dataset.pair") == ":".join(third)
            assert rows() == [(*first, "left", "tester"), (*second, "right", "tester")]
            press("a")
            assert rows()[-1] == (*third, "left", "tester")
        finally:
            browser.close()

    # Only images of the dataset, by id; nothing from the file system.
    ok_id = rows()[0][0]
    assert request(port, "GET", f"/image/{ok_id}")[0] == 200
    for path in [f"/image/{'0' * 64}", "/image/../../../../etc/passwd", "/../../../../etc/passwd",
                 "/%2e%2e/%2e%2e/etc/passwd", "/image/..%2f..%2f..%2fetc%2fpasswd", "/rate.html",
                 "/pipelines/quality/server.py", f"/image/{ok_id}/../../x", "//etc/passwd"]:
        status, body = request(port, "GET", path)
        assert status == 404 and b"root:" not in body, path
    state = json.loads(request(port, "GET", "/api/state")[1])
    assert request(port, "POST", "/api/judge",
                   {"left": state["right"], "right": state["left"], "winner": "left"})[0] == 409
    assert request(port, "POST", "/api/judge", {**state, "winner": "both"})[0] == 400
    # a page on another site: a rebound domain name, or a form post that is not JSON
    assert request(port, "GET", f"/image/{ok_id}", Host="evil.example:80")[0] == 403
    assert request(port, "POST", "/api/judge", {**state, "winner": "left"}, **{"Content-Type": "text/plain"})[0] == 415
    assert len(rows()) == 3

    # Killed without warning, nothing judged is lost: every judgement was already a part.
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert len(rows()) == 3


def test_rate_binds_where_told(dataset):
    """--host is honoured (and warned about); the default above is loopback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "curate", "quality", "rate", str(dataset.root), "--port", "0",
                             "--host", "0.0.0.0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        port = port_of(line)
        assert listening_addresses(port) == ["00000000"]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert "anyone who can reach this machine" in err and "judgements this session" in out  # warning; summary
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def raw_post(port: int, body: bytes, length: str) -> int:
    """POST /api/judge with a Content-Length of our choosing; the reply's status (0: none came)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /api/judge HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + length.encode() + b"\r\n\r\n" + body)
        s.shutdown(socket.SHUT_WR)  # a server reading "until the end" would wait for this forever otherwise
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3})", reply)
    return int(match.group(1)) if match else 0


def test_hostile_request_bodies_get_400_and_the_server_goes_on(rating_server):
    port, proc = rating_server
    nested = b"[" * 100_000 + b"]" * 100_000  # past the JSON parser's recursion limit
    assert raw_post(port, b"x" * 10_000, "-1") == 400  # a negative length: never read to the end
    assert raw_post(port, b"{}", str(1 << 40)) == 400  # a huge one: refused before reading
    assert raw_post(port, nested[:4000], "4000") == 400  # nested within the size cap
    assert raw_post(port, b'{"winner": ' + b"[" * 3000 + b"]" * 3000 + b"}", str(6011)) == 400  # over the cap
    assert raw_post(port, b"[" * 2000 + b"]" * 2000, "4000") == 400  # deep nesting under the cap
    assert raw_post(port, b"[1, 2]", "6") == 400  # JSON, but not an object
    assert proc.poll() is None
    status, body = request(port, "GET", "/api/state")
    assert status == 200 and "left" in json.loads(body)
