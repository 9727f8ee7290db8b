"""``python -m sglang_ckpt_plugin.update``: push a safetensors checkpoint into a running SGLang server.

Options follow SGLang's checkpoint-engine entry point (``sglang.srt.checkpoint_engine.update``), plus
``--bucket-size``, ``--num-buffers``, ``--device`` and ``--timeout``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from typing import Literal

from . import watchdog
from .options import LoaderOptions

MiB = 1 << 20
API_KEY_ENV = "SGLANG_CKPT_API_KEY"


def parse_size(text: str) -> int:
    """'auto' -> 0; otherwise bytes, with an optional K/M/G suffix (powers of 1024)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text == "AUTO":
        return 0
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 256M, 1G or auto)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_ckpt_plugin.update", description=__doc__)
    p.add_argument(
        "--update-method",
        choices=["broadcast", "p2p", "all"],
        default="broadcast",
        help="broadcast: every instance is updated, each rank reads its share and the ranks exchange the "
        "rest; p2p: only the instances of --ranks are updated, fed by all ranks; all: both, in turn",
    )
    p.add_argument("--ranks", help="p2p: comma-separated loader ranks (whole instances) whose servers are updated")
    p.add_argument(
        "--p2p-transport",
        choices=["torch", "mooncake", "auto"],
        default="torch",
        help="what moves the buckets of a p2p update (p2p, the p2p part of all, a join): torch = torch.distributed "
        "send/recv; mooncake = Mooncake Transfer Engine one-sided reads from the owner's registered buffers, RDMA "
        "where there is RDMA, else TCP (pip install 'sglang-ckpt-plugin[p2p]'), failing the update if an engine "
        "cannot start; auto = Mooncake where every rank can start it and the buffers are in host memory, else "
        "torch.distributed (the choice is printed)",
    )
    p.add_argument("--checkpoint-path", help="directory of *.safetensors (with or without an index)")
    p.add_argument(
        "--draft-checkpoint-path",
        help="the server's speculative-decoding draft model's own checkpoint (EAGLE/EAGLE3/STANDALONE): pushed in "
        "the same update as --checkpoint-path, so target and draft change together",
    )
    p.add_argument(
        "--inference-parallel-size",
        type=int,
        default=1,
        help="ranks per inference instance (the server's tp size); a CPU server's ranks are fed by this "
        "one process, a GPU server's by one loader process per rank (started with torchrun)",
    )
    p.add_argument(
        "--nnodes",
        type=int,
        default=1,
        help="nodes of one run: start this same command on every node with its --node-rank (and its own --endpoint); "
        "with a TP = 1 server the command is its node's loader rank; with TP > 1 it starts torchrun there, one loader "
        "rank per TP rank; either reads its node's share of the checkpoint while the ranks start and meet (the "
        "flags are torchrun's own)",
    )
    p.add_argument("--node-rank", type=int, default=0, help="with --nnodes: this node's index, 0 .. nnodes-1")
    p.add_argument("--master-addr", help="with --nnodes > 1: node 0's address, where the loader ranks meet")
    p.add_argument("--master-port", type=int, default=29500, help="with --nnodes > 1: the port they meet on")
    p.add_argument("--endpoint", default="http://localhost:19730", help="the SGLang server's base URL")
    p.add_argument("--checkpoint-name", default="my-checkpoint-iter-0", help="name of this checkpoint")
    p.add_argument("--save-metas-file", help="write the read plan (tensors, owners) as JSON for a later join")
    p.add_argument("--load-metas-file", help="use a plan written by --save-metas-file instead of re-reading headers")
    p.add_argument("--uds", help="reach the server over this Unix socket instead of TCP")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help="bearer token for a server started with --admin-api-key / --api-key; prefer setting "
        "$SGLANG_CKPT_API_KEY (a command line is visible to every user of the machine)",
    )
    p.add_argument("--weight-version", help="version string the server reports after this update")
    p.add_argument("--sleep-time", type=float, default=0.0, help="seconds to sleep after the update before exiting")
    p.add_argument("--bucket-size", type=parse_size, default=0, help="bytes per bucket, e.g. 256M; default auto")
    p.add_argument("--num-buffers", type=int, default=2, help="bucket buffers in flight (>= 2 pipelines)")
    p.add_argument(
        "--transfer",
        choices=["auto", "map", "copy"],
        default="auto",
        help="map: the server maps the checkpoint files and copies tensors straight from the page cache "
        "(CPU; with several nodes each node maps them itself, nothing crosses between nodes); copy: "
        "through shared bucket buffers; auto: map where one process feeds every server rank",
    )
    p.add_argument(
        "--use-kept-buffers",
        choices=["auto", "off"],
        default="auto",
        help="auto: where the server keeps update buffers (--keep-update-buffers) and buckets travel through "
        "shared memory, fill those instead of allocating fresh ones; off: always allocate",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where buffers live: cpu = shared memory, cuda = CUDA IPC on the server rank's GPU; auto = "
        "follow the server (/model_info): CUDA IPC where this process sees that GPU, else shared memory",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="hard ceiling in seconds for the whole run (waiting for the server included); past it the "
        "loader prints every thread's stack and exits 1",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="send xxh3 digests of every tensor; the server checks them before loading and both sides "
        "print the checkpoint fingerprint",
    )
    p.add_argument(
        "--partial",
        action="store_true",
        help="update only the parameters in this checkpoint (the server otherwise rejects an update "
        "that does not cover every parameter)",
    )
    p.add_argument(
        "--allow-unused",
        action="store_true",
        help="accept tensors the served model does not use (otherwise the server rejects the update)",
    )
    p.add_argument(
        "--two-phase",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto/on: stage every bucket on the server while it keeps serving the old weights, then commit "
        "in one short pause (all instances of the loader group together, only once every one staged); "
        "auto falls back to streaming when the staged bytes exceed --staging-budget (said on stderr); "
        "off: stream (the server pauses for the whole transfer, bounded loader memory)",
    )
    p.add_argument(
        "--staging-budget",
        type=parse_size,
        default=0,
        help="shared memory the staged buckets may take on one node, e.g. 8G; default 80%% of MemAvailable",
    )
    p.add_argument(
        "--commit-retries",
        type=int,
        default=2,
        help="retries of a failed commit, from the bytes the server staged (nothing is read again)",
    )
    p.add_argument(
        "--watch",
        metavar="DIR",
        help="stay resident: push every new complete checkpoint that appears under DIR (step directories, "
        "newest first, --weight-version = the directory's name) and refill any server that comes back "
        "without complete weights; ends cleanly on Ctrl-C / SIGTERM (docs/rl.md)",
    )
    p.add_argument(
        "--ready-marker",
        metavar="NAME",
        help="--watch: a checkpoint is ready once the trainer wrote this file into it (e.g. COMPLETE); "
        "default: once its files are complete and unchanged between two scans",
    )
    p.add_argument("--poll-s", type=float, default=0.25, help="--watch: seconds between scans of DIR and the servers")
    p.add_argument(
        "--status-file",
        help="--watch: keep a JSON status here (what each server serves, the update in "
        "progress, skipped checkpoints and why), rewritten atomically",
    )
    p.add_argument("--no-flush-cache", action="store_true", help="keep the radix cache after the update")
    p.add_argument(
        "--direct-io",
        choices=["auto", "on", "off"],
        default="auto",
        help="GPU buffers: read a bucket the page cache does not hold with O_DIRECT straight into the pinned "
        "staging chunks (auto), every bucket (on), or none (off)",
    )
    p.add_argument(
        "--no-read-ahead",
        action="store_true",
        help="do not read the checkpoint into the page cache while waiting for the server to answer",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> LoaderOptions:
    """The command line as one typed value (errors exit 2 with argparse's usage line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.inference_parallel_size < 1:
        parser.error("--inference-parallel-size must be >= 1")
    if args.commit_retries < 0:
        parser.error("--commit-retries must be >= 0")
    if args.num_buffers < 1:
        parser.error("--num-buffers must be >= 1")
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        parser.error(f"--node-rank {args.node_rank} is not one of --nnodes {args.nnodes}: 0 .. nnodes-1")
    if args.nnodes > 1 and not args.master_addr:
        parser.error("--nnodes > 1 needs --master-addr: node 0's address, the same on every node")
    if args.watch:
        given = [
            flag
            for flag, value in (
                ("--checkpoint-path", args.checkpoint_path),
                ("--draft-checkpoint-path", args.draft_checkpoint_path),
                ("--load-metas-file", args.load_metas_file),
                ("--save-metas-file", args.save_metas_file),
                ("--weight-version", args.weight_version),
                ("--sleep-time", args.sleep_time),
            )
            if value
        ]
        if given or args.update_method != "broadcast":
            parser.error(
                f"--watch takes the checkpoints and their versions from DIR and updates every instance: "
                f"drop {', '.join(given) or '--update-method ' + args.update_method}"
            )
        if args.poll_s <= 0:
            parser.error("--poll-s must be positive")
    elif not args.checkpoint_path and not args.load_metas_file:
        parser.error("--checkpoint-path is required (or --load-metas-file, or --watch DIR)")
    if args.save_metas_file and args.load_metas_file:
        parser.error("--save-metas-file and --load-metas-file exclude each other")
    if args.draft_checkpoint_path and (args.save_metas_file or args.load_metas_file):
        parser.error("--draft-checkpoint-path is read from its directory: drop --save-metas-file / --load-metas-file")
    return LoaderOptions.from_namespace(args)


def without_api_key(argv: list[str]) -> list[str]:
    """``argv`` minus ``--api-key X`` / ``--api-key=X``: the key reaches child processes through the
    environment (SGLANG_CKPT_API_KEY), never their command line (which every user of the machine can read)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--api-key":
            skip = True
        elif not arg.startswith("--api-key="):
            out.append(arg)
    return out


def torchrun_command(
    loader_args: list[str],
    *,
    port: int,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
) -> list[str]:
    """torchrun (``python -m torch.distributed.run``) starting this loader with ``loader_args``: node ``node_rank``
    of ``nnodes`` (one command per machine), ``nproc_per_node`` loader ranks on it, rendezvous at
    ``master_addr``:port (node 0's address where the nodes are machines)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--node-rank",
        str(node_rank),
        "--nproc-per-node",
        str(nproc_per_node),
        "--master-addr",
        master_addr,
        "--master-port",
        str(port),
        "-m",
        "sglang_ckpt_plugin.update",
        *loader_args,
    ]


def node_torchrun_command(args: LoaderOptions, argv: list[str]) -> list[str]:
    """torchrun on this node for this loader's ``argv`` (less the API key): a loader rank per TP rank, node
    ``--node-rank`` of ``--nnodes`` meeting at ``--master-addr`` (one node: 127.0.0.1, a free port)."""
    from .http import free_port

    one_node = args.nnodes == 1
    return torchrun_command(
        without_api_key(argv),
        port=free_port() if one_node else args.master_port,
        nproc_per_node=args.inference_parallel_size,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr="127.0.0.1" if one_node else args.master_addr,
    )


def relaunch_under_torchrun(args: LoaderOptions, argv: list[str]) -> None:
    """Replace this process with torchrun on this node (``node_torchrun_command``); the API key travels in the
    environment."""
    if args.api_key:
        os.environ[API_KEY_ENV] = args.api_key
    cmd = node_torchrun_command(args, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def ask_server(args: LoaderOptions) -> tuple[dict | None, str | None]:
    """The server's /model_info, and why it cannot take this many loader ranks (None: it can)."""
    if args.update_method == "p2p":
        return None, None  # the updated instances may not be the one at --endpoint
    from .http import ServerClient, ServerError, layout_mismatch

    client = ServerClient(args.endpoint, uds=args.uds, timeout_s=args.timeout, api_key=args.api_key)
    try:
        info = client.wait_until_listening()
    except ServerError as exc:
        return None, str(exc)
    return info, layout_mismatch(info, args.endpoint, args.inference_parallel_size)


def feeds_from_one_process(args: LoaderOptions, info: dict | None) -> bool:
    """The launch decision: whether this process feeds every TP rank of the server at ``info`` itself (the route
    torchrun's ranks would take has one feeder: a CPU server, or a GPU server whose GPUs this process sees and which
    read each other's memory peer to peer), or torchrun starts one loader rank per TP rank."""
    from ..placement import ServerPlacement
    from .route import Servers, decide_route, fed_on_gpus
    from .world import LoaderWorld

    if info is None:  # p2p: the updated instances may not be the one at --endpoint
        return False
    server = ServerPlacement.from_model_info(info)
    gpus = []
    if fed_on_gpus(server, args):
        from ..transport.handles import visible_gpu_keys  # the server is up: no CUDA context is made before its own

        gpus = visible_gpu_keys()
    world = LoaderWorld.of_node(args.inference_parallel_size, args.nnodes, args.node_rank)
    return decide_route(args, world, Servers.seen(server, args, gpus)).one_process


Launch = Literal["one process", "node rank", "torchrun"]


def choose_launch(args: LoaderOptions, info: dict | None) -> Launch:
    """How this command's loader ranks start: "one process" feeds every TP rank of its instance
    (``feeds_from_one_process``); "node rank": a run over nodes with one loader rank per node (``--nnodes`` > 1, a
    TP = 1 server on each), where this process is that rank and meets the other nodes' itself; "torchrun" starts a
    loader rank per TP rank on this node. Without torchrun's agent a node imports torch once, not twice, and skips
    the agent's rendezvous and exit barrier (seconds on every node of a one-shot update)."""
    if feeds_from_one_process(args, info):
        return "one process"
    if args.inference_parallel_size == 1 and args.nnodes > 1:
        return "node rank"
    return "torchrun"


def become_node_rank(args: LoaderOptions) -> None:
    """This process becomes loader rank ``--node-rank`` of ``--nnodes`` (one per node): the environment torchrun
    would have given it, torch.distributed meeting at ``--master-addr``:``--master-port`` (rank 0 hosts the store).
    Line-buffered output, as torchrun's ``python -u`` ranks write it."""
    rank = str(args.node_rank)
    os.environ.update(
        RANK=rank,
        GROUP_RANK=rank,
        WORLD_SIZE=str(args.nnodes),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR=args.master_addr,
        MASTER_PORT=str(args.master_port),
    )
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    watchdog.install(args.timeout)
    early = None
    if "RANK" not in os.environ and (args.inference_parallel_size > 1 or args.nnodes > 1):
        from .early_read import EarlyRead
        from .world import LoaderWorld

        early = EarlyRead.for_node(args)  # what this node's loader ranks will read, whoever reads it
        if early is not None:
            early.start()
        info, error = ask_server(args)  # before starting N processes: a clear message, no torchrun noise
        if error:
            print(f"[sglang-ckpt] error: {error}", file=sys.stderr)
            return 1
        launch = choose_launch(args, info)
        args = args.with_(feeds_instance=launch == "one process")
        if launch == "node rank":
            become_node_rank(args)  # reads on in this process: the rank it becomes is the one that needs the share
        elif launch == "torchrun":
            if early is not None:
                early.report(LoaderWorld())
                early.read_on_in_child()  # torchrun and its ranks take seconds to start: the disk keeps reading
            relaunch_under_torchrun(args, argv)
    from .session import run_loader  # heavy imports after argument errors

    return run_loader(args, early, t_start)


def console_main() -> None:
    sys.exit(main())
