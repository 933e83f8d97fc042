"""`curate quality rate`: a local web page for head-to-head judgements.

The server answers only a fixed set of routes: the page itself, a small JSON API, and
`/image/<image_id>` for images of the rating pool (anything else is 404), with the
protections every local page shares (curate.web: loopback only by default, Host check,
JSON-only writes).

A judgement is written (its own part, fsynced and renamed into place) before the answer
that carries the next pair, so the page never shows a pair whose predecessor is unsaved.
"""
from __future__ import annotations

import threading
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path

from curate import web
from curate.pipelines.quality import ratings as rt
from curate.pipelines.quality.pairs import PairChooser
from curate.store import Dataset
from curate.web import PageHandler, Refused, image_id_or_404

PAGE = Path(__file__).with_name("rate.html")


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
        return web.image_bytes(self.ds, image_id) if image_id in self.chooser.index else None


def make_handler(session: RatingSession):
    class Handler(PageHandler):
        what = "this rating page"

        def get(self, path: str, query: dict) -> None:
            if path == "/":
                self.send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif path == "/api/state":
                with session.lock:
                    self.send_json(HTTPStatus.OK, session.state())
            elif path.startswith("/image/"):
                found = session.image(image_id_or_404(path[len("/image/"):]))
                if not found:
                    raise Refused(HTTPStatus.NOT_FOUND, "not found")
                self.send(HTTPStatus.OK, *found)
            else:
                raise Refused(HTTPStatus.NOT_FOUND, "not found")

        def post(self, path: str, body: dict) -> None:
            try:
                if path == "/api/judge":
                    winner = body.get("winner")
                    if winner not in (*rt.WINNERS, "skip"):
                        raise Refused(HTTPStatus.BAD_REQUEST, "winner must be left, right, tie or skip")
                    self.send_json(HTTPStatus.OK, session.judge(body.get("left"), body.get("right"), winner))
                elif path == "/api/undo":
                    self.send_json(HTTPStatus.OK, session.undo())
                else:
                    raise Refused(HTTPStatus.NOT_FOUND, "not found")
            except LookupError as e:
                raise Refused(HTTPStatus.CONFLICT, str(e)) from None
            except (ValueError, AttributeError) as e:
                raise Refused(HTTPStatus.BAD_REQUEST, f"bad request: {e}") from None

    return Handler


def serve(session: RatingSession, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A started-to-be server; call serve_forever() (or run it in a thread) and shutdown() to stop."""
    return web.serve(make_handler(session), host, port)
