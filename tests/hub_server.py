"""A Hugging Face Hub on 127.0.0.1, serving model repos from a folder, for the tests.

    with HubServer(root) as hub:   # root/ORG/NAME/... are the repos' files
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": ...}

It answers what huggingface_hub asks of the real hub when it resolves a revision and
downloads files: `GET /api/models/ORG/NAME[/revision/REV]` (the commit and the file list),
`GET /api/models/ORG/NAME/tree/REV` (the files, as snapshot_download lists them) and
`HEAD`/`GET /ORG/NAME/resolve/REV/FILE` (X-Repo-Commit, ETag, Content-Length, the bytes).
A repo's commit is a hash of its files, so changing a file is a new commit, as on the hub.
Every request is logged (method, path) in `requests`, so a test sees what was fetched.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


def commit_of(repo: Path) -> str:
    digest = hashlib.sha1()
    for file in sorted(p for p in repo.rglob("*") if p.is_file()):
        digest.update(file.relative_to(repo).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


class HubServer:
    def __init__(self, root: Path):
        self.root, self.requests = Path(root), []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HubServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self, repo: str) -> set[str]:
        """The files of `repo` whose bytes were fetched (GET .../resolve/REV/FILE)."""
        prefix = f"/{repo}/resolve/"
        return {path[len(prefix):].split("/", 1)[1] for method, path in self.requests
                if method == "GET" and path.startswith(prefix)}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo = hub.root / parts[2] / parts[3]
                    if not repo.is_dir():
                        return self.send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                    files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
                    if len(parts) >= 5 and parts[4] == "tree":
                        tree = [{"type": "file", "path": f, "size": (repo / f).stat().st_size,
                                 "oid": hashlib.sha1((repo / f).read_bytes()).hexdigest()} for f in files]
                        return self.send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
                    info = {"id": f"{parts[2]}/{parts[3]}", "modelId": f"{parts[2]}/{parts[3]}",
                            "sha": commit_of(repo), "private": False, "siblings": [{"rfilename": f} for f in files]}
                    return self.send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo = hub.root / parts[0] / parts[1]
                    file = repo / "/".join(parts[4:])
                    if not file.is_file():
                        return self.send(404, b"", {"X-Error-Code": "EntryNotFound"}, body)
                    data = file.read_bytes()
                    return self.send(200, data, {"X-Repo-Commit": commit_of(repo),
                                                 "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, body)
                self.send(404, b"", {}, body)

            def send(self, status: int, data: bytes, headers: dict, body: bool = True):
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        return Handler
