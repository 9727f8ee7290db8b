"""A cluster in one box: N emulated nodes on this machine, for the cluster bench and the namespace tests.

Each node is a network namespace with an address of its own (198.18.0.i, the range set aside for benchmarks,
only inside namespaces made here; the host's interfaces are untouched), joined to the others through a veth link
to a bridge in a hub namespace, rate-limited both ways (``tc tbf``), and losing a set share of its packets each way
where asked (nftables' random numbers at the ingress of both ends of the node's cable: kernels without ``netem``,
this machine's, have them). Each node
reads a disk of its own at a set rate: an ext4 image on a loop device (direct I/O, so the host's page cache of
the image file plays no part) and a blkio cgroup (v1) that throttles reads from it; every process started on the
node joins that cgroup. Every node sees its disk at the same path (``Cluster.disk``, bind-mounted in the node's
own mount namespace), as the nodes of a real cluster see a checkpoint at one path.

Root only. ``close()`` (also at interpreter exit and on SIGTERM) kills what runs in each node's cgroup and removes
namespaces, links, mounts, loop devices, cgroups and the images, failures included; a cluster left behind by a
process that was killed outright is removed by the next one (its pid is in every name).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..loader.early_read import drop_cached

SUBNET = "198.18.0"
HUB_ADDRESS = f"{SUBNET}.254"
BLKIO = Path("/sys/fs/cgroup/blkio")
LOSS_TABLE = "ckb_loss"  # a node's lossy cable: one nftables table per end (node side, hub side)
PREFIX = "ckb"  # every name starts with PREFIX + the owning pid: namespaces, links, cgroups, /tmp/ckb-<pid>
CLONE_NEWNET = 0x40000000
MIB = 1 << 20

# join the node's cgroup (before `ip netns exec`, which mounts a /sys of the namespace without the cgroups), enter its
# namespaces, bind its disk at the common path, then become the command
_JOIN = 'echo $$ > "$1" && shift && exec "$@"'
_MOUNT = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int
    disk_mib_s: float | None = None  # each node's disk read rate (None: not throttled)
    link_mbit: float | None = None  # each node's link rate, each direction (None: not limited)
    disk_mib: int = 512  # each node's disk size


def _sh(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, input=stdin)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def missing_tools() -> list[str]:
    """What a cluster needs of this machine that it lacks (empty: it can be built)."""
    missing = [tool for tool in ("ip", "tc", "nft", "losetup", "mkfs.ext4", "mount") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    if not (BLKIO / "blkio.throttle.read_bps_device").exists():
        missing.append("cgroup v1 blkio")
    return missing


class Node:
    def __init__(self, cluster: Cluster, index: int):
        self.index = index
        self.netns = f"{cluster.name}n{index}"
        self.address = f"{SUBNET}.{index + 1}"
        self.image = cluster.root / f"node{index}.img"
        self.disk = cluster.root / f"node{index}"  # the node's disk, mounted on the host (to fill it)
        self.cgroup = BLKIO / self.netns
        self.hub = cluster.hub
        self.hub_link = f"{cluster.name}b{index}"
        self.loop = ""
        self._mount_at = cluster.disk

    def command(self, args: list[str]) -> list[str]:
        """``args`` run on this node: its network, its cgroup, its disk at ``Cluster.disk``."""
        procs = str(self.cgroup / "cgroup.procs")
        join = ["sh", "-c", _JOIN, "node", procs]
        mount = ["sh", "-c", _MOUNT, "node", str(self.disk), str(self._mount_at)]
        return [*join, "ip", "netns", "exec", self.netns, *mount, *args]

    def popen(self, args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """Start ``args`` on this node in a process group of its own (stop it by that group)."""
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.command(args), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def pids(self) -> list[int]:
        return _members(self.cgroup)

    def kill_all(self) -> None:
        """SIGKILL every process on this node (its cgroup holds them all, torchrun's workers included)."""
        _kill_members(self.cgroup)

    def set_link(self, up: bool) -> None:
        """The node's cable in or out (its side of the veth, as a failed NIC or switch port would be)."""
        _sh("ip", "-n", self.netns, "link", "set", "eth0", "up" if up else "down")

    def shape(self, *qdisc: str) -> None:
        """Replace the node's outgoing queue discipline, e.g. ``shape("tbf", "rate", "20mbit", "burst", "64kb",
        "latency", "400ms")`` (or ``netem`` delay and loss, where the kernel has it)."""
        _sh("tc", "-n", self.netns, "qdisc", "replace", "dev", "eth0", "root", *qdisc)

    def lose(self, percent: float) -> None:
        """Drop ``percent`` % of the packets crossing the node's cable, each way, at random (0: a clean cable again):
        what arrives at the node, and what it sends as it arrives at the hub. TCP resends what is lost."""
        for netns, device in self._cable_ends():
            _sh("ip", "netns", "exec", netns, "nft", "delete", "table", "netdev", LOSS_TABLE, check=False)
            if percent > 0:
                hook = f"type filter hook ingress device {device} priority 0"
                rule = f"numgen random mod 1000000 < {round(percent * 10_000)} counter drop"
                table = f"table netdev {LOSS_TABLE} {{\n chain arriving {{\n  {hook}\n  {rule}\n }}\n}}\n"
                _sh("ip", "netns", "exec", netns, "nft", "-f", "-", stdin=table)

    def lost_packets(self) -> int:
        """Packets the lossy cable dropped, both ways, since ``lose`` last set it."""
        lost = 0
        for netns, _device in self._cable_ends():
            listed = _sh("ip", "netns", "exec", netns, "nft", "list", "table", "netdev", LOSS_TABLE, check=False)
            lost += sum(int(n) for n in re.findall(r"counter packets (\d+)", listed.stdout))
        return lost

    def _cable_ends(self) -> list[tuple[str, str]]:
        return [(self.netns, "eth0"), (self.hub, self.hub_link)]

    def drop_page_cache(self) -> None:
        """Evict the node's files from the page cache, so that the next read comes from its (throttled) disk."""
        for path in self.disk.rglob("*"):
            if path.is_file():
                drop_cached(str(path))


class Cluster:
    """``with Cluster(ClusterSpec(2, disk_mib_s=50, link_mbit=1000)) as c: c.nodes[0].popen(...)``."""

    def __init__(self, spec: ClusterSpec, workdir: Path | None = None):
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"a cluster in one box needs {', '.join(missing)}: run scripts/cluster_tools.sh as root")
        self.spec = spec
        self.name = f"{PREFIX}{os.getpid()}"
        self.root = Path(workdir or "/tmp") / f"ckb-{os.getpid()}"
        self.disk = self.root / "disk"  # where every node sees its own disk
        self.hub = f"{self.name}h"
        self.nodes = [Node(self, i) for i in range(spec.nodes)]
        self._closed = False

    # ------------------------------------------------------------------ build
    def __enter__(self) -> Cluster:
        if self.root.exists():  # every name carries this process's pid: one cluster at a time per process
            raise RuntimeError(f"a cluster of this process is open already ({self.root})")
        remove_stale_clusters(Path(self.root).parent)
        atexit.register(self.close)
        self._previous_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        self.disk.mkdir(parents=True, exist_ok=True)
        _sh("ip", "netns", "add", self.hub)
        _sh("ip", "-n", self.hub, "link", "set", "lo", "up")
        _sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.hub, "addr", "add", f"{HUB_ADDRESS}/24", "dev", "br0")
        _sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for node in self.nodes:
            self._build_network(node)
            self._build_disk(node)

    def _build_network(self, node: Node) -> None:
        _sh("ip", "netns", "add", node.netns)
        _sh("ip", "-n", node.netns, "link", "set", "lo", "up")
        node_end = f"{self.name}a{node.index}"
        _sh("ip", "link", "add", node_end, "type", "veth", "peer", "name", node.hub_link)
        _sh("ip", "link", "set", node_end, "netns", node.netns)
        _sh("ip", "link", "set", node.hub_link, "netns", self.hub)
        _sh("ip", "-n", node.netns, "link", "set", node_end, "name", "eth0")
        _sh("ip", "-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
        _sh("ip", "-n", node.netns, "link", "set", "eth0", "up")
        _sh("ip", "-n", self.hub, "link", "set", node.hub_link, "master", "br0", "up")
        if self.spec.link_mbit:
            rate = ["tbf", "rate", f"{self.spec.link_mbit:g}mbit", "burst", "1mb", "latency", "100ms"]
            node.shape(*rate)  # what the node sends
            _sh("tc", "-n", self.hub, "qdisc", "replace", "dev", node.hub_link, "root", *rate)  # what it receives

    def _build_disk(self, node: Node) -> None:
        with open(node.image, "wb") as f:
            f.truncate(self.spec.disk_mib * MIB)
        _sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(node.image))
        node.loop = _sh("losetup", "--direct-io=on", "-f", "--show", str(node.image)).stdout.strip()
        node.disk.mkdir(exist_ok=True)
        _sh("mount", node.loop, str(node.disk))
        node.cgroup.mkdir(exist_ok=True)
        if self.spec.disk_mib_s:
            rdev = os.stat(node.loop).st_rdev
            limit = f"{os.major(rdev)}:{os.minor(rdev)} {int(self.spec.disk_mib_s * MIB)}"
            (node.cgroup / "blkio.throttle.read_bps_device").write_text(limit)

    # ------------------------------------------------------------------ use
    def copy_to_every_disk(self, src: Path, name: str | None = None) -> Path:
        """``src`` (a checkpoint directory) onto every node's disk; returns the path every node sees it at."""
        for node in self.nodes:
            shutil.copytree(src, node.disk / (name or src.name), dirs_exist_ok=True)
        return self.disk / (name or src.name)

    def on_disk(self, node: Node, path: Path) -> Path:
        """Where the host finds, on ``node``'s disk, what the node sees at ``path`` (under ``self.disk``)."""
        return node.disk / Path(path).relative_to(self.disk)

    def drop_page_cache(self) -> None:
        for node in self.nodes:
            node.drop_page_cache()

    @contextmanager
    def reachable(self) -> Iterator[None]:
        """This thread joins the hub's network (every node's address answers there) until the block ends; sockets
        opened inside keep working after it."""
        with network_namespace(self.hub):
            yield

    # ------------------------------------------------------------------ tear down
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for node in self.nodes:
            node.kill_all()
        _remove(self.name, self.root)
        atexit.unregister(self.close)
        if signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_sigterm)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through close(), which a plain SIGTERM would skip


def _members(cgroup: Path) -> list[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _kill_members(cgroup: Path) -> None:
    """SIGKILL every process in ``cgroup`` until none is left (a fork may add one meanwhile)."""
    for _ in range(50):
        pids = _members(cgroup)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _remove(name: str, root: Path) -> None:
    """Everything a cluster named ``name`` made, whatever it got to (each step tolerates what is absent)."""
    for cgroup in BLKIO.glob(f"{name}n*"):
        _kill_members(cgroup)
    namespaces = _sh("ip", "netns", "list", check=False).stdout.split()
    for ns in namespaces:
        if ns.startswith(name) and ns[len(name) :][:1] in ("n", "h"):
            _sh("ip", "netns", "del", ns, check=False)
    if root.exists():
        for disk in sorted(root.glob("node*")):
            if disk.is_dir():
                _sh("umount", "-l", str(disk), check=False)
        for image in root.glob("node*.img"):
            for line in _sh("losetup", "-j", str(image), check=False).stdout.splitlines():
                _sh("losetup", "-d", line.split(":", 1)[0], check=False)
        shutil.rmtree(root, ignore_errors=True)
    for cgroup in BLKIO.glob(f"{name}n*"):
        for _ in range(100):  # a killed process leaves its cgroup a moment later
            _kill_members(cgroup)
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def remove_stale_clusters(parent: Path) -> None:
    """Clusters whose owner is gone (killed outright): removed."""
    names = [p.name.split("-", 1)[1] for p in parent.glob("ckb-*")]  # work directories: ckb-<pid>
    names += [c.name[len(PREFIX) :] for c in BLKIO.glob(f"{PREFIX}*")]  # cgroups: ckb<pid>n<i>
    names += [ns[len(PREFIX) :] for ns in _sh("ip", "netns", "list", check=False).stdout.split() if ns[:3] == PREFIX]
    owners = {int(found[0]) for found in (re.match(r"\d+", name) for name in names) if found}
    for pid in owners:
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            _remove(f"{PREFIX}{pid}", parent / f"ckb-{pid}")


@contextmanager
def network_namespace(netns: str) -> Iterator[None]:
    """The calling thread in network namespace ``netns`` for the block (setns(2); Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to this thread's own network failed")
    finally:
        os.close(own)
        os.close(target)
