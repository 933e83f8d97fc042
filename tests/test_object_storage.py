"""A dataset and its images in object storage: a real S3 API server on loopback (moto's server
mode), the real `curate` commands against s3:// locations, from ingest to training steps."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CHROMIUM_ARGS, REPO, encode_image, image_rows, make_image, port_of, request, run_cli
from s3_server import S3Server

from curate.models.tiny import write_zoo
from curate.pipelines.executor import run
from curate.pipelines.ingest import ingest
from curate.pipelines.stats import StatsStage
from curate.storage import LOCATOR_COLUMNS, filesystem
from curate.store import Dataset, now

SMALL = "rule:step=64,max_area=65536,min_area=40000"  # ~256x256 buckets: fast on CPU
TRAIN = {"max_steps": 2, "batch_size": 2, "precision": "fp32", "learning_rate": 1e-4, "validate_every": 2,
         "checkpoint_every": 2, "validation_fraction": 0.0}


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        for bucket in ("photos", "data"):
            server.client.create_bucket(Bucket=bucket)
        for i in range(20):  # loose files, and a webdataset shard of four more
            server.client.put_object(Bucket="photos", Key=f"set/{i % 3}/img{i:02d}.jpg",
                                     Body=encode_image(make_image(*[(300, 260), (260, 300), (330, 230)][i % 3],
                                                                  seed=i)))
        shard = io.BytesIO()
        with tarfile.open(fileobj=shard, mode="w") as tar:
            for i in range(4):
                data = encode_image(make_image(280, 280, seed=50 + i), "PNG")
                member = tarfile.TarInfo(f"{i:05d}.png")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        server.client.put_object(Bucket="photos", Key="set/shard-0000.tar", Body=shard.getvalue())
        server.client.put_object(Bucket="photos", Key="set/broken.jpg", Body=b"not an image")
        yield server


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("zoo"), ["open_clip", "vae", "sdxl"])


def curate(s3, *args, **kw):
    return run_cli(*args, env=s3.env, **kw)


def table(location: str, name: str, key: str = "image_id") -> list[dict]:
    return Dataset(location).read(name).drop_columns(["created_at"]).sort_by(key).to_pylist()


def encode_killed_then_rerun(s3, zoo, ds: str) -> int:
    """`curate encode` killed (SIGKILL) once a part is in the bucket, then run again; returns
    how many latent rows the killed run had left."""
    args = [sys.executable, "-m", "curate", "encode", ds, "--vae", str(zoo["vae"]), "--set", SMALL,
            "--batch-size", "2", "--device", "cpu", "-q"]
    env = {**os.environ, **s3.env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "CURATE_PART_ROWS": "2"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not s3.keys("data", "killed/tables/latents/part-") and proc.poll() is None:
        assert time.monotonic() < deadline, "hung"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = len(table(ds, "latents"))
    curate(s3, *args[3:])
    return left


def test_ingest_score_sql_encode_and_train_on_s3(s3, zoo, tmp_path):
    # sources and dataset both in the bucket; --reference: stages read each image from S3 where it is
    proc = curate(s3, "--endpoint-url", s3.url, "ingest", "--reference", "s3://photos/set", "s3://data/killed")
    assert "25" in proc.stdout  # 20 files + 4 members + 1 broken
    ingest(["s3://photos/set/"], Dataset("s3://data/clean", create=True), show_progress=False, reference=True)
    images = table("s3://data/clean", "images", "source")
    member = next(r for r in images if r["source"].endswith("shard-0000.tar::00002.png"))
    assert member["location"] == "s3://photos/set/shard-0000.tar" and member["location_offset"] > 0
    assert {r["error"] for r in images} == {None, "unidentified"}
    assert all(r["bytes"] is None for r in images)

    curate(s3, "score", "s3://data/clean", "--clip", str(zoo["open_clip"]), "--device", "cpu", "-q")
    out = curate(s3, "sql", "s3://data/clean", "SELECT count(*) AS n, count(DISTINCT model) AS models "
                 "FROM embeddings WHERE status = 'ok'", "--format", "json").stdout
    assert json.loads(out) == {"n": 24, "models": 1}

    curate(s3, "encode", "s3://data/clean", "--vae", str(zoo["vae"]), "--set", SMALL, "--batch-size", "2",
           "--device", "cpu", "-q")
    left = encode_killed_then_rerun(s3, zoo, "s3://data/killed")
    assert 0 < left < 24, "the kill should land mid-run"
    assert table("s3://data/killed", "latents") == table("s3://data/clean", "latents")
    assert not any("tmp" in key for key in s3.keys("data"))  # nothing half-written is in the bucket

    config = tmp_path / "train.toml"
    config.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {**TRAIN, "output": str(tmp_path / "run")}
                                .items()))
    curate(s3, "train", "s3://data/killed", "--base", str(zoo["sdxl"]), "--config", str(config), "-q")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x] == [1, 2]


def test_a_missing_bucket_or_dataset_is_one_line(s3):
    proc = curate(s3, "sql", "s3://data/nothing-here", "SELECT 1", check=False)
    assert proc.returncode == 2 and "not a curate dataset" in proc.stdout + proc.stderr


def test_info_names_a_foreign_part_and_quality_fit_asks_where_to_put_the_head(s3):
    ds = Dataset("s3://data/odd", create=True)
    ds.write_part("images", {"image_id": ["a" * 64], "source": ["a.jpg"], "bytes": [b""], "size_bytes": [0],
                             "width": [8], "height": [8], "format": ["JPEG"], "mode": ["RGB"], "animated": [False],
                             "status": ["ok"], "error": [None], "message": [None], "created_at": [now()],
                             **{c: [None] for c in LOCATOR_COLUMNS}})
    fs, path = filesystem("s3://data/odd/tables/tags/part-dropped-here.parquet")
    pq.write_table(pa.table({"x": [1]}), path, filesystem=fs)
    said = curate(s3, "info", "s3://data/odd").stdout
    assert "tables/tags/part-dropped-here.parquet" in said and "Traceback" not in said
    proc = curate(s3, "quality", "fit", "s3://data/odd", check=False)
    assert proc.returncode == 2 and "give -o" in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr


def test_two_ray_nodes_read_an_s3_dataset_and_the_driver_commits(s3):
    """Two Ray nodes on this machine with separate resources, started without any AWS settings:
    the workers reach the bucket with what the driver passes them (--endpoint-url, the keys)."""
    from ray.cluster_utils import Cluster

    for name in ("ray", "one"):  # --copy: the image bytes are in the bucket's parts
        ingest(["s3://photos/set"], Dataset(f"s3://data/{name}", create=True), show_progress=False)
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    try:  # the nodes (and their workers) inherit no AWS settings
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1},
                                                                "include_dashboard": False})
        cluster.add_node(num_cpus=1, resources={"second": 1})
    finally:
        os.environ.update(saved)
    try:
        assert len(cluster.list_all_nodes()) == 2
        env = {k: v for k, v in s3.env.items() if k != "AWS_ENDPOINT_URL"}  # the flag says it
        run_cli("--endpoint-url", s3.url, "hash", "s3://data/ray", "--engine", "ray", "--ray-address",
                cluster.address, "-q", env=env)
    finally:
        cluster.shutdown()
    run(Dataset("s3://data/one"), StatsStage(), show_progress=False)
    ray_rows, local_rows = table("s3://data/ray", "stats"), table("s3://data/one", "stats")
    assert len(ray_rows) == 24 and all(r["status"] == "ok" for r in ray_rows)
    assert ray_rows == local_rows


def test_the_trainer_reads_latent_row_groups_ahead_from_s3(s3, zoo, tmp_path):
    import pyarrow.fs as pafs
    import torch

    from curate.trainer.config import load_config
    from curate.trainer.train import Trainer
    from tests.trainer_helpers import make_latent_dataset

    make_latent_dataset(tmp_path / "ds", 48, rows_per_group=4, latent_parts=4)  # 12 row groups
    pafs.copy_files(str(tmp_path / "ds" / "tables"), "data/latents/tables",
                    destination_filesystem=Dataset("s3://data/latents", create=True).fs)
    settings = dict(batch_size=4, max_steps=12, precision="fp32", validation_fraction=0.0, latent_cache_mib=0.001)
    remote = Trainer("s3://data/latents", str(zoo["sdxl"]), load_config(None, output=str(tmp_path / "a"), **settings))
    local = Trainer(tmp_path / "ds", str(zoo["sdxl"]), load_config(None, output=str(tmp_path / "b"), **settings))
    cache = remote.data.latents
    for micro in range(6):
        batch = remote.build_batch(micro)[0]
        wanted = {(r.part, r.row_group) for m in range(micro + 1, micro + 5)
                  for r in (remote.data.rows[i] for i in remote.data.batch_at(m)[1])}
        # the groups of the next batches are on their way while this one trains (a cache of one group)
        assert set(cache.ahead) and set(cache.ahead) <= wanted
        assert torch.equal(batch["latents"], local.build_batch(micro)[0]["latents"])
    assert max(cache.reads.values()) <= 2  # read ahead, then used: not read again and again



def test_ray_train_workers_read_latents_from_s3(s3, zoo, tmp_path):
    """Two Ray Train workers (`curate train --workers 2` starts its own Ray) read an s3:// dataset."""
    import pyarrow.fs as pafs

    from tests.trainer_helpers import make_latent_dataset

    make_latent_dataset(tmp_path / "ds", 8)
    pafs.copy_files(str(tmp_path / "ds" / "tables"), "data/ray-train/tables",
                    destination_filesystem=Dataset("s3://data/ray-train", create=True).fs)
    config = tmp_path / "train.toml"
    config.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {**TRAIN, "output": str(tmp_path / "run")}
                                .items()))
    curate(s3, "train", "s3://data/ray-train", "--base", str(zoo["sdxl"]), "--config", str(config), "--workers", "2",
           "-q")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == "0 -> 2"


def test_report_and_view_of_an_s3_dataset(s3, chromium, tmp_path):
    """Copied and referenced images, every stage table, all in the bucket: the report renders
    offline, the view serves grid, thumbnails and images, and an edit becomes a row of the
    remote `edits` table that `curate sql`'s manifest applies. Caches stay on this machine."""
    from playwright.sync_api import sync_playwright

    from tests.view_helpers import add_stage_rows, write_images

    ds = Dataset("s3://data/pages", create=True)
    write_images(tmp_path / "src", n=6)
    ingest([str(tmp_path / "src")], ds, show_progress=False)  # copied: the bytes are in the bucket's parts
    ingest(["s3://photos/set/1/"], ds, show_progress=False, reference=True)  # read from the bucket where they are
    written = add_stage_rows(ds)
    referenced = written["ids"][written["sources"].index("s3://photos/set/1/img01.jpg")]
    env = {**s3.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}

    out = tmp_path / "report.html"
    said = run_cli("report", "s3://data/pages", "-o", str(out), env=env).stdout
    assert "│ images     │ 13 " in said  # 6 copied + 7 referenced
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.as_uri())
            page.wait_for_load_state("networkidle")
            assert [u for u in requests if not u.startswith("data:")] == [out.as_uri()]  # nothing else, ever
            assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator(".pic svg rect").count() == sum(written["marked"])
            assert "unidentified: 1" in page.inner_text("body")  # the broken file's error row

            view = subprocess.Popen([sys.executable, "-m", "curate", "view", "s3://data/pages", "--port", "0"],
                                    env={**os.environ, "PYTHONPATH": str(REPO), **env}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            try:
                line = view.stdout.readline()
                assert line.startswith("view: http://127.0.0.1:"), view.stderr.read() if view.poll() else line
                port = port_of(line)
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_function("() => document.querySelectorAll('.tile img').length === 13 && [...document"
                                       ".querySelectorAll('.tile img')].every(i => i.complete && i.naturalWidth > 0)")
                status, body = request(port, "GET", f"/image/{referenced}")
                assert status == 200 and body == s3.client.get_object(Bucket="photos", Key="set/1/img01.jpg")[
                    "Body"].read()
                status, body = request(port, "POST", "/api/edit", {"action": "exclude", "ids": [referenced]})
                assert status == 200, body
            finally:
                view.kill()
                view.communicate()
        finally:
            browser.close()

    edits = Dataset("s3://data/pages").read("edits").to_pylist()
    assert [(e["image_id"], e["action"]) for e in edits] == [(referenced, "exclude")]
    manifest = Dataset("s3://data/pages").sql("SELECT image_id FROM manifest", rows=True).rows  # as `curate sql`
    assert len(manifest) == 12 and (referenced,) not in manifest
    # the bucket holds the dataset's tables only: the join and the thumbnails are in the local cache
    assert [key for key in s3.keys("data", "pages/") if not key.startswith("pages/tables/")] == ["pages/"]
    assert len(list((tmp_path / "cache" / "curate").rglob("thumbs/*/*.jpg"))) == 13


# Arrow uploads an object over 10 MiB as a multipart upload in parts of 10 MiB (kPartUploadSize in its
# C++ code; pyarrow has no setting for it), a smaller one as one PutObject.
MULTIPART = 12 << 20


def test_a_part_over_the_multipart_size_uploads_in_parts_and_reads_back_equal(s3):
    ds = Dataset("s3://data/multipart", create=True)
    rows = image_rows([MULTIPART])
    part = ds.write_part("images", rows)
    etag = s3.client.head_object(Bucket="data", Key=part[len("s3://data/"):])["ETag"]
    assert etag.endswith('-2"')  # a multipart upload's ETag says its number of parts
    assert ds.read("images", ["bytes"]).column("bytes").to_pylist() == rows["bytes"]


def test_a_killed_multipart_upload_leaves_no_part(s3):
    """Killed after its multipart upload began (five parts to go), a writer leaves nothing a reader
    lists: only the upload's pieces, which S3 never shows as an object."""
    child = ("from conftest import image_rows; from curate.store import Dataset; "
             f"Dataset('s3://data/killed-upload', create=True).write_part('images', image_rows([{4 * MULTIPART}]))")
    proc = subprocess.Popen([sys.executable, "-c", child], env={**os.environ, **s3.env, "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "tests")])}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not s3.client.list_multipart_uploads(Bucket="data", Prefix="killed-upload/").get("Uploads"):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no upload began"
        time.sleep(0.005)
    proc.kill()
    proc.communicate()
    assert not [key for key in s3.keys("data", "killed-upload/") if "part-" in key]
    assert s3.client.list_multipart_uploads(Bucket="data", Prefix="killed-upload/")["Uploads"]  # its pieces
    assert Dataset("s3://data/killed-upload").read("images").num_rows == 0


class RefusingProxy:
    """A loopback HTTP proxy before the S3 server that refuses the requests `refuse(method, path)`
    picks (403 AccessDenied, which the client does not retry) and passes every other one on."""

    def __init__(self, upstream: str, refuse):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        target = urlsplit(upstream).netloc

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def answer(self):
                import http.client

                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if refuse(self.command, self.path):
                    status, headers, data = 403, [], b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>"
                else:
                    conn = http.client.HTTPConnection(target, timeout=30)
                    conn.request(self.command, self.path, body, dict(self.headers))
                    reply = conn.getresponse()
                    status, headers, data = reply.status, reply.getheaders(), reply.read()
                    conn.close()
                self.send_response(status)
                length = len(data)
                for name, value in headers:
                    if name.lower() == "content-length":
                        length = int(value)  # a HEAD's: the object's size, with no body
                    elif name.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_failed_upload_raises_and_leaves_no_part(s3, monkeypatch):
    """A part whose upload fails is an error, never a part the writer takes for published and never
    an object a reader lists."""
    from curate.store import DatasetError

    # pyarrow's copy_files, which uploaded parts before, dropped such a failure: it returned as if done
    s3.client.create_bucket(Bucket="gone")
    ds = Dataset("s3://gone/ds", create=True)
    for key in s3.keys("gone"):
        s3.client.delete_object(Bucket="gone", Key=key)
    s3.client.delete_bucket(Bucket="gone")
    with pytest.raises(DatasetError, match="cannot write a part of images"):
        ds.write_part("images", image_rows([1000]))

    # The multipart upload cannot begin: Arrow's stream, closed after the failed write, puts what it
    # holds (nothing) under the part's name; an empty "part" would make the table unreadable.
    with RefusingProxy(s3.url, lambda method, path: method == "POST" and path.endswith("?uploads")) as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        with pytest.raises(DatasetError, match="CreateMultipartUpload"):
            Dataset("s3://data/refused", create=True).write_part("images", image_rows([MULTIPART]))
    assert not [key for key in s3.keys("data", "refused/") if "part-" in key]
    assert Dataset("s3://data/refused").read("images").num_rows == 0
