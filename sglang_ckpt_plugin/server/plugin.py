"""Entry point in the ``sglang.srt.plugins`` group: SGLang's ``load_plugins()`` calls ``register()``
once in every SGLang process (HTTP server, scheduler/TP workers, detokenizer)."""

from __future__ import annotations


def register() -> None:
    from .hooks import install_hooks

    install_hooks()
