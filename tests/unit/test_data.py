"""Specification of the data pipeline: tokenizers, prepared files, split, packing, sharded loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from meshweave.config import DataConfig
from meshweave.data.build import build_datasets
from meshweave.data.datasets import (
    IGNORE_INDEX,
    PackedSequences,
    TokenCorpus,
    corpus_from_source,
    embedded_documents,
    split_documents,
)
from meshweave.data.loader import ShardedLoader
from meshweave.data.prepare import prepare
from meshweave.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

EOS = 1000


def counting_corpus(num_tokens: int) -> TokenCorpus:
    """One document whose tokens are 0, 1, 2, ... so a window's first token names its position."""
    tokens = np.append(np.arange(num_tokens - 1), EOS).astype(np.int64)
    return TokenCorpus(tokens, np.array([0, num_tokens]), vocab_size=EOS + 1, eos_id=EOS)


def counting_dataset(num_samples: int, seq_len: int = 4) -> PackedSequences:
    ds = PackedSequences(counting_corpus(num_samples * seq_len + 1), [0], seq_len)
    assert len(ds) == num_samples
    return ds


def sample_ids(batches: list, seq_len: int = 4) -> list[int]:
    return [int(x[0]) // seq_len for inputs, *_ in batches for x in inputs]


def write_word_tokenizer(path: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


# --------------------------------------------------------------------------------------------
# tokenizers and the embedded corpus


def test_byte_tokenizer_round_trips_utf8_text():
    tok = ByteTokenizer()
    text = "naïve café — 数据 🚀"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_tokenizer_reserves_256_for_eos_and_decode_drops_it():
    tok = ByteTokenizer()
    assert (tok.eos_id, tok.vocab_size) == (256, 257)
    assert tok.eos_id not in tok.encode("abc")
    assert tok.decode([97, 256, 98, 256]) == "ab"


def test_load_tokenizer_bytes_spec_gives_byte_tokenizer():
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)


def test_load_tokenizer_rejects_a_missing_path(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_hf_tokenizer_uses_the_vocabulary_eos_when_present(tmp_path):
    path = write_word_tokenizer(tmp_path / "tokenizer.json", ["[UNK]", "hello", "world", "<|endoftext|>"])
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert (tok.eos_id, tok.vocab_size) == (3, 4)
    assert tok.encode("hello world") == [1, 2]
    assert tok.decode([1, 3, 2]) == tok.decode([1, 2])


def test_hf_tokenizer_appends_an_eos_id_when_the_vocabulary_has_none(tmp_path):
    path = write_word_tokenizer(tmp_path / "tokenizer.json", ["[UNK]", "a", "b"])
    tok = load_tokenizer(str(path))
    assert (tok.eos_id, tok.vocab_size) == (3, 4)


def test_embedded_documents_are_pydoc_topics_in_sorted_key_order():
    from pydoc_data.topics import topics

    docs = embedded_documents()
    assert docs == [topics[k] for k in sorted(topics)]
    assert len(docs) > 10 and all(docs)


def test_embedded_corpus_is_byte_tokens_with_eos_after_each_document():
    corpus = corpus_from_source("embedded")
    docs = embedded_documents()
    assert (corpus.num_documents, corpus.vocab_size, corpus.eos_id) == (len(docs), 257, 256)
    for d in (0, len(docs) - 1):
        assert corpus.document(d).tolist() == list(docs[d].encode("utf-8")) + [256]


# --------------------------------------------------------------------------------------------
# prepare (a Megatron indexed dataset, see test_megatron_data.py) and TokenCorpus.open


@pytest.fixture
def text_inputs(tmp_path) -> tuple[list[str], list[str]]:
    """Two plain files and a jsonl of two records (with a blank line), and the four documents."""
    (tmp_path / "a.txt").write_text("first document", encoding="utf-8")
    (tmp_path / "b.txt").write_text("zweites Dokument ü", encoding="utf-8")
    lines = [json.dumps({"text": "line one"}), "", json.dumps({"text": "line two", "id": 7})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    files = [str(tmp_path / n) for n in ("a.txt", "b.txt", "c.jsonl")]
    return files, ["first document", "zweites Dokument ü", "line one", "line two"]


def test_prepare_writes_documents_each_followed_by_eos(tmp_path, text_inputs):
    files, docs = text_inputs
    index = prepare(files, "bytes", str(tmp_path / "out"))
    expected = [t for doc in docs for t in list(doc.encode("utf-8")) + [256]]
    lengths = [len(doc.encode("utf-8")) + 1 for doc in docs]
    assert TokenCorpus.open(tmp_path / "out").doc_offsets.tolist() == np.cumsum([0] + lengths).tolist()
    assert (index["num_documents"], index["num_tokens"]) == (4, len(expected))
    assert (index["dtype"], index["vocab_size"], index["eos_id"]) == ("uint16", 257, 256)
    assert (index["format"], index["tokenizer"]) == (2, "bytes")
    assert np.fromfile(tmp_path / "out" / "text_document.bin", dtype=np.uint16).tolist() == expected


def test_prepare_returns_the_index_it_writes_and_leaves_no_temp_files(tmp_path, text_inputs):
    files, _ = text_inputs
    out = tmp_path / "out"
    index = prepare(files, "bytes", str(out))
    assert json.loads((out / "text_document.meshweave.json").read_text()) == index
    assert sorted(p.name for p in out.iterdir()) == [
        "text_document.bin",
        "text_document.idx",
        "text_document.meshweave.json",
    ]


def test_token_corpus_open_memory_maps_the_prepared_tokens(tmp_path, text_inputs):
    files, docs = text_inputs
    prepare(files, "bytes", str(tmp_path / "out"))
    corpus = TokenCorpus.open(tmp_path / "out")
    assert isinstance(corpus.tokens, np.memmap)
    assert corpus.doc_offsets.tolist() == np.cumsum([0] + [len(d.encode()) + 1 for d in docs]).tolist()
    assert (corpus.num_documents, corpus.vocab_size, corpus.eos_id) == (4, 257, 256)
    assert [ByteTokenizer().decode(corpus.document(d)) for d in range(4)] == docs


def test_prepare_with_tokenizer_json_stores_its_ids_and_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus_text = ["the quick brown fox", "jumps over the lazy dog", "the dog sleeps"]
    tok.train_from_iterator(corpus_text, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "x.txt").write_text("the lazy fox", encoding="utf-8")
    (tmp_path / "y.txt").write_text("brown dog", encoding="utf-8")

    index = prepare(
        [str(tmp_path / "x.txt"), str(tmp_path / "y.txt")], str(tmp_path / "tokenizer.json"), str(tmp_path / "out")
    )
    eos = tok.token_to_id("</s>")
    x_ids, y_ids = tok.encode("the lazy fox").ids, tok.encode("brown dog").ids
    assert (index["eos_id"], index["vocab_size"]) == (eos, tok.get_vocab_size())
    corpus = TokenCorpus.open(tmp_path / "out")
    assert corpus.doc_offsets.tolist() == [0, len(x_ids) + 1, len(x_ids) + len(y_ids) + 2]
    assert corpus.tokens.tolist() == x_ids + [eos] + y_ids + [eos]


def test_prepare_stores_int32_when_the_vocabulary_reaches_65500_as_megatron_does(tmp_path):
    words = ["[UNK]"] + [f"w{i}" for i in range(70_000)]
    path = write_word_tokenizer(tmp_path / "tokenizer.json", words)
    (tmp_path / "doc.txt").write_text("w1 w69999", encoding="utf-8")
    index = prepare([str(tmp_path / "doc.txt")], str(path), str(tmp_path / "out"))
    assert index["dtype"] == "int32"
    assert TokenCorpus.open(tmp_path / "out").tokens.tolist() == [2, 70_000, index["eos_id"]]


def test_prepare_names_the_line_of_a_malformed_jsonl_record(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        prepare([str(tmp_path / "bad.jsonl")], "bytes", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # the dataset is built beside it and renamed in at the end


# --------------------------------------------------------------------------------------------
# split


def test_split_is_deterministic_disjoint_and_complete():
    train, held = split_documents(1000, 0.1)
    train2, held2 = split_documents(1000, 0.1)
    assert np.array_equal(train, train2) and np.array_equal(held, held2)
    assert not set(train.tolist()) & set(held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(1000))


def test_split_holds_out_about_eval_fraction_of_documents():
    _, held = split_documents(20_000, 0.1)
    assert 1800 < len(held) < 2200


def test_split_of_a_prefix_agrees_with_the_split_of_the_whole():
    _, small = split_documents(500, 0.2)
    _, large = split_documents(5000, 0.2)
    assert small.tolist() == [d for d in large.tolist() if d < 500]


def test_split_guarantees_one_eval_and_one_train_document():
    train, held = split_documents(2, 1e-9)
    assert len(train) == 1 and len(held) == 1
    train, held = split_documents(3, 0.999999)
    assert len(train) >= 1 and len(held) >= 1


def test_split_with_zero_eval_fraction_keeps_every_document_for_training():
    train, held = split_documents(50, 0.0)
    assert train.tolist() == list(range(50)) and held.size == 0


# --------------------------------------------------------------------------------------------
# packing


def three_doc_corpus() -> TokenCorpus:
    docs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14]]
    tokens = np.array([t for d in docs for t in d + [EOS]], dtype=np.uint16)
    offsets = np.cumsum([0] + [len(d) + 1 for d in docs])
    return TokenCorpus(tokens, offsets, vocab_size=EOS + 1, eos_id=EOS)


def test_windows_tile_the_stream_sharing_one_token_and_drop_the_remainder():
    ds = PackedSequences(three_doc_corpus(), [0, 1, 2], seq_len=4)
    stream = three_doc_corpus().tokens.astype(np.int64)
    assert len(ds) == (len(stream) - 1) // 4 == 4
    for i in range(len(ds)):
        assert ds.window(i).tolist() == stream[4 * i : 4 * i + 5].tolist()


def test_packed_stream_of_a_split_is_its_documents_in_order():
    corpus = three_doc_corpus()
    ds = PackedSequences(corpus, [2, 0], seq_len=3)
    stream = np.concatenate([corpus.document(0), corpus.document(2)]).tolist()
    assert ds.num_tokens == len(stream)
    assert [t for i in range(len(ds)) for t in ds.window(i)[:-1].tolist()] == stream[: 3 * len(ds)]


def test_labels_are_next_tokens_except_after_eos():
    ds = PackedSequences(three_doc_corpus(), [0, 1, 2], seq_len=5)
    for i in range(len(ds)):
        inputs, labels = ds[i]
        window = ds.window(i)
        after_eos = inputs == EOS
        assert torch.all(labels[after_eos] == IGNORE_INDEX)
        assert torch.equal(labels[~after_eos], torch.from_numpy(window[1:])[~after_eos])
        assert (inputs.dtype, labels.dtype, inputs.shape, labels.shape) == (torch.long, torch.long, (5,), (5,))


def test_label_predicting_eos_is_kept():
    inputs, labels = PackedSequences(three_doc_corpus(), [0, 1, 2], seq_len=8)[0]
    assert inputs[4] == 5 and labels[4] == EOS and labels[5] == IGNORE_INDEX


def test_windows_from_a_memory_mapped_corpus_match_the_in_memory_one(tmp_path, text_inputs):
    files, docs = text_inputs
    prepare(files, "bytes", str(tmp_path / "out"))
    mapped = PackedSequences(TokenCorpus.open(tmp_path / "out"), [0, 2, 3], seq_len=6)
    stream = [t for d in (docs[0], docs[2], docs[3]) for t in list(d.encode()) + [256]]
    for i in range(len(mapped)):
        assert mapped.window(i).tolist() == stream[6 * i : 6 * i + 7]


def test_window_index_out_of_range_raises_index_error():
    ds = PackedSequences(three_doc_corpus(), [0, 1, 2], seq_len=4)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_build_datasets_on_embedded_gives_train_and_eval_sequences():
    train, held, corpus = build_datasets(DataConfig(source="embedded", eval_fraction=0.05), 64, seed=1)
    assert len(train) > 0 and len(held) > 0 and corpus.vocab_size == 257
    assert not set(train.doc_ids.tolist()) & set(held.doc_ids.tolist())


def test_build_datasets_without_eval_fraction_has_an_empty_eval_split():
    train, held, corpus = build_datasets(DataConfig(eval_fraction=0.0), 64, seed=1)
    assert len(held) == 0 and len(train.doc_ids) == corpus.num_documents


def test_build_datasets_rejects_an_eval_split_shorter_than_one_sequence(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text("short", encoding="utf-8")
    prepare([str(tmp_path / f"{i}.txt") for i in range(4)], "bytes", str(tmp_path / "out"))
    with pytest.raises(ValueError, match="eval_fraction"):
        build_datasets(DataConfig(source=str(tmp_path / "out"), eval_fraction=0.3), 8, seed=0)


# --------------------------------------------------------------------------------------------
# sharded loading


def global_batch_of(ds: PackedSequences, dp_size: int, consumed: int = 0, batch: int = 8) -> list[int]:
    ids = []
    for rank in range(dp_size):
        loader = ShardedLoader(ds, batch, 0, rank, dp_size, seed=3, consumed_samples=consumed)
        ids += sample_ids(loader.next_batch())
    return ids


def test_ranks_together_see_the_same_global_batch_for_any_dp_size():
    ds = counting_dataset(40)
    for consumed in (0, 8, 36):
        reference = global_batch_of(ds, 1, consumed)
        assert global_batch_of(ds, 2, consumed) == reference
        assert global_batch_of(ds, 4, consumed) == reference


def test_next_batch_splits_the_rank_slice_into_microbatches():
    loader = ShardedLoader(counting_dataset(40, seq_len=4), 8, 2, dp_rank=1, dp_size=2, seed=0)
    batches = loader.next_batch()
    assert len(batches) == 2
    assert all(x.shape == (2, 4) and y.shape == (2, 4) for x, y, _ in batches)
    assert loader.consumed_samples == 8


def test_micro_batch_zero_means_one_microbatch_per_step():
    batches = ShardedLoader(counting_dataset(40), 8, 0, dp_rank=0, dp_size=2, seed=0).next_batch()
    assert len(batches) == 1 and batches[0][0].shape == (4, 4)


def test_resume_from_state_dict_continues_the_stream_under_another_dp_size():
    ds = counting_dataset(30)
    single = ShardedLoader(ds, 8, 0, 0, 1, seed=5)
    stream = [sample_ids(single.next_batch()) for _ in range(6)]

    first = ShardedLoader(ds, 8, 0, 0, 1, seed=5)
    first.next_batch(), first.next_batch()
    state = first.state_dict()
    assert state == {"consumed_samples": 16, "seed": 5}
    resumed = []
    for rank in range(4):
        loader = ShardedLoader(ds, 8, 1, rank, 4, seed=999)
        loader.load_state_dict(state)
        resumed.append([sample_ids(loader.next_batch()) for _ in range(4)])
    assert [sum((resumed[r][s] for r in range(4)), []) for s in range(4)] == stream[2:]


def test_each_epoch_visits_every_sample_once_in_a_fresh_order():
    ds = counting_dataset(12)
    loader = ShardedLoader(ds, 4, 0, 0, 1, seed=0)
    epochs = [sum((sample_ids(loader.next_batch()) for _ in range(3)), []) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert epochs[0] != epochs[1]
    assert loader.epoch == 2


def test_a_batch_straddling_an_epoch_end_joins_both_epochs_orders():
    ds = counting_dataset(10)
    aligned = ShardedLoader(ds, 5, 0, 0, 1, seed=7)
    stream = sum((sample_ids(aligned.next_batch()) for _ in range(4)), [])
    straddling = ShardedLoader(ds, 4, 0, 0, 1, seed=7, consumed_samples=8)
    assert sample_ids(straddling.next_batch()) == stream[8:12]


def test_global_batch_not_divisible_by_dp_size_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"global_batch=10.*dp_size=4"):
        ShardedLoader(counting_dataset(10), 10, 0, 0, 4, seed=0)


def test_micro_batch_not_dividing_the_rank_slice_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"micro_batch=3.*per-rank batch 4"):
        ShardedLoader(counting_dataset(10), 8, 3, 0, 2, seed=0)


def test_rank_outside_dp_size_is_rejected():
    with pytest.raises(ValueError, match="dp_rank=2"):
        ShardedLoader(counting_dataset(10), 8, 0, 2, 2, seed=0)


def test_document_ids_count_document_starts_within_the_window():
    """Stream: 1 2 3 4 5 eos | 6 7 eos | 8 ... 14 eos; a document's eos belongs to it."""
    ds = PackedSequences(three_doc_corpus(), [0, 1, 2], seq_len=5)
    assert ds.documents(0).tolist() == [0, 0, 0, 0, 0]
    assert ds.documents(1).tolist() == [0, 1, 1, 1, 2]  # eos of doc 0, then 6 7 eos, then 8
    assert ds.documents(2).tolist() == [0, 0, 0, 0, 0]


def test_loader_hands_document_ids_beside_each_microbatch_when_asked():
    ds = PackedSequences(three_doc_corpus(), [0, 1, 2], seq_len=5)
    with_docs = ShardedLoader(ds, 2, 1, dp_rank=0, dp_size=1, seed=0, documents=True).next_batch()
    without = ShardedLoader(ds, 2, 1, dp_rank=0, dp_size=1, seed=0).next_batch()
    for (inputs, labels, docs), plain in zip(with_docs, without, strict=True):
        assert torch.equal(inputs, plain.inputs) and torch.equal(labels, plain.labels) and plain.documents is None
        row = next(i for i in range(len(ds)) if torch.equal(ds[i][0], inputs[0]))  # windows differ here
        assert torch.equal(docs[0], ds.documents(row))
