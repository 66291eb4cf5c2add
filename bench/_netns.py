"""gloo ranks in network namespaces joined by a shaped Linux bridge: a slow network on one machine.

Each of ``n`` ranks gets a network namespace of its own with one veth whose other end is a port of
a bridge in the root namespace (the bridge itself has no address, so the root namespace cannot
reach the ranks and they reach nothing but each other). Rank ``i``'s veth has the address
``10.78.0.<i+1>/24`` — it exists only inside that namespace — and its egress is shaped with
``tc qdisc ... tbf rate <R>mbit``: every rank sends at most R Mbit/s in total, like a node with an
R Mbit/s NIC behind a switch. Two ways in::

    from bench._netns import ShapedNetwork, available, spawn_in_namespaces
    reason = available()
    if reason:
        print(f"skipped: {reason}")
    else:
        results = spawn_in_namespaces(fn, 2, spec, rate_mbit=1000)   # rank-ordered return values
        with ShapedNetwork(2, 100) as net:                            # or: any command per namespace
            subprocess.Popen(net.command(0, ["python", "-m", "meshweave", "train", ...]), env=...)

:func:`spawn_in_namespaces` is :func:`meshweave.launch.harness.spawn` (same rules for ``fn``, its
arguments and its result) with each rank moved into its namespace (``setns``) before torch is
imported, ``GLOO_SOCKET_IFNAME`` set to its veth and ``MASTER_ADDR`` the first namespace's address.
The namespaces, the veths and the bridge are deleted when the network is closed — normally, on a
worker failure or timeout, on KeyboardInterrupt and on SIGTERM — after killing whatever still runs
inside the namespaces (only processes this helper started can).

Needs root (or CAP_NET_ADMIN) and iproute2 (``ip``, ``tc``); :func:`available` says why not.
This is ../shared/RECIPES.md's "slow link between two nodes" with a bridge for more than two.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from meshweave.launch.harness import WorkerError, spawn

SUBNET = "10.78.0"
CLONE_NEWNET = 0x40000000  # <sched.h>: setns() into a network namespace
BRIDGE_HINT = (
    "ranks in shaped namespaces; if they never connected, check that bridged traffic is not filtered "
    "(/proc/sys/net/bridge/bridge-nf-call-iptables with a FORWARD DROP policy)"
)


_NETWORKS = itertools.count()


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def available() -> str | None:
    """``None`` if namespaces can be made here, else the reason they cannot (for "skipped: ...")."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the bench as root for the shaped-link table)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command (iproute2) is not installed"
    probe = f"mw-probe-{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


class ShapedNetwork:
    """``n`` namespaces on one bridge, each veth shaped to ``rate_mbit``; a context manager.

    ``ns[i]``, ``dev[i]`` (the veth inside ``ns[i]``) and ``addr[i]`` describe rank ``i``'s node.
    Everything created is removed on exit, whatever the exit.
    """

    def __init__(self, n: int, rate_mbit: float) -> None:
        # Unique per network, not only per process: the kernel deletes a namespace's veths
        # asynchronously, so the next network of the same process could meet the old names.
        tag = f"{os.getpid() % 100000}n{next(_NETWORKS) % 100}"
        self.n, self.rate_mbit = n, rate_mbit
        self.bridge = f"mwbr{tag}"  # interface names: at most 15 characters
        self.ns = [f"mw-{tag}-{i}" for i in range(n)]
        self.dev = [f"mwn{tag}x{i}" for i in range(n)]
        self.host_dev = [f"mwh{tag}x{i}" for i in range(n)]
        self.addr = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self._made_ns: list[str] = []
        self._made_bridge = False
        self._old_sigterm: Any = None

    def __enter__(self) -> ShapedNetwork:
        if threading.current_thread() is threading.main_thread():  # SIGTERM -> SystemExit -> __exit__
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_exit)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _create(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        _run("ip", "link", "set", self.bridge, "up")
        # tbf needs a bucket of at least one (GSO) packet; ~1 ms of traffic, never under 64 KiB.
        burst = max(64 * 1024, int(self.rate_mbit * 1e6 / 8 / 1000))
        for ns, dev, host, addr in zip(self.ns, self.dev, self.host_dev, self.addr, strict=True):
            _run("ip", "netns", "add", ns)
            self._made_ns.append(ns)
            _run("ip", "link", "add", host, "type", "veth", "peer", "name", dev, "netns", ns)
            _run("ip", "link", "set", host, "master", self.bridge, "up")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run(
                "ip",
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                f"{self.rate_mbit:g}mbit",
                "burst",
                str(burst),
                "latency",
                "50ms",
            )

    def command(self, rank: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside rank ``rank``'s namespace (``ip netns exec`` execs it: the process
        started is the command itself). Give it ``GLOO_SOCKET_IFNAME=dev[rank]`` for gloo."""
        return ["ip", "netns", "exec", self.ns[rank], *argv]

    def rank_setup(self) -> Callable[[int], dict[str, str]]:
        """A picklable ``rank_setup`` for :func:`meshweave.launch.harness.spawn`: rank ``i`` enters
        ``ns[i]`` and rendezvouses at ``addr[0]`` over its veth (one rank per "node")."""
        return functools.partial(enter_namespace, tuple(self.ns), tuple(self.dev), self.addr[0])

    def close(self) -> None:
        """Kill what runs in the namespaces, delete them (their veths go with them) and the bridge."""
        errors = []
        for ns in self._made_ns:
            for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            gone = _run("ip", "netns", "del", ns, check=False)
            if gone.returncode != 0:
                errors.append(f"ip netns del {ns}: {gone.stderr.strip()}")
        self._made_ns = []
        if self._made_bridge:
            gone = _run("ip", "link", "del", self.bridge, check=False)
            if gone.returncode != 0:
                errors.append(f"ip link del {self.bridge}: {gone.stderr.strip()}")
            self._made_bridge = False
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        if errors:
            print(f"_netns: cleanup incomplete: {'; '.join(errors)}", file=sys.stderr)


def _raise_exit(signum: int, frame: Any) -> None:  # noqa: ARG001
    raise SystemExit(128 + signum)


def enter_namespace(names: Sequence[str], devices: Sequence[str], master: str, rank: int) -> dict[str, str]:
    """Move this process into ``names[rank]`` (before it opens any socket: only the calling thread
    moves, and threads started later inherit its namespace); returns the rank's gloo variables."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{names[rank]}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {names[rank]}: {os.strerror(err)}")
    finally:
        os.close(fd)
    return {"GLOO_SOCKET_IFNAME": devices[rank], "MASTER_ADDR": master, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


def spawn_in_namespaces(fn: Callable, world: int, *args: Any, rate_mbit: float = 1000, **kwargs: Any) -> list[Any]:
    """:func:`meshweave.launch.harness.spawn` with rank ``r`` in namespace ``r`` of a fresh
    :class:`ShapedNetwork` at ``rate_mbit``; ``kwargs`` (timeout, env, log_dir) go to ``spawn``.
    Rank-ordered results; :class:`~meshweave.launch.harness.WorkerError` as ``spawn`` raises it."""
    with ShapedNetwork(world, rate_mbit) as net:
        try:
            return spawn(fn, world, *args, rank_setup=net.rank_setup(), **kwargs)
        except WorkerError as e:
            raise WorkerError(f"{BRIDGE_HINT}:\n{e}") from None
