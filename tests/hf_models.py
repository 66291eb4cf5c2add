"""Tiny Hugging Face models of each supported family, built here by transformers (random init,
``save_pretrained``; nothing is downloaded). One case per family feature."""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}

# name -> (transformers config class, model class, the config that turns the feature on)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3.1-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE}),
    "llama-linear-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    ),
    "llama-yarn-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": YARN_ROPE}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
}


def save_tiny(case: str, path: str | Path, **shape: int) -> torch.nn.Module:
    """Build ``case`` with ``shape`` (transformers config keys), save it to ``path``, return it in
    eval mode. ``initializer_range`` 0.1 makes attention far from uniform; biases and q/k norm
    weights are drawn at random, so a dropped bias or norm changes the logits."""
    import transformers

    config_cls, model_cls, feature = CASES[case]
    config = getattr(transformers, config_cls)(**{"initializer_range": 0.1, **shape, **feature})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif "_norm" in name:
                p.normal_(1.0, 0.1)
    model.save_pretrained(path)
    return model


def model_overrides(hf_dir: str | Path) -> list[str]:
    """``--model.key=value`` for every model key of ``hf_dir``'s config (init_from needs them equal)."""
    from dataclasses import asdict

    from meshweave.models.hf_config import read_hf_config

    def text(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return [f"--model.{k}={text(v)}" for k, v in asdict(read_hf_config(hf_dir)).items()]
