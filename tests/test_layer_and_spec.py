"""MoE layer vs a dense reference, with_null_experts on GPT specs, and every config error."""

import copy

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_nullmoe import _mcore
from megatron_nullmoe import (
    NullExpertConfig,
    NullExpertConfigError,
    NullExpertRouter,
    dispatch_stats,
    routing_stats,
    set_vision_mask,
    with_null_experts,
)
from megatron_nullmoe.dispatch import NullAllGatherDispatcher, NullAlltoAllDispatcher
from megatron_nullmoe.layer import NullExpertTransformerLayer
from tests._models import HIDDEN, build_layer, dense_reference, global_weights, load_weights, moe_config

pytestmark = pytest.mark.usefixtures("single_rank")


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
@pytest.mark.parametrize("null_logits", ["shared", "per_expert"])
def test_layer_equals_dense_reference(dispatcher, null_logits):
    torch.manual_seed(0)
    config = moe_config(num_experts=4, topk=3, dispatcher=dispatcher)
    nc = NullExpertConfig(num_null_experts=3, null_logits=null_logits)
    layer = build_layer(config, nc)
    weights = global_weights(config, nc)
    load_weights(layer, weights)
    x = torch.randn(7, 2, HIDDEN)
    out, bias = layer(x)
    assert bias is None
    probs, rmap = layer.router(x)
    ref = dense_reference(x.reshape(-1, HIDDEN), probs, rmap, weights).view_as(out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    stats = layer.token_dispatcher.stats
    assert stats.rows_dispatched == int(rmap.sum()) == stats.rows_computed
    assert stats.rows_topk == 14 * 3
    assert 0 < stats.rows_dispatched < stats.rows_topk  # some picks went to null slots
    # tokens with no real expert have an exactly-zero routed output
    none_T = ~rmap.any(dim=-1)
    assert torch.equal(out.reshape(-1, HIDDEN)[none_T], torch.zeros(int(none_T.sum()), HIDDEN))


def _gpt_config(**kw):
    base = dict(num_layers=3, moe_layer_freq=[1, 0, 1], num_experts=4, topk=2)
    base.update(kw)
    num_experts, topk = base.pop("num_experts"), base.pop("topk")
    return moe_config(num_experts=num_experts, topk=topk, **base)


def test_with_null_experts_on_block_spec_leaves_dense_layers_and_input_alone():
    config = _gpt_config()
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    before = copy.deepcopy(block)
    nc = NullExpertConfig(num_null_experts=4)
    out = with_null_experts(block, nc)
    assert [s.module for s in block.layer_specs] == [s.module for s in before.layer_specs]
    assert out.layer_specs[1] is block.layer_specs[1]  # dense layer untouched
    assert out.layer_specs[0].module is NullExpertTransformerLayer
    moe_cls, moe_subs = _mcore.moe_parts(out.layer_specs[0].submodules.mlp)
    assert moe_cls is MoELayer  # identity kept: pg arrives (0.16.1 checks it)
    assert moe_subs.router.func is NullExpertRouter
    assert _mcore.moe_parts(block.layer_specs[0].submodules.mlp)[1].router is not moe_subs.router


def test_gpt_model_with_null_experts_trains_a_step_and_reports_stats():
    torch.manual_seed(0)
    config = _gpt_config(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01)
    spec = with_null_experts(get_gpt_decoder_block_spec(config, use_transformer_engine=False),
                             NullExpertConfig(num_null_experts=4))
    model = GPTModel(config, spec, vocab_size=32, max_sequence_length=8)
    routers = [m for m in model.modules() if isinstance(m, NullExpertRouter)]
    assert len(routers) == 2 and [r.layer_number for r in routers] == [1, 3]
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert all(isinstance(m.token_dispatcher, NullAlltoAllDispatcher) for m in moe_layers)
    ids = torch.randint(0, 32, (2, 8))
    vision = torch.zeros(2, 8, dtype=torch.bool)
    vision[:, :3] = True
    set_vision_mask(model, vision)
    _mcore.clear_moe_metrics()
    loss = model(ids, torch.arange(8).expand(2, 8), None, labels=ids).mean()
    loss.backward()
    assert routers[0].null_weight.grad is not None
    stats = routing_stats(model)
    assert set(stats) == {1, 3, "all"}
    by = stats["all"].null_fraction_by_modality()
    assert by["vision"] is not None and by["text"] is not None
    assert stats["all"].tokens == 2 * 16
    tracker = _mcore.moe_metrics()
    for name in ("null_slot_fraction", "real_experts_per_token"):
        values = tracker[name]
        assert values[0] > 0 and values[1] == 0 and values[2] > 0  # MoE layers 1 and 3 only
    rows = dispatch_stats(model)
    assert rows.rows_topk == 2 * 16 * 2 and rows.rows_dispatched <= rows.rows_topk


def test_local_layer_spec_and_allgather():
    config = moe_config(num_experts=4, topk=2, dispatcher="allgather")
    spec = with_null_experts(get_gpt_layer_local_spec(num_experts=4), NullExpertConfig(num_null_experts=2))
    model = GPTModel(config, spec, vocab_size=16, max_sequence_length=4)
    assert isinstance(model.decoder.layers[0].mlp.token_dispatcher, NullAllGatherDispatcher)
    ids = torch.randint(0, 16, (1, 4))
    model(ids, torch.arange(4).expand(1, 4), None, labels=ids).sum().backward()


def test_with_null_experts_rejects_dense_spec_and_bad_types():
    with pytest.raises(ValueError, match="no MoE layer"):
        with_null_experts(get_gpt_layer_local_spec(), NullExpertConfig(num_null_experts=2))
    with pytest.raises(TypeError, match="NullExpertConfig"):
        with_null_experts(get_gpt_layer_local_spec(num_experts=4), {"num_null_experts": 2})
    with pytest.raises(TypeError, match="takes a layer ModuleSpec"):
        with_null_experts("gpt", NullExpertConfig(num_null_experts=2))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(num_null_experts=-1), "num_null_experts"),
        (dict(num_null_experts=2.5), "num_null_experts"),
        (dict(null_logits="tied"), "null_logits"),
        (dict(gate_normalization="softmax"), "gate_normalization"),
        (dict(target_real_per_token=0), "target_real_per_token"),
        (dict(budget_update_rate=0), "budget_update_rate"),
    ],
)
def test_null_config_errors_name_field_value_and_valid(kwargs, field):
    with pytest.raises(NullExpertConfigError, match=field) as err:
        NullExpertConfig(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(err.value)


@pytest.mark.parametrize(
    "overrides,null_kwargs,field",
    [
        (dict(topk=4, num_experts=2), dict(num_null_experts=1), "moe_router_topk"),
        (dict(moe_token_dispatcher_type="flex"), {}, "moe_token_dispatcher_type"),
        (dict(moe_router_load_balancing_type="sinkhorn"), {}, "moe_router_load_balancing_type"),
        (dict(moe_expert_capacity_factor=1.0), {}, "moe_expert_capacity_factor"),
        (dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True), {},
         "moe_expert_capacity_factor"),
        (dict(moe_router_num_groups=2, moe_router_group_topk=1), {}, "moe_router_num_groups"),
        (dict(moe_permute_fusion=True), {}, "moe_permute_fusion"),
        (dict(moe_router_fusion=True), {}, "moe_router_fusion"),
        (dict(moe_shared_expert_overlap=True), {}, "moe_shared_expert_overlap"),
        (dict(moe_enable_routing_replay=True), {}, "moe_enable_routing_replay"),
        (dict(moe_router_force_load_balancing=True), {}, "moe_router_force_load_balancing"),
        (dict(cuda_graph_impl="local"), {}, "cuda_graph_impl"),
        ({}, dict(target_real_per_token=3.0), "target_real_per_token"),
        (dict(num_experts=None), {}, "num_moe_experts"),
    ],
)
def test_megatron_options_null_experts_cannot_honour_are_refused(overrides, null_kwargs, field):
    config = moe_config(num_experts=4, topk=2)
    num_experts = overrides.pop("num_experts", 4)
    topk = overrides.pop("topk", 2)
    # Set fields directly: some combinations are refused by TransformerConfig itself first.
    object.__setattr__(config, "num_moe_experts", num_experts)
    object.__setattr__(config, "moe_router_topk", topk)
    for k, v in overrides.items():
        object.__setattr__(config, k, v)
    nc = NullExpertConfig(num_null_experts=null_kwargs.pop("num_null_experts", 2), **null_kwargs)
    with pytest.raises(NullExpertConfigError, match=field):
        nc.check(config)
    with pytest.raises(NullExpertConfigError, match=field):
        NullExpertRouter(config, null_config=nc)


def test_transformer_engine_spec_converts_even_without_te():
    config = _gpt_config()
    try:
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=True)
    except Exception as e:  # megatron-core cannot even describe TE specs here
        pytest.skip(f"TE spec unavailable without Transformer Engine: {e}")
    out = with_null_experts(block, NullExpertConfig(num_null_experts=4))
    moe = [s for s in out.layer_specs if s.module is NullExpertTransformerLayer]
    assert len(moe) == 2
    assert all(_mcore.moe_parts(s.submodules.mlp)[1].router.func is NullExpertRouter for s in moe)


def test_modality_and_padding_masks_split_stats_without_changing_the_model():
    """The masks only label tokens for statistics: outputs are identical with and without them,
    padding is left out of every count, and vision/text counts follow the mask exactly."""
    torch.manual_seed(0)
    config = _gpt_config()
    spec = with_null_experts(get_gpt_decoder_block_spec(config, use_transformer_engine=False),
                             NullExpertConfig(num_null_experts=4))
    model = GPTModel(config, spec, vocab_size=32, max_sequence_length=8).eval()
    ids = torch.randint(0, 32, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        plain = model(ids, pos, None)
    routing_stats(model, reset=True)
    vision = torch.zeros(2, 8, dtype=torch.bool)
    vision[:, :3] = True
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[0, 6:] = True  # sample 0 ends in two padding tokens
    set_vision_mask(model, vision, pad)
    with torch.no_grad():
        labelled = model(ids, pos, None)
    assert torch.equal(plain, labelled)
    for key, stats in routing_stats(model).items():
        counts = stats.counts
        layers = 1 if key != "all" else 2
        assert float(counts["tokens"]) == layers * (16 - 2)
        assert counts["modality_tokens"].tolist() == [layers * (16 - 6 - 2), layers * 6]
    set_vision_mask(model, None)
    with pytest.raises(ValueError, match="vision/padding mask has 8 entries"):
        set_vision_mask(model, vision[:1])
        with torch.no_grad():
            model(ids, pos, None)
