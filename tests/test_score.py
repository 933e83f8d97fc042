"""The scoring pass on the tiny zoo: reference checks per model, resume, one decode, the CLI."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.tiny import write_zoo
from pipelines.score import score
from tests.conftest import run_cli


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def family(zoo, name):
    return write_zoo(zoo, [name])[name]


def said(proc) -> str:
    """What the CLI printed, with rich's line wrapping undone."""
    return " ".join((proc.stdout + proc.stderr).split())


def originals(ds) -> dict[str, Image.Image]:
    rows = ds.query("SELECT image_id, bytes FROM images WHERE bytes IS NOT NULL").to_pylist()
    return {r["image_id"]: Image.open(io.BytesIO(r["bytes"])).convert("RGB") for r in rows}


def test_clip_batched_embeddings_equal_open_clip_per_image(dataset, zoo):
    import open_clip

    clip = family(zoo, "open_clip")
    [summary] = score(dataset, clip=str(clip), batch_size=5, show_progress=False)
    assert summary.ok == 12 and summary.model == "open_clip:open_clip"
    stored = {r["image_id"]: np.array(r["embedding"], np.float32) for r in dataset.read("embeddings").to_pylist()}
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip}")
    model.eval()
    for image_id, image in originals(dataset).items():
        with torch.no_grad():  # open_clip's own path, one full-size image at a time
            ref = model.encode_image(preprocess(image)[None])[0]
        ref = torch.nn.functional.normalize(ref, dim=0).numpy()
        assert np.linalg.norm(stored[image_id]) == pytest.approx(1, abs=2e-3)
        assert np.abs(stored[image_id] - ref).max() < 0.03, image_id


def test_float16_embeddings_read_in_duckdb(dataset, zoo):
    score(dataset, clip=str(family(zoo, "open_clip")), show_progress=False)
    row = dataset.query("SELECT typeof(embedding) AS t, len(embedding) AS n, "
                        "list_dot_product(embedding, embedding) AS norm2 FROM embeddings LIMIT 1").to_pylist()[0]
    assert row["t"] == "FLOAT[]" and row["n"] == 32 and row["norm2"] == pytest.approx(1, abs=5e-3)


def test_quality_ranks_stored_embeddings_and_refuses_another_embedder(dataset, zoo, tmp_path):
    from models.quality_head import RankHead, load_head, save_head

    clip, head_dir = family(zoo, "open_clip"), family(zoo, "quality_head")
    embeddings, quality = score(dataset, clip=str(clip), quality=str(head_dir), show_progress=False)
    assert embeddings.ok == quality.ok == 12
    head, _ = load_head(head_dir)
    for row in dataset.query("SELECT q.rank, q.probs, e.embedding FROM quality q JOIN embeddings e USING (image_id)").to_pylist():
        with torch.no_grad():
            probs = torch.softmax(head(torch.tensor([row["embedding"]])), -1)[0].numpy()
        assert row["rank"] == probs.argmax() and np.allclose(row["probs"], probs, atol=1e-5)
    assert dataset.query("SELECT count(*) AS n FROM manifest WHERE rank IS NOT NULL").to_pylist()[0]["n"] == 12
    # a head fitted on another embedder is refused before anything runs
    save_head(tmp_path / "other", RankHead(32), embedder="open_clip:ViT-L-14")
    proc = run_cli("score", str(dataset.root), "--clip", str(clip), "--quality", str(tmp_path / "other"), check=False)
    assert proc.returncode == 2 and "trained on embeddings from 'open_clip:ViT-L-14'" in said(proc)


def test_bad_flags_say_what_would_be_right(dataset, zoo):
    proc = run_cli("score", str(dataset.root), "--tagger", "foo:x", check=False)
    assert proc.returncode == 2 and "unknown model family 'foo'" in said(proc) and "wd14:MODEL or joytag:MODEL" in said(proc)
    proc = run_cli("score", str(dataset.root), "--clip", str(zoo / "nowhere" / "model"), check=False)
    assert proc.returncode == 2 and "neither a directory nor a hub id" in said(proc)
    proc = run_cli("score", str(dataset.root), check=False)
    assert proc.returncode == 2 and "nothing to score" in said(proc)
