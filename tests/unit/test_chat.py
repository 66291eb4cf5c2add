"""Specification of chat rendering and its loss mask (meshweave/data/chat.py) against transformers.

Token ids must equal ``apply_chat_template(..., tokenize=True)`` and, for a template marking the
assistant text with ``{% generation %}``, the mask must equal transformers'
``return_assistant_tokens_mask``. A template without the markers must give the same mask as the
marked version of itself (each assistant turn = the text it adds, end-of-turn included). Exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from meshweave.data.chat import ChatError, ChatTemplate, chat_messages, encode_conversations

transformers = pytest.importorskip("transformers")

CHATML_MARKED = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML = CHATML_MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is a mesh?"},
    {"role": "assistant", "content": "A grid of devices, named by dimension."},
    {"role": "user", "content": "And a shard?"},
    {"role": "assistant", "content": "One rank's piece of a tensor."},
]


@pytest.fixture(scope="module")
def byte_bpe() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    text = [m["content"] for m in CONVERSATION] * 20 + ["system user assistant answer question"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer)
    return tok


def model_dir(root: Path, tok: tokenizers.Tokenizer, template: str, **special: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **special}
    (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


def ours(path: Path, records: list, train_on_prompt: bool = False) -> list[tuple[list[int], list[int]]]:
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))

    def encode_offsets(texts: list[str]):
        return [(e.ids, e.offsets) for e in tok.encode_batch(texts, add_special_tokens=False)]

    return list(encode_conversations(records, ChatTemplate.from_model_dir(path), encode_offsets, train_on_prompt))


def test_ids_and_assistant_mask_equal_transformers_for_a_marked_template(tmp_path, byte_bpe):
    path = model_dir(tmp_path, byte_bpe, CHATML_MARKED, eos_token="<|im_end|>")
    hf = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ((ids, mask),) = ours(path, [{"messages": CONVERSATION}])
    assert ids == list(hf["input_ids"]) and mask == list(hf["assistant_masks"])
    assert 0 < sum(mask) < len(mask)


def test_an_unmarked_template_trains_the_same_tokens_as_its_marked_twin(tmp_path, byte_bpe):
    marked = ours(model_dir(tmp_path / "marked", byte_bpe, CHATML_MARKED), [{"messages": CONVERSATION}])
    plain = ours(model_dir(tmp_path / "plain", byte_bpe, CHATML), [{"messages": CONVERSATION}])
    assert plain == marked


def test_a_template_writing_bos_gives_transformers_ids_and_masks_each_reply_with_its_end_of_turn(tmp_path, byte_bpe):
    path = model_dir(tmp_path, byte_bpe, LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    want = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    ((ids, mask),) = ours(path, [{"messages": CONVERSATION}])
    assert ids == list(want)
    trained = byte_bpe.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "A grid of devices, named by dimension.<|eot_id|>One rank's piece of a tensor.<|eot_id|>"


def test_prompt_and_completion_are_one_user_and_one_assistant_turn():
    assert chat_messages({"prompt": "2+2?", "completion": "4"}) == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_train_on_prompt_counts_every_token(tmp_path, byte_bpe):
    ((ids, mask),) = ours(model_dir(tmp_path, byte_bpe, CHATML), [{"prompt": "hi", "completion": "yo"}], True)
    assert mask == [1] * len(ids)


@pytest.mark.parametrize(
    "record, why",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\]"),
        ({"messages": []}, "non-empty list"),
        ({"prompt": "hi"}, "'completion'"),
        (["not", "an", "object"], "JSON object"),
        ({"messages": [{"role": "assistant", "content": "x"}], "tools": [{"name": "f"}]}, "'tools'"),
        ({"messages": [{"role": "assistant", "content": "x"}], "prompt": "p"}, "keep one"),
    ],
)
def test_a_malformed_record_is_a_chat_error_saying_what_is_wrong(record, why):
    with pytest.raises(ChatError, match=why):
        chat_messages(record)


def test_a_template_that_raises_is_a_chat_error_with_its_message():
    template = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}")
    with pytest.raises(ChatError, match="user first"):
        template.render([{"role": "assistant", "content": "x"}])


def test_a_directory_without_a_chat_template_is_an_error_naming_it(tmp_path, byte_bpe):
    byte_bpe.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no chat template"):
        ChatTemplate.from_model_dir(tmp_path)


# --------------------------------------------------------------------------------------------
# data prepare --format chat: tokens + text_document.loss_mask, read back by training


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


RECORDS = [
    {"messages": CONVERSATION},
    {"prompt": "And a shard?", "completion": "One rank's piece of a tensor."},
    {"messages": CONVERSATION[1:3]},
]


def test_prepared_chat_data_trains_exactly_the_assistant_tokens(tmp_path, byte_bpe):
    import numpy as np

    from meshweave.data.datasets import IGNORE_INDEX, PackedSequences, TokenCorpus
    from meshweave.data.prepare import prepare

    path = model_dir(tmp_path / "model", byte_bpe, CHATML, eos_token="<|im_end|>")
    sidecar = prepare(
        [str(write_jsonl(tmp_path / "chat.jsonl", RECORDS))], str(path), str(tmp_path / "out"), format="chat"
    )
    want = ours(path, RECORDS)
    corpus = TokenCorpus.open(tmp_path / "out")
    assert corpus.tokens.tolist() == [t for ids, _ in want for t in ids]
    assert corpus.loss_mask is not None and corpus.loss_mask.tolist() == [m for _, mask in want for m in mask]
    assert sidecar["chat"]["loss_mask"] == "text_document.loss_mask" and sidecar["num_documents"] == 3
    seq = PackedSequences(corpus, [0, 1, 2], seq_len=len(corpus.tokens) - 1)
    inputs, labels = seq[0]
    trained = labels != IGNORE_INDEX
    # a label counts iff the token it predicts is a target and it does not cross a conversation
    targets = np.asarray(corpus.loss_mask[1:], dtype=bool)
    ends = np.cumsum([len(ids) for ids, _ in want])[:-1] - 1  # last token of each conversation but the last
    targets[ends] = False
    assert trained.tolist() == targets.tolist()


@pytest.mark.parametrize("overlong, kept", [("truncate", 3), ("drop", 1)])
def test_conversations_over_max_tokens_are_cut_or_dropped_and_counted(tmp_path, byte_bpe, overlong, kept):
    from meshweave.data.prepare import prepare

    path = model_dir(tmp_path / "model", byte_bpe, CHATML)
    lengths = [len(ids) for ids, _ in ours(path, RECORDS)]
    limit = sorted(lengths)[1] - 1  # two conversations are longer
    sidecar = prepare(
        [str(write_jsonl(tmp_path / "c.jsonl", RECORDS))],
        str(path),
        str(tmp_path / "out"),
        format="chat",
        max_tokens=limit,
        overlong=overlong,
    )
    assert sidecar["num_documents"] == kept and sidecar["chat"]["cut"] == {overlong: 2}
    assert sidecar["num_tokens"] <= kept * limit


def test_a_record_that_is_no_conversation_is_a_one_line_error_or_skipped_and_counted(tmp_path, byte_bpe):
    from meshweave.data.prepare import prepare

    path = model_dir(tmp_path / "model", byte_bpe, CHATML)
    data = str(write_jsonl(tmp_path / "c.jsonl", [*RECORDS, {"messages": [{"role": "user", "content": "hi"}]}]))
    with pytest.raises(ValueError, match=r"c\.jsonl:4: the conversation has no assistant turn"):
        prepare([data], str(path), str(tmp_path / "out"), format="chat")
    assert not (tmp_path / "out").exists()
    sidecar = prepare([data], str(path), str(tmp_path / "out"), format="chat", skip_bad=True)
    assert sidecar["skipped"] == {"not_a_conversation": 1} and sidecar["num_documents"] == 3


def test_text_data_written_over_chat_data_leaves_no_stale_loss_mask(tmp_path, byte_bpe):
    from meshweave.data.datasets import TokenCorpus
    from meshweave.data.prepare import prepare

    path = model_dir(tmp_path / "model", byte_bpe, CHATML, eos_token="<|im_end|>")
    prepare([str(write_jsonl(tmp_path / "c.jsonl", RECORDS))], str(path), str(tmp_path / "out"), format="chat")
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "a mesh of devices"}])
    prepare([str(text)], str(path), str(tmp_path / "out"))
    assert TokenCorpus.open(tmp_path / "out").loss_mask is None


def test_chat_format_refuses_plain_text_inputs_and_the_bytes_tokenizer(tmp_path, byte_bpe):
    from meshweave.data.prepare import prepare

    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="from .jsonl"):
        prepare(
            [str(tmp_path / "a.txt")],
            str(model_dir(tmp_path / "m", byte_bpe, CHATML)),
            str(tmp_path / "o"),
            format="chat",
        )
    with pytest.raises(ValueError, match="chat template"):
        prepare([str(write_jsonl(tmp_path / "c.jsonl", RECORDS))], "bytes", str(tmp_path / "o"), format="chat")
