"""gloo ranks in network namespaces joined by a shaped Linux bridge: a slow network on one machine.

Each of ``n`` ranks gets a network namespace of its own with one veth whose other end is a port of
a bridge in the root namespace (the bridge itself has no address, so the root namespace cannot
reach the ranks and they reach nothing but each other). Rank ``i``'s veth has the address
``10.78.0.<i+1>/24`` — it exists only inside that namespace — and its egress is shaped with
``tc qdisc ... tbf rate <R>mbit``: every rank sends at most R Mbit/s in total, like a node with an
R Mbit/s NIC behind a switch. One process per namespace runs ``fn(rank, world, *args)`` with
``GLOO_SOCKET_IFNAME`` set to that veth and ``MASTER_ADDR`` the first namespace's address::

    from _netns import available, spawn_in_namespaces
    reason = available()
    if reason:
        print(f"skipped: {reason}")
    else:
        results = spawn_in_namespaces(fn, 2, spec, rate_mbit=1000)   # rank-ordered return values

``fn`` must be a module-level function of a file that can be imported by path (a bench script is
fine: its ``if __name__ == "__main__"`` block does not run in the workers); its arguments and
return value must pickle as plain data. The namespaces, the veths and the bridge are deleted when
the run ends — normally, on a worker failure or timeout, on KeyboardInterrupt and on SIGTERM —
after killing whatever still runs inside the namespaces (only processes this helper started can).

Needs root (or CAP_NET_ADMIN) and iproute2 (``ip``, ``tc``); :func:`available` says why not.
This is ../shared/RECIPES.md's "slow link between two nodes" with a bridge for more than two.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, _pythonpath  # noqa: E402

from meshweave.launch.harness import collect_results, run_rank  # noqa: E402

SUBNET = "10.78.0"
PORT = 29500  # any port is free in a fresh namespace


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
        tag = str(os.getpid() % 100000)
        self.n, self.rate_mbit = n, rate_mbit
        self.bridge = f"mwbr{tag}"  # interface names: at most 15 characters
        self.ns = [f"mw-{tag}-{i}" for i in range(n)]
        self.dev = [f"mwn{tag}x{i}" for i in range(n)]
        self.host_dev = [f"mwh{tag}x{i}" for i in range(n)]
        self.addr = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self._made_ns: list[str] = []
        self._made_bridge = False
        self._old_sigterm = None

    def __enter__(self) -> "ShapedNetwork":
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
        for ns, dev, host, addr in zip(self.ns, self.dev, self.host_dev, self.addr):
            _run("ip", "netns", "add", ns)
            self._made_ns.append(ns)
            _run("ip", "link", "add", host, "type", "veth", "peer", "name", dev, "netns", ns)
            _run("ip", "link", "set", host, "master", self.bridge, "up")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                 "rate", f"{self.rate_mbit:g}mbit", "burst", str(burst), "latency", "50ms")

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


def _raise_exit(signum, frame):  # noqa: ARG001
    raise SystemExit(128 + signum)


def spawn_in_namespaces(fn: Callable, world: int, *args: Any, rate_mbit: float = 1000, timeout: float = 900,
                        env: dict[str, str] | None = None, log_dir: Path | None = None) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks, one per shaped namespace; rank-ordered
    results. Raises :class:`meshweave.launch.harness.WorkerError` with the first traceback if a rank fails or the
    run exceeds ``timeout`` seconds. Worker output goes to ``log_dir/rank<r>.log`` when given."""
    target = (str(Path(sys.modules[fn.__module__].__file__).resolve()), fn.__qualname__)
    with tempfile.TemporaryDirectory(prefix="meshweave-netns-") as tmp, ShapedNetwork(world, rate_mbit) as net:
        where = Path(log_dir) if log_dir else Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        procs = []
        try:
            for rank in range(world):
                job = Path(tmp) / f"{rank}.job"
                job.write_bytes(pickle.dumps({"target": target, "rank": rank, "world": world, "args": args,
                                              "master": net.addr[0], "timeout": timeout, "results": tmp}))
                child_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath(),
                             "GLOO_SOCKET_IFNAME": net.dev[rank]}
                with open(where / f"rank{rank}.log", "w") as log:
                    procs.append(subprocess.Popen(
                        ["ip", "netns", "exec", net.ns[rank], sys.executable, __file__, str(job)],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=ROOT))
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs):
                failed = any(p.poll() not in (None, 0) for p in procs)
                if failed or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            for p in procs:  # `ip netns exec` execs the command: these are the workers themselves
                if p.poll() is None:
                    p.kill()
                    p.wait()
        logs = f" (logs: {where})" if log_dir else ""
        return collect_results(tmp, world, timeout,
                               hint=f"{logs}; if they never connected, check that bridged traffic is not filtered "
                                    "(/proc/sys/net/bridge/bridge-nf-call-iptables with a FORWARD DROP policy)")


def _worker(job_path: str) -> None:
    """One rank inside its namespace (started by :func:`spawn_in_namespaces`)."""
    job = pickle.loads(Path(job_path).read_bytes())
    rank, world, results = job["rank"], job["world"], Path(job["results"])
    os.environ.update(MASTER_ADDR=job["master"], MASTER_PORT=str(PORT), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    path, name = job["target"]
    spec = importlib.util.spec_from_file_location(f"_netns_target_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run_rank(getattr(module, name), rank, world, job["args"], results, job["timeout"])


if __name__ == "__main__":
    _worker(sys.argv[1])
