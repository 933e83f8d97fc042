"""The tiny model zoo: random-weight models in the exact on-disk layout of the real ones.

Tests and the demo load these through the same loaders that load published weights
(a hub id resolves to a local directory of these same files), so the real loading code
is what runs, offline. FAMILIES maps each name to the function that fills an empty
directory with that family's files; NEEDS says which families a writer reads beside it.
"""
from __future__ import annotations

from pathlib import Path

from curate.models import tiny_llava, tiny_scoring, tiny_sd, tiny_vlm

FAMILIES = {
    "open_clip": tiny_scoring.write_open_clip,
    "hf_clip": tiny_scoring.write_hf_clip,
    "bigasp_scorer": tiny_scoring.write_bigasp_scorer,
    "quality_head": tiny_scoring.write_quality_head,
    "laion-aesthetic": tiny_scoring.write_laion_aesthetic,
    "wd14": tiny_scoring.write_wd14,
    "wd14_timm": tiny_scoring.write_wd14_timm,
    "joytag": tiny_scoring.write_joytag,
    "owlv2": tiny_scoring.write_owlv2,
    "classifier_nsfw": tiny_scoring.write_classifier_nsfw,
    "classifier_style": tiny_scoring.write_classifier_style,
    "llava": tiny_llava.write_tiny_llava,
    "llava_next": tiny_vlm.write_llava_next,
    "qwen2_5_vl": tiny_vlm.write_qwen2_5_vl,
    "smolvlm": tiny_vlm.write_smolvlm,
    "florence2": tiny_vlm.write_florence2,
    "joycaption": tiny_vlm.write_joycaption,
    "vae": tiny_sd.write_vae,
    "sdxl": tiny_sd.write_tiny_sdxl,
    "sd15": tiny_sd.write_tiny_sd15,
    "xllsd": tiny_sd.write_tiny_xllsd,
}
NEEDS = {"quality_head": ["open_clip"], "bigasp_scorer": ["hf_clip"]}  # a head is fitted to the embedder it ranks


def write_zoo(root: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Write the named families (all by default) under root/<name>; existing ones are kept."""
    root = Path(root)
    unknown = sorted(set(names or []) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown model families {unknown}; known: {', '.join(sorted(FAMILIES))}")
    written = {}
    for name in names or sorted(FAMILIES):
        if name in NEEDS:
            write_zoo(root, NEEDS[name])
        written[name] = tiny_scoring.write_once(root / name, FAMILIES[name])
    return written
