"""What the local web pages (`curate quality rate`, `curate view`) share to stay safe.

A page's server binds to 127.0.0.1 unless told otherwise, and then answers only requests
addressed to a loopback name: a web page that rebinds its own domain to 127.0.0.1 gets
403. Writes must be JSON (other sites cannot send that unasked), of bounded size. Images
are served by id from the images table, never from a path in the request; routes are a
fixed set, so `..` in a URL names nothing. Every answer forbids content sniffing and
frames, and the pages may load nothing but their own server's resources.
"""
from __future__ import annotations

import io
import json
import re
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pyarrow.compute as pc

from curate.images import decode
from curate.store import Dataset

IMAGE_ID = re.compile(r"[0-9a-f]{64}")
WEB_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                               "script-src 'self' 'unsafe-inline'; img-src 'self' data:"}
NO_STORE = {"Cache-Control": "no-store"}
IMMUTABLE = {"Cache-Control": "private, max-age=31536000, immutable"}  # content addressed: the id is the hash


class Refused(Exception):
    """A request the server answers with `status` and a one-line JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class PageHandler(BaseHTTPRequestHandler):
    """Host check, JSON bodies and JSON errors; subclasses answer `get(path, query)` and
    `post(path, body)` and raise Refused for anything they will not do."""

    loopback_only = True
    max_body = 64 << 10
    what = "this page"

    def log_message(self, *args):  # quiet: pages are used for hours
        pass

    def get(self, path: str, query: dict[str, str]) -> None:
        raise Refused(HTTPStatus.NOT_FOUND, "not found")

    def post(self, path: str, body: dict) -> None:
        raise Refused(HTTPStatus.NOT_FOUND, "not found")

    def do_GET(self):
        self.answer(lambda: self.get(*split_url(self.path)))

    def do_POST(self):
        self.answer(lambda: self.post(split_url(self.path)[0], self.read_json()))

    def answer(self, work) -> None:
        try:
            self.check_host()
            work()
        except Refused as e:
            self.send_json(e.status, {"error": str(e)})

    def check_host(self) -> None:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if self.loopback_only and host not in LOOPBACK_NAMES:
            raise Refused(HTTPStatus.FORBIDDEN, f"{self.what} answers only to 127.0.0.1 / localhost")

    def read_json(self) -> dict:
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            raise Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON (Content-Type: application/json)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise Refused(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
        if not 0 <= length <= self.max_body:
            raise Refused(HTTPStatus.BAD_REQUEST, f"a request body is 0 to {self.max_body} bytes")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, RecursionError) as e:
            raise Refused(HTTPStatus.BAD_REQUEST, f"bad JSON: {type(e).__name__}") from None
        if not isinstance(body, dict):
            raise Refused(HTTPStatus.BAD_REQUEST, "send a JSON object")
        return body

    def send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**SECURITY_HEADERS, **(headers or NO_STORE)}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, value) -> None:
        self.send(status, json.dumps(value, default=str).encode(), "application/json")

    def send_immutable(self, etag: str, body_of, content_type: str) -> None:
        """A response that never changes for this URL: 304 when the browser has it already."""
        tag = f'"{etag}"'
        if self.headers.get("If-None-Match") == tag:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("ETag", tag)
            for k, v in IMMUTABLE.items():
                self.send_header(k, v)
            self.end_headers()
            return
        body = body_of()
        if body is None:
            raise Refused(HTTPStatus.NOT_FOUND, "not found")
        self.send(HTTPStatus.OK, body, content_type, {**IMMUTABLE, "ETag": tag})


def split_url(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    return parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}


def image_id_or_404(text: str) -> str:
    if not IMAGE_ID.fullmatch(text):
        raise Refused(HTTPStatus.NOT_FOUND, "not found")
    return text


def serve(handler: type[PageHandler], host: str, port: int) -> ThreadingHTTPServer:
    """A server on (host, port), loopback-only when host is a loopback name; call
    serve_forever() (or run it in a thread) and shutdown() to stop."""
    handler.loopback_only = host in LOOPBACK_NAMES
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def image_bytes(ds: Dataset, image_id: str) -> tuple[bytes, str] | None:
    """An ok image's file as browsers show it (TIFF, BMP, ... as PNG), or None."""
    table = ds.read("images", ["bytes", "format"], filter=(pc.field("image_id") == image_id)
                    & (pc.field("status") == "ok") & pc.field("bytes").is_valid())
    if table.num_rows == 0:
        return None
    data, fmt = table.column("bytes")[0].as_py(), table.column("format")[0].as_py()
    if fmt in WEB_FORMATS:
        return data, WEB_FORMATS[fmt]
    buf = io.BytesIO()
    decode(data, min_side=1024).image.save(buf, "PNG")
    return buf.getvalue(), "image/png"
