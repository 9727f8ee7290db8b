"""Unit tests: the readiness gate as a plain ASGI middleware (the real-server behaviour is in test_e2e_*)."""

import asyncio
import json

from sglang_ckpt_plugin.server.gate import OPEN_BEFORE_WEIGHTS, WeightsGate


async def inner_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"inner"})


def call(gate, path, kind="http"):
    sent = []

    async def send(msg):
        sent.append(msg)

    async def receive():
        return {"type": "http.request", "body": b""}

    asyncio.run(gate({"type": kind, "path": path}, receive, send))
    return sent


def test_closed_gate_answers_503_json_with_instructions():
    gate = WeightsGate(inner_app, is_open=lambda: False)
    for path in ["/generate", "/v1/chat/completions", "/health", "/health_generate", "/ready", "/anything/new"]:
        start, body = call(gate, path)
        assert start["status"] == 503
        assert dict(start["headers"])[b"content-type"] == b"application/json"
        doc = json.loads(body["body"])
        assert doc["code"] == 503 and "not been loaded" in doc["message"] and "--checkpoint-path" in doc["message"]


def test_closed_gate_lets_introspection_and_updates_through():
    gate = WeightsGate(inner_app, is_open=lambda: False)
    for path in ["/model_info", "/update_weights_from_ipc", "/update_weights_from_disk", "/server_info"]:
        assert path in OPEN_BEFORE_WEIGHTS
        assert call(gate, path)[0]["status"] == 200


def test_open_gate_passes_everything():
    gate = WeightsGate(inner_app, is_open=lambda: True)
    assert call(gate, "/generate")[0]["status"] == 200


def test_closed_gate_closes_websockets():
    gate = WeightsGate(inner_app, is_open=lambda: False)
    (msg,) = call(gate, "/v1/realtime", kind="websocket")
    assert msg["type"] == "websocket.close" and msg["code"] == 1013


def test_lifespan_is_not_gated():
    gate = WeightsGate(inner_app, is_open=lambda: False)
    assert call(gate, "", kind="lifespan")[0]["status"] == 200


def test_a_metrics_error_never_reaches_the_update_routes(monkeypatch):
    """Whatever goes wrong in the metrics (a prometheus_client that refuses a metric, say) is logged once and
    counting stops; the state reading that called it (and so the gate) goes on."""
    from sglang_ckpt_plugin.server import metrics
    from sglang_ckpt_plugin.server import sglang_compat as sg

    def refuse():
        raise ValueError("multiprocess_mode not supported")

    monkeypatch.setattr(sg, "metrics_enabled", lambda: True)
    monkeypatch.setattr(metrics, "PluginMetrics", refuse)
    monkeypatch.setattr(metrics, "_serving", True)
    monkeypatch.setattr(metrics, "_metrics", None)
    monkeypatch.setattr(metrics, "_broken", False)
    metrics.observe({"state": "complete"}, True, None)  # does not raise
    assert metrics._broken
    metrics.observe({"state": "complete"}, True, None)  # and stays quiet
