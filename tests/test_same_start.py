"""Issue 17, item 1: with one seed, every variant of a study starts from the same parameters.

Null-expert rows draw from a stream of their own (seeded by the run's seed and the layer), so a
null-MoE variant shares every parameter a model without null slots has, bit for bit: paired
differences between variants then cancel the initialisation, as they do for top-1 against top-2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_nullmoe import parallel

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model.router_topk=1", "model.null_experts.num_null_experts=0",
        "model.null_experts.target_real_per_token=null", "seed=5"]
NULL = ["model.router_topk=2", "model.null_experts.num_null_experts=8", "seed=5"]


def _parameters(recipe: str, overrides: list[str]) -> dict:
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.run.model import build_model

    cfg = load_config(str(ROOT / "examples" / recipe), overrides)
    parallel.init_model_parallel(seed=cfg.seed)
    model, _ = build_model(cfg, 512, ProcessGroupCollection.use_mpu_process_groups(),
                           torch.float32)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("recipe,extra", [
    ("gpt_null_moe.yaml", ["model.null_experts.target_real_per_token=1.0"]),
    ("gpt_null_moe.yaml", ["model.null_experts.null_logits=per_expert",
                           "model.null_experts.gate_normalization=keep_null_share"]),
    ("demo_vlm.yaml", ["model.null_experts.target_real_per_token=1.0"]),
])
def test_a_null_variant_shares_every_parameter_of_the_baseline_at_step_0(single_rank, recipe,
                                                                          extra):
    try:
        base = _parameters(recipe, BASE)
        null = _parameters(recipe, NULL + extra)
    finally:
        parallel.init_model_parallel(seed=1234)  # the session's state for the tests after
    added = sorted(set(null) - set(base))
    assert added and all(name.endswith("router.null_weight") for name in added), added
    differ = [name for name in base if not torch.equal(base[name], null[name])]
    assert not differ, f"{len(differ)} of {len(base)} shared parameters differ: {differ[:4]}"
    rows = [null[name] for name in added]
    assert not torch.equal(rows[0], rows[1])  # each layer's null rows have their own stream
    again = _parameters(recipe, NULL + extra)
    parallel.init_model_parallel(seed=1234)
    assert all(torch.equal(null[name], again[name]) for name in added)  # and are reproducible


def test_zero_null_init_starts_every_null_logit_at_0_and_changes_nothing_else(single_rank):
    """`null_init: zero`: the null rows start at zero, so every token's null logit is 0 at step 0
    (a flat threshold the seed does not draw), and every other parameter is the baseline's."""
    try:
        base = _parameters("gpt_null_moe.yaml", BASE)
        normal = _parameters("gpt_null_moe.yaml", NULL)
        zero = _parameters("gpt_null_moe.yaml", NULL + ["model.null_experts.null_init=zero"])
    finally:
        parallel.init_model_parallel(seed=1234)
    assert set(zero) == set(normal)
    rows = sorted(set(zero) - set(base))
    assert rows and all(name.endswith("router.null_weight") for name in rows)
    assert all(not torch.any(normal[name] == 0) for name in rows)  # the default draws them
    assert all(torch.count_nonzero(zero[name]) == 0 for name in rows)
    differ = [name for name in base if not torch.equal(base[name], zero[name])]
    assert not differ, differ[:4]


def test_zero_null_init_gives_a_null_logit_of_0_for_every_token(single_rank):
    import functools

    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_nullmoe.config import NullExpertConfig
    from megatron_nullmoe.router import NullExpertRouter

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                               num_moe_experts=4, moe_router_topk=2, use_cpu_initialization=True)
    make = functools.partial(NullExpertRouter, config=config)
    router = make(null_config=NullExpertConfig(num_null_experts=4, null_init="zero"))
    router.set_layer_number(1)  # megatron-core numbers routers after building: rows drawn again
    logits = router.gating(torch.randn(5, 3, 16))
    assert logits.shape == (5, 3, 8)
    assert torch.count_nonzero(logits[..., 4:]) == 0
    assert torch.count_nonzero(logits[..., :4]) == logits[..., :4].numel()
    with pytest.raises(ValueError, match="null_init='uniform'.*'normal', 'zero'"):
        NullExpertConfig(num_null_experts=4, null_init="uniform")
