"""Two "nodes" on one machine: one torchrun per node (``--nnodes 2``, one worker each) trains to the
same losses as the same two ranks started by one torchrun.

Why bitwise: the layout is pure replicated DP over two ranks in both runs. Each rank sees the same
batches, runs the same single-threaded (OMP_NUM_THREADS=1) CPU kernels, and gloo all-reduces the
same gradient buffers between the same two ranks with the same algorithm, whichever address the
bytes travel over (loopback, or a veth between two network namespaces). Nothing in the arithmetic
knows how many nodes there are, so the float operations and their order are identical: the losses
are compared with ``==``, not a tolerance.

The namespace test follows ../shared/RECIPES.md (beside the repository): the 10.77.<n>.x addresses exist only inside the
two namespaces it creates (their only route is the veth between them), and the namespaces are
deleted afterwards, also on failure.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshweave.launch.harness import free_port, read_metrics
from tests.parity import TINY, losses, worker_pids

STEPS = 10
LAYOUT = ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def one_node_losses(reference_run):
    """The reference: the same two ranks under one torchrun (`meshweave run --nproc 2`)."""
    records = reference_run(2, *LAYOUT, steps=STEPS)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return losses(records)


def _node_command(node_rank: int, master_addr: str, port: int, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        f"--node-rank={node_rank}",
        "--nproc-per-node=1",
        f"--master-addr={master_addr}",
        f"--master-port={port}",
        "--max-restarts=0",
        "-m",
        "meshweave",
        "train",
        *TINY,
        *LAYOUT,
        f"--train.steps={STEPS}",
        f"--out={out}",
    ]


def _stop(procs: list[subprocess.Popen], out: Path) -> None:
    """Stop whatever of these torchrun agents (and their workers, which run in sessions of their own)
    is still alive: SIGTERM to the agents (they forward it), then SIGKILL to agents and workers."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + 15
    for p in alive:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=30)
    for pid in worker_pids(out):  # only processes training into this test's own directory
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run_two_nodes(commands: list[list[str]], out: Path, logs: Path, env: dict[str, str]) -> list[dict]:
    """Start both node commands at once, wait for both (TIMEOUT_S in all), return rank 0's metrics."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    try:
        for node, cmd in enumerate(commands):
            log = open(logs / f"node{node}.log", "w")
            files.append(log)
            procs.append(
                subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, text=True
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _stop(procs, out)
        pytest.fail(f"two-node run did not finish within {TIMEOUT_S}s\n{_tails(logs)}")
    finally:
        _stop(procs, out)
        for f in files:
            f.close()
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"node exit codes {codes}\n{_tails(logs)}"
    return read_metrics(out)


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log")))


def _assert_same_trajectory(reference: list[float], records: list[dict]) -> None:
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # Bitwise, see the module docstring; a difference is a real divergence, not rounding noise.
    assert losses(records) == reference


def test_two_torchrun_nodes_train_to_the_same_losses_as_one_node(tmp_path, one_node_losses):
    out = tmp_path / "two-nodes"
    port = free_port()
    commands = [_node_command(node, "127.0.0.1", port, out) for node in (0, 1)]
    records = _run_two_nodes(commands, out, tmp_path / "logs", {**os.environ, "OMP_NUM_THREADS": "1"})
    _assert_same_trajectory(one_node_losses, records)


# ---------------------------------------------------------------------------------------------
# two network namespaces joined by a veth pair


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _permission_error(text: str) -> bool:
    return "operation not permitted" in text.lower() or "permission denied" in text.lower()


class _Link:
    """Two namespaces, ns[0] and ns[1], joined by veth dev[i] <-> dev[1-i] with address addr[i]."""

    def __init__(self, tag: str, subnet: int):
        self.ns = [f"mw-{tag}-a", f"mw-{tag}-b"]
        self.dev = [f"mwa{tag}", f"mwb{tag}"]  # <= 15 characters: IFNAMSIZ
        self.addr = [f"10.77.{subnet}.1", f"10.77.{subnet}.2"]


@pytest.fixture
def veth_link():
    in_ci = os.environ.get("CI", "").lower() == "true"
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (run as root, or in CI, to test two nodes over a veth)")
    if shutil.which("ip") is None:
        if in_ci:
            pytest.fail("CI=true but the `ip` command (iproute2) is missing")
        pytest.skip("the `ip` command (iproute2) is not installed")
    pid = os.getpid()
    link = _Link(str(pid), pid % 250 + 1)
    created = []
    try:
        probe = _ip("netns", "add", link.ns[0], check=False)
        if probe.returncode != 0:
            if _permission_error(probe.stderr) and not in_ci:
                pytest.skip(f"`ip netns add` is not permitted here: {probe.stderr.strip()}")
            raise RuntimeError(f"ip netns add {link.ns[0]} failed: {probe.stderr.strip()}")
        created.append(link.ns[0])
        _ip("netns", "add", link.ns[1])
        created.append(link.ns[1])
        # Both ends are created straight inside their namespaces: nothing appears in the host's.
        _ip(
            "link",
            "add",
            link.dev[0],
            "netns",
            link.ns[0],
            "type",
            "veth",
            "peer",
            "name",
            link.dev[1],
            "netns",
            link.ns[1],
        )
        for ns, dev, addr in zip(link.ns, link.dev, link.addr):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield link
    finally:
        errors = []
        for ns in created:
            # Anything still running in the namespace was started by this test: end it first.
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for p in pids:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            gone = _ip("netns", "del", ns, check=False)  # takes the veth end inside with it
            if gone.returncode != 0:
                errors.append(f"ip netns del {ns}: {gone.stderr.strip()}")
        leftover = set(_ip("netns", "list", check=False).stdout.split()) & set(link.ns)
        assert not errors and not leftover, f"namespaces not cleaned up: {errors} {sorted(leftover)}"


def test_two_nodes_in_network_namespaces_over_a_veth_link(tmp_path, one_node_losses, veth_link):
    out = tmp_path / "two-namespaces"
    port = free_port()  # any port is free inside a fresh namespace; this one is as good as any
    master = veth_link.addr[0]
    commands = [
        [
            "ip",
            "netns",
            "exec",
            veth_link.ns[node],
            "env",
            f"GLOO_SOCKET_IFNAME={veth_link.dev[node]}",
            *_node_command(node, master, port, out),
        ]
        for node in (0, 1)
    ]
    records = _run_two_nodes(commands, out, tmp_path / "logs", {**os.environ, "OMP_NUM_THREADS": "1"})
    _assert_same_trajectory(one_node_losses, records)
    # The gradients really crossed the veth (node 1's namespace has no other way to node 0). Each
    # step all-reduces every fp32 gradient, so node 1 received about STEPS model sizes (measured:
    # 4.82 MB for 10 x 0.48 MB); half of that still proves it, and survives bf16 gradient traffic.
    received, bound = _rx_bytes(veth_link.ns[1], veth_link.dev[1]), STEPS * _param_bytes() // 2
    assert received >= bound, f"only {received} bytes arrived over {veth_link.dev[1]} (expected >= {bound})"


def _rx_bytes(ns: str, dev: str) -> int:
    text = _ip("netns", "exec", ns, "cat", f"/sys/class/net/{dev}/statistics/rx_bytes").stdout
    return int(text)


def _param_bytes() -> int:
    """fp32 bytes of the TINY model's parameters: a lower bound on what one step's gradient
    all-reduce delivers to each of two ranks."""
    from meshweave.models.llama import build_model, num_params
    from meshweave.validation import resolve

    return 4 * num_params(build_model(resolve(None, TINY).model))
