"""Specification of the single-process MoE layer (meshweave.models.moe).

Routing (top-k of softmax / sigmoid scores, capacity dropping by position, aux and z losses,
aux-loss-free bias balancing), the dispatch seam (permute -> experts -> un-permute -> gate-sum),
BigMac low-dimensional experts, and the helpers the trainer calls.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from meshweave.config import MoEConfig, check_moe
from meshweave.models.moe import (
    Experts,
    MoEFeedForward,
    Router,
    aux_loss,
    capacity,
    combine,
    init_moe_buffers,
    is_moe_layer,
    local_dispatch,
    moe_layers,
    moe_metrics,
    sort_by_expert,
    update_balance_bias,
)

DIM = 16
# float64 end to end: two computations of the same sums in a different association differ by a
# few ulp of 2.2e-16 on O(1) values; 1e-12 is far above that and far below any routing or
# weighting mistake (those change outputs by O(0.1)).
TOL = 1e-12


def settings(**overrides) -> MoEConfig:
    fields = dict(num_experts=4, top_k=2, expert_ffn_dim=8, aux_loss_coeff=1e-2, z_loss_coeff=1e-3)
    fields.update(overrides)
    return MoEConfig(**fields)


def make_moe(seed: int = 0, dim: int = DIM, **overrides) -> MoEFeedForward:
    """A float64 layer whose weights are O(1/sqrt(fan-in)), so routing is decisive (no near-ties)."""
    torch.manual_seed(seed)
    m = MoEFeedForward(dim, settings(**overrides)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return m


def tokens(t: int = 24, dim: int = DIM, seed: int = 1) -> torch.Tensor:
    return torch.randn(t, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class IdentityExperts(Experts):
    """Experts that return their input rows: isolates permutation and combination."""

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        assert sum(counts) == rows.shape[0]
        return rows


def distinct_choices(t: int, e: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])


def router_with_logits(logits: torch.Tensor, **overrides) -> tuple[Router, torch.Tensor]:
    """A router whose gate is the identity, so feeding ``logits`` as tokens yields those logits."""
    e = logits.shape[1]
    router = Router(e, settings(num_experts=e, **overrides)).double()
    with torch.no_grad():
        router.weight.copy_(torch.eye(e, dtype=torch.float64))
    return router, logits.double()


# --------------------------------------------------------------------------------------------
# dispatch seam


@pytest.mark.parametrize("k,weight", [(1, 1.0), (2, 0.5)])
def test_dispatch_then_combine_with_identity_experts_returns_the_input_exactly(k, weight):
    # weights 1, or 0.5 + 0.5: sums that are exact in binary floating point
    x = tokens(30)
    idx = distinct_choices(30, 6, k)
    out, side = local_dispatch(x, idx, torch.full((30, k), weight, dtype=torch.float64), IdentityExperts(6, DIM, 1))
    assert torch.equal(out, x) and side is None


def test_sort_by_expert_groups_slots_by_expert_keeping_token_order_and_skipping_drops():
    idx = torch.tensor([[2, 0], [0, -1], [1, 2]])  # flat slots 0..5
    order, counts = sort_by_expert(idx, 4)
    assert order.tolist() == [1, 2, 4, 0, 5]
    assert counts.tolist() == [2, 1, 2, 0]


def test_dropped_slots_contribute_nothing_to_the_token():
    x = tokens(3, dim=4)
    idx = torch.tensor([[0, 1], [1, -1], [-1, -1]])
    w = torch.tensor([[0.5, 0.5], [0.5, 0.0], [0.0, 0.0]], dtype=torch.float64)
    out, _ = local_dispatch(x, idx, w, IdentityExperts(2, 4, 1))
    assert torch.equal(out, torch.stack([x[0], 0.5 * x[1], torch.zeros(4, dtype=torch.float64)]))


def test_combine_weights_each_expert_row_by_its_gate():
    rows = torch.tensor([[1.0], [10.0], [100.0]], dtype=torch.float64)
    order = torch.tensor([1, 0, 2])  # rows belong to (token 0 slot 1), (token 0 slot 0), (token 1 slot 0)
    w = torch.tensor([[0.25, 0.75], [2.0, 0.0]], dtype=torch.float64)
    assert combine(rows, order, w, 2).tolist() == [[0.75 * 1 + 0.25 * 10], [200.0]]


def test_overlap_callable_result_is_returned_beside_the_routed_output():
    x = tokens(5, dim=4)
    _, side = local_dispatch(
        x, distinct_choices(5, 2, 1), torch.ones(5, 1, dtype=torch.float64), IdentityExperts(2, 4, 1), lambda: x * 3
    )
    assert torch.equal(side, x * 3)


def test_local_dispatch_refuses_a_sharded_expert_set():
    experts = Experts(4, DIM, 8)
    experts.keep(2, 2)
    with pytest.raises(ValueError, match="full expert set"):
        local_dispatch(tokens(4), distinct_choices(4, 4, 1), torch.ones(4, 1), experts)


# --------------------------------------------------------------------------------------------
# router


def test_softmax_router_picks_the_top_k_probabilities_as_weights():
    router, x = router_with_logits(tokens(20, dim=6), top_k=3)
    idx, w = router(x)
    probs = x.softmax(-1)
    top = probs.topk(3, dim=-1)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(w, top.values, atol=TOL, rtol=0)
    assert (w.sum(-1) < 1).all()  # not renormalised by default


def test_softmax_router_renormalises_top_k_on_request():
    router, x = router_with_logits(tokens(20, dim=6), top_k=3, renormalize=True)
    _, w = router(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(20, dtype=torch.float64), atol=TOL, rtol=0)


def test_sigmoid_router_selects_by_sigmoid_and_normalises_weights_to_one():
    router, x = router_with_logits(tokens(20, dim=6), top_k=2, score="sigmoid")
    idx, w = router(x)
    top = x.sigmoid().topk(2, dim=-1)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(w, top.values / top.values.sum(-1, keepdim=True), atol=TOL, rtol=0)


def test_router_computes_in_at_least_float32():
    router = Router(DIM, settings())
    idx, w = router(tokens().to(torch.bfloat16))
    assert w.dtype == torch.float32 and idx.dtype == torch.int64


def test_aux_loss_is_coeff_times_e_times_sum_of_fraction_times_mean_probability():
    logits = [
        [3.0, 1.0, 0.0, -1.0],
        [2.0, 2.5, 0.0, 0.0],
        [0.0, 0.1, 4.0, 0.0],
        [1.0, -2.0, 0.0, 3.0],
        [5.0, 0.0, 1.0, 0.0],
    ]
    router, x = router_with_logits(torch.tensor(logits, dtype=torch.float64), top_k=2, aux_loss_coeff=0.1)
    router(x)
    t, e, k = 5, 4, 2
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    chosen = [sorted(range(e), key=lambda i: -row[i])[:k] for row in logits]
    f = [sum(i in c for c in chosen) / (t * k) for i in range(e)]
    p_mean = [sum(p[i] for p in probs) / t for i in range(e)]
    expected = 0.1 * e * sum(fi * pi for fi, pi in zip(f, p_mean))
    assert router.last_aux.item() == pytest.approx(expected, rel=1e-12)
    assert router.last_load.tolist() == [round(fi * t * k) for fi in f]


def test_z_loss_is_coeff_times_mean_squared_logsumexp():
    logits = [[3.0, 1.0, 0.0, -1.0], [2.0, 2.5, 0.0, 0.0], [0.0, 0.1, 4.0, 0.0]]
    router, x = router_with_logits(torch.tensor(logits, dtype=torch.float64), z_loss_coeff=0.5)
    router(x)
    expected = 0.5 * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 3
    assert router.last_z.item() == pytest.approx(expected, rel=1e-12)


def test_aux_loss_reaches_its_minimum_coeff_under_perfect_balance():
    # token t prefers expert t mod 4 strongly and all others equally: f_i = P_i = 1/4
    logits = torch.full((8, 4), -1.0)
    logits[torch.arange(8), torch.arange(8) % 4] = 5.0
    router, x = router_with_logits(logits, top_k=1, aux_loss_coeff=0.1)
    router(x)
    assert router.last_aux.item() == pytest.approx(0.1, rel=1e-12)


# --------------------------------------------------------------------------------------------
# capacity


@pytest.mark.parametrize(
    "t,k,cf,min_cap,expected",
    [(16, 1, 1.0, 1, 4), (16, 2, 1.0, 1, 8), (16, 1, 1.5, 1, 6), (10, 2, 1.25, 1, 7), (4, 1, 1.0, 4, 4)],
)
def test_capacity_is_ceil_k_t_over_e_times_factor_at_least_min_capacity(t, k, cf, min_cap, expected):
    assert capacity(t, settings(top_k=k, capacity_factor=cf, min_capacity=min_cap)) == expected


@pytest.mark.parametrize("k,cf", [(1, 1.0), (2, 1.0), (1, 1.5)])
def test_over_capacity_assignments_are_dropped_latest_tokens_first(k, cf):
    t, e = 16, 4
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).repeat(t, 1)  # everyone wants experts 0 then 1
    router, x = router_with_logits(logits, top_k=k, capacity_factor=cf, min_capacity=1)
    idx, w = router(x)
    cap = math.ceil(k * t / e * cf)
    for expert in range(k):
        kept = (idx[:, expert] == expert).nonzero().squeeze(1)
        assert kept.tolist() == list(range(cap))  # position priority: the first cap tokens
    assert (idx[cap:] == -1).all() and (w[cap:] == 0).all()
    assert router.last_dropped == pytest.approx(k * (t - cap) / (k * t))
    assert router.last_load.tolist()[:k] == [t] * k  # load and aux count choices before dropping


def test_dropless_mode_drops_nothing_however_skewed():
    router, x = router_with_logits(torch.tensor([[4.0, 3.0, 0.0, -1.0]]).repeat(64, 1), top_k=2)
    idx, _ = router(x)
    assert (idx >= 0).all() and router.last_dropped == 0.0


# --------------------------------------------------------------------------------------------
# aux-loss-free bias balancing


def skewed_moe(**overrides) -> tuple[MoEFeedForward, torch.Tensor]:
    """A layer whose router sends every token to expert 0 first (top-1)."""
    m = make_moe(top_k=1, bias_balancing=True, bias_update_rate=0.01, **overrides)
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.weight[0, 0] = 1.0
    return m, tokens().abs()


def test_balancing_bias_is_a_checkpointed_buffer_not_a_parameter():
    m = make_moe(bias_balancing=True)
    assert "gate.e_score_correction_bias" in m.state_dict()
    assert all("bias" not in n for n, _ in m.named_parameters())
    assert "gate.e_score_correction_bias" not in make_moe().state_dict()


def test_bias_update_lowers_overloaded_and_raises_underloaded_experts():
    m, x = skewed_moe()
    m(x)
    update_balance_bias(m)
    assert m.gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])


def test_bias_changes_selection_but_not_gate_weights():
    m, x = skewed_moe()
    with torch.no_grad():
        m.gate.e_score_correction_bias[3] = 100.0
    idx, w = m.gate(x)
    assert (idx == 3).all()
    torch.testing.assert_close(w[:, 0], F.linear(x, m.gate.weight).softmax(-1)[:, 3], atol=TOL, rtol=0)


def test_bias_update_uses_load_summed_over_micro_batches_and_then_restarts():
    m, x = skewed_moe()
    m(x)
    m(x[:5])
    assert m.gate.load_since_update.tolist() == [x.shape[0] + 5, 0, 0, 0]
    update_balance_bias(m)
    assert m.gate.load_since_update is None


def test_bias_update_reduces_all_layers_loads_in_one_call():
    net = nn.Sequential(skewed_moe()[0], skewed_moe()[0])
    x = tokens().abs()
    for m in net:
        m(x)  # each layer sees the skewed tokens
    calls = []

    def reduce_load(load: torch.Tensor) -> torch.Tensor:
        calls.append(load.clone())
        return -load  # pretend the other ranks overload the other way

    update_balance_bias(net, reduce_load)
    assert len(calls) == 1 and calls[0].shape == (8,)
    for m in net:
        assert m.gate.e_score_correction_bias.tolist() == pytest.approx([0.01, -0.01, -0.01, -0.01])


def test_recomputation_under_activation_checkpointing_does_not_count_load_twice():
    m, x = skewed_moe()
    checkpoint(m, x.requires_grad_(), use_reentrant=False).sum().backward()
    assert m.gate.load_since_update.tolist() == [x.shape[0], 0, 0, 0]


def test_eval_forward_does_not_count_load():
    m, x = skewed_moe()
    m.eval()
    m(x)
    assert m.gate.load_since_update is None


def test_init_moe_buffers_zeroes_the_bias_after_to_empty():
    with torch.device("meta"):
        m = MoEFeedForward(DIM, settings(bias_balancing=True))
    m.to_empty(device="cpu")
    init_moe_buffers(m)
    assert torch.equal(m.gate.e_score_correction_bias, torch.zeros(4))


# --------------------------------------------------------------------------------------------
# the layer


def naive_moe(m: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition MoEFeedForward must compute."""
    s, ex = m.settings, m.experts
    probs = F.linear(x, m.gate.weight).softmax(-1)
    out = []
    for t in range(x.shape[0]):
        h = m.descend(x[t]) if m.descend is not None else x[t]
        acc = torch.zeros_like(h)
        for e in probs[t].topk(s.top_k).indices.tolist():
            y = ex.down_proj.weight[e] @ (F.silu(ex.gate_proj.weight[e] @ h) * (ex.up_proj.weight[e] @ h))
            acc = acc + probs[t, e] * y
        y = m.ascend(acc) if m.ascend is not None else acc
        out.append(y + (m.shared_experts(x[t]) if m.shared_experts is not None else 0))
    return torch.stack(out)


@pytest.mark.parametrize(
    "overrides", [{}, {"shared_experts": 2}, {"low_dim": 4, "shared_experts": 1}], ids=["routed", "shared", "bigmac"]
)
def test_moe_layer_equals_the_token_by_token_definition(overrides):
    m = make_moe(num_experts=6, top_k=2, **overrides)
    x = tokens(20)
    torch.testing.assert_close(m(x.view(4, 5, DIM)).view(20, DIM), naive_moe(m, x), atol=TOL, rtol=0)


def test_moe_layer_is_a_drop_in_for_the_dense_feed_forward_shape():
    m = make_moe(low_dim=4)
    assert m(tokens(12).view(3, 4, DIM)).shape == (3, 4, DIM)


def test_bigmac_experts_operate_at_low_dim():
    m = make_moe(low_dim=4, expert_ffn_dim=8)
    assert m.experts.gate_proj.weight.shape == (4, 8, 4)
    assert m.experts.down_proj.weight.shape == (4, 4, 8)
    assert m.descend.weight.shape == (4, DIM) and m.ascend.weight.shape == (DIM, 4)


def test_shared_experts_are_one_swiglu_of_count_times_expert_ffn_dim():
    m = make_moe(shared_experts=3, expert_ffn_dim=8)
    assert m.shared_experts.gate_proj.weight.shape == (24, DIM)


def test_gradients_reach_router_experts_shared_and_projections():
    m = make_moe(shared_experts=1, low_dim=4)
    x = tokens(32).requires_grad_()
    (m(x).pow(2).sum() + aux_loss(m)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_parameter_names_follow_hugging_face_moe_and_end_residual_branches_in_down_proj():
    names = [n for n, _ in make_moe(shared_experts=1, low_dim=4).named_parameters()]
    assert names == [
        "gate.weight",
        "experts.gate_proj.weight",
        "experts.up_proj.weight",
        "experts.down_proj.weight",
        "shared_experts.gate_proj.weight",
        "shared_experts.up_proj.weight",
        "shared_experts.down_proj.weight",
        "descend.weight",
        "ascend.weight",
    ]


def test_layer_builds_on_meta_without_storage():
    with torch.device("meta"):
        m = MoEFeedForward(DIM, settings(shared_experts=1))
    assert all(p.is_meta for p in m.parameters())


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"top_k": 5}, "top_k"),
        ({"low_dim": DIM}, "low_dim"),
        ({"score": "relu"}, "score"),
        ({"capacity_factor": -1}, "capacity_factor"),
        ({"every": 0}, "every"),
        ({"num_experts": 0}, "num_experts"),
    ],
)
def test_invalid_settings_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"moe\.{field}: {field}="):
        check_moe(settings(**overrides), DIM)


@pytest.mark.parametrize("every,expected", [(1, [0, 1, 2, 3]), (2, [1, 3]), (4, [3])])
def test_moe_layers_are_the_last_of_every_group_of_every(every, expected):
    assert [i for i in range(4) if is_moe_layer(i, settings(every=every))] == expected


# --------------------------------------------------------------------------------------------
# experts


def test_keep_on_meta_shrinks_dim_zero_and_records_the_offset():
    with torch.device("meta"):
        ex = Experts(8, DIM, 12)
    ex.keep(4, 2)
    assert ex.gate_proj.weight.shape == (2, 12, DIM) and ex.down_proj.weight.shape == (2, DIM, 12)
    assert (ex.offset, ex.num_local, ex.num_experts) == (4, 2, 8)


def test_keep_on_materialised_experts_keeps_their_slice():
    ex = Experts(8, DIM, 12)
    full = ex.up_proj.weight.detach().clone()
    ex.keep(2, 3)
    assert torch.equal(ex.up_proj.weight, full[2:5])
    with pytest.raises(ValueError, match="already"):
        ex.keep(0, 1)


# --------------------------------------------------------------------------------------------
# trainer helpers


def test_aux_loss_sums_aux_and_z_of_every_layer_from_the_last_forward():
    net = nn.Sequential(make_moe(seed=0), make_moe(seed=1))
    assert aux_loss(net).item() == 0.0
    net(tokens())
    expected = sum(m.gate.last_aux + m.gate.last_z for m in moe_layers(net))
    assert aux_loss(net).item() == pytest.approx(expected.item(), rel=1e-12)


def test_moe_metrics_report_load_drops_and_losses_per_layer():
    net = nn.Sequential(make_moe(seed=0), make_moe(seed=1, capacity_factor=1.0, min_capacity=1))
    net(tokens(24))
    metrics = moe_metrics(net)
    assert list(metrics) == ["0", "1"]
    for m in metrics.values():
        assert sum(m["tokens_per_expert"]) == 24 * 2
        assert set(m) == {"tokens_per_expert", "dropped_fraction", "aux", "z"}
    assert metrics["0"]["dropped_fraction"] == 0.0
