"""Tiny random Qwen2.5-VL, Qwen3-VL and Gemma-3 checkpoints (vision tower, language model, processor files, a
word-level tokenizer with the family's special tokens) and a small image, made locally for the VLM tests: no hub
access needed.

The tokenizer splits and joins words with a Metaspace pre-tokenizer and decoder: SGLang's chat path looks for
``<|vision_start|><|image_pad|><|vision_end|>`` in the decoded prompt, and a decoder that put spaces between special
tokens would make it drop the image silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tiny_model import vary_weights

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PAD = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] in ('image', 'image_url') %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
IMAGE_PROMPT = "<|im_start|>user <|vision_start|><|image_pad|><|vision_end|> w20 w30<|im_end|><|im_start|>assistant "

GEMMA_SPECIAL = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }} {% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] in ('image', 'image_url') %}"
    "<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}"
)
GEMMA_IMAGE_PROMPT = "<bos><start_of_turn>user <start_of_image> w20 w30<end_of_turn><start_of_turn>model "


# every family's language model: 2 layers of 64, 4 query and 2 KV heads
TEXT_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
)


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *SPECIAL, PAD]
    words += [f"w{i}" for i in range(len(words), vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token=PAD,
        additional_special_tokens=SPECIAL,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _gemma_tokenizer(vocab: int):
    """Gemma's ids for pad/eos/bos, its turn and image tokens (``boi``/``eoi``/``image`` named, as Gemma3Processor
    reads them), every special token split out before the Metaspace pre-tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    first = ["<pad>", "<eos>", "<bos>", "<unk>", *GEMMA_SPECIAL]
    words = first + [f"w{i}" for i in range(len(first), vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in first])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    fast.chat_template = GEMMA_TEMPLATE
    return fast


# Each family's classes, its own sizes beside the shared ones, the image side that makes 4 image tokens (Qwen: a 2x2
# merge of 2x2 patches; Gemma-3: 4x4 patches pooled to 2x2), the prompt of an image request and the server flags it
# needs.
FAMILIES = {
    "qwen2_5_vl": dict(
        classes=(
            "Qwen2_5_VLConfig",
            "Qwen2_5_VLForConditionalGeneration",
            "Qwen2_5_VLProcessor",
            "Qwen2VLVideoProcessor",
        ),
        text=dict(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision=dict(patch_size=14, window_size=56, fullatt_block_indexes=[1], in_chans=3),
        image_side=56,
        image_prompt=IMAGE_PROMPT,
        server_args=[],
    ),
    "qwen3_vl": dict(
        classes=("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
        text=dict(
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 500000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision=dict(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0], in_channels=3),
        image_side=64,
        image_prompt=IMAGE_PROMPT,
        server_args=[],
    ),
    "gemma3": dict(
        classes=("Gemma3Config", "Gemma3ForConditionalGeneration", "Gemma3Processor", None),
        image_side=32,
        image_prompt=GEMMA_IMAGE_PROMPT,
        server_args=["--enable-multimodal"],  # SGLang serves Gemma-3 text-only unless asked
    ),
}


def make_tiny_vlm(out_dir: str | Path, family: str = "qwen2_5_vl", seed: int = 0, vocab: int = 1000) -> Path:
    """Write config, random weights (float32), processor (images of 1-2x ``image_side``: 4 to 16 image tokens) and
    tokenizer of one of FAMILIES."""
    import transformers
    from transformers import Qwen2VLImageProcessor

    if family == "gemma3":
        return _make_gemma3(Path(out_dir), seed, vocab)
    spec = FAMILIES[family]
    config_class, model_class, processor_class, video_class = (getattr(transformers, c) for c in spec["classes"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(vocab)
    ids = tokenizer.get_vocab()
    eos = ids["<|im_end|>"]
    text = dict(
        **TEXT_SIZES,
        vocab_size=vocab,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=eos,
        **spec["text"],
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        spatial_merge_size=2,
        temporal_patch_size=2,
        **spec["vision"],
    )
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    vary_weights(model_class(config)).save_pretrained(out, safe_serialization=True)
    side = spec["image_side"]
    images = Qwen2VLImageProcessor(
        patch_size=spec["vision"]["patch_size"], merge_size=2, min_pixels=side * side, max_pixels=4 * side * side
    )
    processor_class(images, tokenizer, video_class(), chat_template=CHAT_TEMPLATE).save_pretrained(out)
    generation = {"do_sample": False, "bos_token_id": 1, "eos_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def _make_gemma3(out: Path, seed: int, vocab: int) -> Path:
    """A tiny Gemma-3 with a SigLIP vision tower, its tensors named as the released checkpoints name them
    (``vision_tower.vision_model.*``, ``language_model.model.*``, ``multi_modal_projector.*``), which SGLang 0.5.23
    loads; transformers 5 saves the vision tower without ``vision_model.``."""
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _gemma_tokenizer(vocab)
    ids = tokenizer.get_vocab()
    side = FAMILIES["gemma3"]["image_side"]
    text = dict(
        **TEXT_SIZES,
        head_dim=16,
        vocab_size=vocab,
        sliding_window=8,
        query_pre_attn_scalar=16,
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
        pad_token_id=ids["<pad>"],
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=side,
        patch_size=side // 4,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = vary_weights(Gemma3ForConditionalGeneration(config))
    with torch.no_grad():  # transformers starts the projection at zero: the image would not matter
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    weights = out / "model.safetensors"
    tensors = {_released_gemma3_name(name): t for name, t in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    images = Gemma3ImageProcessor(size={"height": side, "width": side}, do_pan_and_scan=False)
    Gemma3Processor(images, tokenizer, chat_template=GEMMA_TEMPLATE, image_seq_length=4).save_pretrained(out)
    generation = {"do_sample": False, "bos_token_id": ids["<bos>"], "eos_token_id": ids["<eos>"]}
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def _released_gemma3_name(name: str) -> str:
    return (
        "vision_tower.vision_model." + name.removeprefix("vision_tower.") if name.startswith("vision_tower.") else name
    )


def make_image(path: str | Path, seed: int = 0, size: int = 56) -> Path:
    """A small random RGB PNG (``size``: a family's ``image_side`` makes 4 image tokens)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return Path(path)
