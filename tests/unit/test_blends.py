"""Specification of ``data.blend``: weighted mixes of prepared sources in Megatron's order, exact
proportions, the same global stream under any data-parallel degree and across a resume, the eval
split kept per source, tokens per source, and one-line errors for a bad blend. No process group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from meshweave.config import ConfigError, DataConfig
from meshweave.data.blend import BlendedSequences, BlendOrder, parse_blend
from meshweave.data.build import build_datasets
from meshweave.data.datasets import split_documents
from meshweave.data.loader import ShardedLoader
from meshweave.data.prepare import prepare
from meshweave.validation import preflight, resolve
from tests.unit.test_megatron_data import megatron_prefix

SEQ = 8
EOS = 256


def source(root: Path, letter: str, docs: int = 12) -> str:
    """A prepared dataset (bytes tokenizer) whose documents are runs of ``letter`` of varying length,
    so every sample names its source by its first token; returns the output directory."""
    root.mkdir()
    paths = []
    for d in range(docs):
        (root / f"{d}.txt").write_text(letter * (20 + 7 * d), encoding="utf-8")
        paths.append(str(root / f"{d}.txt"))
    prepare(paths, "bytes", str(root / "out"))
    return str(root / "out")


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, str]:
    return {letter: source(tmp_path / letter, letter, docs) for letter, docs in (("a", 12), ("b", 5), ("c", 3))}


def blend_of(sources: dict[str, str], weights: str = "5 a 3 b 2 c", eval_fraction: float = 0.2):
    spec = " ".join(sources.get(item, item) for item in weights.split())
    return build_datasets(DataConfig(blend=spec, eval_fraction=eval_fraction), SEQ, seed=0)


def global_stream(ds: BlendedSequences, dp_size: int, steps: int, consumed: int = 0, batch: int = 8) -> list:
    """The global batches' input rows, rank slices in rank order, for ``steps`` steps."""
    loaders = [ShardedLoader(ds, batch, 0, r, dp_size, seed=3, consumed_samples=consumed) for r in range(dp_size)]
    rows = []
    for _ in range(steps):
        for loader in loaders:
            rows += [x for inputs, *_ in loader.next_batch() for x in inputs.tolist()]
    return rows


def test_parse_blend_normalises_megatron_weight_path_pairs():
    pairs = parse_blend("0.7 path/a 0.3 path/b")
    assert [p for _, p in pairs] == ["path/a", "path/b"] and [w for w, _ in pairs] == pytest.approx([0.7, 0.3])
    pairs = parse_blend("2 x 6 y")
    assert [p for _, p in pairs] == ["x", "y"] and [w for w, _ in pairs] == pytest.approx([0.25, 0.75])


def test_proportions_over_10000_samples_are_within_1_percent_of_the_weights(sources):
    train, _, _ = blend_of(sources)
    loader = ShardedLoader(train, 100, 0, 0, 1, seed=7)
    rows = [row for _ in range(100) for inputs, *_ in loader.next_batch() for row in inputs.tolist()]
    first = [chr(next(t for t in row if t != EOS)) for row in rows]  # every window holds a letter
    assert len(first) == 10_000
    for letter, weight in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(first.count(letter) / 10_000 - weight) < 0.01
    assert loader.metrics() == {
        "source_tokens": {sources[k]: first.count(k) * SEQ for k in "abc"},
    }


def test_every_prefix_of_the_greedy_order_is_within_one_sample_of_the_weights():
    weights = [0.55, 0.3, 0.1, 0.05]
    source, within = BlendOrder([w * 3 for w in weights]).lookup(0, 10_000)
    counts = np.stack([np.cumsum(source == s) for s in range(len(weights))], axis=1)
    n = np.arange(1, 10_001)[:, None]
    assert np.abs(counts - n * np.asarray(weights)).max() <= 1.0
    for s in range(len(weights)):  # each source's samples are taken in turn
        assert (within[source == s] == np.arange((source == s).sum())).all()


def test_the_order_is_a_pure_function_of_the_global_index():
    late = BlendOrder([0.7, 0.3]).lookup(150_000, 5)
    fresh = BlendOrder([0.7, 0.3])
    fresh.lookup(0, 10)
    assert all((x == y).all() for x, y in zip(late, fresh.lookup(150_000, 5), strict=True))


def test_the_global_stream_is_identical_across_dp_degrees(sources):
    train, _, _ = blend_of(sources)
    reference = global_stream(train, 1, steps=12)
    assert global_stream(train, 2, steps=12) == reference
    assert global_stream(train, 4, steps=12) == reference


def test_resume_continues_the_stream_under_another_dp_degree(sources):
    train, _, _ = blend_of(sources)
    reference = global_stream(train, 1, steps=10)
    first = ShardedLoader(train, 8, 0, 0, 1, seed=3)
    for _ in range(4):
        first.next_batch()
    state = first.state_dict()
    rows = []
    loaders = [ShardedLoader(train, 8, 0, r, 4, seed=99) for r in range(4)]
    for loader in loaders:
        loader.load_state_dict(state)
    for _ in range(6):
        for loader in loaders:
            rows += [x for inputs, *_ in loader.next_batch() for x in inputs.tolist()]
    assert rows == reference[4 * 8 :]
    # A fresh blend over the same files (a restarted run) serves the same samples.
    again, _, _ = blend_of(sources)
    assert global_stream(again, 2, steps=3, consumed=56) == reference[56:80]


def test_a_source_that_runs_out_wraps_around_in_a_new_order_each_epoch(sources):
    train, _, _ = blend_of(sources)
    c = 2
    n = len(train.sources[c])
    windows = [w for s, w in (train.locate(i, 3) for i in range(20 * n * 5)) if s == c]
    epochs = [windows[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert n < 3 or epochs[0] != epochs[1]


def test_eval_keeps_each_sources_held_out_split_with_the_same_weights(sources):
    train, held, _ = blend_of(sources)
    for t, e in zip(train.sources, held.sources, strict=True):
        train_ids, eval_ids = split_documents(t.corpus.num_documents, 0.2)
        assert list(t.doc_ids) == list(train_ids) and list(e.doc_ids) == list(eval_ids)
    assert held.order.weights == pytest.approx([0.5, 0.3, 0.2])
    _, none, _ = blend_of(sources, eval_fraction=0.0)
    assert len(none) == 0


def test_a_good_blend_passes_validation_and_preflight(tmp_path, sources):
    cfg = resolve(None, [f"--out={tmp_path / 'run'}", f"--data.blend=0.6 {sources['a']} 0.4 {sources['b']}"], 1)
    preflight(cfg)


def blend_error(tmp_path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        preflight(resolve(None, [f"--out={tmp_path / 'run'}", *overrides], world_size=1))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("data.blend")
    return msg


def test_each_bad_blend_is_one_line_naming_data_blend_and_the_fix(tmp_path, sources):
    a, b = sources["a"], sources["b"]
    assert "'x' (before" in blend_error(tmp_path, f"--data.blend=x {a} 0.3 {b}")
    assert "not a positive number" in blend_error(tmp_path, f"--data.blend=0 {a} 1 {b}")
    assert "not a positive number" in blend_error(tmp_path, f"--data.blend=-0.5 {a} 1 {b}")
    assert "not a positive number" in blend_error(tmp_path, f"--data.blend=nan {a} 1 {b}")
    assert "3 items" in blend_error(tmp_path, f"--data.blend=0.5 {a} 0.5")
    missing = tmp_path / "nowhere"
    msg = blend_error(tmp_path, f"--data.blend=0.5 {a} 0.5 {missing}")
    assert f"source {missing}: " in msg and "not found" in msg
    empty = megatron_prefix(tmp_path, [])
    msg = blend_error(tmp_path, f"--data.blend=0.5 {a} 0.5 {empty}")
    assert f"source {empty}: " in msg and "no documents" in msg and "meshweave data prepare" in msg
    assert "give one of them" in blend_error(tmp_path, f"--data.source={a}", f"--data.blend=1 {b}")
    for bad in ("x 0.3", "1 a 1"):
        assert "weight and dataset prefix pairs" in blend_error(tmp_path, f"--data.blend={bad}")


def test_a_blended_sample_carries_its_sources_document_ids(sources):
    train, *_ = blend_of(sources)
    for i in range(0, 200, 7):
        s, w = train.locate(i, seed=3)
        assert torch.equal(train.documents(i, seed=3), train.sources[s].documents(w))
