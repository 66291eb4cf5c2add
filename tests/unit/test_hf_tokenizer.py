"""Specification of tokenizers from a Hugging Face model directory: special ids, the embedded corpus,
prepared data and the checks before launch. Every tokenizer is trained here; nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from meshweave import cli
from meshweave.config import ConfigError
from meshweave.data.datasets import TokenCorpus, corpus_from_source, embedded_documents
from meshweave.data.prepare import prepare
from meshweave.data.tokenizers import HFTokenizer, load_tokenizer
from meshweave.validation import preflight, resolve

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|eot|>"]
SENTENCES = ["the quick brown fox", "jumps over the lazy dog", "the dog sleeps", "a fox and a dog"]


def train_tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=80, special_tokens=SPECIALS))
    return tok


@pytest.fixture(scope="module")
def bpe() -> tokenizers.Tokenizer:
    return train_tokenizer()


def model_dir(root: Path, bpe: tokenizers.Tokenizer, **configs: dict) -> Path:
    """A model directory holding ``tokenizer.json`` and each ``name=content`` as ``name.json``."""
    root.mkdir(parents=True, exist_ok=True)
    bpe.save(str(root / "tokenizer.json"))
    for name, content in configs.items():
        (root / f"{name}.json").write_text(json.dumps(content), encoding="utf-8")
    return root


def ids(bpe: tokenizers.Tokenizer, *tokens: str) -> list[int]:
    return [bpe.token_to_id(t) for t in tokens]


def config_for(tmp_path: Path, *overrides: str):
    return resolve(None, [f"--out={tmp_path / 'run'}", *overrides], world_size=1)


# --------------------------------------------------------------------------------------------
# special ids


def test_tokenizer_config_strings_give_bos_eos_pad(tmp_path, bpe):
    conf = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    tok = load_tokenizer(str(model_dir(tmp_path, bpe, tokenizer_config=conf)))
    assert isinstance(tok, HFTokenizer)
    assert [tok.bos_id, tok.eos_id, tok.pad_id] == ids(bpe, "<s>", "</s>", "<pad>")
    assert list(tok.eos_ids) == ids(bpe, "</s>")


def test_tokenizer_config_content_dicts_give_the_same_ids(tmp_path, bpe):
    conf = {
        "bos_token": {"content": "<s>", "lstrip": False, "__type": "AddedToken"},
        "eos_token": {"content": "<|eot|>", "special": True},
        "pad_token": None,
    }
    tok = load_tokenizer(str(model_dir(tmp_path, bpe, tokenizer_config=conf)))
    assert [tok.bos_id, tok.eos_id, tok.pad_id] == [*ids(bpe, "<s>", "<|eot|>"), None]


def test_generation_config_ids_are_read(tmp_path, bpe):
    bos, eos, pad = ids(bpe, "<s>", "<|eot|>", "<pad>")
    gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    tok = load_tokenizer(str(model_dir(tmp_path, bpe, generation_config=gen)))
    assert [tok.bos_id, tok.eos_id, tok.pad_id] == [bos, eos, pad]


def test_generation_config_eos_wins_over_tokenizer_config(tmp_path, bpe):
    d = model_dir(
        tmp_path,
        bpe,
        tokenizer_config={"eos_token": "</s>", "pad_token": "<pad>"},
        generation_config={"eos_token_id": bpe.token_to_id("<|eot|>")},
    )
    tok = load_tokenizer(str(d))
    assert (tok.eos_id, tok.pad_id) == (bpe.token_to_id("<|eot|>"), bpe.token_to_id("<pad>"))


def test_generation_config_eos_list_takes_the_first_and_records_all(tmp_path, bpe):
    eos_ids = ids(bpe, "<|eot|>", "</s>")
    tok = load_tokenizer(str(model_dir(tmp_path, bpe, generation_config={"eos_token_id": eos_ids})))
    assert isinstance(tok, HFTokenizer)
    assert (tok.eos_id, list(tok.eos_ids)) == (eos_ids[0], eos_ids)
    assert tok.decode([*tok.encode("the dog"), *eos_ids]) == tok.decode(tok.encode("the dog"))


def test_special_tokens_map_is_the_fallback_for_missing_tokenizer_config_keys(tmp_path, bpe):
    d = model_dir(tmp_path, bpe, tokenizer_config={"eos_token": "</s>"}, special_tokens_map={"bos_token": "<s>"})
    tok = load_tokenizer(str(d))
    assert [tok.bos_id, tok.eos_id] == ids(bpe, "<s>", "</s>")


def test_an_eos_token_missing_from_the_vocabulary_is_an_error_naming_the_file(tmp_path, bpe):
    d = model_dir(tmp_path, bpe, tokenizer_config={"eos_token": "<|im_end|>"})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token '<\|im_end\|>'"):
        load_tokenizer(str(d))


def test_a_non_integer_generation_config_id_is_an_error_naming_the_key(tmp_path, bpe):
    d = model_dir(tmp_path, bpe, generation_config={"eos_token_id": "</s>"})
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id"):
        load_tokenizer(str(d))


def test_vocab_size_covers_every_special_id_even_past_the_vocabulary(tmp_path, bpe):
    beyond = bpe.get_vocab_size() + 7
    tok = load_tokenizer(str(model_dir(tmp_path, bpe, generation_config={"eos_token_id": [2, beyond]})))
    assert tok.vocab_size == beyond + 1


def test_a_directory_written_by_transformers_save_pretrained_loads(tmp_path, bpe):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert [tok.bos_id, tok.eos_id, tok.pad_id] == [fast.bos_token_id, fast.eos_token_id, fast.pad_token_id]
    assert tok.encode("the lazy fox") == fast.encode("the lazy fox", add_special_tokens=False)


# --------------------------------------------------------------------------------------------
# the embedded corpus and prepared data


def test_embedded_corpus_with_a_model_directory_is_its_tokenizers_ids(tmp_path, bpe):
    d = model_dir(tmp_path, bpe, generation_config={"eos_token_id": bpe.token_to_id("</s>")})
    corpus = corpus_from_source("embedded", str(d))
    docs = embedded_documents()
    eos = bpe.token_to_id("</s>")
    assert (corpus.num_documents, corpus.eos_id, corpus.vocab_size) == (len(docs), eos, bpe.get_vocab_size())
    for i in (0, 17, len(docs) - 1):
        assert corpus.document(i).tolist() == bpe.encode(docs[i], add_special_tokens=False).ids + [eos]


def test_prepare_with_a_model_directory_records_it_and_its_ids(tmp_path, bpe):
    gen = {"bos_token_id": 1, "eos_token_id": ids(bpe, "<|eot|>", "</s>"), "pad_token_id": 3}
    d = model_dir(tmp_path / "model", bpe, generation_config=gen)
    (tmp_path / "a.txt").write_text("the quick dog", encoding="utf-8")
    assert (
        cli.main(
            [
                "data",
                "prepare",
                "--input",
                str(tmp_path / "a.txt"),
                "--tokenizer",
                str(d),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    index = json.loads((tmp_path / "out" / "text_document.meshweave.json").read_text())
    eot = bpe.token_to_id("<|eot|>")
    assert index["tokenizer"] == str(d.resolve())
    assert (index["eos_id"], index["eos_ids"], index["bos_id"], index["pad_id"]) == (eot, gen["eos_token_id"], 1, 3)
    assert TokenCorpus.open(tmp_path / "out").tokens.tolist() == bpe.encode("the quick dog").ids + [eot]


# --------------------------------------------------------------------------------------------
# preflight


def test_a_vocabulary_larger_than_the_model_is_one_line_naming_model_vocab_size(tmp_path, bpe):
    d = model_dir(tmp_path / "model", bpe, tokenizer_config={"eos_token": "</s>"})
    need = bpe.get_vocab_size()
    with pytest.raises(ConfigError) as err:
        preflight(config_for(tmp_path, f"--data.tokenizer={d}", f"--model.vocab_size={need - 1}"))
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"model.vocab_size={need - 1} ")
    assert f"--model.vocab_size={need}" in str(err.value)


def test_the_cli_rejects_a_too_small_vocabulary_with_exit_2_before_training(tmp_path, bpe, capsys):
    d = model_dir(tmp_path / "model", bpe, tokenizer_config={"eos_token": "</s>"})
    code = cli.main(["train", f"--data.tokenizer={d}", "--model.vocab_size=8", f"--out={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("meshweave: error: model.vocab_size=8 ")
    assert not (tmp_path / "run").exists()


def test_a_fitting_vocabulary_passes_preflight(tmp_path, bpe):
    d = model_dir(tmp_path / "model", bpe, tokenizer_config={"eos_token": "</s>"})
    preflight(config_for(tmp_path, f"--data.tokenizer={d}", f"--model.vocab_size={bpe.get_vocab_size()}"))


def test_a_missing_tokenizer_is_one_line_naming_data_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: .*tokenizer\.json$"):
        preflight(config_for(tmp_path, f"--data.tokenizer={tmp_path / 'nowhere'}"))


def test_a_tokenizer_other_than_the_prepared_datas_is_an_error(tmp_path, bpe):
    d = model_dir(tmp_path / "model", bpe, tokenizer_config={"eos_token": "</s>"})
    (tmp_path / "a.txt").write_text("the quick dog", encoding="utf-8")
    prepare([str(tmp_path / "a.txt")], str(d), str(tmp_path / "out"))
    with pytest.raises(ConfigError) as err:
        preflight(config_for(tmp_path, f"--data.source={tmp_path / 'out'}", "--model.vocab_size=512"))
    assert str(err.value).startswith("data.tokenizer=bytes ") and "\n" not in str(err.value)
    assert f"--data.tokenizer={d.resolve()}" in str(err.value)


def test_prepared_bytes_data_rejects_a_model_directory_tokenizer(tmp_path, bpe):
    d = model_dir(tmp_path / "model", bpe, tokenizer_config={"eos_token": "</s>"})
    (tmp_path / "a.txt").write_text("the quick dog", encoding="utf-8")
    prepare([str(tmp_path / "a.txt")], "bytes", str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"^data\.tokenizer=.*--data\.tokenizer=bytes"):
        preflight(config_for(tmp_path, f"--data.source={tmp_path / 'out'}", f"--data.tokenizer={d}"))


def test_a_different_eos_from_the_same_tokenizer_json_is_an_error(tmp_path, bpe):
    d = model_dir(tmp_path / "model", bpe, tokenizer_config={"eos_token": "</s>"})
    (tmp_path / "a.txt").write_text("the quick dog", encoding="utf-8")
    prepare([str(tmp_path / "a.txt")], str(d), str(tmp_path / "out"))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": bpe.token_to_id("<|eot|>")}))
    with pytest.raises(ConfigError, match="documents end in id"):
        preflight(config_for(tmp_path, f"--data.source={tmp_path / 'out'}", f"--data.tokenizer={d}"))


def test_a_copy_of_the_preparing_model_directory_is_accepted(tmp_path, bpe):
    d = model_dir(tmp_path / "model", bpe, tokenizer_config={"eos_token": "</s>"})
    (tmp_path / "a.txt").write_text("the quick dog", encoding="utf-8")
    prepare([str(tmp_path / "a.txt")], str(d), str(tmp_path / "out"))
    copy = Path(shutil.copytree(d, tmp_path / "copy"))
    one_document = "--data.eval_fraction=0"
    preflight(
        config_for(
            tmp_path, f"--data.source={tmp_path / 'out'}", f"--data.tokenizer={copy / 'tokenizer.json'}", one_document
        )
    )


def test_embedded_corpus_ids_fit_the_vocabulary_preflight_checked(tmp_path, bpe):
    d = model_dir(tmp_path, bpe, tokenizer_config={"eos_token": "</s>"})
    corpus = corpus_from_source("embedded", str(d))
    assert int(np.max(corpus.tokens)) < load_tokenizer(str(d)).vocab_size
