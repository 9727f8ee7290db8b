"""``python -m sglang_ckpt_plugin.update``: push a checkpoint into a running SGLang server."""

import sys

from .loader.cli import main

if __name__ == "__main__":
    sys.exit(main())
