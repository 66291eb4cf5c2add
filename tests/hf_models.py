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
    "qwen3-tied": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24, "tie_word_embeddings": True}),
    # Llama 3.2 1B / 3B: llama3 rope scaling and a tied head
    "llama3.2": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # layer 0 dense (decoder_sparse_step 2), a shared expert twice an expert's width behind its gate
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "decoder_sparse_step": 2,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True},
    ),
    # q/k RMSNorm over the whole projection, not per head
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "eos_token_id": 2}),
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
    """``--model.key=value`` (and ``--moe.key=value`` for an MoE family) for every key of
    ``hf_dir``'s config: init_from needs them equal."""
    from dataclasses import asdict

    from meshweave.models.hf_config import read_hf_config

    def text(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    model, moe = read_hf_config(hf_dir)
    sections = [("model", model)] + ([("moe", moe)] if moe.num_experts else [])
    return [f"--{name}.{k}={text(v)}" for name, section in sections for k, v in asdict(section).items()]
