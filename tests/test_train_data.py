"""Trainer settings, data selection, tokens, batching, chunking, masks, loss weights and time ids."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import curate.trainer.epoch_prompts
from curate import edits
from curate.store import now
from curate.trainer.config import config_dict, load_config
from curate.trainer.data import TrainData, watermark_mask
from curate.trainer.losses import loss_weights
from curate.trainer.rows import load_rows, split_rows
from tests.conftest import REPO, run_cli
from tests.trainer_helpers import WORDS, make_latent_dataset, retag
from tests.trainer_helpers import image_id as id_of


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    from curate.models.tiny import write_zoo

    return write_zoo(tmp_path_factory.mktemp("zoo"), ["sdxl", "sd15"])


def tokenizer(zoo, name="sdxl"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(zoo[name] / "tokenizer")


def test_config_rejects_bad_keys_and_types(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text("learning_rat = 1e-4\n")
    with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
        load_config(path)
    path.write_text("[prompts]\nugc = 0.2\n")
    with pytest.raises(ValueError, match="did you mean 'prompts.ucg'"):
        load_config(path)
    path.write_text("batch_size = 'four'\n")
    with pytest.raises(ValueError, match="batch_size must be int"):
        load_config(path)
    path.write_text("loss = 'l1'\n")
    with pytest.raises(ValueError, match="'mse', 'min_snr', 'debiased'"):
        load_config(path)
    path.write_text("zero_terminal_snr = true\n")
    with pytest.raises(ValueError, match="v_prediction"):
        load_config(path)
    documented = load_config(REPO / "docs" / "train.toml")  # the commented example holds every key
    text = (REPO / "docs" / "train.toml").read_text()
    keys = [k for k in config_dict(documented) if k != "prompts"] + list(config_dict(documented)["prompts"])
    assert all(f"{key} =" in text for key in keys) and "[prompts]" in text
    path.write_text("max_steps = 7\nlearning_rate = 1\n[prompts]\nucg = 0.25\n")
    config = load_config(path, max_steps=3)  # flags override the file
    assert (config.max_steps, config.learning_rate, config.prompts.ucg) == (3, 1.0, 0.25)
    ds = make_latent_dataset(tmp_path / "ds", 4)
    path.write_text("batch_sise = 2\n")
    proc = run_cli("train", str(ds.root), "--base", "x", "--config", str(path), "--dry-run", check=False)
    assert proc.returncode == 2 and "did you mean 'batch_size'" in proc.stdout + proc.stderr


def test_a_recipe_starts_from_bigasps_code_and_the_file_overrides_it(tmp_path):
    from curate.trainer.config import config_from_dict

    post = load_config()  # no recipe: the post's figures
    assert (post.prompts.ucg, post.prompts.alias_rate, post.prompts.formatting, post.recipe) == (0.1, 0.1, "noise",
                                                                                                  None)
    path = tmp_path / "train.toml"
    path.write_text('recipe = "bigasp-v2"\nlearning_rate = 2e-5\n[prompts]\ntag_count_sd = 10.0\n')
    config = load_config(path)
    p = config.prompts
    assert (p.ucg, p.tag_count_min, p.tag_count_rounding, p.tag_count_from, p.alias_rate, p.formatting) == (
        0.05, 5, "down", "caption", 0.2, "bigasp-v2")
    assert (p.score_tag_weights, p.score_tag_dropout, p.sentence_shuffle) == ([3.0, 2.0, 1.0], 0.1, False)
    assert p.source_weights == {"tags": 0.1, "caption": 0.9, "both": 0.0}
    assert (p.tag_count_sd, config.learning_rate, config.loss) == (10.0, 2e-5, "min_snr")  # the file's keys win
    assert config_from_dict(config_dict(config)) == config  # what a checkpoint stores resumes the same
    v1 = load_config(recipe="bigasp-v1").prompts
    assert (v1.ucg, v1.formatting, v1.score_tag_weights, v1.source_weights["tags"]) == (0.05, "bigasp-v1",
                                                                                         [1.0, 1.0, 1.0], 0.0)
    path.write_text('recipe = "bigasp-v3"\n')
    with pytest.raises(ValueError, match="did you mean 'bigasp-v2'"):
        load_config(path)


def test_chunks_keep_each_start_and_end_token_and_readme_says_where_kohya_differs():
    from curate.trainer.config import RECIPES, TrainConfig
    from curate.trainer.data import chunked

    ids = list(range(1000, 1160))  # 160 content tokens: three chunks
    reference = []  # bigASP's chunk_tokens (data.py), written out: BOS, up to 75 tokens, EOS, pads, per chunk
    for start in range(0, 225, 75):
        body = ids[start:start + 75]
        reference += [1, *body, 2] + [0] * (75 - len(body))
    assert chunked(ids, 3, bos=1, eos=2, pad=0) == reference and len(reference) == 3 * 77
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "75n + 2 positions" in readme and "n x 77 positions" in readme  # kohya's way, and ours
    rows = {line.split("|")[1].strip(): line for line in (REPO / "README.md").read_text().splitlines()
            if line.startswith("| ")}
    header = rows["prompts"]
    assert all(f'recipe = "{name}"' in header for name in RECIPES)  # each preset beside the post's figures
    cells = {k: [c.strip().split(" ")[0] for c in v.split("|")[2:5]] for k, v in rows.items()}  # first words
    for row, key in (("empty prompt (`ucg`)", "ucg"), ("alias mutation (`alias_rate`)", "alias_rate")):
        figures = [getattr(TrainConfig().prompts, key)] + [r["prompts"][key] for r in RECIPES.values()]
        assert cells[row] == [f"{x:.0%}" for x in figures], row


def test_rank_0_and_where_are_left_out(tmp_path):
    ds = make_latent_dataset(tmp_path / "ds", 10, ranks=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    rows = load_rows(ds, load_config(None))
    assert len(rows) == 8 and all(r.rank > 0 for r in rows)
    objects = {id(t) for r in rows for t in r.tags}  # one object per distinct tag, however many rows have it
    assert len(objects) == len({t for r in rows for t in r.tags}) < sum(len(r.tags) for r in rows)
    assert {r.rank for r in load_rows(ds, load_config(None, where="rank >= 5"))} == {5, 6, 7, 8}
    assert len(load_rows(ds, load_config(None, keep_rank_0=True))) == 10
    with pytest.raises(ValueError, match="bad where"):
        load_rows(ds, load_config(None, where="no_such_column > 1"))
    assert len(split_rows(rows, load_config(None))[1]) == 0  # 2% of 8 rows
    train, val = split_rows(rows, load_config(None, validation_fraction=0.25))
    assert len(val) == 2 and not {r.image_id for r in val} & {r.image_id for r in train}


def test_the_trainer_reads_the_stage_join_kept_in_the_cache_until_parts_change(tmp_path):
    """The join of the stage tables is made once per set of parts (the trainer's start at 1.5M
    rows: ~20 s joined, ~3 s read back): a restart reads it, a new part makes a new one, edits
    apply over it (a read-only dataset joins in memory: test_disk's report)."""
    ds = make_latent_dataset(tmp_path / "ds", 6, ranks=[1, 2, 3, 4, 5, 6])
    config = load_config(None, where="rank >= 2")
    first = load_rows(ds, config)
    (cached,) = (tmp_path / "ds" / "cache").glob("manifest-*.parquet")
    made = cached.stat().st_mtime_ns
    assert [r.rank for r in load_rows(ds, config)] == [r.rank for r in first] and cached.stat().st_mtime_ns == made

    ds.write_part("quality", {"image_id": [id_of(0)], "model": ["head"], "rank": [9], "probs": [[0.1] * 10],
                              "status": ["ok"], "error": [None], "message": [None], "created_at": [now()]})
    assert {r.image_id: r.rank for r in load_rows(ds, config)}[id_of(0)] == 9  # the newer rank, from a new join
    (newer,) = (tmp_path / "ds" / "cache").glob("manifest-*.parquet")
    assert newer != cached  # and the stale join is gone

    edits.record(ds, "exclude", [id_of(0)])
    assert id_of(0) not in {r.image_id for r in load_rows(ds, config)}
    assert newer.exists() and len(list(newer.parent.glob("manifest-*.parquet"))) == 1  # an edit needs no new join


def test_batches_hold_one_bucket_and_keep_prompt_lengths_varied(tmp_path, zoo):
    ds = make_latent_dataset(tmp_path / "ds", 96, buckets=[(8, 8), (8, 12), (12, 8)])
    # long, varied tag lists (a newer tagger's rows) so prompts need 1, 2 or 3 chunks
    ids = [r.image_id for r in load_rows(ds, load_config(None))]
    tags = [[f"{WORDS[0]}_{j}" for j in range(i % 40 * 2 + 1)] for i in range(len(ids))]
    retag(ds, ids, tags)
    con_rows = load_rows(ds, load_config(None))
    assert [len(r.tags) - r.has_watermark for r in con_rows] == [len(t) for t in tags]  # + OWLv2's `watermark`
    config = load_config(None, batch_size=4, prompts={"tag_count_mean": 40.0})
    data = TrainData(con_rows, config, tokenizer(zoo))
    built = []
    data.epoch_prompts(0, advance=built.append)  # the progress bar's advance, once per 10,000 rows
    assert built == [96]
    plan = data.plan(0)
    assert len(plan) == data.batches_per_epoch == 24
    assert all(len({con_rows[i].bucket for i in batch}) == 1 for batch in plan)
    chunks = data.epoch_prompts(0).chunks
    padded = [chunks[batch].max() for batch in plan]
    assert set(padded) == {1, 2, 3}
    assert plan == data.plan(0) and plan != data.plan(1)  # reproducible per epoch, new each epoch
    batch = data.collate(plan[0], 0, [tokenizer(zoo)])
    assert batch["input_ids"][0].shape == (4, 77 * batch["n_chunks"])
    assert batch["latents"].shape[0] == 4


def test_prompt_worker_processes_build_the_same_prompts(tmp_path, zoo, monkeypatch):
    monkeypatch.setattr(curate.trainer.epoch_prompts, "PROMPT_SPAN", 16)
    rows = load_rows(make_latent_dataset(tmp_path / "ds", 100), load_config(None))
    serial = TrainData(rows, load_config(None, prompt_workers=1), tokenizer(zoo)).build_prompts(3)
    parallel = TrainData(rows, load_config(None, prompt_workers=3), tokenizer(zoo))
    built = []
    prompts = parallel.build_prompts(3, built.append)
    assert built == [16] * 6 + [4]  # in row order, one advance per span
    for name in ("order", "chunks", "tag_counts"):
        assert np.array_equal(getattr(prompts, name), getattr(serial, name)), name
    assert all(np.array_equal(prompts.tokens_of(i), serial.tokens_of(i)) for i in range(len(rows)))
    assert parallel.tokenize.pieces == {}  # the workers did the work, each with its own piece cache
    class Unloadable:  # the tokenizer the workers are sent, which they cannot load: they fail, and the trainer says so
        def to_str(self) -> str:
            return "{}"

    parallel.tokenize.backend = Unloadable()
    with pytest.raises(RuntimeError, match=r"a prompt worker stopped \(exit code 1\)"):
        parallel.build_prompts(4)
    with pytest.raises(ValueError, match="prompt_workers must be 0"):
        load_config(None, prompt_workers=-1)


def test_the_first_batch_waits_for_one_span_of_prompts_not_the_epoch(tmp_path, zoo, monkeypatch):
    """At 1.5M rows an epoch's prompts take minutes: the plan takes a span of them at a time,
    so the first batch needs one span built, and the whole plan is the same either way."""
    import threading

    from curate.trainer.data import EpochPlan
    from curate.trainer.epoch_prompts import build_span

    monkeypatch.setattr(curate.trainer.epoch_prompts, "PROMPT_SPAN", 16)
    config = load_config(None, batch_size=4)
    rows = load_rows(make_latent_dataset(tmp_path / "ds", 100, buckets=[(8, 8), (8, 12)]), config)
    data = TrainData(rows, config, tokenizer(zoo))
    prompts = data.new_prompts(0)
    first = [rows[i] for i in prompts.order[:16]]
    prompts.add(build_span(data.prompts, data.tokenize, 0, [(r.image_id, r.tags, r.caption, r.rank,
                                                            r.has_watermark) for r in first]))
    plan = EpochPlan(prompts, rows, 4, np.random.default_rng([0, 0, 4]))
    planned = threading.Thread(target=plan.first, args=(1,), daemon=True)
    planned.start()
    planned.join(timeout=30)
    assert not planned.is_alive() and prompts.built == 16  # one span: the rest of the epoch is not built
    assert plan.batches and {i for batch in plan.batches for i in batch} <= set(prompts.order[:16].tolist())

    whole = data.plan(0)  # built and planned to the end by the trainer's own path
    assert whole[: len(plan.batches)] == plan.batches and whole == data.plan(0)
    per_bucket = Counter(r.bucket for r in rows)
    assert Counter(rows[b[0]].bucket for b in whole) == {k: n // 4 for k, n in per_bucket.items()}
    assert all(len(b) == 4 and len({rows[i].bucket for i in b}) == 1 for b in whole)
    assert len({i for b in whole for i in b}) == 4 * len(whole) == 4 * data.batches_per_epoch


def test_prompt_tokenizer_gives_the_tokenizers_own_ids(zoo):
    """Every pair of ASCII characters, contractions, special tokens, and Unicode that the
    normalizer composes, lowercases or turns into spaces next to a space, and prompts as the
    builder makes them: the tokenizer's own ids, from an empty and from a filled cache. A
    tokenizer whose pipeline differs (here: no lowercasing) is left to do all the work itself."""
    from tokenizers import Tokenizer, normalizers

    from curate.trainer.prompts import PromptBuilder, PromptConfig
    from curate.trainer.tokens import PromptTokenizer

    chars = [chr(c) for c in range(128)]
    texts = [a + b for a in chars for b in chars] + [f"x{a}'{b}e" for a in chars for b in "stdmrvl"]
    texts += ["a photo, <|endoftext|>, of it's", "café au lait,  1girl", "e\u0301 \xa0smile\u3000x", "",
              "a \u0301b", "\u1100 \u1161", "İstanbul, ﬁsh, ß, Ω, Ⅻ, ½, 字 😀", " \u2009 \u200b x\x85 y "]
    builder = PromptBuilder(PromptConfig(formatting_noise=0.5), seed=0)
    texts += [builder.build(f"{i:064x}", 0, [f"{w}_({i % 7})" for w in WORDS], "It's red. A cat!", rank=i % 10).text
              for i in range(300)]
    for name in ("sdxl", "sd15"):
        clip = tokenizer(zoo, name)
        want = clip(texts, add_special_tokens=False).input_ids
        fast = PromptTokenizer(clip.backend_tokenizer)
        assert fast.pieces is not None
        for _ in ("cold", "warm"):
            ids, lengths = fast(texts)
            assert [a.tolist() for a in np.split(ids, np.cumsum(lengths)[:-1])] == want
        full = PromptTokenizer(clip.backend_tokenizer)
        full.max_pieces = 100  # the cache stops growing; pieces past it are encoded each time
        ids, lengths = full(texts)
        assert len(full.pieces) == 100 and [a.tolist() for a in np.split(ids, np.cumsum(lengths)[:-1])] == want

    backend = Tokenizer.from_str(tokenizer(zoo).backend_tokenizer.to_str())
    backend.normalizer = normalizers.NFC()
    cased = PromptTokenizer(backend)
    assert cased.pieces is None
    ids, _ = cased(["Long Hair, smile"])
    assert ids.tolist() == backend.encode("Long Hair, smile", add_special_tokens=False).ids
    assert ids.tolist() != tokenizer(zoo)("Long Hair, smile", add_special_tokens=False).input_ids


def test_dry_run_prints_histograms_and_examples(tmp_path, zoo):
    ds = make_latent_dataset(tmp_path / "ds", 12)
    out = run_cli("train", str(ds.root), "--base", str(zoo["sdxl"]), "--dry-run").stdout  # the report
    assert "padded prompt length per batch" in out and "75" in out
    assert "tags per tag prompt" in out
    for rule in ("shuffle_tags", "tag_count", "score_tags", "sentence_shuffle", "ucg", "all on"):
        assert rule in out


def test_long_prompts_go_in_chunks_and_long_clip_reads_248(tmp_path, zoo):
    from curate.models.tiny_sd import write_tiny_sd15
    from curate.trainer.model import Models

    ds = make_latent_dataset(tmp_path / "ds", 4)
    ids = [r.image_id for r in load_rows(ds, load_config(None))]
    retag(ds, ids, [[f"tag{j}" for j in range(30)]] * len(ids))  # about 115 tokens
    rows = load_rows(ds, load_config(None))
    config = load_config(None, batch_size=4, prompts={"ucg": 0.0, "tag_count": False, "score_tags": False,
                                                      "source_weights": {"tags": 1.0, "caption": 0.0, "both": 0.0}})
    sdxl = Models(zoo["sdxl"], config, torch.device("cpu"))
    batch = TrainData(rows, config, sdxl.tokenizers[0]).collate([0, 1, 2, 3], 0, sdxl.tokenizers)
    assert batch["n_chunks"] == 2
    ids = batch["input_ids"][0][0]
    assert ids[0] == ids[77] == 49406 and ids[76] == 49407  # BOS starts, EOS ends every chunk
    hidden, pooled = sdxl.encode(batch["input_ids"], batch["n_chunks"])
    assert hidden.shape == (4, 154, 64) and pooled.shape == (4, 32)
    assert (batch["input_ids"][1][0][1:76] == batch["input_ids"][0][0][1:76]).all()  # same content, per-encoder pad
    long_dir = tmp_path / "sd15-long"
    long_dir.mkdir()
    write_tiny_sd15(long_dir, positions=248)
    long = Models(long_dir, config, torch.device("cpu"))
    batch = TrainData(rows, config, long.tokenizers[0]).collate([0, 1], 0, long.tokenizers)
    assert batch["input_ids"][0].shape == (2, 248) and batch["n_chunks"] == 1
    assert long.encode(batch["input_ids"], 1)[0].shape == (2, 248, 32)


def test_watermark_boxes_map_into_latent_coordinates(tmp_path):
    ds = make_latent_dataset(tmp_path / "ds", 3, buckets=[(8, 12)])
    row = [r for r in load_rows(ds, load_config(None)) if r.has_watermark][0]
    # box = lower-right quarter of the original; resized 72x96, crop top 4: rows (36-4)/64*8 = 4.. , cols 6..
    mask = watermark_mask(row)
    assert mask.shape == (1, 8, 12)
    assert mask[0, 4:, 6:].sum() == 0 and mask[0, :4].sum() == 4 * 12 and mask[0, :, :6].sum() == 8 * 6


def test_loss_weights_equal_reference_formulas():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 1, 10, 100, 400, 700, 999])
    snr = compute_snr(scheduler, t)
    from curate.trainer.losses import snr as our_snr

    assert torch.allclose(our_snr(scheduler.alphas_cumprod, t), snr)
    gamma = 5.0
    # diffusers' train_text_to_image.py min-SNR weights
    ref = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    assert torch.allclose(loss_weights("min_snr", snr, "epsilon", gamma), ref / snr)
    assert torch.allclose(loss_weights("min_snr", snr, "v_prediction", gamma), ref / (snr + 1))
    # debiased estimation (Yu et al.): 1/sqrt(snr) on the epsilon loss, carried exactly into v units
    assert torch.allclose(loss_weights("debiased_matched", snr, "epsilon"), 1 / torch.sqrt(snr))
    assert torch.allclose(loss_weights("debiased_matched", snr, "v_prediction"),
                          1 / torch.sqrt(snr) * snr / (snr + 1))
    assert torch.equal(loss_weights("mse", snr, "epsilon"), torch.ones_like(snr))


def kohya_debiased(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """kohya-ss/sd-scripts library/custom_train_functions.py apply_debiased_estimation, its weight."""
    snr_t = torch.minimum(snr, torch.ones_like(snr) * 1000)  # "if timestep is 0, snr_t is inf, so limit it to 1000"
    return 1 / (snr_t + 1) if v_prediction else 1 / torch.sqrt(snr_t)


def test_debiased_estimation_weighs_as_kohya_also_at_zero_terminal_snr():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    t = torch.tensor([0, 1, 10, 100, 400, 700, 998, 999])
    for zero_terminal in (False, True):
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  rescale_betas_zero_snr=zero_terminal)
        snr = compute_snr(scheduler, t)
        for prediction, v in (("epsilon", False), ("v_prediction", True)):
            if zero_terminal and not v:
                continue  # epsilon is undefined at snr = 0; the config refuses it
            assert torch.allclose(loss_weights("debiased", snr, prediction), kohya_debiased(snr, v))
    assert snr[-1] == 0 and loss_weights("debiased", snr, "v_prediction")[-1] == 1  # the terminal step trains
    assert loss_weights("debiased_matched", snr, "v_prediction")[-1] == 0  # ... and here it would not


def test_sdxl_time_ids_in_diffusers_order(tmp_path, zoo):
    from diffusers import StableDiffusionXLPipeline

    ds = make_latent_dataset(tmp_path / "ds", 4, buckets=[(8, 12)])
    rows = load_rows(ds, load_config(None))
    data = TrainData(rows, load_config(None, batch_size=2), tokenizer(zoo))
    batch = data.collate([0, 1], 0, [tokenizer(zoo)])
    pipe = StableDiffusionXLPipeline.from_pretrained(zoo["sdxl"])
    table = ds.read("latents").to_pylist()
    by_id = {r["image_id"]: r for r in table}
    for got, image_id in zip(batch["time_ids"], batch["image_ids"]):
        r = by_id[image_id]
        expected = pipe._get_add_time_ids((r["original_height"], r["original_width"]), (r["crop_top"], r["crop_left"]),
                                          (r["target_height"], r["target_width"]), torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        assert torch.equal(got, expected[0])
        assert got[0] != got[1] and got[4] != got[5]  # not square: a height/width swap would show


def test_latents_stream_from_row_groups_through_a_bounded_cache(tmp_path, zoo):
    """Rows hold no latents; batches read whole row groups through an LRU cache smaller than the
    dataset, each group at most once per batch that needs it and about once an epoch, and get
    exactly the latents that reading the whole table into memory gives."""
    import numpy as np
    import pyarrow as pa

    from curate.latents import read_row_group
    from curate.store import now
    from curate.trainer.data import LatentCache
    from curate.trainer.train import Trainer

    held_before = pa.total_allocated_bytes()  # Arrow memory earlier tests in this process still hold
    ds = make_latent_dataset(tmp_path / "ds", 48, buckets=[(32, 32), (32, 24)], latent_parts=3, rows_per_group=4)
    # A newer encode of four images, each after a failed row: the trainer must take the newer
    # ok row, which sits at an odd row of its group (a row index counts every stored row).
    redo = ds.read("latents").to_pylist()[:4]
    failed = [r | {"status": "error", "latent": None, "created_at": now()} for r in redo]
    newer = [r | {"latent": (np.frombuffer(r["latent"], np.float16) + 1).tobytes(), "created_at": now()} for r in redo]
    ds.write_part("latents", pa.Table.from_pylist([x for pair in zip(failed, newer) for x in pair]))

    stored = {}
    for r in ds.read("latents").to_pylist():  # the in-memory reference: the latest ok row per image
        if r["status"] == "ok" and (r["image_id"] not in stored
                                    or r["created_at"] >= stored[r["image_id"]]["created_at"]):
            stored[r["image_id"]] = r
    total_bytes = sum(len(r["latent"]) for r in stored.values())

    rows = load_rows(ds, load_config(None, batch_size=4))
    assert not hasattr(rows[0], "latent") and not hasattr(rows[0], "__dict__")  # metadata only
    groups = {(r.part, r.row_group) for r in rows}
    # 3 parts of 4 groups and the newer part's one group, less the group whose 4 rows were all re-encoded
    assert len({part for part, _ in groups}) == 4 and len(groups) == 12
    largest_group = max(read_row_group(Path(p), g, ["latent"]).column("latent").nbytes for p, g in groups)
    budget = 3 * largest_group  # room for about 3 of the 12 groups
    config = load_config(None, batch_size=4, latent_cache_mib=budget / 2**20)
    assert sorted(r.row for r in rows if r.image_id in {x["image_id"] for x in redo}) == [1, 3, 5, 7]

    data = TrainData(rows, config, tokenizer(zoo))
    for epoch in range(2):
        before = data.latents.reads.copy()
        plan = data.plan(epoch)
        for batch in plan:
            got = data.collate(batch, epoch, [tokenizer(zoo)])
            expected = [stored[i] for i in got["image_ids"]]
            assert torch.equal(got["latents"], torch.from_numpy(np.stack(
                [(np.frombuffer(r["latent"], np.float16).reshape(r["shape"]).astype(np.float32)
                  - (r["shift_factor"] or 0.0))
                 * r["scaling_factor"]
                 for r in expected])))
            assert data.latents.nbytes == sum(c.nbytes for c in data.latents.groups.values())
            assert data.latents.nbytes <= budget < total_bytes / 3
        reads = data.latents.reads - before
        needed = Counter(g for batch in plan for g in {(rows[i].part, rows[i].row_group) for i in batch})
        assert set(reads) <= set(needed) and all(reads[g] <= needed[g] for g in reads)  # once per batch at most
        # Batches come from windows of row groups that fit the cache: each group is read about
        # once an epoch (42 reads of these 12 groups when batches drew from the whole table).
        assert sum(reads.values()) <= len(groups)
        assert len(plan) == data.batches_per_epoch and len({i for batch in plan for i in batch}) == 4 * len(plan)
        assert all(len({rows[i].bucket for i in batch}) == 1 for batch in plan)
    # All the Arrow memory held now (measured by Arrow's allocator) is about the cache, far from the table's
    assert pa.total_allocated_bytes() - held_before < data.latents.nbytes + total_bytes / 4

    # With room for every group, two epochs read each group exactly once.
    roomy = TrainData(rows, config, tokenizer(zoo), latents=LatentCache(total_bytes * 2, ("latent", "mean", "logvar")))
    for epoch in range(2):
        for batch in roomy.plan(epoch):
            roomy.collate(batch, epoch, [tokenizer(zoo)])
    assert roomy.latents.reads == Counter(dict.fromkeys(groups, 1))

    # The trainer shares one bounded cache between training, validation and stable-train sets.
    run = load_config(None, output=str(tmp_path / "run"), batch_size=4, latent_cache_mib=2 * largest_group / 2**20,
                      max_steps=2, precision="fp32", validate_every=2, validation_fraction=0.1, checkpoint_every=100)
    trainer = Trainer(ds.root, zoo["sdxl"], run)
    summary = trainer.run(show_progress=False)
    assert summary["last loss"] == summary["last loss"] and "val_loss" in summary
    assert trainer.val_data.latents is trainer.stable_data.latents is trainer.data.latents
    assert 0 < trainer.data.latents.nbytes <= 2 * largest_group


def test_latents_are_resampled_per_epoch_from_stored_moments(tmp_path, zoo):
    """encode --keep-distribution stores mean and log-variance: each epoch draws its own
    latent, mean + std * noise seeded by (seed, epoch, image); resample_latents = false,
    or no moments, trains on the stored sample."""
    import numpy as np

    from curate.trainer.data import image_seed

    ds = make_latent_dataset(tmp_path / "ds", 8, moments=True)
    stored = {r["image_id"]: np.frombuffer(r["latent"], np.float16).reshape(r["shape"]).astype(np.float32)
              for r in ds.read("latents").to_pylist()}
    config = load_config(None, batch_size=4, validation_fraction=0)
    rows = load_rows(ds, config)
    data = TrainData(rows, config, tokenizer(zoo))
    batch = data.plan(0)[0]
    for epoch in (0, 1):
        got = data.collate(batch, epoch, [tokenizer(zoo)])
        for image_id, latent in zip(got["image_ids"], got["latents"].numpy()):
            noise = np.random.default_rng([0, epoch, image_seed(image_id), 2]).standard_normal(latent.shape, np.float32)
            np.testing.assert_allclose(latent, (stored[image_id] + 0.1 * noise) * 0.13025, rtol=1e-3, atol=1e-4)
        assert torch.equal(got["latents"], data.collate(batch, epoch, [tokenizer(zoo)])["latents"])  # seeded
    plain = load_config(None, batch_size=4, validation_fraction=0, resample_latents=False)
    got = TrainData(load_rows(ds, plain), plain, tokenizer(zoo)).collate(batch, 0, [tokenizer(zoo)])
    assert np.array_equal(got["latents"].numpy(), np.stack([stored[i] * np.float32(0.13025) for i in got["image_ids"]]))
