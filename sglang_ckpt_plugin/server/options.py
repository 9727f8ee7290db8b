"""Server flags added to ``python -m sglang.launch_server`` / ``sglang serve`` by the plugin."""

from __future__ import annotations

import argparse
import os

TIMEOUT_ENV = "SGLANG_CKPT_INITIAL_WEIGHTS_TIMEOUT"


class _StoreTimeoutInEnv(argparse.Action):
    """ServerArgs keeps only its own fields, so the timeout travels in the environment (children inherit it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is not None and values <= 0:
            parser.error(f"{option_string} must be > 0 seconds")
        os.environ[TIMEOUT_ENV] = str(values)
        setattr(namespace, self.dest, values)


def add_server_flags(parser: argparse.ArgumentParser, wait_field: str) -> None:
    parser.add_argument(
        "--wait-for-initial-weights",
        dest=wait_field,
        action="store_true",
        help="(sglang-ckpt-plugin) with --load-format dummy: answer 503 to health and generation until a "
        "complete set of weights has been pushed (python -m sglang_ckpt_plugin.update). "
        "Same as --checkpoint-engine-wait-weights-before-ready.",
    )
    parser.add_argument(
        "--initial-weights-timeout",
        dest="ckpt_plugin_initial_weights_timeout",
        type=float,
        default=None,
        action=_StoreTimeoutInEnv,
        help="(sglang-ckpt-plugin) with --wait-for-initial-weights: exit non-zero if no weights arrive "
        "within this many seconds. Default: wait indefinitely.",
    )


def initial_weights_timeout() -> float | None:
    value = os.environ.get(TIMEOUT_ENV)
    return float(value) if value else None
