"""Server flags added to ``python -m sglang.launch_server`` / ``sglang serve`` by the plugin."""

from __future__ import annotations

import argparse
import os

TIMEOUT_ENV = "SGLANG_CKPT_INITIAL_WEIGHTS_TIMEOUT"
KEEP_BUFFERS_ENV = "SGLANG_CKPT_KEEP_UPDATE_BUFFERS"


class _StoreTimeoutInEnv(argparse.Action):
    """ServerArgs keeps only its own fields, so the timeout travels in the environment (children inherit it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is not None and values <= 0:
            parser.error(f"{option_string} must be > 0 seconds")
        os.environ[TIMEOUT_ENV] = str(values)
        setattr(namespace, self.dest, values)


class _StoreFlagInEnv(argparse.Action):
    """A switch that the server's ranks read from the environment (they inherit it; ServerArgs would drop it)."""

    def __init__(self, option_strings, dest, env: str, **kwargs):
        self.env = env
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        os.environ[self.env] = "1"
        setattr(namespace, self.dest, True)


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
    parser.add_argument(
        "--keep-update-buffers",
        dest="ckpt_plugin_keep_update_buffers",
        action=_StoreFlagInEnv,
        env=KEEP_BUFFERS_ENV,
        help="(sglang-ckpt-plugin) keep the shared-memory bucket buffers of weight updates between updates and "
        "lend them to every loader (python -m sglang_ckpt_plugin.update --transfer copy, torchrun ranks): no "
        "update allocates or faults in fresh memory; costs host memory of about the checkpoint's size (a staged "
        "update holds every bucket), allocated while a --wait-for-initial-weights server waits.",
    )


def initial_weights_timeout() -> float | None:
    value = os.environ.get(TIMEOUT_ENV)
    return float(value) if value else None
