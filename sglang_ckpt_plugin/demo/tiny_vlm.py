"""A tiny random Qwen2.5-VL checkpoint (vision tower, language model, processor files, a word-level tokenizer with
Qwen's special tokens) and a small image, made locally for the VLM tests: no hub access needed.

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


def make_tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0, vocab: int = 1000) -> Path:
    """Write config, random weights (float32), processor (images of 56-112 px: 4 to 16 image tokens) and tokenizer."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

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
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=eos,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
        in_chans=3,
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=1,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    vary_weights(Qwen2_5_VLForConditionalGeneration(config)).save_pretrained(out, safe_serialization=True)
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2_5_VLProcessor(
        image_processor=images,
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    (out / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "bos_token_id": 1, "eos_token_id": eos})
    )
    return out


def make_image(path: str | Path, seed: int = 0, size: int = 56) -> Path:
    """A small random RGB PNG (56 px: 4 image tokens after the 2x2 merge)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return Path(path)
