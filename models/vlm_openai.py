"""A VLM served elsewhere behind an OpenAI-compatible chat-completions API (vLLM, Ollama,
LM Studio, moondream-station, ...).

Requests go to the configured base URL and nowhere else: plain http.client on that host
and port, no proxies from the environment, redirects refused. Images travel inline as
JPEG data URLs. A batch is sent as concurrent requests; 5xx and 429 replies, timeouts and
dropped connections are retried with exponential backoff; anything else fails that image only.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from PIL import Image

from curate.models.captioner import Captioner, CaptionError

JPEG_QUALITY = 90
MAX_SIDE = 1024  # servers resize to their own input size; no need to send more pixels


class RetryableError(Exception):
    pass


def jpeg_data_url(image: Image.Image) -> str:
    """The image, no larger than MAX_SIDE, as an inline JPEG data URL (also what vLLM's chat takes)."""
    image = image.copy()
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAI(Captioner):
    uses_gpu = False  # the GPU is on the server

    def __init__(self, spec, prompt: str | None = None, max_new_tokens: int | None = None, **http):
        super().__init__(spec, prompt, max_new_tokens, **http)
        url = urlsplit(spec.target)
        self.scheme, self.host, self.port = url.scheme, url.hostname, url.port
        self.path = url.path.rstrip("/") + "/chat/completions"
        self.concurrency, self.timeout = self.settings["concurrency"], self.settings["timeout"]
        self.retries, self.backoff = self.settings["retries"], self.settings["backoff"]
        self.batch_size = max(self.batch_size, self.concurrency)  # a batch is one wave of concurrent requests

    def load(self, device: str | None = None, dtype: str | None = None) -> None:
        self._api_key = os.environ.get("OPENAI_API_KEY")  # sent only to the configured host
        self._lock = threading.Lock()

    def preprocess(self, image) -> dict:
        return {"input": jpeg_data_url(image.image)}

    def caption(self, images: list[str], prompts: list[str]) -> list[str | CaptionError]:
        with ThreadPoolExecutor(max(1, min(self.concurrency, len(images)))) as pool:
            return list(pool.map(self._one, images, prompts))

    def _one(self, data_url: str, prompt: str) -> str | CaptionError:
        body = json.dumps({
            "model": self.spec.model_name,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": {"url": data_url}},
            ]}],
            "max_tokens": self.max_new_tokens,
            "temperature": 0,
        }).encode()
        for attempt in range(self.retries + 1):
            try:
                return self._parse(*self._post(body))
            except RetryableError as e:
                if attempt == self.retries:
                    return CaptionError("process_failed", f"{e} (gave up after {attempt + 1} tries)")
                time.sleep(self.backoff * 2**attempt)
            except CaptionError as e:
                return e

    def _post(self, body: bytes) -> tuple[int, bytes]:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.timeout)
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            conn.request("POST", self.path, body, headers)
            reply = conn.getresponse()
            return reply.status, reply.read()
        except (socket.timeout, TimeoutError) as e:
            raise RetryableError(f"no reply within {self.timeout:g} s") from e
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise RetryableError(f"connection to {self.host}:{self.port} failed: {type(e).__name__}: {e}") from e
        finally:
            conn.close()

    def _parse(self, status: int, payload: bytes) -> str:
        if status >= 500 or status == 429:  # overloaded or rate-limited: worth another try
            raise RetryableError(f"server error {status}: {payload[:200]!r}")
        if status != 200:  # 3xx (redirects are not followed) and 4xx: retrying will not help
            raise CaptionError("process_failed", f"HTTP {status}: {payload[:300]!r}")
        try:
            reply = json.loads(payload)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise CaptionError("bad_output", f"malformed reply: {payload[:300]!r}") from None
        if not isinstance(content, str):
            raise CaptionError("bad_output", f"reply content is not text: {str(content)[:300]}")
        tokens = (reply.get("usage") or {}).get("completion_tokens")
        if isinstance(tokens, int):
            with self._lock:
                self.generated_tokens += tokens
        return content
