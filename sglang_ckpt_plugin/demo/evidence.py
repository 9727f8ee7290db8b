"""Evidence that a server serves exactly a checkpoint, with SGLang itself as the reference.

1. SGLang's own ``/weights_checker`` checksums (a hash of every parameter in SGLang's parameter space, per TP
   rank) of the served weights equal those after SGLang's own disk reload of the same files on the same server:
   the parameters are bit-identical to what SGLang's loader makes of the checkpoint.
2. Greedy output before and after that reload is the same.
3. HF transformers as a second opinion that rounding cannot break: teacher-forced on SGLang's tokens, each of
   them is within HF's top-k at its position (CPU kernels round differently, so HF's own greedy text may part
   from SGLang's at a near-tie; a wrong checkpoint does not stay in the top-k).

Step 1-2 reload the server from disk (same files, same ``weight_version``), so call this when the server is
expected to serve that checkpoint completely.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from .launch import generate_ids

HF_TOP_K = 5


@dataclass
class Evidence:
    served_checksum: str
    disk_checksum: str
    served_ids: list[int]
    disk_ids: list[int]
    hf_ranks: list[int]  # rank of SGLang's token in HF's logits at each position (0 = HF's own choice)
    hf_top_k: int = HF_TOP_K

    @property
    def bit_identical(self) -> bool:
        return self.served_checksum == self.disk_checksum

    @property
    def same_output(self) -> bool:
        return self.served_ids == self.disk_ids

    @property
    def hf_agrees(self) -> bool:
        return max(self.hf_ranks, default=0) < self.hf_top_k

    @property
    def ok(self) -> bool:
        return self.bit_identical and self.same_output and self.hf_agrees

    def verdict(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}: {self.findings()}"

    def findings(self) -> str:
        inside = sum(r < self.hf_top_k for r in self.hf_ranks)
        return (
            f"served parameters {'bit-identical to' if self.bit_identical else 'DIFFER from'} SGLang's own "
            f"load of the same files (checksum {self.served_checksum[:16]}), greedy output "
            f"{'equal to' if self.same_output else 'DIFFERENT from'} the disk-loaded output; HF second opinion: "
            f"SGLang's token in HF's top-{self.hf_top_k} at {inside}/{len(self.hf_ranks)} positions "
            f"(HF's own first choice at {self.hf_ranks.count(0)})"
        )


def _weights_checker(url: str, headers: dict | None) -> dict:
    resp = httpx.post(f"{url}/weights_checker", json={"action": "checksum"}, headers=headers, timeout=120)
    resp.raise_for_status()
    return resp.json()


def checksum(url: str, headers: dict | None = None) -> str:
    """SGLang's per-engine checksum of the served parameters (all TP ranks)."""
    return _weights_checker(url, headers)["per_engine_checksum"]


def parameter_checksums(url: str, headers: dict | None = None) -> dict[str, str]:
    """SGLang's hash of each served parameter (TP rank 0's shard)."""
    return _weights_checker(url, headers)["ranks"][0]["checksums"]


def wait_warmed_up(url: str, headers: dict | None = None, timeout_s: float = 240.0) -> None:
    """Wait until SGLang's own warm-up after the first weights has finished (its ``/health`` answers 503 until then):
    a request sent during the warm-up is batched with SGLang's warm-up request, which moves its log-probabilities in
    the last bits."""
    if not httpx.get(f"{url}/model_info", headers=headers, timeout=30).json().get("weights_loaded", True):
        raise RuntimeError(f"{url} has no complete weights (its gate is shut): there is nothing to gather evidence of")
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/health", headers=headers, timeout=60).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not finish SGLang's warm-up within {timeout_s:g} s")
        time.sleep(0.2)


def reload_from_disk(url: str, checkpoint: str | Path, headers: dict | None = None) -> None:
    """SGLang's own ``/update_weights_from_disk`` of ``checkpoint``, keeping the served weight_version."""
    version = httpx.get(f"{url}/model_info", headers=headers, timeout=30).json().get("weight_version")
    body = {"model_path": str(checkpoint), "load_format": "auto", "weight_version": version}
    resp = httpx.post(f"{url}/update_weights_from_disk", json=body, headers=headers, timeout=300)
    if resp.status_code != 200 or not resp.json().get("success"):
        raise RuntimeError(f"SGLang's disk reload of {checkpoint} failed: {resp.text[:500]}")


@functools.lru_cache(maxsize=4)
def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()


def hf_ranks(model_dir: str | Path, prompt_ids: list[int], output_ids: list[int]) -> list[int]:
    """Teacher-forced on ``prompt_ids + output_ids``: the rank of each output token in HF's next-token logits."""
    model = _hf_model(str(model_dir))
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + output_ids])).logits[0].float()
    ranks = []
    for i, token in enumerate(output_ids):
        row = logits[len(prompt_ids) - 1 + i]
        ranks.append(int((row > row[token]).sum()))
    return ranks


def gather(
    url: str,
    checkpoint: str | Path,
    prompt_ids: list[int],
    new_tokens: int,
    headers: dict | None = None,
    hf_checkpoint: str | Path | None = None,
) -> Evidence:
    """Checksums and greedy output as served, then after SGLang's disk reload of the same files (at
    ``hf_checkpoint`` for HF's check in this process, where the server sees them at another path)."""
    wait_warmed_up(url, headers)
    served = checksum(url, headers)
    served_ids = generate_ids(url, prompt_ids, new_tokens)["output_ids"]
    reload_from_disk(url, checkpoint, headers)
    disk = checksum(url, headers)
    disk_ids = generate_ids(url, prompt_ids, new_tokens)["output_ids"]
    return Evidence(served, disk, served_ids, disk_ids, hf_ranks(hf_checkpoint or checkpoint, prompt_ids, served_ids))
