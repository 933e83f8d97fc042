"""Captioning with tiny random-weight models of every scheme's architecture through the real
transformers loader, and caption cleanup."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pytest

from curate.images import decode
from curate.models.captioner import SpecError, make_captioner, parse_spec
from curate.models.common import ModelError
from curate.pipelines.caption import CaptionStage, clean_caption, garbage_reason
from curate.pipelines.executor import run
from tests.conftest import REPO, encode_image, make_image, run_cli


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    from curate.models.tiny import write_zoo

    return write_zoo(tmp_path_factory.mktemp("zoo"), ["llava"])["llava"]


# ---- cleanup -------------------------------------------------------------------------
@pytest.mark.parametrize("raw, clean", [
    ("The image shows a woman standing in a kitchen.", "A woman standing in a kitchen."),
    ("Sure! Here is a detailed description of the image:\n\nThis is a picture of a red car at night.",
     "A red car at night."),
    ("In this image, we can see   two dogs\n on a   beach.", "Two dogs on a beach."),
    ("This photograph depicts a quiet street. A bus waits.", "A quiet street. A bus waits."),
    ("A cat sleeps on a sofa. There is a lamp behind it and the", "A cat sleeps on a sofa."),  # cut by the token limit
    ("a red car parked on a street", "A red car parked on a street"),  # no sentence end at all: kept whole
    ('"An old man reading."', "An old man reading."),
])
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_long_captions_are_cut_at_a_sentence_end():
    raw = "A woman stands in a kitchen. There is a desk in the background. A flower is on the desk."
    assert clean_caption(raw, max_chars=70) == "A woman stands in a kitchen. There is a desk in the background."
    assert clean_caption(raw, max_chars=20) == "A woman stands in a"  # no sentence fits: whole words
    assert len(clean_caption(raw, max_chars=20)) <= 20


@pytest.mark.parametrize("text, bad", [("", True), ("!!! ... ???", True), ("\ufffd\ufffd a", True),
                                       ("#$%^&*()_+ a", True), ("A dog.", False),
                                       ("On pink pink pink pink pink pink pink pink.", True),
                                       ("A dog and a cat and a bird and a horse on a field.", False)])
def test_garbage_is_recognised(text, bad):
    assert (garbage_reason(text) is not None) == bad


def test_model_specs():
    assert str(parse_spec("openai:http://h:1/v1/#org/model")) == "openai:http://h:1/v1#org/model"
    assert parse_spec("moondream:vikhyatk/moondream2").revision == "2025-01-09"
    assert parse_spec("llava:llava-hf/llava-1.5-7b-hf@main").revision == "main"
    for bad in ["llava", "llava:", "blip:x", "openai:http://h/v1", "openai:h:1#m"]:
        with pytest.raises(SpecError, match="--model"):
            parse_spec(bad)
    for scheme in ("vllm:org/m", "llava:org/m"):  # every backend refuses a bad --dtype before loading
        with pytest.raises(ModelError, match="bad --dtype 'fp8': use auto, float32, float16 or bfloat16"):
            CaptionStage(scheme, None, 8, dtype="fp8")


def test_prompt_is_part_of_the_model_key(tiny_llava):
    a = CaptionStage(f"llava:{tiny_llava}", "Describe.", 8)
    assert a.model_key() != CaptionStage(f"llava:{tiny_llava}", "Describe briefly.", 8).model_key()
    assert a.model_key() != CaptionStage(f"llava:{tiny_llava}", "Describe.", 9).model_key()
    assert a.model_key() == CaptionStage(f"llava:{tiny_llava}", "Describe.", 8, batch_size=3, device="cpu").model_key()


# ---- the tiny LLaVA --------------------------------------------------------------------
def test_batched_captions_equal_unbatched(tiny_llava):
    captioner = make_captioner(parse_spec(f"llava:{tiny_llava}"), max_new_tokens=12)
    captioner.load("cpu")
    images = [captioner.preprocess(decode(encode_image(make_image(60 + 17 * i, 90 - 9 * i, seed=i), "PNG")))["input"]
              for i in range(6)]
    # prompts of different lengths, so the batch really is left-padded
    prompts = ["Describe the image.", "Write a long detailed description of this picture.", "Caption."] * 2
    batched = captioner.caption(images, prompts)
    assert captioner.generated_tokens > 0
    one_by_one = [captioner.caption([image], [prompt])[0] for image, prompt in zip(images, prompts)]
    assert batched == one_by_one
    assert all(isinstance(c, str) for c in batched) and len(set(batched)) > 1  # the image matters


@pytest.fixture(scope="session")
def vlm_zoo(tmp_path_factory):
    from curate.models.tiny import write_zoo

    return write_zoo(tmp_path_factory.mktemp("vlm"), ["llava_next", "qwen2_5_vl", "smolvlm", "florence2", "joycaption"])


@pytest.mark.parametrize("scheme, name", [("hf", "llava_next"), ("hf", "qwen2_5_vl"), ("hf", "smolvlm"),
                                          ("florence2", "florence2"), ("joycaption", "joycaption")])
def test_every_caption_scheme_batches_as_it_captions_one_by_one(vlm_zoo, scheme, name):
    """Each scheme on a tiny random model of its own architecture (transformers' config classes,
    the published processor layout): a batch of differently sized images and prompts of
    different lengths (padded) gives each image the caption it gets alone."""
    captioner = make_captioner(parse_spec(f"{scheme}:{vlm_zoo[name]}"), max_new_tokens=10)
    captioner.load("cpu")
    images = [captioner.preprocess(decode(encode_image(make_image(60 + 17 * i, 90 - 9 * i, seed=i), "PNG")))["input"]
              for i in range(6)]
    prompts = (["<MORE_DETAILED_CAPTION>", "<CAPTION>", "<DETAILED_CAPTION>"] if scheme == "florence2" else
               ["Describe the image.", "Write a long detailed description of this picture.", "Caption."]) * 2
    processor = captioner._processor
    lengths = {processor(images=[[images[0]]], text=[captioner.prompt_text(p)], return_tensors="pt")["input_ids"]
               .shape[1] for p in prompts}
    assert len(lengths) > 1  # the batch is padded
    batched = captioner.caption(images, prompts)
    one_by_one = [captioner.caption([image], [prompt])[0] for image, prompt in zip(images, prompts)]
    assert batched == one_by_one
    assert all(isinstance(c, str) and c.strip() for c in batched) and len(set(batched)) > 1


@pytest.fixture
def demo_dataset(tmp_path):
    """The demo's image set (odd modes, animated, EXIF-rotated, broken files), small."""
    from curate.cli.demo import write_demo_images
    from curate.pipelines.ingest import ingest
    from curate.store import Dataset

    write_demo_images(tmp_path / "demo", n=24)
    ds = Dataset(tmp_path / "demo-ds", create=True)
    ingest([str(tmp_path / "demo")], ds, show_progress=False)
    return ds


def test_caption_command_on_the_demo_set_records_prompt_and_resumes(demo_dataset, tiny_llava, tmp_path):
    ds, model = demo_dataset, f"llava:{tiny_llava}"
    ids = ds.select_ids()
    run_cli("caption", str(ds.root), "--model", model, "--prompt", "Describe the image.",
            "--max-new-tokens", "10", "--batch-size", "8", "-q")
    rows = ds.read("captions").to_pylist()
    assert len(ids) >= 20 and sorted(r["image_id"] for r in rows) == ids  # every ok image, once
    assert {r["prompt"] for r in rows} == {"Describe the image."}
    assert sum(r["status"] == "ok" for r in rows) >= len(ids) // 2
    for r in rows:
        assert (r["status"], r["error"]) in {("ok", None), ("error", "bad_output")}
        if r["status"] == "ok":
            assert r["caption"] and r["raw"] and r["caption"] == clean_caption(r["raw"])
        else:  # the raw output stays for people to see why
            assert r["caption"] is None and r["raw"] and garbage_reason(clean_caption(r["raw"]))
    again = run_cli("caption", str(ds.root), "--model", model, "--prompt", "Describe the image.",
                    "--max-new-tokens", "10", "-q")
    assert re.search(r"│ todo +│ 0 ", again.stdout)  # the summary, on stdout
    assert ds.read("captions").num_rows == len(ids)
    # a new prompt is new work; --where picks the input
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Write a short caption.\n")
    run_cli("caption", str(ds.root), "--model", model, "--prompt-file", str(prompt_file),
            "--max-new-tokens", "10", "--where", "width > height", "-q")
    new = ds.read("captions").filter(pc.field("prompt") == "Write a short caption.")
    wide = ds.select_ids("width > height")
    assert sorted(new.column("image_id").to_pylist()) == wide and 0 < len(wide) < len(ids)
    assert len(set(ds.read("captions").column("model").to_pylist())) == 2


def test_engines_write_the_same_captions(dataset, tiny_llava, ray_cluster):
    stage = CaptionStage(f"llava:{tiny_llava}", "Describe the image.", 8, batch_size=4)
    run(dataset, stage, show_progress=False)[0]
    local = {r["image_id"]: (r["status"], r["caption"]) for r in dataset.read("captions").to_pylist()}
    for part in dataset.parts("captions"):
        part.unlink()
    summary = run(dataset, stage, engine="ray", show_progress=False)[0]
    assert summary.todo == 12
    assert {r["image_id"]: (r["status"], r["caption"]) for r in dataset.read("captions").to_pylist()} == local


def test_kill_9_mid_run_then_rerun_captions_each_image_once(dataset, tiny_llava):
    # Small parts (4 rows) so a kill lands between parts; otherwise the same command a user runs.
    driver = ("import sys, curate.store as s; s.PART_ROWS = 4; from curate.cli.app import app; "
              "sys.argv[0] = 'curate'; app()")
    args = ["caption", str(dataset.root), "--model", f"llava:{tiny_llava}", "--max-new-tokens", "48",
            "--batch-size", "2", "-q"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", driver, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not dataset.parts("captions") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done_before = dataset.read("captions").num_rows
    assert 0 < done_before < 12
    subprocess.run([sys.executable, "-c", driver, *args], env=env, check=True, capture_output=True, timeout=300)
    ids = dataset.read("captions").column("image_id").to_pylist()
    assert sorted(ids) == dataset.select_ids()  # none missed, none twice
