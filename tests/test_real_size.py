"""Real-size random-weight models from the published configurations (models/real_size.py) load
through the same loaders as the downloads and run one real photo on the CPU.

Marked slow (about two minutes on two cores, most of it OWLv2 at 960 px): the default run
skips it, `.ci/run` runs it (`python -m pytest -m slow`)."""
from __future__ import annotations

import matplotlib.cbook
import numpy as np
import pytest

from curate.images import decode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from curate.models.real_size import write_real_size

    return write_real_size(tmp_path_factory.mktemp("real-size"))


@pytest.fixture(scope="module")
def photo() -> bytes:
    return matplotlib.cbook.get_sample_data("grace_hopper.jpg").read()


def run_one(adapter, photo: bytes) -> dict:
    """The adapter as the pass runs it: load, the pass's decode, preprocess, a batch of one."""
    adapter.load("cpu")
    prepared = adapter.preprocess(decode(photo, min_side=adapter.decode_min_side, long_side=adapter.decode_long_side))
    return adapter.forward({k: [v] if np.isscalar(v) else np.asarray(v)[None] for k, v in prepared.items()})


@pytest.mark.parametrize("name, size, width", [("open_clip_b32", 224, 512), ("open_clip_siglip_b16", 224, 768)])
def test_open_clip_configs(real, photo, name, size, width):
    from curate.models.clip import Clip

    clip = Clip(str(real[name]))
    assert clip.image_size == size
    out = run_one(clip, photo)
    assert out["embedding"].shape == (1, width) and np.linalg.norm(out["embedding"][0].astype(np.float32)) == (
        pytest.approx(1, abs=2e-3))


def test_hf_clip_feeds_bigasps_768_wide_scorer(real, photo):
    from curate.models.hf_clip import HFClip
    from curate.models.quality import QualityHead

    out = run_one(HFClip(str(real["hf_clip_b32"])), photo)
    assert out["embedding"].shape == (1, 768)  # the class token bigASP's scorer reads
    head = QualityHead(str(real["bigasp_scorer"] / "scorer.pt"))
    head.load("cpu")
    ranked = head.forward({"embedding": np.stack([head.preprocess(out["embedding"][0])["embedding"]])})
    assert 0 <= ranked["rank"][0] <= 9 and ranked["probs"].shape == (1, 10)


def test_owlv2_base_at_960(real, photo):
    from curate.models.owlv2 import OWLv2

    detector = OWLv2(str(real["owlv2_base"]))
    assert detector.size == 960
    out = run_one(detector, photo)
    assert 0 <= out["score"][0] <= 1 and len(out["boxes"][0]) <= 16


def test_taggers_joytag_and_wd_vit_v3_through_timm(real, photo):
    from curate.models.joytag import JoyTag
    from curate.models.wd14 import WD14

    joytag, wd = JoyTag(str(real["joytag"])), WD14(str(real["wd_vit_v3"]))
    assert (joytag.size, wd.size, wd.backend) == (448, 448, "timm")
    for tagger in (joytag, wd):
        out = run_one(tagger, photo)
        assert len(out["tags"][0]) == len(out["tag_scores"][0]) > 0
    assert out["rating"][0] in {f"tag_{i}" for i in range(4)}  # WD's rating is its own column
