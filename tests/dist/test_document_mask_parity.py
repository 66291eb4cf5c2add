"""Document-masked training reproduces one process on every layout that splits a sequence.

The corpus is short documents (3-40 bytes, seq_len 64: about four boundaries per sequence), so
masking changes the loss visibly (checked first: otherwise parity would prove nothing). Each
layout trains 10 fp32 steps with ``data.document_mask`` on (the default) and must stay within
1e-4 relative per step of one process. Context parallelism and pipeline stages see shards /
microbatches of the same packed rows; a token attending across a boundary or a RoPE position
not restarting shows up as > 1e-3 within a few steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from meshweave.data.datasets import embedded_documents
from tests.parity import assert_losses_match, losses, train_run

pytestmark = pytest.mark.dist
STEPS = 10
EOS = 256  # the bytes tokenizer's end of document


def short_documents(root: Path, count: int = 3000, seed: int = 0) -> str:
    """A Megatron dataset prefix of ``count`` documents of 3-40 bytes cut from the embedded corpus."""
    from megatron.core.datasets import indexed_dataset as mi

    text = "".join(embedded_documents()).encode("utf-8")
    rng = np.random.default_rng(seed)
    prefix = str(root / "short_text_document")
    builder = mi.IndexedDatasetBuilder(mi.get_bin_path(prefix), dtype=np.uint16)
    start = 0
    for length in rng.integers(3, 41, size=count):
        builder.add_item(torch.tensor([*text[start : start + length], EOS]))
        builder.end_document()
        start += int(length)
    builder.finalize(mi.get_idx_path(prefix))
    return prefix


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    return [f"--data.source={short_documents(tmp_path_factory.mktemp('short'))}", "--data.eval_fraction=0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> list[float]:
    return losses(train_run(tmp_path_factory.mktemp("one"), 1, *corpus, steps=STEPS))


def test_masking_changes_the_trajectory(tmp_path, corpus, reference):
    unmasked = losses(train_run(tmp_path, 1, *corpus, "--data.document_mask=false", steps=STEPS))
    assert max(abs(a - b) / a for a, b in zip(reference, unmasked)) > 1e-3


def cp(degree: int, method: str, *extra: str) -> list[str]:
    return [f"--parallel.cp={degree}", f"--parallel.cp_method={method}", *extra]


@pytest.mark.parametrize(
    "nproc,layout",
    [
        pytest.param(2, cp(2, "ulysses"), id="cp2-ulysses"),
        pytest.param(2, cp(2, "ring"), id="cp2-ring"),
        pytest.param(2, cp(2, "tokenring"), id="cp2-tokenring"),
        pytest.param(4, cp(4, "ulysses"), id="cp4-ulysses"),
        pytest.param(4, cp(4, "ring"), id="cp4-ring"),
        pytest.param(4, cp(4, "tokenring"), id="cp4-tokenring"),
        pytest.param(4, cp(4, "hybrid", "--parallel.ulysses=2"), id="cp4-hybrid-ulysses2-ring2"),
        pytest.param(
            4,
            cp(4, "hybrid", "--parallel.ulysses=2", "--parallel.cp_inner=tokenring"),
            id="cp4-hybrid-ulysses2-tokenring2",
        ),
        pytest.param(2, ["--parallel.pp=2", "--parallel.pp_microbatches=4"], id="pp2-1f1b"),
        pytest.param(4, ["--parallel.pp=2", *cp(2, "ring")], id="pp2-cp2-ring"),
        pytest.param(4, ["--parallel.tp=2", "--parallel.dp_shard=2"], id="tp2-fsdp2"),
        pytest.param(1, ["--train.compile=true"], id="compiled"),
    ],
)
def test_document_masked_layout_matches_one_process(tmp_path, corpus, reference, nproc, layout):
    assert_losses_match(reference, losses(train_run(tmp_path, nproc, *corpus, *layout, steps=STEPS)), rtol=1e-4)
