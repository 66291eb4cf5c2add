"""A private two-node SLURM cluster on this machine (munged, slurmctld, two slurmd), per test session.

Two NodeNames on 127.0.0.1 with their own ports, each served by ``slurmd -N name``. Outside CI the
tests skip when SLURM is not installed; in CI (CI=true) .ci/run installs it and they must run.
"""

from __future__ import annotations

import os
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works() -> bool:
    enc = subprocess.run(["munge", "-n"], capture_output=True)
    return enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True).returncode == 0


def _kill_pidfile(path: Path) -> None:
    try:
        os.kill(int(path.read_text().split()[0]), signal.SIGTERM)
    except (OSError, ValueError):
        pass


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Environment (with SLURM_CONF) for talking to a running two-node cluster."""
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        reason = (f"SLURM not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
                  if missing else "a private SLURM cluster needs root")
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} — .ci/run must provide it in CI")
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(CONF.format(host=host, d=d, ctld_port=_free_port(), port1=_free_port(), port2=_free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}

    started_munge = False
    if not _munge_works():
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["dd", "if=/dev/urandom", f"of={key}", "bs=1", "count=1024"], check=True,
                           capture_output=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True)
        started_munge = True
    subprocess.run(["slurmctld", "-f", str(conf), "-i"], env=env, check=True)
    for node in ("n1", "n2"):
        subprocess.run(["slurmd", "-f", str(conf), "-N", node], env=env, check=True)
    deadline = time.monotonic() + 90
    while True:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True).stdout.split()
        if len(states) == 2 and all(s.startswith("idle") for s in states):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"SLURM nodes never became idle: {states}\n{(d / 'ctld.log').read_text()[-2000:]}")
        time.sleep(1)
    yield env
    subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
    for pidfile in (d / "d-n1.pid", d / "d-n2.pid", d / "ctld.pid"):
        _kill_pidfile(pidfile)
    if started_munge:
        subprocess.run(["pkill", "-x", "munged"], capture_output=True)


def job_state(env: dict, job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


def wait_for_state(env: dict, job_id: str, states: set[str], timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(env, job_id)
        if state in states:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout}s (wanted {states})")
        time.sleep(1)
