"""A full disk and a read-only dataset, for real: each scenario runs in a mount namespace of
its own (unshare), on a small tmpfs or a read-only bind mount, so nothing outside it changes."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, encode_image, make_image, need

from curate.store import Dataset

CURATE = f"{sys.executable} -m curate"


def private_mounts(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a bash script as root of a mount namespace of its own; skip (fail in CI) where
    this machine allows none."""
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare[1:1] = ["--user", "--map-root-user"]
    probe = subprocess.run([*unshare, "true"], capture_output=True) if shutil.which("unshare") else None
    need(probe is not None and probe.returncode == 0, "no private mount namespaces here (unshare --mount); "
                                                      "the disk-full and read-only tests need one")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "CURATE_PART_ROWS": "8", "COLUMNS": "200"}
    return subprocess.run([*unshare, "bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    src = tmp_path_factory.mktemp("disk") / "src"
    src.mkdir()
    for i in range(40):
        (src / f"p{i:02d}.jpg").write_bytes(encode_image(make_image(420, 300, seed=i), "JPEG", quality=95))
    return src


def rows(ds_dir) -> list[dict]:
    return Dataset(ds_dir).read("images").drop_columns(["created_at"]).sort_by("source").to_pylist()


def test_disk_full_mid_ingest_is_one_line_and_a_rerun_completes(photos, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "curate", "ingest", str(photos), str(reference), "-q"], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO), "CURATE_PART_ROWS": "8"}, capture_output=True)
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    proc = private_mounts(f"""
        mount -t tmpfs -o size=400k tmpfs {mnt}
        set +e
        {CURATE} ingest {photos} {mnt}/ds -q > {out}/stdout 2> {out}/stderr
        echo $? > {out}/rc
        set -e
        ls -a {mnt}/ds/tables/images > {out}/listing
        cp -a {mnt}/ds {out}/full                      # as the full disk left it
        mount -o remount,size=20m {mnt}                # space freed
        {CURATE} ingest {photos} {mnt}/ds -q > /dev/null
        cp -a {mnt}/ds {out}/after
    """)
    assert proc.returncode == 0, proc.stderr
    stderr = (out / "stderr").read_text()
    assert (out / "rc").read_text().strip() != "0"
    assert stderr.startswith("error: the disk is full: no space left writing a part of images in ")
    assert "MiB free" in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 3, stderr
    assert not [n for n in (out / "listing").read_text().split() if n.startswith(".tmp-")], "a partial part stayed"
    partial = Dataset(out / "full").read("images")
    assert 0 < partial.num_rows < 40  # parts before the disk filled are whole and readable
    assert rows(out / "after") == rows(reference)


def test_failed_manifest_refresh_keeps_the_old_file_and_sql_still_answers(photos, tmp_path):
    ds = tmp_path / "ds"
    subprocess.run([sys.executable, "-m", "curate", "ingest", str(photos), str(ds), "-q"], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    proc = private_mounts(f"""
        mount -t tmpfs -o size=8m tmpfs {mnt}
        cp -a {ds} {mnt}/ds
        {CURATE} sql {mnt}/ds "SELECT 1" > /dev/null
        sha256sum {mnt}/ds/manifest.duckdb > {out}/before
        dd if=/dev/zero of={mnt}/filler bs=64k 2> /dev/null || true   # the disk is now full
        {CURATE} sql {mnt}/ds "SELECT count(*) AS n FROM manifest" --format csv > {out}/stdout 2> {out}/stderr
        sha256sum {mnt}/ds/manifest.duckdb > {out}/after
        ls -a {mnt}/ds > {out}/listing
    """)
    assert proc.returncode == 0, proc.stderr
    assert (out / "stdout").read_text().split() == ['"n"', "40"]
    assert "manifest.duckdb was not refreshed" in (out / "stderr").read_text()
    assert (out / "before").read_text() == (out / "after").read_text()
    assert not [n for n in (out / "listing").read_text().split() if n.startswith(".tmp-")]


def test_read_only_dataset_answers_sql_info_and_dups(photos, tmp_path):
    ds = tmp_path / "ds"
    subprocess.run([sys.executable, "-m", "curate", "ingest", str(photos), str(ds), "-q"], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    out = tmp_path / "out"
    out.mkdir()
    proc = private_mounts(f"""
        mount --bind {ds} {ds}
        mount -o remount,bind,ro {ds}
        {CURATE} sql {ds} "SELECT count(*) AS n FROM manifest" --format csv > {out}/sql 2> {out}/sql.err
        {CURATE} info {ds} --format json > {out}/info
        {CURATE} dups {ds} --format csv > {out}/dups
        {CURATE} report {ds} -o {out}/report.html 2> {out}/report.err > /dev/null  # joins in memory: no DS/cache
        set +e
        {CURATE} hash {ds} -q 2> {out}/hash.err
        echo $? > {out}/hash.rc
    """)
    assert proc.returncode == 0, proc.stderr
    assert (out / "sql").read_text().split() == ['"n"', "40"]
    assert "Traceback" not in (out / "sql.err").read_text()
    info = [json.loads(line) for line in (out / "info").read_text().splitlines()]
    assert info[0]["table"] == "images" and info[0]["rows"] == 40
    assert (out / "dups").read_text().startswith('"group"')
    assert "40 images" in (out / "report.html").read_text() and not (ds / "cache").exists()
    hash_err = (out / "hash.err").read_text()
    assert (out / "hash.rc").read_text().strip() == "2" and "Read-only file system" in hash_err
    assert "Traceback" not in hash_err
