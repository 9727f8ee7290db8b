"""The loader's HTTP side: wait for the server, make the update call concurrently with the feeding."""

from __future__ import annotations

import socket
import threading
import time

import httpx

from ..placement import PLUGIN_MARKER, ServerPlacement
from ..transport.messages import PHASE_KEY


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a rendezvous or a server we are about to start)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def layout_mismatch(info: dict, endpoint: str, parallel_size: int) -> str | None:
    """Why a server (its /model_info) cannot take ``parallel_size`` loader ranks per instance, or None."""
    server = ServerPlacement.from_model_info(info)
    if server.rank_count != parallel_size:
        return (
            f"the server at {endpoint} runs {server.rank_count} rank(s) ({server.shape}) but "
            f"--inference-parallel-size is {parallel_size}; pass --inference-parallel-size {server.rank_count}"
        )
    if server.rank_count > server.tp_size and len(server.rank_keys) != server.rank_count:
        return (
            f"the server at {endpoint} runs {server.rank_count} ranks ({server.shape}) but published "
            f"{len(server.rank_keys)} rank keys: its sglang-ckpt-plugin predates data-parallel and pipeline "
            "updates; upgrade it"
        )
    return None


class ServerError(RuntimeError):
    """The server is unreachable, lacks the plugin, or refused the update."""


class UpdateCall:
    """A ``POST`` that lasts as long as the transfer (``/update_weights_from_ipc``, the trainer's group calls)
    running in a thread, while this process moves the data."""

    def __init__(
        self, client: ServerClient, body: dict, cancelled: threading.Event, path: str = "/update_weights_from_ipc"
    ):
        self.error: ServerError | None = None
        self.message = ""
        self._client = client
        self._path = path
        self._body = body
        self._cancelled = cancelled
        self._thread = threading.Thread(target=self._call, name="update-http", daemon=True)
        self._thread.start()

    def _call(self) -> None:
        try:
            self.message = self._client.post(self._path, self._body)
        except ServerError as exc:
            self.error = exc
        if self.error is not None:
            self._cancelled.set()  # stop the feeder waiting for a server that will not come

    def finished(self) -> bool:
        return not self._thread.is_alive()

    def join_quietly(self) -> None:
        self._thread.join(timeout=30)

    def join(self) -> None:
        """Wait for the server's answer, at most the client's timeout (every wait of the loader is bounded)."""
        self._thread.join(timeout=self._client.timeout_s)
        if self._thread.is_alive():
            raise ServerError(
                f"{self._path} on {self._client.base_url} did not answer within "
                f"{self._client.timeout_s:g} s (--timeout); see the server log"
            )
        if self.error is not None:
            raise self.error


def _json(resp: httpx.Response) -> dict:
    try:
        data = resp.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class ServerClient:
    def __init__(self, base_url: str, uds: str | None = None, timeout_s: float = 600.0, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        # a plain-HTTP endpoint never speaks TLS: no certificate store to load (26 ms of every loader's start)
        tls = self.base_url.startswith("https://")
        transport = httpx.HTTPTransport(uds=uds, verify=tls) if uds else None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, transport=transport, timeout=30.0, headers=headers, verify=tls)

    def post(self, path: str, body: dict, timeout_s: float | None = None) -> str:
        """POST and return the server's message; ServerError if it failed or refused."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            resp = self.http.post(path, json=body, timeout=httpx.Timeout(timeout_s, connect=min(30.0, timeout_s)))
        except httpx.HTTPError as exc:
            raise ServerError(f"{path} on {self.base_url} failed: {exc}") from exc
        data = _json(resp)
        if resp.status_code in (401, 403):
            raise ServerError(
                f"the server refused {path} (HTTP {resp.status_code}): it needs the server's admin API "
                "key; pass --api-key"
            )
        if resp.status_code != 200 or not data.get("success", False):
            raise ServerError(
                f"server refused {path} (HTTP {resp.status_code}): {data.get('message', resp.text[:500])}"
            )
        return data.get("message", "")

    def model_info(self) -> dict:
        return _json(self.http.get("/model_info"))

    def wait_until_listening(self) -> dict:
        """Poll ``/model_info`` until the server answers; refuse a server without our plugin."""
        deadline = time.monotonic() + self.timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                resp = self.http.get("/model_info", timeout=5.0)
                if resp.status_code == 200:
                    info = _json(resp)
                    if PLUGIN_MARKER not in info:
                        raise ServerError(
                            f"{self.base_url} is an SGLang server without sglang-ckpt-plugin "
                            "(no 'ckpt_plugin' in /model_info); pip install sglang-ckpt-plugin in the server's "
                            "environment and restart it"
                        )
                    return info
                if resp.status_code in (401, 403):
                    raise ServerError(
                        f"{self.base_url} requires an API key (HTTP {resp.status_code}); pass --api-key "
                        "(the server's --admin-api-key, or --api-key if it has no admin key)"
                    )
                last = f"HTTP {resp.status_code}"
            except httpx.TransportError as exc:
                last = str(exc) or type(exc).__name__
            time.sleep(0.1)  # a starting server: push as soon as it answers
        raise ServerError(
            f"server {self.base_url} not reachable within {self.timeout_s:g} s ({last}); "
            "is it running, and is --endpoint right?"
        )

    def start_update(
        self, zmq_handles: dict[str, str], weight_version: str | None, flush_cache: bool, cancelled: threading.Event
    ) -> UpdateCall:
        body = {"zmq_handles": zmq_handles, "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        return UpdateCall(self, body, cancelled)

    # ---- two phases, over SGLang's /update_weights_from_ipc (PHASE_KEY in zmq_handles; server/routes.py)
    def stage(self, endpoints: dict[str, str]) -> str:
        """Every TP rank starts receiving from its endpoint in the background; answered at once."""
        return self.post(
            "/update_weights_from_ipc", {"zmq_handles": {**endpoints, PHASE_KEY: "stage"}, "flush_cache": False}
        )

    def commit(self, rank_keys: list[str], update_id: str, weight_version: str | None, flush_cache: bool) -> str:
        """Load what every TP rank staged under ``update_id`` (under SGLang's model-update lock: the pause)."""
        body = {"zmq_handles": {**dict.fromkeys(rank_keys, update_id), PHASE_KEY: "commit"}, "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        return self.post("/update_weights_from_ipc", body)

    def abort(self, rank_keys: list[str], update_id: str) -> str:
        """Drop what the TP ranks staged under ``update_id`` and record why the update did not happen."""
        body = {"zmq_handles": {**dict.fromkeys(rank_keys, update_id), PHASE_KEY: "abort"}, "flush_cache": False}
        return self.post("/update_weights_from_ipc", body, timeout_s=30)

    @staticmethod
    def progress(total: int, disable: bool):
        from tqdm import tqdm  # only where buckets are filled: the page-cache path shows no bar

        return tqdm(total=total, unit="B", unit_scale=True, desc="push", disable=disable, leave=False)
