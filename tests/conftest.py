"""Test-wide set-up: which tests start processes, and one memoised run per distinct tiny-model run.

Tests under ``tests/dist``, ``tests/e2e``, ``tests/slurm`` and ``tests/gpu`` start processes (gloo workers, the CLI,
torchrun, SLURM) and are marked ``procs``; the few unit tests that do are marked by hand. ``make
test-fast`` deselects them, so it runs in-process specifications only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parity import train_run

TESTS = Path(__file__).resolve().parent
PROCESS_DIRS = ("dist", "e2e", "slurm", "gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.resolve().relative_to(TESTS).parts
        if len(parts) > 1 and parts[0] in PROCESS_DIRS:
            item.add_marker(pytest.mark.procs)


class ReferenceRuns:
    """Runs of the tiny model (tests/parity.py) computed once per session, whoever asks for them.

    ``runs(nproc, *overrides, steps=N)`` returns the run's metrics records, ``runs.dir(...)`` its run
    directory (for final weights). The same arguments give the same numbers, so sharing a run
    changes no assertion; callers only read a shared run directory, never write into it.
    """

    def __init__(self, root: pytest.TempPathFactory) -> None:
        self._root = root
        self._done: dict[tuple, tuple[Path, list[dict]]] = {}

    def _get(self, nproc: int, overrides: tuple[str, ...], steps: int) -> tuple[Path, list[dict]]:
        key = (nproc, overrides, steps)
        if key not in self._done:
            out = self._root.mktemp("reference")
            self._done[key] = (out, train_run(out, nproc, *overrides, steps=steps))
        return self._done[key]

    def __call__(self, nproc: int, *overrides: str, steps: int) -> list[dict]:
        return self._get(nproc, overrides, steps)[1]

    def dir(self, nproc: int, *overrides: str, steps: int) -> Path:
        return self._get(nproc, overrides, steps)[0]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> ReferenceRuns:
    """The session's :class:`ReferenceRuns`."""
    return ReferenceRuns(tmp_path_factory)
