"""Shared fixtures: datasets made of generated images, a real local Ray cluster, the CLI."""
from __future__ import annotations

import atexit
import faulthandler
import http.client
import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own browser download needs a network we lack
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run only when a -m expression asks for them (.ci/run: -m slow)."""
    if config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow (real-size models): run with -m slow, as .ci/run does")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def need(ready: bool, why: str) -> None:
    """Skip a test whose outside requirement is missing here, saying why in one line; in CI
    (CURATE_CI=1, set by .ci/run, which installs everything) a missing requirement fails."""
    if not ready:
        if os.environ.get("CURATE_CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture
def chromium() -> str:
    need(os.access(CHROMIUM, os.X_OK), f"no browser: {CHROMIUM} is missing (apt-get install chromium; .ci/run does)")
    return CHROMIUM


def make_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth random image (gradients plus blobs), so resizing and hashing behave like on photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.28)]
        channels.append(127 + 120 * np.sin(x / width * fx * 3.14 + y / height * fy * 3.14 + phase))
    arr = np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def encode_image(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def image_rows(sizes: list[int], seed: int = 0) -> dict:
    """Rows of the images table holding random bytes of these sizes (incompressible, stored as they are)."""
    import hashlib

    from curate.store import now, schema_of

    blobs = [np.random.default_rng(seed + i).bytes(n) for i, n in enumerate(sizes)]
    rows = {name: [None] * len(blobs) for name in schema_of("images").names}
    return {**rows, "image_id": [hashlib.sha256(b).hexdigest() for b in blobs], "bytes": blobs,
            "source": [f"blob{i}" for i in range(len(blobs))], "status": ["ok"] * len(blobs),
            "created_at": [now()] * len(blobs)}


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """Twelve ordinary images of varied sizes and formats, one exact duplicate, one broken file."""
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    sizes = [(320, 240), (240, 320), (256, 256), (400, 200), (200, 400), (300, 300),
             (512, 384), (384, 512), (640, 360), (360, 640), (280, 280), (333, 222)]
    for i, (w, h) in enumerate(sizes):
        fmt, ext = ("PNG", "png") if i % 3 == 0 else ("JPEG", "jpg")
        folder = src / "nested" if i % 2 else src
        (folder / f"img{i:02d}.{ext}").write_bytes(encode_image(make_image(w, h, seed=i), fmt))
    (src / "copy_of_img01.jpg").write_bytes((src / "nested" / "img01.jpg").read_bytes())
    (src / "broken.jpg").write_bytes(b"this is not an image")
    return src


@pytest.fixture
def dataset(image_dir, tmp_path):
    """An ingested dataset of `image_dir`."""
    from curate.pipelines.ingest import ingest
    from curate.store import Dataset

    ds = Dataset(tmp_path / "ds", create=True)
    ingest([str(image_dir)], ds, show_progress=False)
    return ds


@pytest.fixture
def rich_dataset(tmp_path):
    """(dataset, what was written): ten real images with a row in every stage table (tests/view_helpers.py)."""
    from curate.pipelines.ingest import ingest
    from curate.store import Dataset
    from tests.view_helpers import add_stage_rows, write_images

    write_images(tmp_path / "src")
    ds = Dataset(tmp_path / "ds", create=True)
    ingest([str(tmp_path / "src")], ds, show_progress=False)
    return ds, add_stage_rows(ds)


@pytest.fixture(scope="session")
def sdxl_base(tmp_path_factory) -> str:
    """The tiny random-weight SDXL pipeline (a base for `curate train`), written once per session."""
    from curate.models.tiny import write_zoo

    return str(write_zoo(tmp_path_factory.mktemp("zoo"), ["sdxl"])["sdxl"])


@pytest.fixture(scope="session")
def ray_cluster(pytestconfig):
    """A real local Ray cluster with two CPUs, shared by the whole test session."""
    import ray

    # Its workers crash for real on files marked for it (curate.images.CRASH_MARKER); this process does not.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"CURATE_TEST_CRASH": "segv"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    # After the whole suite, ray.shutdown() has hung closing its GCS error subscription (seen in a
    # full run). Not reproduced since: not after passes forked from this process that exit, segfault
    # or abort, nor after the test files that use Ray run together, nor after a second cluster
    # started and stopped in this process (test_object_storage). So it gets a minute; then where
    # each thread stands is printed past pytest's capture (output of a passing teardown is
    # dropped), and the cluster's processes are killed so that the session ends.
    stopping = threading.Thread(target=ray.shutdown, daemon=True)
    stopping.start()
    stopping.join(60)
    if stopping.is_alive():
        with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
            print("\nray.shutdown() hung for a minute; the threads of this process:", file=sys.stderr, flush=True)
            faulthandler.dump_traceback(all_threads=True)
            print("the test cluster's processes are killed", file=sys.stderr, flush=True)
        atexit.unregister(ray.shutdown)  # it would wait for the stuck call at exit
        node = ray._private.worker._global_node
        if node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=False)


def run_cli(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
    """Run `curate ARGS` in a fresh process, as a user would (offline, unless `env` says otherwise)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "curate", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"curate {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def port_of(line: str) -> int:
    """The port in a page server's first line, `NAME: http://HOST:PORT/ ...`."""
    match = re.search(r"http://[^:]+:(\d+)/", line)
    assert match, line
    return int(match.group(1))


def listening_addresses(port: int) -> list[str]:
    """Local addresses of TCP sockets listening on `port`, from /proc/net/tcp (hex, little-endian)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for row in open(table).read().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":
                found.append(address)
    return found


def request(port: int, method: str, path: str, body=None, **headers) -> tuple[int, bytes]:
    """One HTTP request to a page server on 127.0.0.1 (JSON body unless told otherwise)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
def in_process(monkeypatch):
    """The local engine's pass in this process, not in the forked one it otherwise watches: for
    tests that count calls in it (a child's counts never come back)."""
    import curate.pipelines.executor as executor

    monkeypatch.setattr(executor, "_can_fork", lambda: False)
