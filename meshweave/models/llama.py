"""A Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

The model knows nothing about meshes. Two seams let ``parallel/`` split it without edits here:

- layers live in a ``ModuleDict`` keyed by their global index, and ``embed_tokens``, ``norm`` and
  ``lm_head`` may be ``None``, so a pipeline stage is the same class with parts removed;
- attention calls ``self.attn_op(q, k, v, causal, documents)`` (the kernel contract in
  docs/architecture.md; ``documents`` a :class:`~meshweave.kernels.documents.Documents` or None),
  which context parallelism rebinds.

With MoE settings (``[moe]``, see :mod:`meshweave.models.moe`) the feed-forward of every
``every``-th layer is a :class:`~meshweave.models.moe.MoEFeedForward` instead of the dense SwiGLU;
which layers are MoE depends only on the global layer index, so pipeline stages agree. This module
imports ``moe``, never the reverse.

Parameter names are Hugging Face Llama's with the ``model.`` prefix dropped (see :func:`hf_name`),
and rotary embeddings use the same half-split convention, so weights map one-to-one with no
permutation. Initial values come from :func:`init_value`, a pure function of (seed, name, shape):
every layout materialises the same full tensors and keeps its own shard of them.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from meshweave.config import ModelConfig, MoEConfig
from meshweave.kernels.documents import Documents, attend
from meshweave.models.family import ModelFamily
from meshweave.models.moe import MoEFeedForward, is_moe_layer
from meshweave.models.rope import apply_rotary, rope_frequencies, rotary_tables

Tensor = torch.Tensor
AttentionOp = Callable[[Tensor, Tensor, Tensor, bool, Documents | None], tuple[Tensor, Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32: bf16 variance loses the small-activation tail.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # In x's dtype: under autocast q/k arrive in bf16 beside a bf16 v, and an fp32 weight
        # would promote them back to fp32 (the attention kernels need one dtype).
        return (self.weight * xf.to(x.dtype)).to(x.dtype)


class LayerCache:
    """One layer's keys and values ``[b, s, kv_heads, head_dim]`` of the tokens seen so far."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new tokens' rotated keys and values; returns all of them."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        return self.k, self.v


class KVCache:
    """Keys and values of every layer for incremental decoding in one process (``generate``):
    ``model(tokens, cache=c)`` attends over the cached tokens too and places the new ones after
    them (positions ``c.length ..``)."""

    def __init__(self) -> None:
        self.length = 0
        self._layers: dict[int, LayerCache] = {}

    def layer(self, index: int) -> LayerCache:
        return self._layers.setdefault(index, LayerCache())


class Attention(nn.Module):
    """Grouped-query attention with optional q/k/v biases (Qwen2) and q/k RMSNorm before the
    rotation, per head (Qwen3) or over the projection (OLMoE); ``[b, s, dim] -> [b, s, dim]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.attention_head_dim()
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        # Per head (Qwen3: one weight of head_dim shared by the heads) or over the whole
        # projection (OLMoE: a weight per feature, normalised across all heads).
        self.qk_norm = cfg.qk_norm
        q_width, k_width = (
            (self.head_dim, self.head_dim)
            if cfg.qk_norm == "head"
            else (
                cfg.n_heads * self.head_dim,
                cfg.n_kv_heads * self.head_dim,
            )
        )
        self.q_norm = RMSNorm(q_width, cfg.norm_eps) if cfg.qk_norm != "none" else None
        self.k_norm = RMSNorm(k_width, cfg.norm_eps) if cfg.qk_norm != "none" else None
        self.attn_op: AttentionOp = attend

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: LayerCache | None = None,
        documents: Documents | None = None,
    ) -> Tensor:
        b, s, _ = x.shape
        # -1 instead of n_heads: tensor parallelism leaves each rank a slice of the heads.
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm == "full" and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, -1, self.head_dim)
        k = k.view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if self.qk_norm == "head" and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # the new queries see every cached key (the causal mask aligns bottom-right)
            k, v = cache.extend(k, v)
        out, _ = self.attn_op(q, k, v, True, documents)
        return self.o_proj(out.reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, moe: MoEConfig | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp: nn.Module = FeedForward(cfg)
        if moe is not None and moe.enabled and is_moe_layer(layer_idx, moe):
            self.mlp = MoEFeedForward(cfg.dim, moe)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: LayerCache | None = None,
        documents: Documents | None = None,
        pending: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The block on the residual stream ``x``; with ``pending`` (Ladder Residual) each of
        attention and MLP reads the stream *without* the output before it, which is added only
        after, and the block returns ``(stream, its MLP output still to add)``."""
        # cos / sin by keyword: a tensor-parallel plan re-lays out only the block's first input.
        if pending is None:
            x = x + self.self_attn(self.input_layernorm(x), cos=cos, sin=sin, cache=cache, documents=documents)
            return x + self.mlp(self.post_attention_layernorm(x))
        # The previous output's reduction (an async collective under tensor parallelism) is first
        # needed by the add after this module's compute, so it runs underneath it.
        attn = self.self_attn(self.input_layernorm(x), cos=cos, sin=sin, cache=cache, documents=documents)
        x = x + pending
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + attn, mlp


class Transformer(nn.Module):
    """Decoder-only LM. ``forward(tokens [b, s]) -> logits [b, s, vocab]`` on the last stage.

    A stage without ``embed_tokens`` takes hidden states ``[b, s, dim]`` instead of tokens; one
    without ``lm_head`` returns hidden states. With a :class:`KVCache` the tokens continue the
    cached ones (decoding). ``positions`` ``[s]`` default to
    ``rope_positions`` if set, else ``0..s-1``: context parallelism and pipeline stages set the
    global positions of the tokens they see.

    ``documents`` ``[b, S]``: document ids of the whole packed sequence (kernels/documents.py),
    of which this model sees the ``rope_positions`` (all of it when unset). Each token then
    attends within its document only and its RoPE position restarts at its document's start.

    With ``ladder_residual`` the stream between pipeline stages is ``[2, b, s, dim]``: the
    residual stream and the last module's output not yet added to it.
    """

    family: ClassVar[ModelFamily]  # declared below the class: what parallel/ needs to know

    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, moe) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.checkpoint_layers = False
        # Global positions of the tokens this model sees, when they are not 0..s-1 of its input:
        # context parallelism (a shard of the sequence) and pipeline stages (hidden-state input).
        self.rope_positions: Tensor | None = None
        # The frequency table, made on first use per device (the model is built on meta).
        self._rope: dict[torch.device, tuple[Tensor, float]] = {}
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share one tensor between embedding and head when ``tie_embeddings`` (and both exist).

        Call again after anything that replaces parameters (``to_empty`` does).
        """
        if self.cfg.tie_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        documents: Tensor | None = None,
    ) -> Tensor:
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        pending: Tensor | None = None
        if self.cfg.ladder_residual:
            h, pending = (h, torch.zeros_like(h)) if self.embed_tokens is not None else h.unbind(0)
            tokens = tokens if self.embed_tokens is not None else h
        start = cache.length if cache is not None else 0
        docs = None
        if documents is not None:
            if cache is not None or positions is not None:
                raise ValueError("documents set the positions themselves; pass neither a cache nor positions")
            docs = Documents(documents.to(h.device), self.rope_positions)
            positions = docs.rope_positions()
        if positions is None:
            positions = self.rope_positions
        if positions is None:
            # From the input, not h: sequence parallelism leaves h a shard of the sequence.
            positions = torch.arange(start, start + tokens.shape[1], device=h.device)
        cos, sin = rotary_tables(positions, *self.rope_table(positions.device), h.dtype)
        for key, layer in self.layers.items():
            if cache is not None:
                out = layer(h, cos, sin, cache=cache.layer(int(key)), pending=pending)
            elif self.checkpoint_layers and torch.is_grad_enabled():
                out = checkpoint(layer, h, cos, sin, documents=docs, pending=pending, use_reentrant=False)
            else:
                out = layer(h, cos, sin, documents=docs, pending=pending)
            h, pending = out if pending is not None else (out, None)
        if cache is not None:
            cache.length += tokens.shape[1]
        if pending is not None:
            if self.lm_head is None and self.norm is None:  # a pipeline stage before the last
                return torch.stack([h, pending])
            h = h + pending
        if self.norm is not None:
            h = self.norm(h)
        return self.lm_head(h) if self.lm_head is not None else h

    def rope_table(self, device: torch.device) -> tuple[Tensor, float]:
        """The rotary ``(inv_freq, cos/sin scale)`` of the config's scaling rule, on ``device``."""
        if device not in self._rope:
            inv_freq, scale = rope_frequencies(self.cfg)
            self._rope[device] = (inv_freq.to(device), scale)
        return self._rope[device]

    def set_attention_op(self, op: AttentionOp) -> None:
        """Route every layer's attention through ``op`` (same contract as kernels.attention)."""
        for layer in self.layers.values():
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.attn_op = op


def init_value(name: str, shape: torch.Size, cfg: ModelConfig, seed: int) -> Tensor:
    """The initial fp32 value of parameter ``name`` of full shape ``shape``, on the CPU.

    A pure function of (seed, name, shape): any layout that materialises it and keeps its own
    shard gets the same model. Residual-branch outputs are scaled by 1/sqrt(2 * n_layers): in MoE
    layers the experts' and shared experts' ``down_proj`` (by name, like the dense MLP's) and
    BigMac's ``ascend``, the routed branch's last projection. With BigMac the routed branch thus
    ends in two scaled projections; that only shrinks its initial contribution, which the router's
    gate weights (< 1) shrink anyway, and keeps every residual-writing matrix on one rule.
    """
    if name.endswith(("layernorm.weight", "_norm.weight")) or name == "norm.weight":
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    std = cfg.init_std
    if name.endswith(("o_proj.weight", "down_proj.weight", "ascend.weight")):
        std = std / math.sqrt(2 * cfg.n_layers)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    """Parameter count of the full (unsharded) model; tied weights counted once."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (exclude_embedding and name.startswith("embed_tokens")):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def params_per_token(model: nn.Module) -> tuple[float, float]:
    """``(parameters, of them frozen)`` that one token's matmuls use, the inputs of the model-FLOPs
    estimate: non-embedding parameters, each MoE layer's routed experts counted at ``top_k /
    num_experts`` (a token visits ``top_k`` of them); tied weights once. Works on ``meta``."""
    share: dict[int, float] = {}
    for layer in model.modules():
        if isinstance(layer, MoEFeedForward):
            for p in layer.experts.parameters():
                share[id(p)] = layer.settings.top_k / layer.settings.num_experts
    seen: set[int] = set()
    used = frozen = 0.0
    for name, p in model.named_parameters():
        if id(p) in seen or name.startswith("embed_tokens"):
            continue
        seen.add(id(p))
        n = p.numel() * share.get(id(p), 1.0)
        used += n
        frozen += 0.0 if p.requires_grad else n
    return used, frozen


def hf_name(name: str) -> str:
    """Hugging Face Llama name of a meshweave parameter (``layers.0...`` -> ``model.layers.0...``)."""
    return name if name.startswith("lm_head") else f"model.{name}"


def build_model(cfg: ModelConfig, device: str | torch.device = "meta", moe: MoEConfig | None = None) -> Transformer:
    """The model on ``device`` without initial values (``meta`` by default); see :func:`init_value`.
    With an ``moe`` section of ``num_experts > 0`` the MoE layers' feed-forwards are mixtures of
    experts; ``None`` or ``num_experts = 0`` is the dense model."""
    with torch.device(device):
        return Transformer(cfg, moe)


def block_tp_plan(block: nn.Module) -> dict[str, str]:
    """The tensor-parallel plan of one decoder block (styles of models/family.py): Megatron's
    column-parallel q/k/v and gate/up, row-parallel o/down, sequence-parallel norms; an MoE block
    runs replicated over tp (its experts are split over ep instead)."""
    plan = {
        "input_layernorm": "sequence_parallel",
        "self_attn": "gather_sequence",
        "self_attn.q_proj": "colwise",
        "self_attn.k_proj": "colwise",
        "self_attn.v_proj": "colwise",
        "self_attn.o_proj": "rowwise",
        "post_attention_layernorm": "sequence_parallel",
    }
    assert isinstance(block, DecoderLayer)
    if block.self_attn.qk_norm != "none":
        style = "head_norm" if block.self_attn.qk_norm == "head" else "feature_norm"
        plan |= {"self_attn.q_norm": style, "self_attn.k_norm": style}
    if isinstance(block.mlp, MoEFeedForward):
        return {**plan, "mlp": "replicated_block"}
    return {
        **plan,
        "mlp": "gather_sequence",
        "mlp.gate_proj": "colwise",
        "mlp.up_proj": "colwise",
        "mlp.down_proj": "rowwise",
    }


Transformer.family = ModelFamily(
    name="llama",
    blocks="layers",
    first_stage=("embed_tokens",),
    last_stage=("norm", "lm_head"),
    root_tp_plan={"embed_tokens": "vocab_embedding", "norm": "sequence_parallel", "lm_head": "vocab_head"},
    block_tp_plan=block_tp_plan,
    init_value=init_value,
    hf_name=hf_name,
)
