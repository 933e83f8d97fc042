"""Tiny zoo writers for the scoring models: open_clip, WD14, JoyTag, OWLv2, the quality head.

Each writes random weights (seeded, so two zoos are equal) in the published layout:
the same file names, config keys, tag CSV columns and tokenizer files as the real repos.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_clip_bpe(folder: Path) -> None:
    """The real CLIP BPE tokenizer as Hugging Face files (vocab.json, merges.txt), built
    from the vocabulary open_clip ships, so no tokenizer is downloaded."""
    import open_clip.tokenizer as oct

    merges = gzip.open(oct.default_bpe(), "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    # open_clip calls the specials <start_of_text>/<end_of_text>; the published files say <|startoftext|>/<|endoftext|>
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): i for token, i in oct.SimpleTokenizer().encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "!"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}))


def write_laion_aesthetic(target: Path) -> None:
    """The LAION aesthetic predictor's published file: a torch state dict, random weights."""
    import torch

    from curate.models.aesthetic import WEIGHTS_FILE, AestheticPredictor

    torch.manual_seed(0)
    torch.save(AestheticPredictor().state_dict(), target / WEIGHTS_FILE)


def write_once(target: Path, write) -> Path:
    """Run `write(target)` unless an earlier run finished it (a `.complete` marker, made last)."""
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        write(target)
        (target / ".complete").touch()
    return target


def save_weights(model, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)


def write_open_clip(folder: Path) -> None:
    """Like laion/CLIP-ViT-B-32-laion2B-s34B-b79K: open_clip_config.json + open_clip_model.safetensors."""
    import open_clip
    import torch

    torch.manual_seed(0)
    save_weights(open_clip.CLIP(**TINY_CLIP), folder / "open_clip_model.safetensors")
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD,
                                                         "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    write_clip_bpe(folder)


def write_quality_head(folder: Path) -> None:
    """A rank head for the embeddings of the tiny open_clip beside it, in the project's own format."""
    import torch

    from curate.models.clip import Clip
    from curate.models.quality_head import RankHead, save_head

    clip_dir = folder.parent / "open_clip"

    torch.manual_seed(0)
    head = RankHead(TINY_CLIP["embed_dim"], hidden=(16,))
    with torch.no_grad():  # random embeddings of random images are close: amplify so ranks spread
        head.net[0].weight.mul_(30)
    save_head(folder, head, embedder=Clip(str(clip_dir)).model_value())


TINY_HF_CLIP = 32  # image size and width of the tiny transformers CLIP


def write_hf_clip(folder: Path) -> None:
    """Like openai/clip-vit-base-patch32 (what bigASP's embed.py loads): a transformers CLIPModel
    (config.json, model.safetensors) with its CLIP image processor's preprocessor_config.json."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    small = {"hidden_size": TINY_HF_CLIP, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}
    config = CLIPConfig(text_config={**small, "vocab_size": 49408, "max_position_embeddings": 77},
                        vision_config={**small, "image_size": TINY_HF_CLIP, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": TINY_HF_CLIP},
                          crop_size={"height": TINY_HF_CLIP, "width": TINY_HF_CLIP}).save_pretrained(folder)


def write_bigasp_scorer(folder: Path) -> None:
    """bigASP's quality-arena/scorer.pt layout (torch.save of ScoreClassifier's state dict), random
    weights, for the class tokens of the tiny hf_clip beside it (the real one: 768 wide)."""
    import numpy as np
    import torch
    from transformers import CLIPVisionModel

    from curate.models.quality_head import BigaspScorer

    torch.manual_seed(0)
    scorer = BigaspScorer(TINY_HF_CLIP)
    vision = CLIPVisionModel.from_pretrained(folder.parent / "hf_clip").eval()
    pixels = torch.from_numpy(np.random.default_rng(0).uniform(-1.5, 1.5, (64, 3, TINY_HF_CLIP, TINY_HF_CLIP)))
    with torch.no_grad():  # a random tiny CLIP's tokens share most of their length: centre the logits on
        tokens = vision(pixel_values=pixels.float()).last_hidden_state[:, 0]  # them and amplify, so ranks spread
        hidden = torch.nn.functional.gelu(scorer.linear1(scorer.ln(tokens)))
        scorer.linear2.weight.mul_(40 / hidden.std(0).mean())
        scorer.linear2.bias.copy_(-scorer.linear2.weight @ hidden.mean(0))
    torch.save(scorer.state_dict(), folder / "scorer.pt")


def write_classifier_nsfw(folder: Path) -> None:
    """Like Falconsai/nsfw_image_detection: a transformers ViTForImageClassification (config.json with
    id2label normal/nsfw, model.safetensors) and its ViTImageProcessor (a square resize, mean/std 0.5)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                       image_size=32, patch_size=8, id2label={0: "normal", 1: "nsfw"},
                       label2id={"normal": 0, "nsfw": 1})
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    with torch.no_grad():  # random features of random images are alike: spread the probabilities
        model.classifier.weight.mul_(30)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder)


def write_classifier_style(folder: Path) -> None:
    """A multi-label style classifier (problem_type multi_label_classification: a sigmoid per label),
    a ConvNeXt with its ConvNextImageProcessor (shorter side / crop_pct, then a centre crop)."""
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor

    labels = ["photo", "anime", "3d render"]
    config = ConvNextConfig(num_stages=2, depths=[1, 1], hidden_sizes=[8, 16], image_size=32,
                            problem_type="multi_label_classification", id2label=dict(enumerate(labels)),
                            label2id={name: i for i, name in enumerate(labels)})
    torch.manual_seed(1)
    model = ConvNextForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.mul_(10)
    model.save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(folder)


# A Danbooru-like tag list: ratings (9), general tags (0) including `watermark`, characters (4).
RATING_TAGS = ["general", "sensitive", "questionable", "explicit"]
GENERAL_TAGS = ["1girl", "solo", "outdoors", "sky", "cloud", "tree", "day", "watermark", "signature", "text",
                "simple_background", "white_background", "blue_sky", "grass", "water", "smile", "long_hair",
                "short_hair", "looking_at_viewer", "monochrome", "greyscale", "building", "scenery", "no_humans"]
CHARACTER_TAGS = ["hatsune_miku", "hakurei_reimu", "kirisame_marisa", "artoria_pendragon_(fate)"]
TINY_TAGGER_SIZE = 64
TINY_OWLV2_SIZE = 96  # the largest of the tiny pass, so the shared decode must serve it


def write_selected_tags(path: Path) -> None:
    rows = [(c, n) for c, names in ((9, RATING_TAGS), (0, GENERAL_TAGS), (4, CHARACTER_TAGS)) for n in names]
    lines = ["tag_id,name,category,count"] + [f"{9999990 + i if c == 9 else 1000 + i},{n},{c},{100000 // (i + 1)}"
                                              for i, (c, n) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")


def n_tags() -> int:
    return len(RATING_TAGS) + len(GENERAL_TAGS) + len(CHARACTER_TAGS)


def write_wd14(folder: Path) -> None:
    """Like SmilingWolf/wd-vit-tagger-v3's ONNX export: model.onnx (input [batch, S, S, 3]
    float BGR 0-255, output [batch, tags] sigmoid) + selected_tags.csv."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    width, patch = 16, 16
    weights = {
        "patch_w": rng.normal(0, 0.2, (width, 3, patch, patch)).astype(np.float32),
        "head_w": rng.normal(0, 2.0, (width, n_tags())).astype(np.float32),
        "head_b": rng.normal(-0.5, 1.0, (n_tags(),)).astype(np.float32),
        "scale": np.array(1 / 255, np.float32),
        "half": np.array(0.5, np.float32),
    }
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["nchw", "scale"], ["unit"]),
        helper.make_node("Sub", ["unit", "half"], ["centred"]),
        helper.make_node("Conv", ["centred", "patch_w"], ["patches"], kernel_shape=[patch, patch],
                         strides=[patch, patch]),
        helper.make_node("ReduceMean", ["patches"], ["pooled4"], axes=[2, 3], keepdims=1),
        helper.make_node("Flatten", ["pooled4"], ["pooled"], axis=1),
        helper.make_node("Gemm", ["pooled", "head_w", "head_b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "wd14-tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", TINY_TAGGER_SIZE, TINY_TAGGER_SIZE, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n_tags()])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    write_selected_tags(folder / "selected_tags.csv")


def write_wd14_timm(folder: Path) -> None:
    """Like the timm layout of SmilingWolf/wd-vit-tagger-v3: config.json + model.safetensors + selected_tags.csv."""
    import timm
    import torch

    model_args = {"img_size": TINY_TAGGER_SIZE, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2,
                  "class_token": False, "global_pool": "avg", "fc_norm": False, "act_layer": "gelu_tanh"}
    config = {
        "architecture": "vit_base_patch16_224", "num_classes": n_tags(), "num_features": 32, "global_pool": "avg",
        "model_args": model_args,
        "pretrained_cfg": {"custom_load": False, "input_size": [3, TINY_TAGGER_SIZE, TINY_TAGGER_SIZE],
                           "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": n_tags(),
                           "pool_size": None, "first_conv": None, "classifier": None},
    }
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=n_tags(), **model_args)
    torch.nn.init.normal_(model.head.weight, std=1.0)  # spread the scores so thresholds matter
    torch.nn.init.normal_(model.head.bias, std=1.5)
    save_weights(model, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_selected_tags(folder / "selected_tags.csv")


def write_joytag(folder: Path) -> None:
    """Like fancyfeast/joytag (the published weights): config.json ({"class": "ViT", ...}),
    model.safetensors and top_tags.txt."""
    import torch

    from curate.models.joytag import JoyTagViT

    tags = GENERAL_TAGS + CHARACTER_TAGS  # JoyTag has no rating outputs
    config = {"class": "ViT", "n_tags": len(tags), "image_size": TINY_TAGGER_SIZE, "num_blocks": 2, "patch_size": 16,
              "d_model": 32, "mlp_dim": 64, "num_heads": 2, "stochdepth_rate": 0.05, "use_sine": False,
              "loss_type": "focal2", "layerscale_init": None, "head_mean_after": False,
              "cnn_stem": "conv:c=8;ln;conv:c=16;ln;conv:c=32;ln;conv:c=32;ln;conv:c=32,s=1,k=1,p=0",
              "patch_dropout": 0.1}
    torch.manual_seed(0)
    model = JoyTagViT(**{k: v for k, v in config.items() if k != "class"})
    torch.nn.init.normal_(model.head.weight, std=1.0)  # spread the scores so the threshold matters
    torch.nn.init.normal_(model.head.bias, std=1.5)
    save_weights(model, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "top_tags.txt").write_text("\n".join(tags) + "\n")


def write_owlv2(folder: Path, config=None) -> None:
    """Like google/owlv2-base-patch16-ensemble: a transformers directory (config.json,
    model.safetensors, preprocessor_config.json, CLIP tokenizer files), built offline; tiny
    unless an Owlv2Config is given (models/real_size.py gives the published one)."""
    import torch
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1}
    config = config or Owlv2Config(text_config={**small, "vocab_size": 49408, "max_position_embeddings": 16},
                                   vision_config={**small, "image_size": TINY_OWLV2_SIZE, "patch_size": 16},
                                   projection_dim=32)
    size = config.vision_config.image_size
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # random class heads saturate every logit: centre them near sigmoid 0.1
        model.class_head.logit_scale.weight.zero_()
        model.class_head.logit_scale.bias.zero_()
        model.class_head.logit_shift.weight.normal_(0, 0.2)
        model.class_head.logit_shift.bias.fill_(-4.4)
    model.save_pretrained(folder)
    write_clip_bpe(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!",
                              model_max_length=config.text_config.max_position_embeddings)
    image_processor = Owlv2ImageProcessor(size={"height": size, "width": size})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    # transformers 5 saves processor_config.json; the published repo has preprocessor_config.json
    saved = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").unlink()
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**saved["image_processor"], "processor_class": "Owlv2Processor"}, indent=2))
