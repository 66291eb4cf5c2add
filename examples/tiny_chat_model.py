"""A tiny chat model and a chat dataset to try finetuning on, built locally (nothing is downloaded).

    python examples/tiny_chat_model.py OUT

writes ``OUT/model``: a Hugging Face Llama directory with random weights (4 layers, width 128,
~0.5M parameters), a byte-level BPE ``tokenizer.json`` trained here and a ChatML chat template in
``tokenizer_config.json``; and ``OUT/chat.jsonl``: conversations about the topics of Python's own
documentation (the corpus meshweave embeds), one ``{"messages": [...]}`` per line. The README's
finetuning walkthrough runs on them; any real model directory and ``.jsonl`` work the same way.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QUESTIONS = ("What is the {} topic about?", "Explain {} briefly.", "Tell me about {} in Python.")


def conversations(seed: int = 0) -> list[dict]:
    """A user question and the assistant's answer (the opening of the topic's text) per topic and
    phrasing, some with a system turn."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    records = []
    for key in sorted(topics):
        answer = " ".join(topics[key].split())[:240]
        for question in QUESTIONS:
            messages = [{"role": "user", "content": question.format(key)}, {"role": "assistant", "content": answer}]
            if rng.random() < 0.5:
                messages.insert(0, {"role": "system", "content": "You answer questions about Python."})
            records.append({"messages": messages})
    rng.shuffle(records)
    return records


def train_tokenizer(texts: list[str]):
    """A byte-level BPE of 512 ids (the ChatML markers among them), as Llama 3 / Qwen tokenizers are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def build(out: Path, **shape: Any) -> tuple[Path, Path]:
    """Write ``out/model`` and ``out/chat.jsonl`` (see the module docstring); ``shape`` overrides
    the Llama config's sizes. Returns (model directory, chat file)."""
    import torch
    import transformers

    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    records = conversations()
    (out / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tok = train_tokenizer([m["content"] for r in records for m in r["messages"]])
    tok.save(str(model_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHATML,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    torch.manual_seed(0)
    sizes = dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    llama = transformers.LlamaConfig(
        **{**sizes, **shape},
        vocab_size=tok.get_vocab_size(),
        eos_token_id=eos,
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        bos_token_id=None,
    )
    transformers.LlamaForCausalLM(llama).save_pretrained(model_dir)
    return model_dir, out / "chat.jsonl"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    model_dir, chat = build(Path(argv[0]))
    print(f"wrote {model_dir} (tiny Llama, random weights)")
    print(f"wrote {chat} ({sum(1 for _ in chat.open())} conversations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
