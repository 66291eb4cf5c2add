"""Specification of the Llama-style model: shapes, Hugging Face equivalence, initialisation,
pipeline-stage seams, the attention-op seam and activation checkpointing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from meshweave.config import ModelConfig
from meshweave.kernels.attention import attention, reference_attention
from meshweave.models.llama import Transformer, build_model, hf_name, init_value, num_params

SEED = 1234


def tiny(**overrides) -> ModelConfig:
    """Small enough for milliseconds per forward; GQA (4 query heads, 2 KV heads) by default."""
    fields = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97, max_seq_len=64, rope_theta=500.0
    )
    fields.update(overrides)
    return ModelConfig(**fields)


@torch.no_grad()
def materialized(cfg: ModelConfig, seed: int = SEED) -> Transformer:
    """Built on meta, allocated with ``to_empty``, filled with :func:`init_value` (untied configs)."""
    model = build_model(cfg)
    model.to_empty(device="cpu")
    for name, p in model.named_parameters():
        p.copy_(init_value(name, p.shape, cfg, seed))
    return model


def tokens(cfg: ModelConfig, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# shapes and parameters


def test_forward_maps_tokens_to_float32_logits_per_position():
    cfg = tiny()
    logits = materialized(cfg)(tokens(cfg, batch=3, seq=10))
    assert logits.shape == (3, 10, cfg.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_build_model_defaults_to_meta_without_storage():
    model = build_model(tiny())
    assert all(p.is_meta for p in model.parameters())


def test_layers_are_keyed_by_global_index():
    model = build_model(tiny(n_layers=3))
    assert list(model.layers.keys()) == ["0", "1", "2"]


def test_default_positions_are_zero_to_seq_len():
    cfg = tiny()
    model, x = materialized(cfg), tokens(cfg)
    with torch.no_grad():
        assert torch.equal(model(x), model(x, positions=torch.arange(x.shape[1])))


def test_logits_are_causal():
    cfg = tiny()
    model, x = materialized(cfg), tokens(cfg)
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])


# --------------------------------------------------------------------------------------------
# Hugging Face equivalence


def hf_llama(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)  # HF's random init; every value is overwritten by the load below
    return LlamaForCausalLM(hf_cfg).eval()


def test_parameter_names_map_one_to_one_onto_hf_llama():
    cfg = tiny()
    ours = {hf_name(n): tuple(p.shape) for n, p in build_model(cfg).named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in hf_llama(cfg).named_parameters()}
    assert ours == theirs
    assert len(ours) == len(list(build_model(cfg).named_parameters()))  # hf_name is injective


def test_hf_name_adds_model_prefix_except_for_lm_head():
    assert hf_name("layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert hf_name("embed_tokens.weight") == "model.embed_tokens.weight"
    assert hf_name("norm.weight") == "model.norm.weight"
    assert hf_name("lm_head.weight") == "lm_head.weight"


# init_std 0.1 instead of 0.02: with the default, q.k scores are ~1e-2 and attention is almost
# uniform, so a wrong rotary convention or head grouping would move logits by less than the
# tolerance. At 0.1 the scores are O(1), logits reach ~3, and such mistakes move them by O(1).
HF_CFG = tiny(init_std=0.1)
# fp32 logits of magnitude <= ~3 (ulp 2.4e-7) after two layers of width 64: the implementations
# differ only in summation order (fused CPU attention vs eager softmax, x*rsqrt vs x/sqrt), which
# measures ~1.3e-6 (a few ulp). 1e-5 leaves ~8x headroom and is 1e5 below a mapping error.
HF_TOL = 1e-5


def loaded_pair():
    ours = materialized(HF_CFG)
    hf = hf_llama(HF_CFG)
    hf.load_state_dict({hf_name(n): t for n, t in ours.state_dict().items()}, strict=True)
    return ours, hf


def test_logits_match_hf_llama_with_grouped_query_attention():
    assert HF_CFG.n_kv_heads < HF_CFG.n_heads
    ours, hf = loaded_pair()
    x = tokens(HF_CFG, batch=2, seq=16)
    with torch.no_grad():
        want = hf(input_ids=x).logits
        got = ours(x)
    assert want.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(got, want, atol=HF_TOL, rtol=0)


def test_hf_comparison_is_sensitive_to_rotary_distances():
    """Guards the tolerance above: a rotary mistake (positions 0, 2, 4, ...) is far outside it."""
    ours, hf = loaded_pair()
    x = tokens(HF_CFG, batch=2, seq=16)
    with torch.no_grad():
        wrong = ours(x, positions=2 * torch.arange(16))
        want = hf(input_ids=x).logits
    assert (wrong - want).abs().max() > 100 * HF_TOL


def test_hf_comparison_is_sensitive_to_kv_head_grouping():
    """Guards the tolerance above: pairing query heads with the wrong KV head is far outside it."""
    ours, hf = loaded_pair()
    head_dim = HF_CFG.dim // HF_CFG.n_heads
    with torch.no_grad():
        for proj in (hf.model.layers[0].self_attn.k_proj, hf.model.layers[0].self_attn.v_proj):
            proj.weight.copy_(proj.weight.roll(head_dim, dims=0))  # swap the two KV heads
        x = tokens(HF_CFG, batch=2, seq=16)
        assert (ours(x) - hf(input_ids=x).logits).abs().max() > 100 * HF_TOL


def test_logits_are_invariant_to_a_constant_position_offset():
    # Rotary embeddings encode relative distance only; context parallelism relies on it when it
    # passes a shard's absolute positions. Angles up to 116 rad are rounded in fp32 (ulp 7.6e-6),
    # so rotated q/k carry ~1e-5 relative error that O(1) scores pass on to the logits: 1e-4.
    # A position encoding that is not relative moves these logits by O(0.1).
    ours = materialized(HF_CFG)
    x = tokens(HF_CFG, batch=2, seq=16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, positions=torch.arange(100, 116)), ours(x), atol=1e-4, rtol=0)


def test_tied_embeddings_share_one_tensor():
    model = build_model(tiny(tie_embeddings=True), device="cpu")
    assert model.lm_head.weight is model.embed_tokens.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "embed_tokens.weight" in names


def test_num_params_counts_tied_embedding_once():
    untied = build_model(tiny(tie_embeddings=False), device="cpu")
    tied = build_model(tiny(tie_embeddings=True), device="cpu")
    cfg = tiny()
    assert num_params(untied) == sum(p.numel() for p in untied.parameters())
    assert num_params(tied) == num_params(untied) - cfg.vocab_size * cfg.dim


def test_num_params_can_exclude_the_embedding():
    cfg = tiny()
    model = build_model(cfg, device="cpu")
    assert num_params(model, exclude_embedding=True) == num_params(model) - cfg.vocab_size * cfg.dim


def test_num_params_is_the_same_on_meta():
    cfg = tiny()
    assert num_params(build_model(cfg)) == num_params(build_model(cfg, device="cpu"))


def test_tied_model_matches_hf_tied_llama():
    cfg = tiny(init_std=0.1, tie_embeddings=True)
    ours = build_model(cfg, device="cpu")
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(init_value(name, p.shape, cfg, SEED))
    hf = hf_llama(cfg)
    state = {hf_name(n): t for n, t in ours.state_dict().items()}  # has lm_head.weight too
    hf.load_state_dict(state, strict=True)
    x = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(input_ids=x).logits, atol=HF_TOL, rtol=0)


def test_materialize_keeps_tied_embeddings_one_tensor():
    from meshweave.parallel.parallelize import materialize

    cfg = tiny(tie_embeddings=True)
    model = build_model(cfg)
    materialize(model, torch.device("cpu"), SEED)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert num_params(model) == num_params(build_model(cfg))


# --------------------------------------------------------------------------------------------
# initial values


def test_init_value_is_a_pure_function_of_seed_name_and_shape():
    cfg = tiny()
    a = init_value("layers.0.self_attn.q_proj.weight", torch.Size([64, 64]), cfg, seed=7)
    torch.manual_seed(999)  # the global RNG must not matter
    torch.randn(10)
    b = init_value("layers.0.self_attn.q_proj.weight", torch.Size([64, 64]), cfg, seed=7)
    assert torch.equal(a, b)
    assert a.dtype == torch.float32 and a.device.type == "cpu"


def test_init_value_does_not_consume_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    init_value("layers.0.mlp.up_proj.weight", torch.Size([32, 32]), tiny(), seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_init_value_differs_with_seed():
    cfg, shape = tiny(), torch.Size([64, 64])
    a = init_value("layers.0.self_attn.q_proj.weight", shape, cfg, seed=7)
    b = init_value("layers.0.self_attn.q_proj.weight", shape, cfg, seed=8)
    assert not torch.equal(a, b)


def test_init_value_differs_between_parameters_of_the_same_shape():
    cfg, shape = tiny(), torch.Size([64, 64])
    a = init_value("layers.0.self_attn.q_proj.weight", shape, cfg, seed=7)
    b = init_value("layers.1.self_attn.q_proj.weight", shape, cfg, seed=7)
    assert not torch.equal(a, b)


@pytest.mark.parametrize(
    "name", ["layers.0.input_layernorm.weight", "layers.3.post_attention_layernorm.weight", "norm.weight"]
)
def test_norm_weights_start_at_one(name):
    assert torch.equal(init_value(name, torch.Size([64]), tiny(), seed=3), torch.ones(64))


# 512 x 512 = 262,144 normal samples: the sample std has relative standard error
# 1/sqrt(2N) ~ 0.14%, so a 1% relative tolerance is ~7 standard errors (never flaky) while the
# 1/sqrt(2 * 8) = 1/4 residual scaling is a 75% effect.
BIG = torch.Size([512, 512])
STD_RTOL = 0.01


@pytest.mark.parametrize("name", ["layers.2.self_attn.o_proj.weight", "layers.5.mlp.down_proj.weight"])
def test_residual_output_projections_are_scaled_by_inverse_sqrt_two_n_layers(name):
    cfg = tiny(n_layers=8, init_std=0.02)
    t = init_value(name, BIG, cfg, seed=11)
    expected = 0.02 / math.sqrt(2 * 8)
    assert abs(t.std().item() - expected) < STD_RTOL * expected
    assert abs(t.mean().item()) < 5 * expected / math.sqrt(t.numel())  # 5 standard errors


@pytest.mark.parametrize(
    "name",
    [
        "layers.2.self_attn.q_proj.weight",
        "layers.2.self_attn.v_proj.weight",
        "layers.5.mlp.gate_proj.weight",
        "embed_tokens.weight",
        "lm_head.weight",
    ],
)
def test_other_matrices_use_init_std(name):
    cfg = tiny(n_layers=8, init_std=0.02)
    t = init_value(name, BIG, cfg, seed=11)
    assert abs(t.std().item() - 0.02) < STD_RTOL * 0.02


def test_meta_built_model_is_deterministic():
    cfg = tiny()
    a, b = materialized(cfg), materialized(cfg)
    assert not any(p.is_meta for p in a.parameters())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    x = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_meta_built_model_holds_init_value_of_every_parameter():
    cfg = tiny()
    model = materialized(cfg, seed=5)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), init_value(name, p.shape, cfg, 5)), name


# --------------------------------------------------------------------------------------------
# pipeline-stage seams


def test_pipeline_stages_compose_to_the_full_model():
    cfg = tiny(n_layers=4)
    full = materialized(cfg)
    first, middle, last = (copy.deepcopy(full) for _ in range(3))
    first.norm = first.lm_head = None
    middle.embed_tokens = middle.norm = middle.lm_head = None
    last.embed_tokens = None
    for stage, keep in ((first, {"0"}), (middle, {"1", "2"}), (last, {"3"})):
        for key in list(stage.layers.keys()):
            if key not in keep:
                del stage.layers[key]

    x = tokens(cfg, batch=2, seq=9)
    with torch.no_grad():
        h1 = first(x)
        h2 = middle(h1)
        logits = last(h2)
        want = full(x)
    assert h1.shape == (2, 9, cfg.dim) and h2.shape == (2, 9, cfg.dim)
    # same operations in the same order on the same values: bitwise equal
    assert torch.equal(logits, want)


def test_stage_without_embedding_and_head_takes_and_returns_hidden_states():
    cfg = tiny()
    stage = materialized(cfg)
    stage.embed_tokens = stage.norm = stage.lm_head = None
    h = torch.randn(2, 6, cfg.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = stage(h)
    assert out.shape == h.shape and out.dtype == h.dtype
    assert not torch.equal(out, h)


# --------------------------------------------------------------------------------------------
# attention-op seam


class RecordingOp:
    def __init__(self, delegate):
        self.delegate, self.calls = delegate, []

    def __call__(self, q, k, v, causal, documents):
        self.calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), causal))
        assert documents is None  # no documents given to the model
        return self.delegate(q, k, v, causal)


def test_set_attention_op_routes_every_layer_through_the_op():
    cfg = tiny(n_layers=3)
    model, x = materialized(cfg), tokens(cfg, batch=2, seq=10)
    with torch.no_grad():
        want = model(x)
        op = RecordingOp(reference_attention)
        model.set_attention_op(op)
        got = model(x)
    head_dim = cfg.dim // cfg.n_heads
    assert (
        op.calls
        == [
            ((2, 10, cfg.n_heads, head_dim), (2, 10, cfg.n_kv_heads, head_dim), (2, 10, cfg.n_kv_heads, head_dim), True)
        ]
        * cfg.n_layers
    )
    # fp32: the reference and the fused kernel differ in summation order only (~1e-7 relative)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_attention_op_output_is_used():
    cfg = tiny()
    model, x = materialized(cfg), tokens(cfg)

    def zero_attention(q, k, v, causal, documents):
        out, lse = attention(q, k, v, causal)
        return torch.zeros_like(out), lse

    with torch.no_grad():
        want = model(x)
        model.set_attention_op(zero_attention)
        got = model(x)
    assert (got - want).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# activation checkpointing


def loss_and_grads(model: Transformer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(x[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_identical_loss_and_gradients():
    cfg = tiny(n_layers=3)
    model, x = materialized(cfg), tokens(cfg, batch=2, seq=13)
    loss, grads = loss_and_grads(model, x)
    model.checkpoint_layers = True
    loss_ckpt, grads_ckpt = loss_and_grads(model, x)
    # recomputation repeats the same CPU kernels on the same inputs: bitwise identical
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_ckpt[name]), name


def test_activation_checkpointing_is_skipped_without_grad():
    cfg = tiny()
    model, x = materialized(cfg), tokens(cfg)
    model.checkpoint_layers = True
    with torch.no_grad():
        out = model(x)
    assert not out.requires_grad


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_bf16_autocast_runs_with_qk_norms_and_stays_near_fp32(qk_norm):
    """Under autocast q/k come out of their norms in bf16 like v (an fp32 norm weight used to
    promote them back to fp32, which the attention kernels refuse). bf16 keeps ~3 significant
    digits: 5e-2 of the logits' scale is a few bf16 roundings through two layers."""
    model, x = materialized(tiny(qk_norm=qk_norm)), tokens(tiny())
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    assert (got.float() - want).abs().max() <= 5e-2 * want.abs().max()
