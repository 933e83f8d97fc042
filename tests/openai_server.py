"""A small OpenAI-compatible chat-completions server, run as its own process by the tests.

    python tests/openai_server.py --mode ok|flaky|slow|malformed|redirect --log FILE [--delay S] [--redirect URL]

It binds 127.0.0.1 on a free port and prints the port on its first stdout line. Every
request is logged as one JSON line (path, Host header, model, prompt, image size,
attempt number, requests in flight), so a test can check what the client sent.

Modes: ok answers every request; flaky answers 503 to the first request for each image
and 200 after; slow sleeps --delay seconds before answering; malformed answers with
broken or empty replies (a different kind per image); redirect answers 307 to --redirect.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

MALFORMED = [
    b"this is not json",
    b'{"id": "x", "object": "chat.completion"}',
    b'{"choices": [{"message": {"role": "assistant", "content": null}}]}',
    b'{"choices": [{"message": {"role": "assistant", "content": "   "}}]}',
    b'{"choices": []}',
]


class State:
    lock = threading.Lock()
    attempts: dict[str, int] = {}
    in_flight = 0


def make_handler(args, log):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # keep stderr quiet
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            parts = body["messages"][0]["content"]
            prompt = next(p["text"] for p in parts if p["type"] == "text")
            url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
            header, _, data = url.partition(",")
            image = Image.open(io.BytesIO(base64.b64decode(data)))
            key = hashlib.sha256(data.encode()).hexdigest()
            with State.lock:
                State.attempts[key] = State.attempts.get(key, 0) + 1
                State.in_flight += 1
                entry = {"path": self.path, "host": self.headers.get("Host"), "model": body.get("model"),
                         "max_tokens": body.get("max_tokens"), "prompt": prompt, "image": key,
                         "data_url_header": header, "size": list(image.size), "attempt": State.attempts[key],
                         "in_flight": State.in_flight, "auth": self.headers.get("Authorization")}
                log.write(json.dumps(entry) + "\n")
                log.flush()
            try:
                self.answer(entry)
            finally:
                with State.lock:
                    State.in_flight -= 1

        def answer(self, entry):
            if args.mode == "slow":
                time.sleep(args.delay)
            if args.mode == "flaky" and entry["attempt"] == 1:
                return self.reply(503, b'{"error": "overloaded"}')
            if args.mode == "redirect":
                return self.reply(307, b"", {"Location": args.redirect})
            if args.mode == "malformed":
                return self.reply(200, MALFORMED[int(entry["image"], 16) % len(MALFORMED)])
            time.sleep(args.delay if args.mode != "slow" else 0)
            caption = (f"The image shows a picture {entry['image'][:8]} of {entry['size'][0]} by {entry['size'][1]} "
                       "pixels.\n\n")
            reply = {"id": "cmpl-1", "object": "chat.completion", "model": entry["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": caption},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}}
            self.reply(200, json.dumps(reply).encode())

        def reply(self, status, payload, headers=None):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ok", "flaky", "slow", "malformed", "redirect"], default="ok")
    parser.add_argument("--log", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--redirect", default="")
    args = parser.parse_args()
    with open(args.log, "a") as log:
        server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(args, log))
        server.daemon_threads = True
        print(server.server_address[1], flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
            sys.stdout.flush()


if __name__ == "__main__":
    main()
