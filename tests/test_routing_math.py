"""Pure routing math against hand-computed cases (no Megatron involved)."""

import math

import pytest
import torch

from megatron_nullmoe.routing import math as rm
from megatron_nullmoe.routing.stats import RoutingStats, count_routing

E = 3  # real experts in the hand cases; slots 3.. are null


def route(logits, k, **kw):
    gate_kw = {key: kw.pop(key) for key in ("gate_normalization", "scaling_factor") if key in kw}
    routing = rm.topk_over_slots(torch.tensor(logits), k, **kw)
    gates = rm.real_gates(routing, E, score_function=kw.get("score_function", "softmax"),
                          pre_softmax=kw.get("pre_softmax", False), **gate_kw)
    return routing, gates


def test_shared_null_logit_is_a_threshold():
    # One null logit (1.0) replicated in Z=2 slots; reals 2.0, 0.5, 3.0.
    slots = rm.expand_null_logits(torch.tensor([[2.0, 0.5, 3.0]]), torch.tensor([[1.0]]), 2)
    assert slots.tolist() == [[2.0, 0.5, 3.0, 1.0, 1.0]]
    routing, gates = route(slots.tolist(), 3)
    # top-3: experts 2 (3.0) and 0 (2.0), then one null copy (1.0); expert 1 is below the null.
    assert sorted(routing.index_TK[0].tolist())[:2] == [0, 2]
    assert int((routing.index_TK >= E).sum()) == 1
    # renormalised gates: softmax over the real picks only.
    want = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    got = {int(i): float(g) for i, g in zip(routing.index_TK[0], gates[0]) if i < E}
    assert got[2] == pytest.approx(float(want[0]), abs=1e-6)
    assert got[0] == pytest.approx(float(want[1]), abs=1e-6)


def test_keep_null_share_leaves_null_mass_unspent():
    logits = [[2.0, 0.5, 3.0, 1.0, 1.0]]
    routing, gates = route(logits, 3, gate_normalization="keep_null_share")
    full = torch.softmax(torch.tensor([3.0, 2.0, 1.0]), 0)
    assert float(gates.sum()) == pytest.approx(float(full[0] + full[1]), abs=1e-6)
    assert float(gates.sum()) < 1.0


def test_all_null_token_gets_zero_gates_and_no_nan():
    logits = torch.tensor([[-5.0, -6.0, -7.0, 4.0, 4.0]], requires_grad=True)
    for mode in rm.GATE_NORMALIZATIONS:
        for score, pre in (("softmax", False), ("softmax", True), ("sigmoid", False)):
            routing = rm.topk_over_slots(logits, 2, score_function=score, pre_softmax=pre)
            gates = rm.real_gates(routing, E, score, pre, mode)
            assert torch.equal(gates, torch.zeros(1, 2))
            gates.sum().backward()
            assert torch.isfinite(logits.grad).all()
            logits.grad = None
    probs, rmap = rm.scatter_real(torch.zeros(1, 2), torch.tensor([[3, 4]]), E)
    assert not rmap.any() and probs.shape == (1, E)


def test_all_real_picks_equal_plain_topk_softmax():
    logits = [[0.1, 2.0, 1.0, -1.0, -1.0]]
    routing, gates = route(logits, 2)
    assert sorted(routing.index_TK[0].tolist()) == [1, 2]
    want = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    assert sorted(gates[0].tolist(), reverse=True) == pytest.approx(want.tolist(), abs=1e-6)


def test_pre_softmax_renormalize_hands_null_share_to_reals():
    logits = [[2.0, 0.0, 0.0, 1.0]]  # E=3 reals + one null slot
    routing, gates = route(logits, 2, pre_softmax=True)
    p = torch.softmax(torch.tensor(logits[0]), 0)
    # picks: expert 0 (p0) and the null (p3); real gate = p0 * (p0 + p3) / p0 = p0 + p3
    assert float(gates.sum()) == pytest.approx(float(p[0] + p[3]), abs=1e-6)


def test_sigmoid_gates_normalise_over_real_picks():
    logits = [[2.0, 1.0, -3.0, 1.5]]
    routing, gates = route(logits, 3, score_function="sigmoid")
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    assert sorted(gates[0].tolist(), reverse=True)[:2] == pytest.approx((s / s.sum()).tolist(), abs=1e-6)


def test_ties_pick_k_distinct_slots_and_scaling_applies():
    routing, gates = route([[1.0, 1.0, 1.0, 1.0, 1.0]], 3, scaling_factor=2.0)
    assert len(set(routing.index_TK[0].tolist())) == 3
    assert float(gates.sum()) == pytest.approx(2.0, abs=1e-6)


def test_zero_nulls_is_plain_topk():
    logits = torch.randn(5, E)
    assert rm.expand_null_logits(logits, torch.empty(5, 0), 0) is logits
    routing = rm.topk_over_slots(logits, 2)
    assert (routing.index_TK < E).all()


def test_selection_bias_changes_picks_not_gates():
    logits = torch.tensor([[2.0, 1.0, 0.0, 1.5]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    routing = rm.topk_over_slots(logits, 2, selection_bias_S=bias)
    assert 3 in routing.index_TK[0].tolist()
    assert float(routing.picked_TK[0][routing.index_TK[0] == 3]) == 1.5  # unbiased logit


def test_unpicked_gap_is_taken_from_the_rounded_selection_values():
    # bf16 logits, sigmoid: real 2**-8 (sigmoid 0.50098) and null -2**-9 (0.49951) both round to
    # 0.5 in bf16, so selection sees a tie. From fp32 sigmoids the gap would be 1.46e-3, and a
    # null bias of gap - 1e-3 would lift the null slot above the real expert.
    logits = torch.tensor([[2.0**-8, -4.0, -(2.0**-9), -(2.0**-9)]], dtype=torch.bfloat16)
    bias = torch.zeros(4)
    gap = rm.unpicked_gap_T(logits, 1, 2, "sigmoid", bias)
    assert gap.dtype == torch.float64 and gap.tolist() == [0.0]
    below = torch.tensor([0.0, 0.0, -1e-3, -1e-3])
    assert rm.topk_over_slots(logits, 1, "sigmoid", selection_bias_S=below).index_TK.tolist() == [[0]]
    # softmax: the k-th real logit minus the best null one, the selection bias included
    logits = torch.tensor([[2.0, 0.5, 3.0, 1.0, 1.25]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0])
    assert rm.unpicked_gap_T(logits, 2, E, "softmax", bias).tolist() == [0.5]
    assert rm.unpicked_gap_T(logits, 2, E, "softmax").tolist() == [0.75]


def test_count_routing_histogram_modality_and_padding():
    index = torch.tensor([[0, 3], [3, 4], [1, 2], [2, 0]])  # E=3: real counts 1, 0, 2, 2
    vision = torch.tensor([True, True, False, False])
    valid = torch.tensor([True, True, True, False])  # last token is padding
    stats = RoutingStats(2, count_routing(index, E, valid, vision))
    assert stats.tokens == 3
    assert stats.real_histogram == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert stats.null_fraction == pytest.approx(3 / 6)
    assert stats.real_per_token == pytest.approx(1.0)
    assert stats.expert_tokens == [1.0, 1.0, 1.0]
    by = stats.null_fraction_by_modality()
    assert by["vision"] == pytest.approx(3 / 4) and by["text"] == pytest.approx(0.0)
    total = stats + stats
    assert total.tokens == 6 and total.null_fraction == pytest.approx(0.5)
    assert math.isclose(stats.max_over_mean_load, 1.0)


@pytest.mark.parametrize("scale,E,Z,score,pre,factor", [
    ("slot_ratio", 8, 8, "softmax", True, 2.0),     # the text study's keep_scale_2
    ("slot_ratio", 8, 24, "softmax", True, 4.0),
    ("slot_ratio", 8, 8, "softmax", False, 1.0),    # normalised over the picks: no slot count
    ("slot_ratio", 8, 8, "sigmoid", True, 1.0),
    ("slot_ratio", 8, 0, "softmax", True, 1.0),     # no null slots: the plain router
    ("none", 8, 8, "softmax", True, 1.0),
])
def test_gate_scale_factor(scale, E, Z, score, pre, factor):
    assert rm.gate_scale_factor(scale, E, Z, score, pre) == factor


def test_slot_ratio_gives_a_uniform_router_the_gate_of_top1_over_the_real_experts():
    """Pre-softmax gates over E + Z equal logits are 1 / (E + Z); x (E + Z) / E is 1 / E, the
    gate the same router has over the E experts alone."""
    E_, Z = 4, 12
    favour_real = torch.cat([torch.ones(E_), torch.zeros(Z)])  # selection only: picks reals
    routing = rm.topk_over_slots(torch.zeros(2, E_ + Z), 2, pre_softmax=True,
                                 selection_bias_S=favour_real)
    factor = rm.gate_scale_factor("slot_ratio", E_, Z, "softmax", True)
    gates = rm.real_gates(routing, E_, pre_softmax=True, gate_normalization="keep_null_share",
                          scaling_factor=factor)
    plain = rm.real_gates(rm.topk_over_slots(torch.zeros(2, E_), 1, pre_softmax=True), E_,
                          pre_softmax=True)
    real = gates[routing.index_TK < E_]
    assert real.numel() == 4 and torch.allclose(real, torch.full_like(real, 1 / E_))
    assert torch.allclose(plain.max(dim=-1).values, torch.full((2,), 1 / E_))


def test_gate_scale_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="gate_scale='double'.*slot_ratio"):
        rm.gate_scale_factor("double", 8, 8)
