"""Latents: `curate encode`: bucket geometry, bitwise-direct encoding, resume, engines, mixed VAEs."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torchvision.transforms import Normalize
from torchvision.transforms.functional import to_tensor

from curate.buckets import parse_bucket_set
from curate.models.common import model_name
from curate.models.vae import Vae, load_vae
from curate.pipelines.encode import EncodeStage, image_seed, seeded_noise
from curate.pipelines.executor import run
from curate.store import Dataset
from tests.conftest import REPO, encode_image, make_image, run_cli

SMALL = "rule:step=64,max_area=65536,min_area=40000"  # 128x512 .. 256x256 .. 512x128: fast on CPU
COLUMNS = ["image_id", "model", "status", "error", "latent", "shape", "original_height", "original_width",
           "resized_height", "resized_width", "crop_top", "crop_left", "target_height", "target_width", "vae"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from curate.models.tiny import write_zoo

    return str(write_zoo(tmp_path_factory.mktemp("zoo"), ["vae"])["vae"])


def ingest(tmp_path, images: dict) -> Path:
    src, ds = tmp_path / "src", tmp_path / "ds"
    src.mkdir()
    for name, img in images.items():
        (src / name).write_bytes(encode_image(img, "PNG" if name.endswith(".png") else "JPEG",
                                              **({} if name.endswith(".png") else {"quality": 95})))
    run_cli("ingest", str(src), str(ds), "-q")
    return ds


def latents(ds) -> dict:
    return {r["image_id"]: r for r in Dataset(ds).read("latents").select(COLUMNS).to_pylist()}


def gradient(width: int, height: int) -> Image.Image:
    """Red grows with x, green with y: any pixel says where in the source it came from."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), np.full_like(x, 128)], -1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def test_stored_latent_equals_encoding_the_crop_directly(tmp_path, vae_dir):
    ds = ingest(tmp_path, {"wide.png": make_image(360, 200, 1), "tall.png": make_image(150, 420, 2),
                           "tiny.png": make_image(100, 100, 3)})
    run_cli("encode", str(ds), "--vae", vae_dir, "--set", SMALL, "--seed", "3", "--keep-distribution", "-q")
    rows = Dataset(ds).query("SELECT l.*, i.source FROM latents l JOIN images i USING (image_id)").to_pylist()
    by_name = {Path(r["source"]).stem: r for r in rows}
    assert by_name["tiny"]["error"] == "too_small" and "100x100" in by_name["tiny"]["message"]
    wide, tall = by_name["wide"], by_name["tall"]
    # 360x200 -> bucket 320x192 (w x h): scaled to 346x192, cut along the width only
    assert (wide["original_width"], wide["original_height"]) == (360, 200)
    assert (wide["resized_width"], wide["resized_height"],
            wide["target_width"], wide["target_height"]) == (346, 192, 320, 192)
    assert wide["crop_top"] == 0 and 0 < wide["crop_left"] <= 26
    # 150x420 -> bucket 128x384: scaled to 137x384, cut along the width
    assert (tall["original_width"], tall["original_height"],
            tall["target_width"], tall["target_height"]) == (150, 420, 128, 384)
    assert list(wide["shape"]) == [4, 192 // 8, 320 // 8] and list(tall["shape"]) == [4, 384 // 8, 128 // 8]

    vae, _ = load_vae(Vae(vae_dir), "cpu")
    threads = torch.get_num_threads()
    # as encode runs on CPU, on every core: the thread count changes conv rounding
    torch.set_num_threads(EncodeStage([Vae(vae_dir)], parse_bucket_set(SMALL)).resources.cpus)
    try:
        check_direct_encoding(vae, vae_dir, [wide, tall])
    finally:
        torch.set_num_threads(threads)


def check_direct_encoding(vae, vae_dir, rows):
    for r in rows:
        img = Image.open(r["source"]).convert("RGB").resize((r["resized_width"], r["resized_height"]),
                                                            Image.Resampling.LANCZOS)
        img = img.crop((r["crop_left"], r["crop_top"], r["crop_left"] + r["target_width"],
                        r["crop_top"] + r["target_height"]))
        x = Normalize([0.5], [0.5])(to_tensor(img))[None]  # the usual way, as diffusers' training scripts do
        x = torch.cat([x, torch.full((7, *x.shape[1:]), -1.0)])  # in a batch of 8 (the default), padded black
        with torch.inference_mode():
            dist = vae.encode(x).latent_dist
        shape = tuple(r["shape"])
        assert np.array_equal(np.frombuffer(r["mean"], np.float16).reshape(shape), dist.mean[0].half().numpy())
        sample = dist.mean[0] + dist.std[0] * seeded_noise(shape, image_seed(3, r["image_id"], "noise"))
        assert np.array_equal(np.frombuffer(r["latent"], np.float16).reshape(shape), sample.half().numpy())
        assert r["scaling_factor"] == pytest.approx(0.13025) and r["vae"] == f"{model_name(vae_dir)}@fp32"


@pytest.mark.parametrize("size", [(1600, 900), (900, 1600)])
def test_crop_box_maps_back_to_the_source_region(size):
    """A JPEG big enough for draft decoding: the pixels fed to the VAE are the stored box of the source."""
    width, height = size
    source = gradient(width, height)
    stage = EncodeStage([Vae("unused")], parse_bucket_set("sd15"), seed=7)
    image_id = "ab" * 32
    p = stage.prepare({"image_id": image_id, "bytes": encode_image(source, "JPEG", quality=95),
                       "width": width, "height": height})
    th, tw = p["target_height"], p["target_width"]
    assert p["pixels"].shape == (th, tw, 3) and (tw > th) == (width > height)
    assert max(p["crop_top"], p["crop_left"]) > 0  # the crop moved along the long side
    from curate.buckets import Crop

    crop = Crop(p["resized_width"], p["resized_height"], p["crop_left"], p["crop_top"], tw, th)
    box = crop.source_box(width, height)
    expected = np.asarray(source.crop(tuple(round(v) for v in box)).resize((tw, th), Image.Resampling.LANCZOS),
                          np.float32)
    assert np.abs(p["pixels"].astype(np.float32) - expected).mean() < 2.0
    # the gradient itself says where the crop starts: red is x, green is y
    assert p["pixels"][:, :4, 0].mean() == pytest.approx(box[0] / (width - 1) * 255, abs=3)
    assert p["pixels"][:4, :, 1].mean() == pytest.approx(box[1] / (height - 1) * 255, abs=3)


def test_kill_9_mid_encode_then_rerun_equals_an_uninterrupted_run(tmp_path, vae_dir):
    images = {f"img{i:02d}.jpg": make_image(*[(300, 260), (260, 300), (520, 140), (270, 270)][i % 4], seed=i)
              for i in range(24)}
    ds = ingest(tmp_path, images)
    clean = tmp_path / "clean"
    shutil.copytree(ds, clean)
    args = ["encode", str(ds), "--vae", vae_dir, "--set", SMALL, "--batch-size", "4", "-q"]
    # The same command, with parts written every 4 rows so a kill lands between parts.
    code = ("import sys, curate.store as s; s.PART_ROWS = 4; sys.argv = ['curate'] + sys.argv[1:]; "
            "from curate.cli.app import app; app()")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    parts = ds / "tables" / "latents"
    deadline = time.monotonic() + 120
    while not list(parts.glob("part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = latents(ds)
    assert 0 < len(partial) < 24, "the kill should land mid-run"
    run_cli(*args)
    run(Dataset(clean), EncodeStage([Vae(vae_dir)], parse_bucket_set(SMALL), batch_size=4), show_progress=False)[0]
    resumed, uninterrupted = latents(ds), latents(clean)
    assert Dataset(ds).read("latents").num_rows == 24  # nothing was encoded twice
    assert resumed.keys() == uninterrupted.keys()
    for image_id, row in uninterrupted.items():
        assert row["status"] == "ok"
        assert resumed[image_id] == row


def test_ray_engine_writes_the_same_latents(dataset, vae_dir, ray_cluster):
    stage = EncodeStage([Vae(vae_dir)], parse_bucket_set(SMALL), crop="center", batch_size=4)
    local = run(dataset, stage, show_progress=False)[0]
    assert local.ok == 12
    first = latents(dataset.root)
    for part in dataset.parts("latents"):
        part.unlink()
    summary = run(dataset, EncodeStage([Vae(vae_dir)], parse_bucket_set(SMALL), crop="center", batch_size=4),
                        engine="ray", show_progress=False)[0]
    assert summary.ok == 12 and latents(dataset.root) == first


def test_mixed_vaes_and_nan_latents(tmp_path, vae_dir):
    from safetensors.torch import load_file, save_file

    ds = ingest(tmp_path, {f"i{i}.png": make_image(280, 280, seed=i) for i in range(8)})
    pipeline = tmp_path / "pipeline"  # a full diffusers pipeline directory: the VAE is in vae/
    shutil.copytree(vae_dir, pipeline / "vae")
    (pipeline / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    mixed = EncodeStage([Vae(vae_dir), Vae(str(pipeline), "bf16")], parse_bucket_set(SMALL), batch_size=8)
    mixed.process = _one_vae_per_batch(mixed.process)
    run(Dataset(ds), mixed, show_progress=False)[0]
    rows = latents(ds)
    assert all(r["status"] == "ok" for r in rows.values())
    assert {r["vae"] for r in rows.values()} == {f"{model_name(vae_dir)}@fp32", f"{model_name(str(pipeline))}@bf16"}
    # A VAE whose outputs overflow float16: every latent is rejected with a reason, none stored.
    broken = tmp_path / "broken"
    shutil.copytree(vae_dir, broken)
    weights = load_file(broken / "diffusion_pytorch_model.safetensors")
    weights = {k: v * 1e6 if k.startswith("encoder.conv_out") else v for k, v in weights.items()}
    save_file(weights, broken / "diffusion_pytorch_model.safetensors")
    run_cli("encode", str(ds), "--vae", str(broken), "--set", SMALL, "-q")
    bad = [r for r in Dataset(ds).read("latents").to_pylist()
           if r["model"].startswith(f"vae:{model_name(str(broken))}@")]
    assert len(bad) == 8 and {r["error"] for r in bad} == {"bad_output"} and all(r["latent"] is None for r in bad)
    assert "NaN or Inf" in bad[0]["message"]


def _one_vae_per_batch(process):
    def checked(batch):
        assert len(set(batch["vae_index"])) == 1
        return process(batch)
    return checked


def test_bad_options_say_what_would_be_right(dataset, vae_dir):
    ds = str(dataset.root)
    for args, says in [(["--vae", vae_dir, "--crop", "diagonal"], "random"),
                       (["--vae", vae_dir, "--mixed-vae", vae_dir], "exactly one of --vae"),
                       (["--vae", vae_dir + "@fp8"], "use fp32, fp16, bf16"),
                       (["--vae", str(dataset.root)], "holds no VAE"),
                       (["--vae", vae_dir, "--set", "sd16"], "sdxl, sd15")]:
        proc = run_cli("encode", ds, *args, check=False)
        assert proc.returncode == 2 and says in " ".join(proc.stderr.split()), (args, proc.stderr)


def test_latent_parts_stream_in_row_groups_of_bounded_size(tmp_path):
    """SDXL 1024x1024 latents are 128 KiB each: a part of 600 holds several row groups, each <= ~32 MiB."""
    import pyarrow.parquet as pq

    from curate.schema import SCHEMAS
    from curate.store import ROW_GROUP_BYTES, now

    ds = Dataset(tmp_path / "ds", create=True)
    n = 600
    rows = {f.name: [None] * n for f in SCHEMAS["latents"]}
    rows.update(image_id=[str(i) for i in range(n)], model=["m"] * n, status=["ok"] * n, created_at=[now()] * n,
                latent=[np.random.default_rng(i).standard_normal(4 * 128 * 128).astype(np.float16).tobytes()
                        for i in range(n)])
    meta = pq.read_metadata(ds.write_part("latents", rows))
    assert meta.num_row_groups >= 3
    assert all(meta.row_group(k).total_byte_size <= ROW_GROUP_BYTES * 1.1 for k in range(meta.num_row_groups))


def test_latents_stream_back_one_row_group_at_a_time(tmp_path):
    from curate.latents import latent_array, latent_row_groups
    from curate.schema import SCHEMAS
    from curate.store import ROW_GROUP_BYTES, now

    ds = Dataset(tmp_path / "ds", create=True)
    n, shape = 300, [4, 128, 128]
    values = [np.full(shape, i % 7, np.float16) for i in range(n)]
    rows = {f.name: [None] * n for f in SCHEMAS["latents"]}
    rows.update(image_id=[f"{i:04d}" for i in range(n)], model=["a" if i % 3 else "b" for i in range(n)],
                status=["error" if i == 5 else "ok" for i in range(n)], created_at=[now()] * n,
                latent=[v.tobytes() for v in values], shape=[shape] * n, original_height=list(range(n)))
    ds.write_part("latents", rows)
    groups = list(latent_row_groups(ds, model="a"))
    assert len(groups) > 1 and all(g.nbytes <= ROW_GROUP_BYTES * 1.1 for g in groups)
    got = pa.concat_tables(groups).to_pylist()
    assert [r["image_id"] for r in got] == [f"{i:04d}" for i in range(n) if i % 3 and i != 5]
    for r in got:
        i = int(r["image_id"])
        assert r["original_height"] == i and np.array_equal(latent_array(r["latent"], r["shape"]), values[i])


def test_a_bucket_is_encoded_a_batch_at_a_time_and_a_latent_does_not_depend_on_its_batch(tmp_path, vae_dir,
                                                                                        monkeypatch, in_process):
    from diffusers import AutoencoderKL

    images = {f"img{i}.jpg": make_image(*[(300, 260), (520, 140)][i % 2], seed=i) for i in range(6)}
    ds = ingest(tmp_path, images)
    halves = tmp_path / "halves"
    shutil.copytree(ds, halves)
    sizes, encode = [], AutoencoderKL.encode

    def counted(self, x, *args, **kw):
        sizes.append(len(x))
        return encode(self, x, *args, **kw)

    monkeypatch.setattr(AutoencoderKL, "encode", counted)
    stage = lambda: EncodeStage([Vae(vae_dir)], parse_bucket_set(SMALL), batch_size=4)  # noqa: E731
    assert run(Dataset(ds), stage(), show_progress=False)[0].ok == 6
    assert sizes == [4, 4]  # two buckets of three: one call each, padded to the batch size
    # other batch-mates and other short batches: the same bits
    half = sorted(Dataset(halves).select_ids())[:3]
    run(Dataset(halves), stage(), ids=half, show_progress=False)
    run(Dataset(halves), stage(), show_progress=False)
    assert latents(halves) == latents(ds)


def test_flip_stores_the_mirrored_crops_latent_with_its_own_crop_conditioning(tmp_path, vae_dir):
    """`--flip`: the flipped latent is the VAE's encoding of the mirrored crop, whose left edge in
    the flipped resized image is flip_crop_left (the crop's right edge, seen from the other side)."""
    ds = ingest(tmp_path, {"wide.png": gradient(360, 200)})
    run_cli("encode", str(ds), "--vae", vae_dir, "--set", SMALL, "--seed", "3", "--keep-distribution", "--flip", "-q")
    (r,) = Dataset(ds).query("SELECT l.*, i.source FROM latents l JOIN images i USING (image_id)").to_pylist()
    assert r["model"].endswith(",flip=true")
    assert r["flip_crop_left"] == r["resized_width"] - r["crop_left"] - r["target_width"] and r["crop_left"] > 0
    resized = Image.open(r["source"]).convert("RGB").resize((r["resized_width"], r["resized_height"]),
                                                            Image.Resampling.LANCZOS)
    crop = resized.crop((r["crop_left"], r["crop_top"], r["crop_left"] + r["target_width"],
                         r["crop_top"] + r["target_height"]))
    left, top = r["flip_crop_left"], r["crop_top"]
    mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop(
        (left, top, left + r["target_width"], top + r["target_height"]))
    assert np.array_equal(np.asarray(mirrored), np.asarray(crop)[:, ::-1])  # the conditioning points at the mirror
    vae, _ = load_vae(Vae(vae_dir), "cpu")
    with torch.inference_mode():
        dist = vae.encode(Normalize([0.5], [0.5])(to_tensor(mirrored))[None]).latent_dist
    # equal up to float16 rounding: the stage encodes a padded batch on every core, this one image
    shape, close = tuple(r["shape"]), dict(rtol=0, atol=2e-3)
    assert np.allclose(np.frombuffer(r["flip_mean"], np.float16).reshape(shape), dist.mean[0].numpy(), **close)
    sample = dist.mean[0] + dist.std[0] * seeded_noise(shape, image_seed(3, r["image_id"], "flip-noise"))
    assert np.allclose(np.frombuffer(r["flip_latent"], np.float16).reshape(shape), sample.numpy(), **close)
    assert not np.array_equal(np.frombuffer(r["flip_latent"], np.float16), np.frombuffer(r["latent"], np.float16))
