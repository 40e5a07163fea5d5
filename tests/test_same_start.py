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

    from megatron_nullmoe.train.config import load_config
    from megatron_nullmoe.train.model import build_model

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
