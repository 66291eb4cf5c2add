"""A private two-node SLURM cluster on this machine (munged, slurmctld, two slurmd), per test session.

Two NodeNames on 127.0.0.1 with their own ports, each served by ``slurmd -N name``. Credentials
expire after 10 s instead of 120 s: that is also how long a requeued job waits before it may start
again (a job started before its old credential expired is refused by slurmd); the scheduler looks at
pending jobs every 2 s instead of 60 s, so it starts then. Outside CI the
tests skip when SLURM is not installed; in CI (CI=true) .ci/run installs it and they must run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

CONF = """ClusterName=meshweave-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/ctld.pid
SlurmdPidFile={d}/d-%n.pid
SlurmctldLogFile={d}/ctld.log
SlurmdLogFile={d}/d-%n.log
SlurmUser=root
SlurmdUser=root
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
KillWait=5
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port1} CPUs=2 RealMemory=10000 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port2} CPUs=2 RealMemory=10000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _daemon_ports(n: int) -> list[int]:
    """n distinct ports, free now, below the kernel's ephemeral range.

    A port taken with bind(0) lies inside the ephemeral range, where any outgoing connection (the
    first slurmd registering, a gloo rendezvous of a test still shutting down) may be handed the
    same number before our daemon binds it: CI once lost the cluster to "Address already in use".
    Below the range only a deliberate bind can collide, and the retry in ``slurm`` covers that.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[int] = []
    for port in random.sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports below the ephemeral range (starts at {low})")


def _munge_works() -> bool:
    enc = subprocess.run(["munge", "-n"], capture_output=True)
    return enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True).returncode == 0


def _kill_pidfile(path: Path) -> None:
    try:
        os.kill(int(path.read_text().split()[0]), signal.SIGTERM)
    except (OSError, ValueError):
        pass


def _daemon_logs(d: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in sorted(d.glob("*.log")))


def _start_cluster(d: Path, conf: Path, env: dict) -> str | None:
    """Start slurmctld and both slurmd; None once both nodes are idle, else what went wrong."""
    subprocess.run(["slurmctld", "-f", str(conf), "-i"], env=env, check=True)
    for node in ("n1", "n2"):
        subprocess.run(["slurmd", "-f", str(conf), "-N", node], env=env, check=True)
    deadline = time.monotonic() + 90
    while True:
        states = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True
        ).stdout.split()
        if len(states) == 2 and all(s.startswith("idle") for s in states):
            return None
        logs = _daemon_logs(d)
        if "fatal:" in logs or time.monotonic() > deadline:
            return f"SLURM nodes never became idle: {states}\n{logs}"
        time.sleep(1)


def _stop_daemons(d: Path) -> None:
    for pidfile in (d / "d-n1.pid", d / "d-n2.pid", d / "ctld.pid"):
        _kill_pidfile(pidfile)
    deadline = time.monotonic() + 15
    while (
        time.monotonic() < deadline
        and subprocess.run(["pgrep", "-f", "--", f"{d}/slurm.conf"], capture_output=True).returncode == 0
    ):
        time.sleep(0.2)
    for log in d.glob("*.log"):
        log.unlink()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Environment (with SLURM_CONF) for talking to a running two-node cluster."""
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        reason = (
            f"SLURM not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
            if missing
            else "a private SLURM cluster needs root"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} — .ci/run must provide it in CI")
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(conf)}

    started_munge = False
    if not _munge_works():
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(
                ["dd", "if=/dev/urandom", f"of={key}", "bs=1", "count=1024"], check=True, capture_output=True
            )
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True)
        started_munge = True
    for attempt in range(3):
        ctld_port, port1, port2 = _daemon_ports(3)
        conf.write_text(CONF.format(host=host, d=d, ctld_port=ctld_port, port1=port1, port2=port2))
        failure = _start_cluster(d, conf, env)
        if failure is None:
            break
        _stop_daemons(d)
        if attempt == 2 or "Address already in use" not in failure:
            raise RuntimeError(failure)
    yield env
    subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
    _stop_daemons(d)
    if started_munge:
        subprocess.run(["pkill", "-x", "munged"], capture_output=True)


def job_state(env: dict, job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


def cluster_report(env: dict, job_id: str) -> str:
    """SLURM's record of a job and the tail of every daemon log, for a failing assertion's message."""
    record = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return f"--- scontrol show job {job_id}\n{record}\n{_daemon_logs(Path(env['SLURM_CONF']).parent)}"


def wait_for_state(env: dict, job_id: str, states: set[str], timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(env, job_id)
        if state in states:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout}s (wanted {states})")
        time.sleep(1)
