"""The prompt builder: statistics over 10,000 samples, every rule, and `curate prompts fit`."""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from scipy import stats

from curate.trainer.prompts import SENTENCE_END, PromptBuilder, PromptConfig, applicable_scores, fit_tag_count
from tests.conftest import run_cli

N = 10_000
TAGS = [f"tag_{i:03d}" for i in range(300)]


def ids(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def drawn_counts(config: PromptConfig, rng_seed: int = 0) -> np.ndarray:
    builder = PromptBuilder(config, seed=rng_seed)
    prompts = [builder.build(i, 0, TAGS, None, rank=5) for i in ids(N)]
    return np.array([len(p.tags) for p in prompts if p.source != "ucg"])


def ks_pvalue(counts: np.ndarray, mean: float, sd: float) -> float:
    """KS test of counts >= 2 against Normal(mean, sd) truncated to [1.5, inf); counts are
    rounded draws, so each is spread uniformly over its rounding interval."""
    rng = np.random.default_rng(1)
    x = counts[counts >= 2] + rng.uniform(-0.5, 0.5, (counts >= 2).sum())
    lo = stats.norm.cdf(1.5, mean, sd)
    return stats.kstest(x, lambda v: (stats.norm.cdf(v, mean, sd) - lo) / (1 - lo)).pvalue


def test_tag_count_matches_target_distribution():
    counts = drawn_counts(PromptConfig())
    assert ks_pvalue(counts, 32, 19.8) > 0.01
    # the test has power: the same counts are far from a different target
    assert ks_pvalue(counts, 32, 15) < 1e-6
    assert ks_pvalue(counts, 28, 19.8) < 1e-6
    assert counts.min() >= 1


def test_priority_ucg_and_scores_over_10000_samples():
    builder = PromptBuilder(PromptConfig(source_weights={"tags": 1, "caption": 1, "both": 1}), seed=3)
    caption = "A woman stands in a kitchen. There is a desk. A flower is on it."
    rng = np.random.default_rng(0)
    ucg = nonempty = 0
    for n, image_id in enumerate(ids(N)):
        rank = int(rng.integers(0, 10))
        p = builder.build(image_id, epoch=n % 3, tags=TAGS[:80], caption=caption, rank=rank, has_watermark=True)
        if p.source == "ucg":
            assert p.text == ""
            ucg += 1
            continue
        nonempty += 1
        assert "watermark" in p.text.split(", ") or "watermark" in p.text
        assert 1 <= len(p.scores) <= 3 and len(set(p.scores)) == len(p.scores)
        assert set(p.scores) <= set(applicable_scores(rank))
        for s in p.scores:
            assert s in p.text
    assert abs(ucg / N - 0.1) < 0.01
    assert nonempty == N - ucg


def test_scores_are_applicable_only():
    assert applicable_scores(3) == ["score_3", "score_1_up", "score_2_up", "score_3_up"]
    assert applicable_scores(0) == ["score_0"]


def test_same_seed_same_prompt_new_epoch_new_prompt():
    builder = PromptBuilder(PromptConfig(ucg=0), seed=7)
    a = builder.build("ab" * 32, 0, TAGS, "One. Two.", rank=4)
    assert a == PromptBuilder(PromptConfig(ucg=0), seed=7).build("ab" * 32, 0, TAGS, "One. Two.", rank=4)
    others = {builder.build("ab" * 32, e, TAGS, "One. Two.", rank=4).text for e in range(1, 6)}
    assert a.text not in others and len(others) == 5  # every epoch a prompt of its own


def test_rules_switch_off():
    off = PromptConfig(ucg=0, tag_count=False, shuffle_tags=False, formatting_noise=0, score_tags=False,
                       sentence_shuffle=False, source_weights={"tags": 1, "caption": 0, "both": 0})
    p = PromptBuilder(off).build("cd" * 32, 0, ["long_hair", "smile", "red_eyes"], "x", rank=9)
    assert p.text == "long hair, smile, red eyes" and p.scores == []
    cap = PromptConfig(ucg=0, score_tags=False, sentence_shuffle=False,
                       source_weights={"tags": 0, "caption": 1, "both": 0})
    text = "First one. Second one. Third one."
    assert PromptBuilder(cap).build("ef" * 32, 0, ["a"], text).text == text
    shuffled = {PromptBuilder(PromptConfig(ucg=0, score_tags=False,
                                           source_weights={"tags": 0, "caption": 1, "both": 0}))
                .build(i, 0, ["a"], text).text for i in ids(20)}
    assert len(shuffled) > 1
    assert all(set(SENTENCE_END.split(s)) == set(SENTENCE_END.split(text)) for s in shuffled)


def test_formatting_noise_and_aliases(tmp_path):
    aliases = tmp_path / "aliases.csv"
    aliases.write_text("antecedent,consequent\nlong_locks,long_hair\nsmiling,smile\nwm,watermark\n")
    config = PromptConfig(ucg=0, tag_count=False, formatting_noise=1.0, alias_rate=0.5, aliases=str(aliases),
                          score_tags=False, source_weights={"tags": 1, "caption": 0, "both": 0})
    builder = PromptBuilder(config)
    texts = [builder.build(i, 0, ["long_hair", "smile", "watermark"], None).text for i in ids(400)]
    assert any("long_locks" in t or "long locks" in t for t in texts)
    assert any("smiling" in t for t in texts)
    assert all("watermark" in t for t in texts)  # priority tags are never mutated
    assert any("long_hair" in t for t in texts) and any("long hair" in t for t in texts)
    assert len({t.replace("long_hair", "").replace("long hair", "")[:6] for t in texts}) > 2  # separators vary
    bad = tmp_path / "bad.csv"
    bad.write_text("from,to\na,b\n")
    with pytest.raises(ValueError, match="antecedent,consequent"):
        PromptBuilder(PromptConfig(aliases=str(bad)))


def test_source_weights_respected_and_fallback():
    builder = PromptBuilder(PromptConfig(ucg=0, source_weights={"tags": 3, "caption": 1, "both": 0}))
    sources = [builder.build(i, 0, ["a", "b"], "A caption.").source for i in ids(2000)]
    assert abs(sources.count("tags") / 2000 - 0.75) < 0.04 and "both" not in sources
    assert builder.build("aa" * 32, 0, [], "Only a caption.").source == "caption"
    with pytest.raises(ValueError, match="source_weights"):
        PromptBuilder(PromptConfig(source_weights={"tag": 1}))


def test_prompts_fit_cli(tmp_path):
    rng = np.random.default_rng(0)
    counts = np.clip(np.round(rng.normal(20, 5, 500)), 1, None).astype(int)
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("\n".join(", ".join(f"t{j}" for j in range(c)) for c in counts) + "\n\n")
    fitted = fit_tag_count(corpus.read_text().splitlines())
    assert abs(fitted["tag_count_mean"] - counts.mean()) < 0.01 and fitted["prompts"] == 500
    out = run_cli("prompts", "fit", str(corpus)).stdout
    assert f"tag_count_mean = {fitted['tag_count_mean']}" in out and "tag_count_sd" in out
    assert run_cli("prompts", "fit", str(tmp_path / "missing.txt"), check=False).returncode == 2


def preset(name: str, **change) -> PromptConfig:
    """The [prompts] of a train.toml with only `recipe = NAME` (and `change` on top)."""
    from curate.trainer.config import config_from_dict, load_config

    prompts = load_config(recipe=name).prompts
    return config_from_dict({"prompts": {**{k: getattr(prompts, k) for k in prompts.__dataclass_fields__}, **change}}
                            ).prompts


SCORE = re.compile(r"score[ _]\d(?:[ _]up)?")


def is_score(tag: str) -> bool:
    return tag.replace(" ", "_").startswith("score_")


def test_bigasp_v1_recipe_over_10000_prompts(tmp_path):
    """bigASP v1's data.py: 5% empty, int(Normal(32, 19.8)) tags and at least 5, aliases at 20%,
    underscores in a third of prompts, 1-3 score tags (uniform) formatted like the tags."""
    aliases = tmp_path / "aliases.csv"
    aliases.write_text("antecedent,consequent\n" + "".join(f"alias_{t},{t}\n" for t in TAGS))
    builder = PromptBuilder(preset("bigasp-v1", aliases=str(aliases)), seed=0)
    prompts = [builder.build(i, 0, TAGS, None, rank=5) for i in ids(N)]
    shown = [p for p in prompts if p.source != "ucg"]
    assert abs((N - len(shown)) / N - 0.05) < 0.007 and {p.source for p in shown} == {"tags"}
    counts = np.array([len(p.tags) for p in shown])
    assert counts.min() == 5 and abs(np.mean(counts == 5) - stats.norm.cdf(6, 32, 19.8)) < 0.01
    x = counts[counts >= 6] + np.random.default_rng(1).uniform(0, 1, (counts >= 6).sum())  # int() draws
    lo = stats.norm.cdf(6, 32, 19.8)
    assert stats.kstest(x, lambda v: (stats.norm.cdf(v, 32, 19.8) - lo) / (1 - lo)).pvalue > 0.01
    pieces = [[t.strip() for t in p.text.replace(",", "\n").splitlines() if t.strip()] for p in shown]
    tags = [t for words in pieces for t in words if not is_score(t)]
    assert abs(np.mean([t.startswith("alias") for t in tags]) - 0.2) < 0.01
    underscored = np.mean([all("_" in t for t in words) for words in pieces])
    assert abs(underscored - 1 / 3) < 0.015  # bigASP's tag_type 0 (the post's default writes none)
    assert np.bincount([len(p.scores) for p in shown])[1:].tolist() == pytest.approx([len(shown) / 3] * 3, rel=0.06)
    assert any("score 5" in p.text or "score 1 up" in p.text for p in shown)  # v1 spaces score tags too
    exact = PromptBuilder(preset("bigasp-v1", tag_count_mean=7.9, tag_count_sd=0.0, ucg=0.0), seed=0)
    assert len(exact.build("ab" * 32, 0, TAGS, None).tags) == 7  # int(7.9), where ours rounds to 8


def test_bigasp_v2_recipe_over_10000_prompts():
    """bigASP v2's data.py: 5% empty; the caption verbatim, or 10% of the time as many tags as
    its tokens / 2.5; 1, 2 or 3 score tags at 3:2:1 before the prompt, none 10% of the time."""
    caption = " ".join(["word"] * 49) + ". Second sentence here."  # 49 + 1 + 3 + 1 = 54 pieces: 21 tags
    builder = PromptBuilder(preset("bigasp-v2"), seed=0)
    prompts = [builder.build(i, 0, TAGS, caption, rank=5) for i in ids(N)]
    shown = [p for p in prompts if p.source != "ucg"]
    assert abs((N - len(shown)) / N - 0.05) < 0.007
    sources = [p.source for p in shown]
    assert abs(sources.count("tags") / len(shown) - 0.1) < 0.01 and set(sources) == {"tags", "caption"}
    assert {len(p.tags) for p in shown if p.source == "tags"} == {21}
    assert all(p.text.endswith(caption) for p in shown if p.source == "caption")  # verbatim, in order
    scored = np.bincount([len(p.scores) for p in shown], minlength=4) / len(shown)
    assert abs(scored[0] - 0.1) < 0.01
    assert scored[1:] / scored[1:].sum() == pytest.approx([3 / 6, 2 / 6, 1 / 6], abs=0.015)
    written = []
    for p in (p for p in shown if p.source == "caption"):  # the score tags come first, then the caption
        prefix = p.text[: len(p.text) - len(caption)]
        written += SCORE.findall(prefix)
        assert sorted(t.replace(" ", "_") for t in SCORE.findall(prefix)) == sorted(p.scores)
        assert SCORE.sub("", prefix).strip(", ") == ""
    assert abs(np.mean([" " in t for t in written]) - 0.2) < 0.015  # a score tag is spaced 20% of the time


@pytest.mark.parametrize("formatting", ["noise", "bigasp-v1", "bigasp-v2"])
def test_kaomoji_keep_their_underscores(formatting):
    builder = PromptBuilder(PromptConfig(ucg=0, tag_count=False, formatting=formatting, formatting_noise=0.5,
                                         score_tags=False,
                                         source_weights={"tags": 1, "caption": 0, "both": 0}))
    texts = [builder.build(i, 0, ["^_^", ">_<", "long_hair", "smile"], None).text for i in ids(300)]
    assert all("^_^" in t and ">_<" in t and "^ ^" not in t for t in texts)
    assert any("long hair" in t for t in texts)  # the rest are still spaced
