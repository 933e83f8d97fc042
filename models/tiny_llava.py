"""A random-weight LLaVA in the llava-hf layout, small enough to generate on CPU in tests.

The real pieces, tiny: LlavaForConditionalGeneration (a CLIP vision tower, a projector and
a Llama), a tokenizer built offline with an `<image>` token, a LLaVA-1.5 style chat
template, and a LlavaProcessor with a CLIP image processor, all written by
save_pretrained, so `AutoProcessor` / `AutoModelForImageTextToText.from_pretrained(dir)`
load it exactly as they load llava-hf/llava-1.5-7b-hf.

The vocabulary is whole English words, so random weights still produce word salad that
reads as text (the caption cleanup and the garbage check see realistic input).
"""
from __future__ import annotations

from pathlib import Path

IMAGE_SIZE = 32
PATCH_SIZE = 8
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
WORDS = """a an the of in on at with and or but near under over behind beside between above below
there is are was it this that these those its their his her one two three several many some
woman man girl boy child people person dog cat bird horse car bus bicycle street road city building house
room kitchen table desk chair sofa bed window door wall floor ceiling lamp flower plant tree grass field
forest mountain river lake sea beach sky cloud sun moon night day morning evening light shadow
red blue green yellow white black grey brown orange pink purple dark bright soft warm cold old young small
large tall short long round wooden metal glass stone standing sitting walking running holding wearing
looking smiling lying sleeping dress shirt coat hat hair face hand eyes background foreground center left
right top bottom close up shot view portrait photo painting drawing detailed sharp blurry colorful quiet
. , !""".split()
# LLaVA-1.5's prompt format: "USER: <image>\n{prompt} ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    prompt_words = ("USER ASSISTANT : write describe caption detailed description image picture few sentences long "
                    "short for this").split()
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(SPECIAL + WORDS + prompt_words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Split(r"\w+|[^\w\s]+", behavior="isolated")  # words and punctuation
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")


def write_tiny_llava(target: Path, seed: int = 0) -> None:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    processor.save_pretrained(target)
