"""`curate view`: the dataset in a local web page (curate/cli/view.html).

Routes, a fixed set (anything else is 404): the page; `/api/state`, `/api/grid`,
`/api/image/<id>` and `/api/edits` to read; `/thumb/<id>` and `/image/<id>` (by image id
only, from the dataset, cached by the browser for good: an id is the hash of the bytes);
`POST /api/edit` and `POST /api/undo` (JSON only) to change. Ids that are not images of
this dataset are 404, bad filters, sort keys and edits 400. The protections every local
page shares are in curate.web.
"""
from __future__ import annotations

from contextlib import contextmanager
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path

from curate import web
from curate.cli.view_data import ViewData
from curate.thumbs import Thumbnailer
from curate.web import PageHandler, Refused, image_id_or_404

PAGE = Path(__file__).with_name("view.html")


def make_handler(data: ViewData, where: str | None) -> type[PageHandler]:
    thumbs = Thumbnailer(data.ds)

    class Handler(PageHandler):
        what = "this page"

        def get(self, path: str, query: dict[str, str]) -> None:
            with refusals():
                if path == "/":
                    self.send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
                elif path == "/api/state":
                    self.send_json(HTTPStatus.OK, {"dataset": str(data.ds.root), "where": where or "",
                                                   "columns": data.columns})
                elif path == "/api/grid":
                    grid = data.grid(query.get("where"), query.get("order", "image_id"), query.get("desc") == "1",
                                     int(query.get("offset", 0)), int(query.get("limit", 120)))
                    thumbs.want([r["image_id"] for r in grid["rows"]])
                    self.send_json(HTTPStatus.OK, grid)
                elif path == "/api/edits":
                    self.send_json(HTTPStatus.OK, data.history())
                elif path.startswith("/api/image/"):
                    self.send_json(HTTPStatus.OK, data.panel(image_id_or_404(path[len("/api/image/"):])))
                elif path.startswith("/thumb/"):
                    image_id = image_id_or_404(path[len("/thumb/"):])
                    if not thumbs.cached(image_id):  # one is made only for an image of the dataset
                        data.known([image_id])
                    self.send_immutable(f"thumb-{image_id}", lambda: thumbs.get(image_id), "image/jpeg")
                elif path.startswith("/image/"):
                    image_id = data.known([image_id_or_404(path[len("/image/"):])])[0]
                    found = web.image_bytes(data.ds, image_id)
                    if not found:
                        raise Refused(HTTPStatus.NOT_FOUND, "not found")
                    self.send_immutable(f"image-{image_id}", lambda: found[0], found[1])
                else:
                    raise Refused(HTTPStatus.NOT_FOUND, "not found")

        def post(self, path: str, body: dict) -> None:
            with refusals():
                if path == "/api/edit":
                    ids = body.get("ids")
                    if ids is not None and not isinstance(ids, list):
                        raise ValueError("ids is a list of image ids")
                    self.send_json(HTTPStatus.OK, data.edit(body.get("action"), body.get("value"), ids,
                                                            body.get("where")))
                elif path == "/api/undo":
                    self.send_json(HTTPStatus.OK, data.undo(body.get("edit")))
                else:
                    raise Refused(HTTPStatus.NOT_FOUND, "not found")

    return Handler


@contextmanager
def refusals():
    """The data layer's errors as answers: LookupError is 404, ValueError and TypeError 400."""
    try:
        yield
    except LookupError as e:
        raise Refused(HTTPStatus.NOT_FOUND, str(e)) from None
    except (ValueError, TypeError) as e:
        raise Refused(HTTPStatus.BAD_REQUEST, str(e)) from None


def serve(data: ViewData, where: str | None, host: str = "127.0.0.1", port: int = 8766) -> ThreadingHTTPServer:
    return web.serve(make_handler(data, where), host, port)
