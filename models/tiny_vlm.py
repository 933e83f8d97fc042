"""Tiny random-weight captioners of every architecture the caption schemes name, built from
transformers' own config classes and saved by save_pretrained in the layout of the published
checkpoints, so `AutoProcessor` / `AutoModelForImageTextToText.from_pretrained(dir)` load them
as they load the real ones:

- llava_next: LLaVA-NeXT (llava-hf/llava-v1.6-*): a CLIP tower, AnyRes tiles, a Llama.
- qwen2_5_vl: Qwen2.5-VL (Qwen/Qwen2.5-VL-*-Instruct): its windowed ViT with 2x2 patch merging,
  dynamic resolution, M-RoPE in a Qwen2 text model, its ChatML template.
- smolvlm: SmolVLM (HuggingFaceTB/SmolVLM-*-Instruct, Idefics3): a SigLIP tower over image
  tiles plus a global view, pixel shuffle, a Llama, its `User:`/`Assistant:` template.
- florence2: Florence-2 (native in transformers 5): a DaViT tower and a BART encoder-decoder;
  the prompt is a task token the processor expands.
- joycaption: JoyCaption beta one (fancyfeast/llama-joycaption-beta-one-hf-llava): LLaVA with a
  SigLIP tower (every patch, no CLS) and a Llama text model, Llama 3's turn template.

Each uses a word-level tokenizer of whole English words (random weights then produce word
salad that reads as text) with the special tokens its processor looks for.
"""
from __future__ import annotations

from pathlib import Path

from curate.models.tiny_llava import WORDS

SIZE, PATCH = 32, 8
PROMPT_WORDS = ("system user assistant you are a helpful image captioner write describe caption detailed description "
                "descriptive picture few sentences long short for this in formal tone what does the is shown with "
                "paragraph").split()
SMALL_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024)
SMALL_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                 patch_size=PATCH)


def word_tokenizer(specials: list[str], **roles):
    """A fast tokenizer over whole words and punctuation runs, with `specials` as special tokens;
    roles name them (bos_token=..., eos_token=..., extra_special_tokens=...)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys(["<unk>"] + specials + WORDS + PROMPT_WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", padding_side="left",
                                   additional_special_tokens=specials, **roles)


def save(target: Path, model, processor, tokenizer) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(target)
    processor.save_pretrained(target)


def write_llava_next(target: Path) -> None:
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from curate.models.tiny_llava import CHAT_TEMPLATE

    tokenizer = word_tokenizer(["<s>", "</s>", "<pad>", "<image>"], bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    pinpoints = [[SIZE, 2 * SIZE], [2 * SIZE, SIZE], [2 * SIZE, 2 * SIZE]]  # AnyRes: a grid of tiles
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**SMALL_VIT, projection_dim=32),
        text_config=LlamaConfig(**SMALL_LLAMA, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.image_token_id, image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(0)
    save(target, LlavaNextForConditionalGeneration(config).eval(), processor, tokenizer)


# Qwen2.5-VL's chat template (ChatML, a default system turn, images between vision marks).
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_qwen2_5_vl(target: Path) -> None:
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    marks = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = word_tokenizer(["<|endoftext|>"] + marks, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    merge = dict(patch_size=PATCH, merge_size=2, temporal_patch_size=2)  # 2x2 patches merge into one token
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": (2 * PATCH) ** 2, "longest_edge": (2 * SIZE) ** 2},
                                            **merge)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(**merge), chat_template=QWEN_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in marks}
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=4 * PATCH, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        text_config=dict(**SMALL_LLAMA, vocab_size=len(tokenizer), bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         # M-RoPE: the head's 8 frequency pairs split over time, height and width
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    save(target, Qwen2_5_VLForConditionalGeneration(config).eval(), processor, tokenizer)


# SmolVLM's chat template (HuggingFaceTB/SmolVLM-256M-Instruct).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def write_smolvlm(target: Path) -> None:
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tiles = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer = word_tokenizer(["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>",
                                "<fake_token_around_image>", "<global-img>"] + tiles,
                               bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    # tiles of SIZE px and a global view; each tile's (SIZE/PATCH)^2 patches shuffle 2x2 into 4 tokens
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 2 * SIZE}, max_image_size={"longest_edge": SIZE})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=(SIZE // PATCH) ** 2 // 4, chat_template=SMOLVLM_TEMPLATE)
    config = Idefics3Config(
        vision_config=dict(SMALL_VIT),
        text_config=dict(model_type="llama", **SMALL_LLAMA, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    save(target, Idefics3ForConditionalGeneration(config).eval(), processor, tokenizer)


def write_florence2(target: Path) -> None:
    import torch
    from transformers import (
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    tokenizer = word_tokenizer(["<s>", "<pad>", "</s>", "<image>"], bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    # DaViT: stride 4, then 2: a 4x4 feature map for SIZE px, plus its pooled token
    image_processor = CLIPImageProcessor(size={"height": SIZE, "width": SIZE}, do_center_crop=False,
                                         image_seq_length=(SIZE // 8) ** 2 + 1, image_mean=[0.485, 0.456, 0.406],
                                         image_std=[0.229, 0.224, 0.225])
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id)
    config = Florence2Config(
        vision_config=dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                           patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4],
                           window_size=2, projection_dim=64, max_position_embeddings=16, drop_path_rate=0.0),
        # init_std 0.2 and an untied head: a random one-layer decoder otherwise repeats its start token
        text_config=dict(vocab_size=len(tokenizer), d_model=64, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                         max_position_embeddings=256, forced_eos_token_id=tokenizer.eos_token_id, init_std=0.2, **ids),
        image_token_id=tokenizer.image_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config).eval()
    model.generation_config.decoder_start_token_id = tokenizer.eos_token_id
    save(target, model, processor, tokenizer)


# Llama 3's turn format, which JoyCaption's template uses (string turns; the image goes before the prompt)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def write_joycaption(target: Path) -> None:
    import torch
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    tokenizer = word_tokenizer(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                "<|finetune_right_pad_id|>", "<image>"], bos_token="<|begin_of_text|>",
                               eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
                               extra_special_tokens={"image_token": "<image>"})
    processor = LlavaProcessor(image_processor=SiglipImageProcessor(size={"height": SIZE, "width": SIZE}),
                               tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="full",
                               num_additional_image_tokens=0, chat_template=LLAMA3_TEMPLATE)
    config = LlavaConfig(  # as the published config: a SigLIP tower, every patch (no CLS), layer -2
        vision_config=SiglipVisionConfig(**SMALL_VIT),
        text_config=LlamaConfig(**SMALL_LLAMA, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.image_token_id, vision_feature_select_strategy="full", vision_feature_layer=-2,
        image_seq_length=(SIZE // PATCH) ** 2)
    torch.manual_seed(0)
    save(target, LlavaForConditionalGeneration(config).eval(), processor, tokenizer)
