"""One SGLang server spread over two "nodes" (``--tp 2 --nnodes 2 --node-rank 0/1 --dist-init-addr``, the
seed's TP=16-over-two-nodes layout in miniature), fed by a loader group over ``torchrun --nnodes 2``.

On one machine each node gets its own ``--port`` (node 1 only runs SGLang's small health server there).
"""

from __future__ import annotations

import pytest

from sglang_ckpt_plugin.demo.launch import SGLangServer, free_port, generate_ids

from .conftest import NEW_TOKENS, PROMPT, assert_serves
from .test_e2e_multinode import run_two_nodes
from .test_e2e_tp2 import bytes_per_rank

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spread_server(llama_a, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    dist_init = f"127.0.0.1:{free_port()}"
    nodes = [
        SGLangServer(
            llama_a,
            logs / f"spread_node{r}.log",
            tp_size=2,
            extra_args=["--nnodes", "2", "--node-rank", str(r), "--dist-init-addr", dist_init],
            env={"SGLANG_CPU_OMP_THREADS_BIND": str(r)},
        )  # one TP rank per node: its own core
        for r in range(2)
    ]
    try:
        for node in nodes:
            node.start()
        nodes[0].wait_listening()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
    assert [n.group_pids() for n in nodes] == [[], []], "server processes left behind"


def test_loader_over_two_nodes_feeds_a_server_over_two_nodes(spread_server, llama_a):
    # loader rank r runs on "node" r next to TP rank r; rank 0 makes the HTTP call to node 0's server
    results = run_two_nodes(
        spread_server,
        "--checkpoint-path",
        str(llama_a),
        "--inference-parallel-size",
        "2",
        "--weight-version",
        "a-spread",
    )
    read = bytes_per_rank(results[0].stdout)
    for b in read:
        assert 0.4 <= b / sum(read) <= 0.6, read
    spread_server[0].wait_healthy(timeout_s=120)
    assert generate_ids(spread_server[0].url, PROMPT, NEW_TOKENS)["meta_info"]["weight_version"] == "a-spread"
    assert_serves(spread_server[0].url, llama_a)
