"""The scoring pass on the tiny zoo: reference checks per model, tag rules, one decode, hub ids, the CLI."""
from __future__ import annotations

import io
import multiprocessing
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import curate.pipelines.rows as pass_rows
from curate.images import Decoded, decode
from curate.models.common import ModelError, model_name
from curate.models.tagging import CHARACTER, GENERAL, RATING, select_tags
from curate.models.tiny import write_zoo
from curate.pipelines.score import score
from tests.conftest import make_image, run_cli


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    write_zoo(root, ["open_clip", "quality_head", "wd14", "wd14_timm", "joytag", "owlv2", "hf_clip", "bigasp_scorer",
                     "classifier_nsfw", "classifier_style"])
    return root


def said(proc) -> str:
    """What the CLI printed, with rich's line wrapping undone."""
    return " ".join((proc.stdout + proc.stderr).split())


def originals(ds) -> dict[str, Image.Image]:
    rows = ds.query("SELECT image_id, bytes FROM images WHERE bytes IS NOT NULL").to_pylist()
    return {r["image_id"]: Image.open(io.BytesIO(r["bytes"])).convert("RGB") for r in rows}


def decoded(image) -> Decoded:  # what the executor hands prepare() as row["image"]
    return Decoded(image, image.width, image.height, "PNG", "RGB", False)


def test_model_column_tells_apart_folders_that_share_a_name(tmp_path, zoo):
    same = shutil.copytree(zoo / "wd14", tmp_path / "a" / "wd14")
    other = shutil.copytree(zoo / "wd14", tmp_path / "b" / "wd14")
    assert model_name(str(same)) == model_name(str(zoo / "wd14"))  # a copy is the same model
    weights = other / "model.onnx"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_name(str(other)).startswith("wd14#") and model_name(str(other)) != model_name(str(same))
    assert model_name("SmilingWolf/wd-vit-tagger-v3") == "SmilingWolf/wd-vit-tagger-v3"


def test_clip_batched_embeddings_equal_open_clip_per_image(dataset, zoo):
    import open_clip

    [summary] = score(dataset, clip=str(zoo / "open_clip"), batch_size=5, show_progress=False)
    assert summary.ok == 12 and summary.model == f"open_clip:{model_name(str(zoo / 'open_clip'))}"
    stored = {r["image_id"]: np.array(r["embedding"], np.float32) for r in dataset.read("embeddings").to_pylist()}
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{zoo / 'open_clip'}")
    model.eval()
    for image_id, image in originals(dataset).items():
        with torch.no_grad():  # open_clip's own path, one full-size image at a time
            ref = torch.nn.functional.normalize(model.encode_image(preprocess(image)[None])[0], dim=0).numpy()
        assert np.linalg.norm(stored[image_id]) == pytest.approx(1, abs=2e-3)
        assert np.abs(stored[image_id] - ref).max() < 0.03, image_id
    # DuckDB reads the float16 lists from Parquet as FLOAT[]
    row = dataset.query("SELECT typeof(embedding) AS t, list_dot_product(embedding, embedding) AS norm2 "
                        "FROM embeddings LIMIT 1").to_pylist()[0]
    assert row["t"] == "FLOAT[]" and row["norm2"] == pytest.approx(1, abs=5e-3)


def real_photo() -> Image.Image:
    """A real photograph (Grace Hopper, 512x600 JPEG) from matplotlib's sample data."""
    import matplotlib.cbook

    return Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")


@pytest.mark.parametrize("name, mean, cropped", [("ViT-B-16-SigLIP:webli", 0.5, False),
                                                  ("ViT-H-14-378-quickgelu:dfn5b", 0.48145466, False),
                                                  ("ViT-B-32:openai", 0.48145466, True)])
def test_registry_names_preprocess_as_their_pretrained_tag_says(name, mean, cropped):
    """open_clip merges a tag's preprocess config (SigLIP: mean/std 0.5, squash) over its defaults;
    a registry name must not fall back to OpenAI's mean/std and a centre crop."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    from curate.models.clip import Clip

    clip, photo = Clip(name), real_photo()
    steps, ours_mean, ours_std = clip.transform()
    pixels = clip.preprocess(decoded(photo))["pixels"]
    ours = (pixels / 255.0 - ours_mean) / ours_std
    arch, tag = name.split(":")
    config = merge_preprocess_dict(PreprocessCfg(size=clip.image_size), open_clip.get_pretrained_cfg(arch, tag))
    reference = image_transform_v2(PreprocessCfg(**config), is_train=False)(photo).numpy().transpose(1, 2, 0)
    assert ours_mean[0] == pytest.approx(mean) and pixels.shape == (clip.image_size, clip.image_size, 3)
    assert any("CenterCrop" in type(step).__name__ for step in steps) == cropped
    assert np.abs(ours - reference).max() <= 1.01 / 255 / ours_std.min()  # a level of rounding at most


def test_quality_ranks_stored_embeddings_and_refuses_another_embedder(dataset, zoo, tmp_path):
    from curate.models.quality_head import RankHead, load_head, save_head

    embeddings, quality = score(dataset, clip=str(zoo / "open_clip"), quality=str(zoo / "quality_head"),
                                show_progress=False)
    assert embeddings.ok == quality.ok == 12
    head, _ = load_head(zoo / "quality_head")
    rows = dataset.query("SELECT q.rank, q.probs, e.embedding FROM quality q JOIN embeddings e USING (image_id)")
    for row in rows.to_pylist():
        with torch.no_grad():
            probs = torch.softmax(head(torch.tensor([row["embedding"]])), -1)[0].numpy()
        assert row["rank"] == probs.argmax() and np.allclose(row["probs"], probs, atol=1e-5)
    assert dataset.query("SELECT count(rank) AS n FROM manifest").to_pylist()[0]["n"] == 12
    save_head(tmp_path / "other", RankHead(32), embedder="open_clip:ViT-L-14")
    with pytest.raises(ModelError, match="trained on embeddings from 'open_clip:ViT-L-14'"):
        score(dataset, clip=str(zoo / "open_clip"), quality=str(tmp_path / "other"), show_progress=False)
    with pytest.raises(ModelError, match="no embeddings from 'open_clip:ViT-L-14'"):
        score(dataset, quality=str(tmp_path / "other"), show_progress=False)


def test_bigasp_scorer_ranks_the_class_tokens_hf_clip_stores(dataset, zoo, tmp_path, monkeypatch):
    """bigASP's own quality model: hf_clip stores what its embed.py stored (the last layer's class
    token, before post-layernorm and projection, of its CLIPProcessor's pixels), and a head in its
    scorer.pt layout (random weights) ranks them as its score-images.py does."""
    from transformers import CLIPImageProcessorPil, CLIPModel

    hub_cache(monkeypatch, tmp_path, zoo, repos={"openai/clip-vit-base-patch32": "hf_clip"})
    scorer = zoo / "bigasp_scorer" / "scorer.pt"
    embeddings, quality = score(dataset, clip="hf_clip", quality=str(scorer), batch_size=5, show_progress=False)
    assert embeddings.ok == quality.ok == 12
    assert embeddings.model == f"hf_clip:openai/clip-vit-base-patch32@{'0' * 40}"
    stored = {r["image_id"]: np.array(r["embedding"], np.float32) for r in dataset.read("embeddings").to_pylist()}
    processor = CLIPImageProcessorPil.from_pretrained(zoo / "hf_clip")  # the PIL processor bigASP's CLIPProcessor was
    vision = CLIPModel.from_pretrained(zoo / "hf_clip").vision_model.eval()
    for image_id, image in originals(dataset).items():
        with torch.no_grad():  # embed.py: hidden_states[-1][:, 0, :], one full-size image at a time
            pixels = processor(images=image, return_tensors="pt")["pixel_values"]
            reference = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][0, 0].numpy()
        assert stored[image_id].shape == (32,) and np.abs(stored[image_id] - reference).max() < 0.05, image_id
    state = torch.load(scorer, weights_only=True)  # score-images.py's ScoreClassifier, written out plainly
    rows = dataset.query("SELECT q.rank, q.probs, e.embedding FROM quality q JOIN embeddings e USING (image_id)")
    for row in rows.to_pylist():
        x = torch.nn.functional.layer_norm(torch.tensor([row["embedding"]]), (32,), state["ln.weight"],
                                           state["ln.bias"])
        x = torch.nn.functional.gelu(x @ state["linear1.weight"].T + state["linear1.bias"])
        probs = torch.softmax(x @ state["linear2.weight"].T + state["linear2.bias"], dim=1)[0].numpy()
        assert row["rank"] == probs.argmax() and np.allclose(row["probs"], probs, atol=1e-4)
    assert len({r["rank"] for r in rows.to_pylist()}) > 1
    with pytest.raises(ModelError, match="trained on embeddings from 'hf_clip:openai/clip-vit-base-patch32'"):
        score(dataset, clip=str(zoo / "open_clip"), quality=str(scorer), show_progress=False)


def test_classifiers_keep_every_label_side_by_side_and_in_the_manifest(dataset, zoo, tmp_path, monkeypatch):
    """Two transformers image classifiers side by side (a 2-label NSFW ViT in Falconsai's layout, a
    multi-label ConvNeXt): every label's probability, as transformers' own pipeline gives it for
    the pass's decode, in the table and the manifest's map."""
    from transformers import pipeline

    # A fresh process: the decode threads' preprocess and the model's load import transformers at once
    run_cli("score", str(dataset.root), "--classifier", f"hf:{zoo / 'classifier_style'}", "-q")
    hub_cache(monkeypatch, tmp_path, zoo, repos={"Falconsai/nsfw_image_detection": "classifier_nsfw"})
    nsfw, style = score(dataset, classifiers=["hf:Falconsai/nsfw_image_detection", f"hf:{zoo / 'classifier_style'}"],
                        show_progress=False)
    assert nsfw.ok == 12 and style.todo == 0  # side by side; the style classifier's rows resume
    assert nsfw.model.startswith("classifier:Falconsai/nsfw_image_detection@")
    rows = {(r["classifier"], r["image_id"]): r for r in dataset.read("classifications").to_pylist()}
    files = dataset.query("SELECT image_id, bytes FROM images WHERE bytes IS NOT NULL").to_pylist()
    # each ran alone, so each image was decoded (JPEG draft) to that model's need only, as here
    for name, folder, need in (("nsfw_image_detection", zoo / "classifier_nsfw", 32),  # a 32 px square
                               ("classifier_style", zoo / "classifier_style", 37)):  # shorter side 32 / crop_pct 0.875
        classify = pipeline("image-classification", model=str(folder), device="cpu")
        for image_id, image in ((r["image_id"], decode(r["bytes"], min_side=need).image) for r in files):
            row, reference = rows[(name, image_id)], {r["label"]: r["score"] for r in classify(image, top_k=None)}
            assert row["labels"] == list(classify.model.config.id2label.values())
            assert row["scores"] == pytest.approx([reference[label] for label in row["labels"]], abs=1e-5)
            assert row["label"] == row["labels"][int(np.argmax(row["scores"]))]
    manifest = dataset.query("SELECT image_id, classes FROM manifest").to_pylist()
    manifest = {r["image_id"]: r["classes"] for r in manifest}
    for (name, image_id), row in rows.items():
        got = dict(manifest[image_id])
        assert [got[f"{name}/{label}"] for label in row["labels"]] == pytest.approx(row["scores"])
    nsfw_ids = sorted(i for (n, i), r in rows.items() if n == "nsfw_image_detection" and r["scores"][1] > 0.5)
    assert dataset.select_ids("classes['nsfw_image_detection/nsfw'] > 0.5") == nsfw_ids
    proc = run_cli("score", str(dataset.root), "--classifier", "onnx:model", check=False)
    assert proc.returncode == 2 and "use hf:MODEL" in said(proc)


def wd14_reference(image: Image.Image, size: int) -> np.ndarray:
    """WD14's published preprocessing, written plainly: white square pad, bicubic resize, RGB->BGR, 0-255."""
    w, h = image.size
    side = max(w, h)
    canvas = np.full((side, side, 3), 255, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = np.asarray(image)
    resized = Image.fromarray(canvas).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, np.float32)[:, :, [2, 1, 0]]


@pytest.mark.parametrize("size", [(150, 90), (90, 151)])
def test_wd14_preprocessing_equals_plain_reference(zoo, size):
    from curate.models.wd14 import WD14

    image = make_image(*size, seed=3)
    tagger = WD14(str(zoo / "wd14"))
    assert tagger.size == 64 and tagger.backend == "onnx"
    pixels = tagger.preprocess(decoded(image))["pixels"]
    assert pixels.dtype == np.uint8  # the workers hand over bytes; the floats are made batched
    ours, reference = tagger.model_input(pixels[None])[0], wd14_reference(image, 64)
    # The resize is Pillow's bicubic filter in torch's uint8 kernel: only rounding may differ
    assert np.abs(ours - reference).max() <= 1 and (ours != reference).mean() < 0.01


def test_tag_thresholds_per_category_and_rating_apart():
    names = ["general", "explicit", "solo", "sky", "watermark", "hatsune_miku", "hakurei_reimu", "some_artist"]
    categories = np.array([RATING, RATING, GENERAL, GENERAL, GENERAL, CHARACTER, CHARACTER, 1])
    scores = np.array([0.2, 0.7, 0.36, 0.34, 0.9, 0.86, 0.84, 0.99], np.float32)
    row = select_tags(scores, names, categories, {GENERAL: 0.35, CHARACTER: 0.85})
    assert row["tags"] == ["watermark", "hatsune_miku", "solo"]  # most confident first; artist category not asked
    assert row["rating"] == "explicit" and row["rating_score"] == pytest.approx(0.7)
    assert select_tags(scores, names, categories, {GENERAL: 0.4})["tags"] == ["watermark"]  # JoyTag: one threshold


def test_wd14_pass_stores_what_onnxruntime_says(dataset, zoo):
    import onnxruntime as ort

    from curate.models.wd14 import read_tags

    [summary] = score(dataset, tagger=f"wd14:{zoo / 'wd14'}", show_progress=False)
    assert summary.ok == 12 and summary.model == f"wd14:{model_name(str(zoo / 'wd14'))}@general=0.35,character=0.85"
    session = ort.InferenceSession(str(zoo / "wd14" / "model.onnx"))
    names, categories = read_tags(zoo / "wd14" / "selected_tags.csv")
    stored = {r["image_id"]: r for r in dataset.read("tags").to_pylist()}
    threshold = np.where(categories == CHARACTER, 0.85, np.where(categories == GENERAL, 0.35, np.inf))
    ratings = np.flatnonzero(categories == RATING)
    for image_id, image in list(originals(dataset).items())[:4]:
        probs = session.run(None, {"input": wd14_reference(image, 64)[None]})[0][0]
        expected = {n for n, p, t in zip(names, probs, threshold) if p > t}
        # the pass decodes JPEGs in draft mode: a tag sitting on its threshold may differ
        borderline = {n for n, p, t in zip(names, probs, threshold) if abs(p - t) < 0.02}
        assert set(stored[image_id]["tags"]) ^ expected <= borderline, image_id
        assert stored[image_id]["rating"] == names[ratings[np.argmax(probs[ratings])]]


def test_joytag_and_timm_wd14_run_from_the_zoo(dataset, zoo):
    joytag = score(dataset, tagger=f"joytag:{zoo / 'joytag'}", show_progress=False)[0]
    timm_wd14 = score(dataset, tagger=f"wd14:{zoo / 'wd14_timm'}", show_progress=False)[0]
    assert joytag.ok == timm_wd14.ok == 12
    rows = dataset.query("SELECT model, min(list_min(tag_scores)) AS lowest, count(*) AS n, "
                         "count(rating) AS rated FROM tags GROUP BY model ORDER BY model").to_pylist()
    assert [r["model"] for r in rows] == [f"joytag:{model_name(str(zoo / 'joytag'))}@threshold=0.4",
                                          f"wd14:{model_name(str(zoo / 'wd14_timm'))}@general=0.35,character=0.85"]
    assert rows[0]["lowest"] > 0.4 and rows[0]["rated"] == 0  # JoyTag has no rating
    assert rows[1]["lowest"] > 0.35 and rows[1]["rated"] == 12


def owlv2_outputs(logits, boxes):
    from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

    return Owlv2ObjectDetectionOutput(logits=torch.tensor(logits), pred_boxes=torch.tensor(boxes))


def test_owlv2_boxes_equal_transformers_postprocessing_on_a_non_square_image(zoo):
    from transformers import Owlv2ImageProcessor

    from curate.models.owlv2 import OWLv2, boxes_in_image, corners_in_image

    detector = OWLv2(f"{zoo / 'owlv2'}")
    detector.load()
    processor = Owlv2ImageProcessor.from_pretrained(zoo / "owlv2")
    image = make_image(240, 120, seed=5)  # wide: padded at the bottom
    prepared = detector.preprocess(decoded(image))
    logits, boxes = detector.detect(prepared["pixels"][None])
    theirs = processor.post_process_object_detection(
        owlv2_outputs(logits, boxes), threshold=0.0, target_sizes=[(120, 240)])[0]  # (height, width)
    assert len(theirs["boxes"]) == boxes.shape[1]
    np.testing.assert_allclose(corners_in_image(boxes[0], 240, 120),
                               np.clip(theirs["boxes"].numpy() / [240, 120, 240, 120], 0, 1), atol=1e-5)
    ours = boxes_in_image(logits[0], boxes[0], 240, 120, threshold=0.0)
    assert ours["score"] == pytest.approx(float(theirs["scores"].max()), abs=1e-6)

    # forced output: one confident box at a known place in the padded 240x240 square
    forced_logits = np.full_like(logits, -10.0)
    forced_logits[0, 7, 0] = 5.0
    forced_boxes = boxes.copy()
    forced_boxes[0, 7] = [0.25, 0.125, 0.1, 0.05]  # cx, cy, w, h of the square
    got = boxes_in_image(forced_logits[0], forced_boxes[0], 240, 120, threshold=0.1)
    assert got["has_watermark"] and len(got["boxes"]) == 1
    box = got["boxes"][0]
    # x: 0.2..0.3 of 240 px; y: 0.1..0.15 of the 240 px square = 24..36 px of 120 = 0.2..0.3
    assert [box["x0"], box["y0"], box["x1"], box["y1"]] == pytest.approx([0.2, 0.2, 0.3, 0.3], abs=1e-6)
    theirs = processor.post_process_object_detection(
        owlv2_outputs(forced_logits, forced_boxes), threshold=0.1, target_sizes=[(120, 240)])[0]
    assert (theirs["boxes"].numpy()[0] / [240, 120, 240, 120]) == pytest.approx([0.2, 0.2, 0.3, 0.3], abs=1e-6)


@pytest.mark.parametrize("size", [(96, 60), (41, 96)])
def test_owlv2_detect_equals_the_models_own_forward(zoo, size):
    """Our preprocessing (uint8 pad, batched normalise) and the query embedded once give what
    the directory's processor and the model's full forward give."""
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    from curate.models.owlv2 import OWLv2

    detector = OWLv2(f"{zoo / 'owlv2'}")
    detector.load()
    image = make_image(*size, seed=7)  # the longer side is the model's 96: no resize on either path
    logits, boxes = detector.detect(detector.preprocess(decoded(image))["pixels"][None])
    processor = Owlv2Processor.from_pretrained(zoo / "owlv2")
    model = Owlv2ForObjectDetection.from_pretrained(zoo / "owlv2").eval()
    inputs = processor(text=[["a watermark"]], images=image, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(boxes, out.pred_boxes.numpy(), atol=1e-4)


def test_the_pass_decodes_each_image_once_and_resumes_per_model(dataset, zoo, monkeypatch):
    sides = multiprocessing.Manager().list()  # the local engine decodes in a process of its own
    real = pass_rows.decode
    monkeypatch.setattr(pass_rows, "decode",
                        lambda data, min_side=None, **kw: sides.append((min_side, kw.get("long_side")))
                        or real(data, min_side, **kw))
    summaries = score(dataset, clip=str(zoo / "open_clip"), tagger=f"wd14:{zoo / 'wd14'}",
                      watermark=f"owlv2:{zoo / 'owlv2'}", batch_size=4, show_progress=False)
    assert [s.ok for s in summaries] == [12, 12, 12]
    # once per image, at the largest needs: CLIP's shorter side 64, OWLv2's longer side 96
    assert len(sides) == 12 and set(sides) == {(64, 96)}
    for row in dataset.read("watermarks").to_pylist():
        assert all(0 <= b[k] <= 1 for b in row["boxes"] for k in ("x0", "y0", "x1", "y1"))
    # the OWLv2 verdict is the tag `watermark` in the manifest, added to the tagger's own tags
    tagger = {r["image_id"]: r["tags"] for r in dataset.read("tags").to_pylist()}
    for row in dataset.query("SELECT image_id, tags, has_watermark FROM manifest").to_pylist():
        own = tagger[row["image_id"]]
        assert row["tags"] == (own + ["watermark"] if row["has_watermark"] and "watermark" not in own else own)
    del sides[:]
    again = score(dataset, clip=str(zoo / "open_clip"), tagger=f"joytag:{zoo / 'joytag'}", show_progress=False)
    assert again[0].todo == 0 and again[1].ok == 12 and len(sides) == 12 and set(sides) == {(None, 64)}


def hub_cache(monkeypatch, tmp_path, zoo, families=(), repos=None):
    """Put zoo folders into a Hugging Face cache as repos `tiny/<family>` (and {repo id: family}),
    as a download would."""
    from huggingface_hub import constants

    for repo_id, name in {**{f"tiny/{name}": name for name in families}, **(repos or {})}.items():
        repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(zoo / name, repo / "snapshots" / ("0" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_every_family_loads_by_hub_id_offline(zoo, tmp_path, monkeypatch):
    from curate.models.clip import Clip
    from curate.models.hf_clip import HFClip
    from curate.models.joytag import JoyTag
    from curate.models.owlv2 import OWLv2
    from curate.models.quality import QualityHead
    from curate.models.wd14 import WD14

    adapters = {"open_clip": Clip, "wd14": WD14, "wd14_timm": WD14, "joytag": JoyTag, "owlv2": OWLv2, "hf_clip": HFClip}
    hub_cache(monkeypatch, tmp_path, zoo, adapters)
    image = decoded(make_image(120, 80, seed=1))
    for name, cls in adapters.items():
        adapter = cls(f"tiny/{name}")
        adapter.load()
        prepared = adapter.preprocess(image)
        out = adapter.forward({k: ([v] if np.isscalar(v) else np.asarray(v)[None]) for k, v in prepared.items()})
        assert all(len(v) == 1 for v in out.values()), name
        assert adapter.model_value().split(":", 1)[1].startswith(f"tiny/{name}")
    QualityHead(str(zoo / "quality_head")).load()  # the project's own format: a directory, never a hub id
    with pytest.raises(ModelError, match="cannot get 'tiny/missing' from the hub"):
        Clip("tiny/missing")


def test_hub_models_fetch_only_their_files_and_pin_the_commit(dataset, zoo, tmp_path):
    """From a hub (a real one's API on loopback): only the files a family reads are fetched (one
    weights format), JoyTag's default weights are fancyfeast/joytag, and the rows name the commit,
    so an updated repo is new work while the same one resumes, online or offline."""
    from tests.hub_server import HubServer, commit_of

    repos = tmp_path / "repos"
    clip = shutil.copytree(zoo / "open_clip", repos / "laion" / "tiny-clip")
    for decoy in ("open_clip_pytorch_model.bin", "pytorch_model.bin", "flax_model.msgpack"):
        (clip / decoy).write_bytes(b"another format of the same weights")
    joytag = shutil.copytree(zoo / "joytag", repos / "fancyfeast" / "joytag")
    (joytag / "model.onnx").write_bytes(b"another format")
    online = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}

    def models(table):
        rows = dataset.query(f"SELECT model, count(*) AS n FROM {table} GROUP BY model").to_pylist()
        return {r["model"]: r["n"] for r in rows}

    with HubServer(repos) as hub:
        online["HF_ENDPOINT"] = hub.url
        run_cli("score", str(dataset.root), "--clip", "laion/tiny-clip", "--tagger", "joytag", env=online)
        assert hub.downloads("laion/tiny-clip") == {"open_clip_config.json", "open_clip_model.safetensors"}
        assert hub.downloads("fancyfeast/joytag") == {"config.json", "model.safetensors", "top_tags.txt"}
        first = commit_of(joytag)
        assert models("embeddings") == {f"open_clip:laion/tiny-clip@{commit_of(clip)}": 12}
        assert models("tags") == {f"joytag:fancyfeast/joytag@{first}@threshold=0.4": 12}
        weights = bytearray((joytag / "model.safetensors").read_bytes())
        weights[-1] ^= 1  # the repo is updated: a new commit
        (joytag / "model.safetensors").write_bytes(bytes(weights))
        run_cli("score", str(dataset.root), "--clip", "laion/tiny-clip", "--tagger", "joytag", env=online)
    assert models("embeddings") == {f"open_clip:laion/tiny-clip@{commit_of(clip)}": 12}  # the same: resumed
    assert models("tags") == {f"joytag:fancyfeast/joytag@{first}@threshold=0.4": 12,
                              f"joytag:fancyfeast/joytag@{commit_of(joytag)}@threshold=0.4": 12}
    proc = run_cli("score", str(dataset.root), "--clip", "laion/tiny-clip", "--tagger", "joytag",
                   env={**online, "HF_HUB_OFFLINE": "1"})  # the cache knows which commit main was
    assert dataset.read("tags").num_rows == 24, proc.stdout


def test_cli_runs_the_full_pass_and_explains_bad_flags(dataset, zoo):
    ds = str(dataset.root)
    run_cli("score", ds, "--clip", str(zoo / "open_clip"), "--quality", str(zoo / "quality_head"),
            "--tagger", f"wd14:{zoo / 'wd14'}", "--watermark", f"owlv2:{zoo / 'owlv2'}", "--quiet")
    counts = dataset.query("SELECT count(rank) AS ranks, count(tags) AS tagged, count(has_watermark) AS checked "
                           "FROM manifest").to_pylist()[0]
    assert counts == {"ranks": 12, "tagged": 12, "checked": 12}
    for flags, message in [(["--clip", str(zoo / "open_clip"), "--device", "tpu"], "'tpu' is not a device; use cuda"),
                           (["--clip", str(zoo / "nowhere")], "neither a directory nor a hub id"),
                           (["--clip", "ViT-B-32"], "name its weights too, as ViT-B-32:TAG"),
                           (["--tagger", f"joytag:{zoo / 'wd14'}"],
                            "lacks config.json, model.safetensors, top_tags.txt")]:
        with pytest.raises(ModelError, match=message):
            score(dataset, **{f[2:]: v for f, v in zip(flags[::2], flags[1::2])}, show_progress=False)
    proc = run_cli("score", ds, "--tagger", "foo:x", check=False)
    assert (proc.returncode == 2 and "unknown model family 'foo'" in said(proc)
            and "wd14:MODEL or joytag:MODEL" in said(proc))


def test_threshold_flags_set_what_is_kept_and_name_the_model(dataset, zoo):
    ds = str(dataset.root)
    run_cli("score", ds, "--tagger", f"wd14:{zoo / 'wd14'}", "--general-threshold", "0.2",
            "--character-threshold", "0.5", "--watermark", f"owlv2:{zoo / 'owlv2'}",
            "--watermark-threshold", "0", "--watermark-query", "a logo", "--quiet")
    score(dataset, tagger=f"wd14:{zoo / 'wd14'}", show_progress=False)  # the defaults, beside them
    wd14 = model_name(str(zoo / "wd14"))
    rows = dataset.query("SELECT model, count(*) AS n, sum(len(tags)) AS tags, min(list_min(tag_scores)) AS lowest "
                         "FROM tags GROUP BY model ORDER BY model").to_pylist()
    assert [r["model"] for r in rows] == [f"wd14:{wd14}@general=0.2,character=0.5",
                                          f"wd14:{wd14}@general=0.35,character=0.85"]
    assert rows[0]["n"] == rows[1]["n"] == 12 and rows[0]["tags"] > rows[1]["tags"]
    assert 0.2 < rows[0]["lowest"] < 0.35
    marks = dataset.query("SELECT model, count(*) FILTER (has_watermark) AS marked FROM watermarks "
                          "GROUP BY model").to_pylist()
    assert marks == [{"model": f"owlv2:{model_name(str(zoo / 'owlv2'))}@query=a logo,threshold=0.0", "marked": 12}]
    for kwargs, message in [({"tagger": f"joytag:{zoo / 'joytag'}", "character_threshold": 0.5},
                             "JoyTag has one threshold for all its tags; use --general-threshold"),
                            ({"clip": str(zoo / "open_clip"), "general_threshold": 0.5}, "give --tagger too"),
                            ({"watermark": f"owlv2:{zoo / 'owlv2'}", "watermark_query": " "},
                             "the watermark query is empty")]:
        with pytest.raises(ModelError, match=message):
            score(dataset, **kwargs, show_progress=False)
    proc = run_cli("score", ds, "--tagger", "wd14", "--general-threshold", "35", check=False)
    assert proc.returncode == 2 and "--general-threshold" in said(proc)
    assert "35.0 is not in the range 0<=x<=1" in said(proc)  # what is wrong and what would be right


def test_ray_engine_writes_the_same_rows(dataset, zoo, ray_cluster):
    models = dict(clip=str(zoo / "open_clip"), tagger=f"wd14:{zoo / 'wd14'}", watermark=f"owlv2:{zoo / 'owlv2'}",
                  classifiers=[f"hf:{zoo / 'classifier_nsfw'}"])
    score(dataset, **models, show_progress=False)
    tables = {"embeddings": ["image_id", "model", "status", "embedding"],
              "tags": ["image_id", "model", "tags", "rating"],
              "watermarks": ["image_id", "model", "has_watermark", "boxes"],
              "classifications": ["image_id", "model", "classifier", "labels", "label"]}
    local = {t: dataset.read(t).select(c).sort_by("image_id") for t, c in tables.items()}
    for table in tables:
        for part in dataset.parts(table):
            part.unlink()
    summaries = score(dataset, **models, engine="ray", show_progress=False)
    assert [s.ok for s in summaries] == [12, 12, 12, 12]
    for table, columns in tables.items():
        got = dataset.read(table).select(columns).sort_by("image_id")
        if table == "embeddings":  # float16 from two processes: equal up to rounding
            a = np.array(got.column("embedding").to_pylist(), np.float32)
            b = np.array(local[table].column("embedding").to_pylist(), np.float32)
            assert np.abs(a - b).max() < 2e-3
        else:
            assert got.equals(local[table]), table
