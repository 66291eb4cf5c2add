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
