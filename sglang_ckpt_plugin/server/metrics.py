"""The plugin's Prometheus metrics on SGLang's own ``/metrics`` (``--enable-metrics``), in the HTTP process.

Every update route ends by reading the scheduler's weights state (routes.refresh_state); that reading is what
these metrics count, so they say what the gate says. SGLang runs prometheus_client in multiprocess mode (its
``PROMETHEUS_MULTIPROC_DIR``, set before it starts serving): prometheus_client picks its storage when first
imported, so nothing here imports it before the first request has arrived.

- ``sglang:ckpt_updates_total{outcome,source}``: outcome success/rejected/failed/incomplete, source
  ipc/trainer/tensor/disk; one per recorded update (a trainer session counts once, at its end).
- ``sglang:ckpt_update_seconds``: from the first update call to the recorded outcome, server side.
- ``sglang:ckpt_update_bytes_total``: bytes the successful updates wrote (0 where SGLang's path does not say).
- ``sglang:ckpt_weights_loaded``: 1 while the gate is open.
- ``sglang:ckpt_weights_state{state}``: 1 for the current one of waiting/complete/incomplete, 0 for the others.
- ``sglang:ckpt_weight_version_info{version}``: 1 for the weight version served now.
- ``sglang:ckpt_last_update_timestamp_seconds``: when the last update (any outcome) was recorded.
"""

from __future__ import annotations

import logging
import time

from . import sglang_compat as sg

logger = logging.getLogger("sglang_ckpt_plugin")

STATES = ("waiting", "complete", "incomplete")
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class PluginMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        latest = {"multiprocess_mode": "mostrecent"}  # one HTTP process writes them; the last value is the value
        self.updates = Counter("sglang:ckpt_updates", "Weight updates by outcome and source", ["outcome", "source"])
        self.seconds = Histogram(
            "sglang:ckpt_update_seconds", "Server-side duration of a weight update", buckets=SECONDS_BUCKETS
        )
        self.bytes = Counter("sglang:ckpt_update_bytes", "Bytes written by successful weight updates")
        self.loaded = Gauge("sglang:ckpt_weights_loaded", "1 while a complete set of weights is served", **latest)
        self.state = Gauge("sglang:ckpt_weights_state", "Weights state (1 for the current one)", ["state"], **latest)
        self.version = Gauge("sglang:ckpt_weight_version_info", "The weight version served (1)", ["version"], **latest)
        self.last_ts = Gauge(
            "sglang:ckpt_last_update_timestamp_seconds", "When the last weight update was recorded", **latest
        )
        self._seen: float | None = None  # finished_at of the last update record counted
        self._version: str | None = None

    def observe(self, report: dict | None, gate_open: bool, started: float | None) -> None:
        """After a state reading; counts the last update record once (each has its own ``finished_at``)."""
        report = report or {}
        state = report.get("state", "complete" if gate_open else "waiting")
        for name in STATES:
            self.state.labels(name).set(1 if name == state else 0)
        self.loaded.set(1 if gate_open else 0)
        last = report.get("last_update")
        if last and last.get("finished_at") != self._seen:
            self._seen = last["finished_at"]
            self.updates.labels(last["outcome"], last["source"]).inc()
            if last["outcome"] == "success":
                self.bytes.inc(last.get("bytes") or 0)
            if started is not None:
                self.seconds.observe(max(0.0, time.monotonic() - started))
            self.last_ts.set(last["finished_at"])
        version = sg.weight_version()
        if version != self._version:
            if self._version is not None:
                self.version.labels(self._version).set(0)
            if version is not None:
                self.version.labels(version).set(1)
            self._version = version


_metrics: PluginMetrics | None = None
_serving = False  # SGLang has set up its metrics (the first request arrived): prometheus_client may be imported
_broken = False


def first_request(report: dict | None, gate_open: bool) -> None:
    """From the gate middleware, before the first request is served: the first scrape already shows the state."""
    global _serving
    if not _serving:
        _serving = True
        observe(report, gate_open, started=None)


def observe(report: dict | None, gate_open: bool, started: float | None) -> None:
    """After every state reading. ``started``: monotonic time the update being recorded began (None: no update
    call, e.g. the first look). A no-op without --enable-metrics or before serving started."""
    global _metrics, _broken
    if _broken or not _serving or not sg.metrics_enabled():
        return
    try:
        if _metrics is None:
            _metrics = PluginMetrics()
        _metrics.observe(report, gate_open, started)
    except Exception:  # metrics must never fail an update route or the gate: say so once, then stop counting
        _broken = True
        logger.exception("sglang-ckpt-plugin metrics disabled after an error")
