"""Captioning throughput: images/s and generated tokens/s, batched against batch 1. Prints JSON.

    python bench/caption.py                          # tiny random-weight LLaVA on CPU
    python bench/caption.py --real-size --device cuda   # LLaVA-1.5-7B architecture, random fp16 weights,
                                                        # transformers batched generate vs vLLM (if installed)

Every row generates exactly --new-tokens tokens (EOS is ignored), so the figures compare
the same work. The tiny mode also times the whole `curate caption` stage (decode, prepare,
generate, cleanup, Parquet) on an ingested dataset.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from curate.cli.demo import synthetic_image  # noqa: E402
from curate.models.captioner import make_captioner, parse_spec  # noqa: E402
from curate.models.tiny_llava import build_tokenizer  # noqa: E402


def images(n: int, seed: int = 0) -> list[Image.Image]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [synthetic_image(rng, int(rng.integers(300, 700)), int(rng.integers(300, 700))) for _ in range(n)]


def measure(captioner, imgs, prompt: str, batch_size: int) -> dict:
    from curate.images import Decoded

    prepared = [captioner.preprocess(Decoded(i, i.width, i.height, "PNG", "RGB", False))["input"] for i in imgs]
    captioner.caption(prepared[:batch_size], [prompt] * min(batch_size, len(prepared)))  # warm-up
    captioner.generated_tokens = 0
    started = time.perf_counter()
    for start in range(0, len(prepared), batch_size):
        chunk = prepared[start:start + batch_size]
        captioner.caption(chunk, [prompt] * len(chunk))
    seconds = time.perf_counter() - started
    return {"batch_size": batch_size, "images": len(prepared), "seconds": round(seconds, 3),
            "images_per_s": round(len(prepared) / seconds, 2),
            "generated_tokens_per_s": round(captioner.generated_tokens / seconds, 1)}


def fix_length(model, new_tokens: int) -> None:
    model.generation_config.min_new_tokens = new_tokens  # EOS cannot end a row early
    model.generation_config.max_new_tokens = new_tokens


def tiny(args) -> dict:
    from curate.models.tiny import write_zoo
    from curate.pipelines.caption import CaptionStage
    from curate.pipelines.executor import run
    from curate.pipelines.ingest import ingest
    from curate.store import Dataset

    work = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    llava = write_zoo(work / "zoo", ["llava"])["llava"]
    captioner = make_captioner(parse_spec(f"llava:{llava}"), max_new_tokens=args.new_tokens)
    captioner.load(args.device)
    fix_length(captioner._model, args.new_tokens)
    imgs = images(args.images)
    result = {"model": "tiny random-weight LLaVA (models/tiny_llava.py)", "device": str(captioner._device),
              "new_tokens": args.new_tokens,
              "batched": measure(captioner, imgs, "Describe the image.", args.batch_size),
              "batch_1": measure(captioner, imgs, "Describe the image.", 1)}
    result["batched_speedup"] = round(result["batched"]["images_per_s"] / result["batch_1"]["images_per_s"], 2)
    # The whole stage, end to end, on an ingested dataset (default max_new_tokens-limited, EOS may stop early).
    src = work / "images"
    src.mkdir()
    for k, img in enumerate(imgs):
        img.save(src / f"{k:04d}.jpg", quality=90)
    ds = Dataset(work / "ds", create=True)
    ingest([str(src)], ds, show_progress=False)
    stage = CaptionStage(f"llava:{llava}", "Describe the image.", args.new_tokens, batch_size=args.batch_size,
                         device=args.device)
    summary = run(ds, stage, show_progress=False)[0]
    result["stage_end_to_end"] = {"images": summary.done, "seconds": round(summary.seconds, 2),
                                  "images_per_s": summary.as_dict()["images_per_s"], "note": "includes model load"}
    return result


def real_size(args) -> dict:
    """LLaVA-1.5-7B's architecture (CLIP ViT-L/14-336 + Llama-2-7B), random weights, fp16."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from curate.models.tiny_llava import CHAT_TEMPLATE

    tokenizer = build_tokenizer()
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                                                  crop_size={"height": 336, "width": 336}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-2)
    work = Path(tempfile.mkdtemp(prefix="bench-caption-7b-"))
    config.save_pretrained(work)  # config, tokenizer and processor only: vLLM makes its own dummy weights
    processor.save_pretrained(work)
    imgs = images(args.images)
    result = {"model": "LLaVA-1.5-7B architecture, random weights", "new_tokens": args.new_tokens}

    captioner = make_captioner(parse_spec(f"llava:{work}"), max_new_tokens=args.new_tokens)
    captioner._device, captioner._dtype = torch.device(args.device), torch.float16
    with torch.device(args.device):
        torch.set_default_dtype(torch.float16)
        model = LlavaForConditionalGeneration(config).eval()
        torch.set_default_dtype(torch.float32)
    captioner._model, captioner._processor = model, processor
    captioner._pad_id, captioner._system = tokenizer.pad_token_id, None
    captioner._inference_mode = torch.inference_mode
    tokenizer.padding_side = "left"
    fix_length(model, args.new_tokens)
    result["transformers_batched"] = measure(captioner, imgs, "Describe the image.", args.batch_size)
    result["transformers_batch_1"] = measure(captioner, imgs[: max(4, args.images // 8)], "Describe the image.", 1)
    del model, captioner
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        result["vllm"] = "not installed"
        return result
    llm = LLM(model=str(work), load_format="dummy", dtype="float16", limit_mm_per_prompt={"image": 1})
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        add_generation_prompt=True, tokenize=False)
    requests = [{"prompt": prompt, "multi_modal_data": {"image": img}} for img in imgs]
    llm.generate(requests[:2], params, use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result["vllm"] = {"images": len(imgs), "seconds": round(seconds, 3), "images_per_s": round(len(imgs) / seconds, 2),
                      "generated_tokens_per_s": round(tokens / seconds, 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-size", action="store_true", help="LLaVA-1.5-7B architecture (needs a GPU in practice)")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present)")
    parser.add_argument("--images", type=int, default=None, help="images to caption (default 48 tiny, 64 real-size)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens generated per image (default 16 tiny, 64 real-size)")
    args = parser.parse_args()
    if args.real_size:
        import torch

        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        args.images, args.new_tokens = args.images or 64, args.new_tokens or 64
        result = real_size(args)
    else:
        args.images, args.new_tokens = args.images or 48, args.new_tokens or 16
        result = tiny(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
