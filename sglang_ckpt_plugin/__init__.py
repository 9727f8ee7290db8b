"""sglang-ckpt-plugin: load and update SGLang model weights the checkpoint-engine way."""

__version__ = "0.1.0"
