"""Start and stop a real SGLang server on 127.0.0.1 (used by the demo, the tests and the benchmarks).

The server runs in its own process group; ``stop()`` ends the group by its id and checks that no process
of it is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import httpx

from ..cpu_env import cpu_environment
from ..cpu_support.plugin import NAME as CPU_PLUGIN
from ..loader.http import free_port  # noqa: F401  (re-exported: tests and bench start servers on it)
from .processes import group_members


def server_env(device: str = "cpu", extra: dict | None = None) -> dict[str, str]:
    """The plain ``cpu_env`` on CPU (the plugin binds cores from the server's own sizes, any --tp)."""
    env = dict(os.environ)
    if device == "cpu":
        env.update(cpu_environment(base=env))
    env.update(extra or {})
    return env


# A server stopped here dies of a SIGTERM to its whole process group: SGLang takes its scheduler's exit for a crash and
# sleeps 5 s before py-spy / CUDA-coredump diagnostics of processes already gone (SGLang 0.5.23,
# TokenizerManager.dump_requests_before_crash). Off for the servers this launcher starts: a stop takes 0.6 s, not 5.5.
QUICK_STOP = {"SGLANG_PYSPY_DUMP_BEFORE_CRASH": "0", "SGLANG_CUDA_COREDUMP_BEFORE_CRASH": "0"}

# what a server that exited because a port was taken wrote last (the bind's error; SGLang's own port check)
PORT_CLASHES = ("address already in use", "port is already in use", "is used by a process already")


def port_clash(log_tail: str) -> bool:
    return any(words in log_tail.lower() for words in PORT_CLASHES)


# SGLANG_PLUGINS naming SGLang's own dependency's plugin and the CPU environment's (cpu_support/plugin.py: FP8
# kernels, no weight-update hook) leaves the plugin's hooks out
PLUGIN_FREE = f"smg-servicer,{CPU_PLUGIN}"


class SGLangServer:
    """``python -m sglang.launch_server`` (or ``sglang serve``) as a child process group."""

    _started: weakref.WeakSet[SGLangServer] = weakref.WeakSet()  # for the tests' failure reports

    def __init__(
        self,
        model_path: str | Path,
        log_path: str | Path,
        *,
        wait_for_weights: bool = True,
        wait_flag: str = "--wait-for-initial-weights",
        device: str = "cpu",
        tp_size: int = 1,
        port: int | None = None,
        extra_args: list[str] | None = None,
        env: dict | None = None,
        launcher: str = "launch_server",
        host: str = "127.0.0.1",
        wrap: Callable[[list[str]], list[str]] | None = None,
    ):
        """``launcher``: ``launch_server`` (python -m sglang.launch_server) or ``serve`` (SGLang's ``sglang serve``
        command, the one its docs recommend). ``host`` and ``wrap`` (a function of the command that returns the
        command to run, e.g. on a node of demo/cluster.py) are for a server on a node of a cluster."""
        self._port_given = port is not None
        self.port = port or free_port()
        self.host = host
        self.url = f"http://{host}:{self.port}"
        self._wrap = wrap or (lambda command: command)
        self.log_path = Path(log_path)
        command = {
            "launch_server": [sys.executable, "-m", "sglang.launch_server"],
            "serve": [str(Path(sys.executable).with_name("sglang")), "serve"],
        }[launcher]
        args = [
            *command,
            "--model-path",
            str(model_path),
            "--host",
            host,
            "--port",
            str(self.port),
            "--device",
            device,
            "--tp-size",
            str(tp_size),
        ]
        if device == "cpu":
            args += ["--max-total-tokens", "4096"]
        if wait_for_weights:
            args += ["--load-format", "dummy", wait_flag]
        self.args = args + list(extra_args or [])
        self.env = server_env(device, {**QUICK_STOP, **(env or {})})
        self.proc: subprocess.Popen | None = None

    def start(self) -> SGLangServer:
        if self.proc is not None and self.proc.poll() is None:  # a second process would outlive stop()
            raise RuntimeError(f"the server on port {self.port} is running already")
        self._log = open(self.log_path, "ab")
        SGLangServer._started.add(self)
        self.proc = subprocess.Popen(
            self._wrap(self.args), stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        return self

    def wait_listening(self, timeout_s: float = 240.0, attempts: int = 3) -> None:
        """Until ``/model_info`` answers (the gate lets it through before weights arrive). A port we picked can be
        taken before the server binds it (another server's internal ports are chosen at random as it starts, and
        so are the ports SGLang derives for this one's own processes: one can be held already), then
        the server exits, and it is started again on another port."""
        for attempt in range(attempts):
            try:
                return self._wait(lambda c: c.get(f"{self.url}/model_info").status_code == 200, timeout_s, "listen")
            except RuntimeError:
                if self._port_given or not port_clash(self.log_tail()) or attempt == attempts - 1:
                    raise
            self.stop()
            self._move_to(free_port())
            self.start()

    def _move_to(self, port: int) -> None:
        self.args[self.args.index("--port") + 1] = str(port)
        self.port, self.url = port, f"http://{self.host}:{port}"

    def wait_healthy(self, timeout_s: float = 240.0) -> None:
        self._wait(lambda c: c.get(f"{self.url}/health").status_code == 200, timeout_s, "become healthy")

    def _wait(self, check, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self.proc.returncode} before it could {what}; "
                        f"see {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if check(client):
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"server did not {what} within {timeout_s} s; see {self.log_path}")

    @classmethod
    def started(cls) -> list[SGLangServer]:
        """Every server started in this process that is still referenced."""
        return list(cls._started)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def group_pids(self) -> list[int]:
        """Live processes of the server's process group (not zombies)."""
        return group_members(self.proc.pid)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while self.group_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.group_pids():
            os.killpg(self.proc.pid, signal.SIGKILL)
            time.sleep(0.5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def __enter__(self) -> SGLangServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def generate_ids(url: str, input_ids: list[int], max_new_tokens: int, timeout_s: float = 120.0) -> dict:
    """Greedy ``/generate`` on token ids; returns the parsed JSON (``output_ids``, ``meta_info``)."""
    body = {
        "input_ids": input_ids,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True},
    }
    resp = httpx.post(f"{url}/generate", json=body, timeout=timeout_s)
    resp.raise_for_status()
    return resp.json()
