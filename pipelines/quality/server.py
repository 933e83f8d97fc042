"""`curate quality rate`: a local web page for head-to-head judgements.

The server answers only a fixed set of routes: the page itself, a small JSON API, and
`/image/<image_id>` for images of this dataset, read from the images table (never from a
file path in the request). Anything else is 404; an id that is not an ok image of the
rating pool is 404 too. It binds to 127.0.0.1 unless told otherwise, and then answers
only requests addressed to a loopback name (a web page that rebinds its own domain to
127.0.0.1 gets 403); judgements must be JSON, which other sites cannot send unasked.

A judgement is written (its own part, fsynced and renamed into place) before the answer
that carries the next pair, so the page never shows a pair whose predecessor is unsaved.
"""
from __future__ import annotations

import io
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.compute as pc

from curate.images import decode
from curate.pipelines.quality import ratings as rt
from curate.pipelines.quality.pairs import PairChooser
from curate.store import Dataset

PAGE = Path(__file__).with_name("rate.html")
WEB_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
MAX_BODY = 4096  # a judgement is a few dozen bytes
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
                    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                               "script-src 'self' 'unsafe-inline'"}


class RatingSession:
    """The state behind the page: the chooser, the current pair, and the undo stack."""

    def __init__(self, ds: Dataset, chooser: PairChooser, rater: str | None = None):
        self.ds, self.chooser, self.rater = ds, chooser, rater
        self.lock = threading.Lock()
        self.written: list[tuple[Path, str, str]] = []  # this session's parts, newest last
        self.total = ds.read("ratings", ["left"]).num_rows
        for row in ds.read("ratings", ["left", "right", "winner"]).to_pylist():
            chooser.add(row["left"], row["right"], row["winner"])
        self.pair = chooser.next_pair()

    def state(self) -> dict:
        return {"left": self.pair[0], "right": self.pair[1], "rated": self.total, "session": len(self.written),
                "images": len(self.chooser.ids), "seen": int((self.chooser.shown > 0).sum()),
                "can_undo": bool(self.written)}

    def judge(self, left: str, right: str, winner: str) -> dict:
        with self.lock:
            if (left, right) != self.pair:
                raise LookupError("that is not the pair on show (another tab answered it?); reload the page")
            if winner == "skip":
                self.chooser.skip(left, right)
            else:
                part = rt.record(self.ds, left, right, winner, self.rater)
                self.written.append((part, left, right))
                self.chooser.add(left, right, winner)
                self.total += 1
            self.pair = self.chooser.next_pair()
            return self.state()

    def undo(self) -> dict:
        with self.lock:
            if self.written:
                part, left, right = self.written.pop()
                rt.undo(part)
                self.chooser.undo(left, right)
                self.total -= 1
                self.pair = (left, right)  # show it again, to be judged anew
            return self.state()

    def image(self, image_id: str) -> tuple[bytes, str] | None:
        if image_id not in self.chooser.index:
            return None
        table = self.ds.read("images", ["bytes", "format"], filter=(pc.field("image_id") == image_id)
                             & (pc.field("status") == "ok") & pc.field("bytes").is_valid())
        if table.num_rows == 0:
            return None
        data, fmt = table.column("bytes")[0].as_py(), table.column("format")[0].as_py()
        if fmt in WEB_FORMATS:
            return data, WEB_FORMATS[fmt]
        buf = io.BytesIO()  # TIFF, BMP, ...: browsers cannot show them, so send PNG
        decode(data, min_side=1024).image.save(buf, "PNG")
        return buf.getvalue(), "image/png"


def make_handler(session: RatingSession, loopback_only: bool):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: the page is used for hours
            pass

        def host_allowed(self) -> bool:
            if not loopback_only:
                return True
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if host not in LOOPBACK_NAMES:
                self.send_json(HTTPStatus.FORBIDDEN,
                               {"error": "this rating page answers only to 127.0.0.1 / localhost"})
                return False
            return True

        def send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in SECURITY_HEADERS.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, status: int, value: dict) -> None:
            self.send(status, json.dumps(value).encode(), "application/json")

        def not_found(self) -> None:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def do_GET(self):
            if not self.host_allowed():
                return
            path = self.path.split("?", 1)[0]
            if path == "/":
                self.send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif path == "/api/state":
                with session.lock:
                    self.send_json(HTTPStatus.OK, session.state())
            elif path.startswith("/image/") and rt.IMAGE_ID.match(path[len("/image/"):]):
                found = session.image(path[len("/image/"):])
                self.send(HTTPStatus.OK, *found) if found else self.not_found()
            else:
                self.not_found()

        def do_POST(self):
            if not self.host_allowed():
                return
            if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                return self.send_json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                      {"error": "send JSON (Content-Type: application/json)"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 <= length <= MAX_BODY:  # read(-1) would read until the client hangs up
                    self.close_connection = True  # the body, if any, is left unread
                    return self.send_json(HTTPStatus.BAD_REQUEST,
                                          {"error": f"Content-Length must be 0 to {MAX_BODY} bytes"})
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("send a JSON object")
                if self.path == "/api/judge":
                    winner = body.get("winner")
                    if winner not in (*rt.WINNERS, "skip"):
                        return self.send_json(HTTPStatus.BAD_REQUEST,
                                              {"error": "winner must be left, right, tie or skip"})
                    self.send_json(HTTPStatus.OK, session.judge(body.get("left"), body.get("right"), winner))
                elif self.path == "/api/undo":
                    self.send_json(HTTPStatus.OK, session.undo())
                else:
                    self.not_found()
            except LookupError as e:
                self.send_json(HTTPStatus.CONFLICT, {"error": str(e)})
            except (ValueError, RecursionError) as e:  # not JSON, or nested past the parser's depth
                self.send_json(HTTPStatus.BAD_REQUEST, {"error": f"bad request: {type(e).__name__}: {e}"})

    return Handler


def serve(session: RatingSession, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A started-to-be server; call serve_forever() (or run it in a thread) and shutdown() to stop."""
    server = ThreadingHTTPServer((host, port), make_handler(session, loopback_only=host in LOOPBACK_NAMES))
    server.daemon_threads = True
    return server
