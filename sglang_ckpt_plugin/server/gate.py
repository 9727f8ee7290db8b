"""The readiness gate: until the first complete update, nothing that would run the model is served.

An ASGI middleware in front of SGLang's FastAPI app answers 503 with a JSON error on every route except
the ones below (introspection and the weight-update routes themselves). SGLang's own wait loop is replaced
by one that never falls through to dummy weights: it waits forever, or exits non-zero after
``--initial-weights-timeout``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from . import metrics
from . import sglang_compat as sg
from .options import initial_weights_timeout

logger = logging.getLogger("sglang_ckpt_plugin")

OPEN_BEFORE_WEIGHTS = frozenset(
    {
        "/model_info",
        "/get_model_info",
        "/server_info",
        "/get_server_info",
        "/ping",
        "/metrics",
        "/weights_checker",
        "/v1/models",
        "/openapi.json",
        "/docs",
        "/redoc",
        "/flush_cache",
        "/configure_logging",
        "/update_weights_from_ipc",
        "/update_weights_from_disk",
        "/update_weight_version",
        "/init_weights_update_group",
        "/destroy_weights_update_group",
        "/update_weights_from_distributed",
        "/update_weights_from_tensor",
        "/begin_weight_update",
        "/end_weight_update",
    }
)

HOW_TO_PUSH = (
    "push them with: python -m sglang_ckpt_plugin.update --checkpoint-path DIR "
    "--inference-parallel-size N (the server's tp x pp x dp) --endpoint http://HOST:PORT"
)
EXIT_NO_WEIGHTS = 3


class GateState:
    """The HTTP process's copy of the scheduler's weights state (refreshed after every update call)."""

    open: bool = True  # set at install: closed under --wait-for-initial-weights
    report: dict | None = None  # the scheduler's WeightsReport, as sent (of a replica that is not complete, if any)
    placement: dict | None = None  # where every rank of every replica runs (replicas.merged_placement)
    diverged: str | None = None  # why data-parallel replicas hold different weights (replicas.divergence)
    shutting_down: bool = False  # the HTTP server's lifespan is ending (e.g. its port was taken)


def closed_message() -> str:
    if GateState.diverged:
        return f"Model weights differ between replicas: {GateState.diverged}; {HOW_TO_PUSH}"
    report = GateState.report or {}
    missing = report.get("missing") or []
    what = (
        f"; {report.get('missing_count', len(missing))} parameter(s) not written yet, e.g. {missing[:3]}"
        if missing
        else ""
    )
    if report.get("state") == "incomplete":
        last = (report.get("last_update") or {}).get("message", "")
        return (
            f"Model weights are incomplete (an update failed part-way: {last[:300]}){what}; a complete update "
            f"is needed before serving; {HOW_TO_PUSH}"
        )
    if report.get("session_open"):
        return f"Model weights are being written by a weight-update session{what}; {HOW_TO_PUSH}"
    return (
        f"Model weights have not been loaded yet (server started with --wait-for-initial-weights){what}; {HOW_TO_PUSH}"
    )


def not_loaded_body() -> bytes:
    return json.dumps(
        {"object": "error", "type": "ServiceUnavailable", "code": 503, "message": closed_message()}
    ).encode()


class WeightsGate:
    """Pure ASGI middleware; ``is_open()`` is asked on every request (cheap attribute reads)."""

    def __init__(self, app, is_open=lambda: GateState.open):
        self.app = app
        self.is_open = is_open

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, _noting_shutdown(receive), send)
        if scope["type"] in ("http", "websocket"):
            metrics.first_request(GateState.report, GateState.open)
        if scope["type"] not in ("http", "websocket") or self.is_open():
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in OPEN_BEFORE_WEIGHTS:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1013, "reason": "weights not loaded"})
        body = not_loaded_body()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", b"5"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _noting_shutdown(receive):
    """The lifespan's receive, noting its shutdown: SGLang joins the thread that waits for weights when the HTTP
    server stops, so that wait must end then (a server whose port was taken must exit, not wait forever)."""

    async def wrapped():
        message = await receive()
        if message.get("type") == "lifespan.shutdown":
            GateState.shutting_down = True
        return message

    return wrapped


def wait_for_initial_weights(poll_s: float = 0.2, log_every_s: float = 30.0) -> None:
    """Replaces SGLang's ``_wait_weights_ready``: no fall-through to dummy weights, ever."""
    timeout = initial_weights_timeout()
    start = last_log = time.monotonic()
    logger.warning("waiting for initial weights; %s", HOW_TO_PUSH)
    while not GateState.open:
        if GateState.shutting_down:  # SystemExit ends SGLang's warm-up thread quietly: no warm-up on dummy weights
            logger.warning("the HTTP server stopped before any weights arrived; not waiting any longer")
            raise SystemExit(EXIT_NO_WEIGHTS)
        now = time.monotonic()
        if timeout is not None and now - start > timeout:
            msg = (
                f"[sglang-ckpt-plugin] no weights arrived within --initial-weights-timeout {timeout:g} s; "
                f"exiting with code {EXIT_NO_WEIGHTS}. Start the loader sooner or raise the timeout."
            )
            logger.error(msg)
            print(msg, file=sys.stderr, flush=True)
            sg.exit_server(EXIT_NO_WEIGHTS)
        if now - last_log > log_every_s:
            logger.warning("still waiting for initial weights after %.0f s; %s", now - start, HOW_TO_PUSH)
            last_log = now
        time.sleep(poll_s)
    logger.warning("initial weights loaded after %.2f s", time.monotonic() - start)
