"""The sbatch script: one source (render_sbatch), valid bash, options rendered as asked."""

import subprocess
import sys
from pathlib import Path

import pytest

from meshweave.launch.slurm import SbatchOptions, render_sbatch

REPO = Path(__file__).resolve().parents[2]


def test_repository_script_is_the_rendered_default():
    assert (REPO / "slurm" / "train.sbatch").read_text() == render_sbatch()


@pytest.mark.procs
def test_rendered_script_is_valid_bash(tmp_path):
    script = tmp_path / "x.sbatch"
    script.write_text(render_sbatch(SbatchOptions(nodes=4, partition="gpu", account="proj")))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_options_become_sbatch_directives():
    text = render_sbatch(SbatchOptions(nodes=4, nproc_per_node=8, time="02:00:00", warning_s=300, partition="gpu"))
    for directive in (
        "#SBATCH --nodes=4",
        "#SBATCH --time=02:00:00",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --partition=gpu",
        "#SBATCH --requeue",
    ):
        assert directive in text
    assert "NPROC_PER_NODE:-8" in text and "--account" not in text


@pytest.mark.procs
def test_submit_dry_run_validates_the_layout_for_the_node_count(tmp_path):
    meshweave = [sys.executable, "-m", "meshweave", "slurm", "submit", "--dry-run", "--nodes", "2"]
    ok = subprocess.run([*meshweave, "--config", str(REPO / "configs" / "tiny.toml")], capture_output=True, text=True)
    assert ok.returncode == 0 and "#SBATCH --nodes=2" in ok.stdout
    bad = subprocess.run(
        [*meshweave, "--parallel.dp_replicate=3", "--parallel.dp_shard=1"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "parallel" in bad.stderr and "Traceback" not in bad.stderr
