"""Specification of the Megatron indexed dataset as the prepared format: interoperability with
megatron-core in both directions, the token dtype, the old-format converter, and the one-line
preflight errors for a bad dataset. Every dataset is written here; nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from meshweave import cli
from meshweave.config import ConfigError, DataConfig
from meshweave.data.build import build_datasets
from meshweave.data.datasets import IGNORE_INDEX, PackedSequences, TokenCorpus
from meshweave.data.indexed import megatron_indexed, token_dtype
from meshweave.data.loader import ShardedLoader
from meshweave.data.prepare import prepare
from meshweave.validation import preflight, resolve

EOS = 256  # the bytes tokenizer's eos: Megatron data below is "tokenized" as bytes
DOCS = [b"first document", b"zweites Dokument", b"a third, longer document of bytes", b"four"]


def megatron_prefix(root: Path, docs: list[bytes], *, eod: bool = True, split_first: bool = False) -> str:
    """A dataset written by megatron-core's own IndexedDatasetBuilder, as preprocess_data.py does:
    one add_item + end_document per document (``--append-eod`` when ``eod``); with ``split_first``
    the first document is two sequences (``--split-sentences``) added with add_document."""
    mi = megatron_indexed()
    prefix = str(root / "megatron_text_document")
    builder = mi.IndexedDatasetBuilder(mi.get_bin_path(prefix), dtype=np.uint16)
    for d, text in enumerate(docs):
        ids = list(text) + ([EOS] if eod else [])
        if d == 0 and split_first:
            builder.add_document(np.array(ids), [3, len(ids) - 3])
        else:
            builder.add_item(torch.tensor(ids))
            builder.end_document()
    builder.finalize(mi.get_idx_path(prefix))
    return prefix


def prepared(tmp_path: Path, docs: list[str] | None = None) -> Path:
    """``meshweave data prepare`` of ``docs`` (one text file each) with the bytes tokenizer; the out dir."""
    docs = docs if docs is not None else [d.decode() for d in DOCS]
    for i, text in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    prepare([str(tmp_path / f"{i}.txt") for i in range(len(docs))], "bytes", str(tmp_path / "out"))
    return tmp_path / "out"


def config_for(tmp_path: Path, *overrides: str):
    return resolve(None, [f"--out={tmp_path / 'run'}", *overrides], world_size=1)


def one_line_error(cfg) -> str:
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


# --------------------------------------------------------------------------------------------
# interoperability


def test_a_dataset_written_by_megatron_cores_builder_trains(tmp_path):
    prefix = megatron_prefix(tmp_path, DOCS, split_first=True)
    train, _, corpus = build_datasets(DataConfig(source=prefix, eval_fraction=0.0), seq_len=8, seed=0)
    stream = [t for d in DOCS for t in [*d, EOS]]
    assert corpus.doc_offsets.tolist() == np.cumsum([0] + [len(d) + 1 for d in DOCS]).tolist()
    loader = ShardedLoader(train, global_batch=len(train), micro_batch=0, dp_rank=0, dp_size=1, seed=1)
    ((inputs, labels, _),) = loader.next_batch()
    served = sorted(row.tolist() for row in inputs)
    assert served == sorted(stream[8 * i : 8 * i + 8] for i in range(len(train)))
    assert int((labels == IGNORE_INDEX).sum()) == sum(int((row == EOS).sum()) for row in inputs)


def test_a_megatron_directory_is_a_source_and_its_vocabulary_comes_from_data_tokenizer(tmp_path):
    megatron_prefix(tmp_path, DOCS)
    corpus = TokenCorpus.open(tmp_path, "bytes")
    assert (corpus.num_documents, corpus.vocab_size, corpus.eos_id) == (len(DOCS), 257, EOS)
    assert bytes(corpus.document(2)[:-1].tolist()) == DOCS[2]


def test_document_ends_from_the_idx_mask_labels_when_documents_carry_no_eos(tmp_path):
    prefix = megatron_prefix(tmp_path, [b"abc", b"defgh"], eod=False)
    corpus = TokenCorpus.open(prefix, "bytes")
    inputs, labels = PackedSequences(corpus, [0, 1], seq_len=7)[0]
    assert inputs.tolist() == list(b"abcdefg")
    assert labels.tolist() == [ord("b"), ord("c"), IGNORE_INDEX, *b"efgh"]


def test_ours_is_read_back_by_megatron_cores_indexed_dataset(tmp_path):
    out = prepared(tmp_path)
    ds = megatron_indexed().IndexedDataset(str(out / "text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[*d, EOS] for d in DOCS]
    assert ds.document_indices.tolist() == list(range(len(DOCS) + 1))
    corpus = TokenCorpus.open(out)
    assert [corpus.document(d).tolist() for d in range(corpus.num_documents)] == [
        ds[i].tolist() for i in range(len(ds))
    ]


@pytest.mark.parametrize("vocab", [257, 65_499, 65_500, 70_001, 128_256])
def test_token_dtype_follows_the_vocabulary_as_megatron_does(vocab):
    assert token_dtype(vocab) == np.dtype(megatron_indexed().DType.optimal_dtype(vocab))


def test_convert_rewrites_the_old_format_with_the_same_tokens_documents_and_record(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    docs = [[*d, EOS] for d in DOCS]
    np.asarray([t for d in docs for t in d], dtype=np.uint16).tofile(old / "tokens.bin")
    offsets = np.cumsum([0] + [len(d) for d in docs]).tolist()
    index = {"format": 1, "dtype": "uint16", "num_tokens": offsets[-1], "num_documents": len(docs)}
    index |= {"doc_offsets": offsets, "vocab_size": 257, "eos_id": EOS, "tokenizer": "bytes", "eos_ids": [EOS]}
    (old / "index.json").write_text(json.dumps(index | {"bos_id": None, "pad_id": None}))
    assert cli.main(["data", "convert", str(old), str(tmp_path / "new" / "data")]) == 0
    corpus = TokenCorpus.open(tmp_path / "new")
    assert corpus.doc_offsets.tolist() == offsets and corpus.tokens.tolist() == [t for d in docs for t in d]
    preflight(config_for(tmp_path, f"--data.source={tmp_path / 'new' / 'data'}"))


# --------------------------------------------------------------------------------------------
# bad datasets: one line from preflight naming the key and the fix


def test_an_idx_that_does_not_match_its_bin_is_one_line_naming_data_source(tmp_path):
    out = prepared(tmp_path)
    shutil.copy(megatron_prefix(tmp_path, DOCS[:2]) + ".idx", out / "text_document.idx")
    msg = one_line_error(config_for(tmp_path, f"--data.source={out}"))
    assert msg.startswith(f"data.source={out}: ") and "does not match" in msg and "meshweave data prepare" in msg


def test_a_truncated_bin_is_one_line_naming_data_source(tmp_path):
    out = prepared(tmp_path)
    data = (out / "text_document.bin").read_bytes()
    (out / "text_document.bin").write_bytes(data[:-6])
    msg = one_line_error(config_for(tmp_path, f"--data.source={out}"))
    assert msg.startswith(f"data.source={out}: ") and "truncated" in msg and "meshweave data prepare" in msg


def test_a_truncated_idx_is_one_line_naming_data_source(tmp_path):
    out = prepared(tmp_path)
    data = (out / "text_document.idx").read_bytes()
    (out / "text_document.idx").write_bytes(data[:40])
    msg = one_line_error(config_for(tmp_path, f"--data.source={out}"))
    assert msg.startswith(f"data.source={out}: ") and "not a readable Megatron .idx" in msg


def test_a_prefix_without_documents_is_one_line_naming_data_source(tmp_path):
    prefix = megatron_prefix(tmp_path, [])
    msg = one_line_error(config_for(tmp_path, f"--data.source={prefix}"))
    assert msg.startswith(f"data.source={prefix}: ") and "no documents" in msg and "meshweave data prepare" in msg


def test_one_document_with_an_eval_split_is_one_line_naming_data_eval_fraction(tmp_path):
    prefix = megatron_prefix(tmp_path, [b"a lone document"])
    msg = one_line_error(config_for(tmp_path, f"--data.source={prefix}"))
    assert msg.startswith(f"data.source={prefix} holds 1 document") and "--data.eval_fraction=0" in msg
    preflight(config_for(tmp_path, f"--data.source={prefix}", "--data.eval_fraction=0"))


def test_a_vocabulary_larger_than_the_model_is_one_line_naming_model_vocab_size(tmp_path):
    out = prepared(tmp_path)
    msg = one_line_error(config_for(tmp_path, f"--data.source={out}", "--model.vocab_size=100"))
    assert msg.startswith("model.vocab_size=100 ") and "--model.vocab_size=257" in msg


def test_megatron_ids_beyond_data_tokenizer_are_one_line_naming_data_tokenizer(tmp_path):
    prefix = megatron_prefix(tmp_path, DOCS)
    big = megatron_indexed().IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    big.add_item(torch.tensor([5, 50_000, 7]))
    big.end_document()
    big.finalize(prefix + ".idx")
    msg = one_line_error(config_for(tmp_path, f"--data.source={prefix}", "--model.vocab_size=60000"))
    assert msg.startswith("data.tokenizer=bytes ") and "50000" in msg


def test_a_directory_with_two_prefixes_is_one_line_naming_data_source(tmp_path):
    out = prepared(tmp_path)
    megatron_prefix(out, DOCS)
    with pytest.raises(ConfigError, match=r"^data\.source=.*2 prefixes.*name one dataset prefix") as err:
        config_for(tmp_path, f"--data.source={out}")
    assert "\n" not in str(err.value)


def test_the_tokenizer_mismatch_check_reads_the_sidecar(tmp_path):
    out = prepared(tmp_path)
    words = {w: i for i, w in enumerate(["[UNK]", "</s>", "first", "document"])}
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    msg = one_line_error(
        config_for(tmp_path, f"--data.source={out}", f"--data.tokenizer={tmp_path / 'tokenizer.json'}")
    )
    assert msg.startswith("data.tokenizer=") and "--data.tokenizer=bytes" in msg


def test_the_cli_rejects_a_truncated_bin_with_exit_2_and_leaves_out_untouched(tmp_path, capsys):
    out = prepared(tmp_path)
    (out / "text_document.bin").write_bytes((out / "text_document.bin").read_bytes()[:-2])
    code = cli.main(["train", f"--data.source={out}", f"--out={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"meshweave: error: data.source={out}: ")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# per-token loss masks (chat data): PREFIX.loss_mask beside the .bin


def test_a_loss_mask_beside_the_bin_leaves_only_target_tokens_as_labels(tmp_path):
    prefix = megatron_prefix(tmp_path, [b"ab", b"cdef"])  # stream: a b eos c d e f eos
    mask = np.array([0, 0, 0, 0, 0, 1, 1, 1], dtype=np.uint8)  # the second document's e f eos are targets
    mask.tofile(prefix + ".loss_mask")
    corpus = TokenCorpus.open(prefix)
    inputs, labels = PackedSequences(corpus, [0, 1], seq_len=7)[0]
    assert labels.tolist() == [IGNORE_INDEX] * 4 + [ord("e"), ord("f"), EOS]
    assert inputs.tolist() == [ord("a"), ord("b"), EOS, ord("c"), ord("d"), ord("e"), ord("f")]


def test_a_loss_mask_of_the_wrong_length_is_one_line_naming_data_source(tmp_path):
    prefix = megatron_prefix(tmp_path, DOCS)
    np.zeros(3, dtype=np.uint8).tofile(prefix + ".loss_mask")
    msg = one_line_error(config_for(tmp_path, f"--data.source={prefix}"))
    assert msg.startswith(f"data.source={prefix}: ") and ".loss_mask has 3 entries" in msg
