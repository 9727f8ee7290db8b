"""Tiny random Qwen2.5-VL and Qwen3-VL checkpoints (vision tower, language model, processor files, a word-level
tokenizer with Qwen's special tokens) and a small image, made locally for the VLM tests: no hub access needed.

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


# Each family's classes, its own sizes beside the shared ones, and the image side that makes 4 image tokens (a 2x2
# merge of 2x2 patches).
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
    ),
}


def make_tiny_vlm(out_dir: str | Path, family: str = "qwen2_5_vl", seed: int = 0, vocab: int = 1000) -> Path:
    """Write config, random weights (float32), processor (images of 1-2x ``image_side``: 4 to 16 image tokens) and
    tokenizer of one of FAMILIES."""
    import transformers
    from transformers import Qwen2VLImageProcessor

    spec = FAMILIES[family]
    config_class, model_class, processor_class, video_class = (getattr(transformers, c) for c in spec["classes"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(vocab)
    ids = tokenizer.get_vocab()
    eos = ids["<|im_end|>"]
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
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


def make_image(path: str | Path, seed: int = 0, size: int = 56) -> Path:
    """A small random RGB PNG (``size``: a family's ``image_side`` makes 4 image tokens)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return Path(path)
