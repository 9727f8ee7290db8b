"""The loader's control collectives over real gloo, two processes on 127.0.0.1 (no server involved)."""

import os
import subprocess
import sys
import textwrap

import pytest

from sglang_ckpt_plugin.loader.http import free_port
from sglang_ckpt_plugin.loader.world import LoaderWorld

SCRIPT = textwrap.dedent("""
    import torch
    from sglang_ckpt_plugin.loader.world import Control, LoaderWorld
    world = LoaderWorld.from_env(1)
    c = Control(world, 30)
    print("id", c.broadcast_str("update-%d" % world.rank))
    print("names", ",".join(c.all_gather_str("cpu-tp%d" % world.rank)))
    print("ints", c.all_gather_int(100 + world.rank))
    print("failed", c.any_failed(world.rank == 1), c.any_failed(False))
    c.close()
""")


def run_ranks(script: str, ranks: int, *argv: str) -> list[tuple[str, str]]:
    """``script`` once per rank of a gloo world on 127.0.0.1 (torchrun's environment); every rank must exit 0.
    Returns each rank's (stdout, stderr)."""
    port = free_port()
    procs = []
    for rank in range(ranks):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(ranks),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(ranks),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * ranks, [err for _, err in outs]
    return outs


def test_control_collectives_between_two_processes():
    for out, _ in run_ranks(SCRIPT, 2):
        assert "id update-0" in out
        assert "names cpu-tp0,cpu-tp1" in out
        assert "ints [100, 101]" in out
        assert "failed True False" in out


def test_world_maps_ranks_to_instances(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    w = LoaderWorld.from_env(2)
    assert (w.instance, w.tp_rank, w.is_leader, w.instance_ranks(), w.num_instances) == (1, 1, False, [2, 3], 2)
    with pytest.raises(ValueError, match="multiple"):
        LoaderWorld.from_env(3)


EXCHANGE = textwrap.dedent("""
    import sys
    from types import SimpleNamespace
    import torch
    from sglang_ckpt_plugin.loader.exchange import Exchange
    from sglang_ckpt_plugin.loader.world import Control, LoaderWorld
    world = LoaderWorld.from_env(1)
    control = Control(world, 30)
    receivers = [int(r) for r in sys.argv[1].split(",")]
    ex = Exchange(world, receivers, torch.device("cpu"))
    ex.allocate(64)
    for owner in range(world.world_size):
        step = SimpleNamespace(owner=owner, bucket=SimpleNamespace(nbytes=48, slots=[0, 1]))
        if not ex.takes_part(step):
            continue
        buffer = torch.full((64,), 255, dtype=torch.uint8)
        digests = None
        if world.rank == owner:
            buffer[:48] = owner + 1
            digests = [2**64 - 1 - owner, owner]
        digests = ex.move(step, buffer, digests, verify=True)
        print("step", owner, "got", sorted(set(buffer[:48].tolist())), "tail", buffer[48:].tolist()[0], digests)
    control.close()
""")


@pytest.mark.parametrize("receivers", ["0,1,2", "0,2"], ids=["broadcast", "p2p"])
def test_exchange_moves_every_bucket_to_every_receiver_on_one_group(receivers):
    """Broadcast (every rank receives) and p2p (only ranks 0 and 2): every receiver ends with each owner's bytes
    and digests (64-bit digests survive the int64 wire); a rank that neither owns nor receives a step sits it out."""
    outs = run_ranks(EXCHANGE, 3, receivers)
    expected_steps = {int(r) for r in receivers.split(",")}
    for rank, (out, _) in enumerate(outs):
        lines = [line for line in out.splitlines() if line.startswith("step")]
        steps = range(3) if rank in expected_steps else [rank]
        assert lines == [f"step {o} got [{o + 1}] tail 255 [{2**64 - 1 - o}, {o}]" for o in steps], out


AGREE = textwrap.dedent("""
    from sglang_ckpt_plugin.loader.rank_setup import agree_on_kind
    from sglang_ckpt_plugin.loader.world import Control, LoaderWorld
    from sglang_ckpt_plugin.placement import LoaderPlacement
    world = LoaderWorld.from_env(2)
    control = Control(world, 30)
    mine = LoaderPlacement("cuda", 0, "GPU-a") if world.rank == 0 else LoaderPlacement("cpu", None, "GPU-b")
    got = agree_on_kind(mine, control, world)
    print("placement", got.kind, got.gpu_index, got.rank_key)
    control.close()
""")


def test_ranks_agree_on_one_kind_of_buffer():
    """Loader rank 1 cannot see its TP rank's GPU: both ranks use shared memory (one data group, one kind),
    each still naming its own server rank."""
    outs = run_ranks(AGREE, 2)
    assert "placement cpu None GPU-a" in outs[0][0] and "placement cpu None GPU-b" in outs[1][0], outs
    assert "loader ranks [1] cannot reach their GPU" in outs[0][1], outs


def test_peer_alarm_frees_a_rank_waiting_for_a_collective_that_cannot_finish():
    """A rank whose NCCL call failed sounds the alarm; a peer polling its own (never-finishing) collective hears it
    and stops, instead of waiting for the watchdog. Without an alarm the wait ends when the work is done."""
    import threading
    import time

    import torch.distributed as dist

    from sglang_ckpt_plugin.loader.world import PeerAlarm

    store = dist.HashStore()
    waiting, failing = PeerAlarm(store), PeerAlarm(store)
    assert waiting.reason() is None
    finished = threading.Event()
    threading.Timer(0.2, finished.set).start()
    assert waiting.wait(finished.is_set, check_every_s=0.01) is None

    threading.Timer(0.2, lambda: failing.sound("loader rank 1: DistBackendError: NCCL error")).start()
    t0 = time.monotonic()
    reason = waiting.wait(lambda: False, check_every_s=0.01)
    assert reason == "loader rank 1: DistBackendError: NCCL error"
    assert time.monotonic() - t0 < 5
    waiting.clear()  # what a restarted group's rank 0 does before its new communicator
    assert failing.reason() is None


def test_a_failed_data_group_call_sounds_the_alarm_for_the_peers():
    import torch
    import torch.distributed as dist

    from sglang_ckpt_plugin.loader.exchange import Exchange
    from sglang_ckpt_plugin.loader.world import PeerAlarm

    alarm = PeerAlarm(dist.HashStore())
    exchange = Exchange(LoaderWorld(rank=1, world_size=2), [0, 1], torch.device("cpu"), alarm=alarm)

    def failing_call():
        raise RuntimeError("NCCL error: unhandled system error")

    with pytest.raises(RuntimeError):
        exchange._guarded(failing_call)
    assert alarm.reason() == "loader rank 1: RuntimeError: NCCL error: unhandled system error"


def world(rank: int, size: int, per_node: int, per_instance: int) -> LoaderWorld:
    return LoaderWorld(
        rank=rank,
        world_size=size,
        local_rank=rank % per_node,
        local_world_size=per_node,
        node_rank=rank // per_node,
        parallel_size=per_instance,
    )


@pytest.mark.parametrize(
    "size, per_node, per_instance, fed",
    [
        (2, 2, 2, ((0, 1), ())),  # one TP=2 instance on one node: one process, one copy
        (4, 2, 2, ((0, 1), (), (2, 3), ())),  # one instance per node: buckets cross between nodes only
        (4, 2, 4, ((0, 1), (), (2, 3), ())),  # one TP=4 instance over two nodes: each node feeds its ranks
        (2, 1, 1, ((0,), (1,))),  # one rank per node
        (4, 4, 2, ((0, 1), (), (2, 3), ())),  # two instances on one node: one feeder each
    ],
)
def test_one_process_per_node_feeds_its_server_ranks(size, per_node, per_instance, fed):
    from sglang_ckpt_plugin.loader.route import one_per_node

    feeding = one_per_node(world(0, size, per_node, per_instance))
    assert feeding.fed == fed
    assert sorted(g for served in feeding.fed for g in served) == list(range(size))  # every server rank, once
    on_node = [feeding.feeders_on_node(world(r, size, per_node, per_instance)) for r in range(size)]
    assert on_node == [sum(1 for f in feeding.feeders if f // per_node == r // per_node) for r in range(size)]


def test_feeding_is_one_process_per_node_only_where_servers_map_the_nodes_memory_and_all_take_one_broadcast():
    from sglang_ckpt_plugin.loader.cli import parse_args
    from sglang_ckpt_plugin.loader.route import Servers, decide_route

    def fed(w, on_cpu, method="broadcast", saved_plan=False, device="auto", gpu_node_local=False):
        argv = ["--device", device, "--update-method", method, "--ranks", "0"]
        argv += ["--load-metas-file", "m.json"] if saved_plan else ["--checkpoint-path", "c"]
        return decide_route(parse_args(argv), w, Servers(on_cpu, gpu_node_local)).feeding.fed

    w = world(0, 2, 2, 2)
    per_node, per_rank = ((0, 1), ()), ((0,), (1,))
    assert fed(w, True) == per_node
    assert fed(w, True, device="cpu") == per_node
    assert fed(w, False) == per_rank  # GPU: each rank on its own GPU
    assert fed(w, False, gpu_node_local=True) == per_node  # peer to peer
    assert fed(w, False, device="cuda", gpu_node_local=True) == per_node
    assert fed(w, False, "p2p", gpu_node_local=True) == per_rank
    assert fed(w, False, saved_plan=True, gpu_node_local=True) == per_rank
    assert fed(w, True, "p2p") == per_rank  # the listed ranks receive
    assert fed(w, True, "all") == per_rank
    assert fed(w, True, saved_plan=True) == per_rank  # a plan saved by N ranks
    assert fed(w, True, device="cuda") == per_rank
    alone = LoaderWorld(parallel_size=2, feeds_instance=True)
    assert fed(alone, True) == ((0, 1),)


def test_the_transfer_is_decided_once_from_the_route_the_buffers_and_the_tensors():
    """Auto maps the files where one process feeds every rank from host memory; map is refused where it cannot be;
    copy always takes buckets."""
    from sglang_ckpt_plugin.loader.cli import parse_args
    from sglang_ckpt_plugin.loader.route import Servers, decide_route

    def route(transfer, w):
        return decide_route(parse_args(["--checkpoint-path", "c", "--transfer", transfer]), w, Servers(True))

    one_node, two_nodes = world(0, 2, 2, 2), world(0, 2, 1, 1)
    assert route("auto", one_node).one_process and not route("auto", two_nodes).one_process
    assert route("auto", one_node).transfer("cpu", mappable=True) == "map"
    assert route("auto", two_nodes).transfer("cpu", mappable=True) == "copy"  # buckets cross between nodes
    assert route("auto", one_node).transfer("cpu", mappable=False) == "copy"
    assert route("auto", one_node).transfer("cuda", mappable=True) == "copy"
    assert route("map", two_nodes).transfer("cpu", mappable=True) == "map"  # each node's feeder maps the files
    assert route("copy", one_node).transfer("cpu", mappable=True) == "copy"
    for kind, mappable in (("cuda", True), ("cpu", False)):
        with pytest.raises(ValueError, match="--transfer map needs CPU buffers"):
            route("map", one_node).transfer(kind, mappable)


LONG = textwrap.dedent("""
    from sglang_ckpt_plugin.loader.world import Control, LoaderWorld
    world = LoaderWorld.from_env(1)
    c = Control(world, 30)
    text = "x" * (1000 + 300 * world.rank)
    print("long", [len(t) for t in c.all_gather_str(text)], len(c.broadcast_str(text, src=1)), c.all_gather_str(""))
    c.close()
""")


def test_control_strings_of_any_length():
    """A resident loader's actions and an instance's eight GPU uuids are longer than one fixed-size buffer."""
    outs = run_ranks(LONG, 2)
    assert all("long [1000, 1300] 1300 ['', '']" in out for out, _ in outs), outs


CLOSE = textwrap.dedent("""
    import os
    from sglang_ckpt_plugin.loader.world import Control, LoaderWorld
    def threads():
        return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    world = LoaderWorld.from_env(1)
    c = Control(world, 30)
    c.all_gather_str("x")
    print("open", threads())
    c.close()
    print("closed", threads())
""")


def test_closing_the_control_joins_its_gloo_workers():
    """A gloo worker frees its last collective's tensors after the caller's wait returned, which takes the GIL; one
    still alive when the interpreter exits aborts the process (SIGABRT, "terminate called without an active
    exception", about 1 run in 10 here). ``close`` lets go of the groups, so their workers are joined before exit."""
    for out, _ in run_ranks(CLOSE, 2):
        opened, closed = (line for line in out.splitlines() if line.startswith(("open", "closed")))
        assert "pt_gloo_runloop" in opened, out  # the thread name this check relies on
        assert "pt_gloo_runloop" not in closed and "gloo_tcp_loop" not in closed, out


PLACE = textwrap.dedent("""
    import sys
    from sglang_ckpt_plugin.loader import rank_setup
    from sglang_ckpt_plugin.loader.cli import parse_args
    from sglang_ckpt_plugin.loader.world import Control, LoaderWorld
    rank_setup.visible_gpu_keys = lambda: ["GPU-a", "GPU-b"]  # the node's two GPUs, as the server published them
    args = parse_args(["--checkpoint-path", "x", "--inference-parallel-size", "2", "--endpoint", sys.argv[1]])
    world = LoaderWorld.from_env(2)
    c = Control(world, 30)
    route, placements, own = rank_setup.place_rank(args, world, c, {})
    print("fed", route.feeding.fed)
    print("feeds", [(p.kind, p.gpu_index, p.rank_key) for p in placements])
    print("own", (own.kind, own.gpu_index, own.rank_key))
    c.close()
""")


@pytest.mark.parametrize("peer_access", [True, False])
def test_one_loader_process_feeds_a_peer_to_peer_gpu_node_and_the_other_keeps_a_gpu_for_nccl(peer_access):
    """torchrun with two loader ranks on one node, a TP=2 GPU server: where its GPUs read each other's memory peer to
    peer, rank 0 feeds both TP ranks from buffers on TP rank 0's GPU and rank 1 feeds none (its TP rank's GPU serves
    its NCCL calls); otherwise each rank feeds its own TP rank and the loader says why every GPU gets every bucket."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    info = {
        "ckpt_plugin": {"device": "cuda", "rank_keys": ["GPU-a", "GPU-b"], "tp_size": 2, "peer_access": peer_access}
    }

    class ModelInfo(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(info).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), ModelInfo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        outs = run_ranks(PLACE, 2, f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    lines = [dict(line.split(" ", 1) for line in out.splitlines() if " " in line) for out, _ in outs]
    if peer_access:
        assert lines[0]["fed"] == lines[1]["fed"] == "((0, 1), ())"
        assert lines[0]["feeds"] == "[('cuda', 0, 'GPU-a'), ('cuda', 1, 'GPU-b')]"
        assert (lines[1]["feeds"], lines[1]["own"]) == ("[]", "('cuda', 1, 'GPU-b')")
        assert "every bucket" not in outs[0][1]
    else:
        assert lines[0]["fed"] == lines[1]["fed"] == "((0,), (1,))"
        assert [line["feeds"] for line in lines] == ["[('cuda', 0, 'GPU-a')]", "[('cuda', 1, 'GPU-b')]"]
        assert "every GPU receiving every bucket: the server's GPUs cannot all read" in outs[0][1]
    assert lines[0]["own"] == "('cuda', 0, 'GPU-a')"


LOST = textwrap.dedent("""
    import os
    from sglang_ckpt_plugin.loader.world import Control, LoaderWorld, PeersLost
    world = LoaderWorld.from_env(1)
    c = Control(world, 20)
    c.barrier()
    if world.rank == 1:
        os._exit(0)  # killed: its connections close under rank 0
    try:
        c.any_failed(False)
    except PeersLost as exc:
        print("lost:", exc)
""")


def test_a_control_collective_whose_peer_is_gone_says_so():
    """A loader rank that dies makes its peer's next agreement fail naming what it means, gloo's words kept."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOST],
            env=dict(
                os.environ,
                RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    out, err = procs[0].communicate(timeout=120)
    procs[1].wait(timeout=30)
    said = "lost: the loader ranks could not agree: a node's link, machine or loader is down or stalled ("
    assert said in out, (out, err)
