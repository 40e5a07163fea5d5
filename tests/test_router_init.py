"""A router's starting state: what the first forward picks when null slots are switched on, and
what `reset_parameters` (meta-device initialisation) puts back."""

import pytest
import torch

from megatron_nullmoe import NullExpertConfig, NullExpertRouter
from megatron_nullmoe.router import START_MARGIN
from tests._models import HIDDEN, moe_config

pytestmark = pytest.mark.usefixtures("single_rank")

BATCHES = 300

# (score function, router input dtype, moe_router_dtype): bf16 logits round the selection
# scores (sigmoid ones to ~2e-3 near 0.5); fp32 logits and the fp32 / fp64 router dtypes do not.
START_CASES = {
    "sigmoid_bf16": ("sigmoid", torch.bfloat16, None),
    "softmax_bf16": ("softmax", torch.bfloat16, None),
    "sigmoid_fp32": ("sigmoid", torch.float32, None),
    "softmax_fp32": ("softmax", torch.float32, None),
    "sigmoid_bf16_in_fp32_router": ("sigmoid", torch.bfloat16, "fp32"),
    "softmax_bf16_in_fp64_router": ("softmax", torch.bfloat16, "fp64"),
}


@pytest.mark.parametrize("case", list(START_CASES))
def test_start_unpicked_picks_no_null_slot_on_the_first_forward(case):
    """`start_null_slots_unpicked`: the first forward after arming picks k real experts for every
    token, whatever the rounding of the selection scores, over many random batches."""
    score, dtype, router_dtype = START_CASES[case]
    config = moe_config(num_experts=8, topk=2, moe_router_score_function=score,
                        moe_router_dtype=router_dtype)
    router = NullExpertRouter(config, null_config=NullExpertConfig(
        num_null_experts=8, target_real_per_token=1.0))
    router.set_layer_number(1)
    router.eval()
    failed, loose = [], []
    for seed in range(BATCHES):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            router.weight.copy_(torch.randn(8, HIDDEN, generator=g) * 0.3)
            router.null_weight.copy_(torch.randn(1, HIDDEN, generator=g) * 0.3)
        x = torch.randn(16, 4, HIDDEN, generator=g).to(dtype)
        router.arm_start()
        with torch.no_grad():
            _, map_TE = router(x)
        router.end_start()
        real_T = map_TE.sum(-1)
        if not bool((real_T == 2).all()):
            failed.append((seed, int((real_T < 2).sum())))
        # and the bias sits just below the closest token, not anywhere below: lifted by twice
        # the margin, the same batch picks a null slot
        with torch.no_grad():
            router.null_budget_bias += 2 * START_MARGIN
            _, lifted_TE = router(x)
        if bool((lifted_TE.sum(-1) == 2).all()):
            loose.append(seed)
    assert failed == [], f"{len(failed)} of {BATCHES} batches picked a null slot: {failed[:5]}"
    assert loose == [], f"{len(loose)} of {BATCHES} batches: bias far below the gap"


def test_every_micro_batch_of_the_first_step_picks_no_null_slot():
    """With several micro-batches in the step that starts unpicked, the bias is placed at each
    forward, lowered where a later micro-batch needs it (the first one placed it from its own
    tokens only), until `update_null_budget` ends the step; then budget control alone moves it."""
    from megatron_nullmoe.model_utils import start_null_slots_unpicked, update_null_budget

    config = moe_config(num_experts=8, topk=2)
    router = NullExpertRouter(config, null_config=NullExpertConfig(
        num_null_experts=8, target_real_per_token=1.0))
    router.set_layer_number(1)
    router.train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, HIDDEN, generator=g) * 0.3)
        router.null_weight.copy_(torch.randn(1, HIDDEN, generator=g) * 0.3)
    micro = [torch.randn(16, 4, HIDDEN, generator=g) for _ in range(6)]
    assert start_null_slots_unpicked(router) == 1
    placed = []
    for x in micro:
        _, map_TE = router(x)
        assert bool((map_TE.sum(-1) == 2).all())
        placed.append(float(router.null_budget_bias))
    assert placed == sorted(placed, reverse=True) and placed[-1] < placed[0]
    update_null_budget(router)
    assert not router.start_unpicked
    before = float(router.null_budget_bias)
    _, map_TE = router(micro[0] * 3)  # no longer placed: the bias stays where control put it
    assert float(router.null_budget_bias) == before


# ------------------------------------------------------------------------ reset_parameters
# Configurations that between them hold every buffer a null router can have: budget control
# with a compute schedule (null_budget_bias, budget_step, budget_counts), the expert bias
# (expert_bias, local_tokens_per_expert), the global balancing loss (global_tokens_per_expert,
# ga_steps); null rows shared or per expert, drawn or zero, with and without a null bias.
RESET_CASES = {
    "budget_schedule_normal": (
        dict(),
        dict(num_null_experts=4, target_real_per_token=1.0, target_start_real_per_token=2.0,
             target_schedule_steps=10)),
    "expert_bias_global_aux_per_expert": (
        dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
             moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.1),
        dict(num_null_experts=4, null_logits="per_expert")),
    "budget_zero_init_with_bias": (
        dict(add_bias_linear=True),
        dict(num_null_experts=4, target_real_per_token=1.0, null_init="zero")),
}


def _build(case, meta=False):
    config, null = RESET_CASES[case]
    make = lambda: NullExpertRouter(moe_config(num_experts=4, topk=2, **config),  # noqa: E731
                                    null_config=NullExpertConfig(**null))
    if meta:
        with torch.device("meta"):
            router = make()
    else:
        router = make()
    router.set_layer_number(1)
    return router


def _garbage(router):
    """Every parameter and buffer overwritten: NaN for floats, large values for the rest."""
    with torch.no_grad():
        for t in list(router.parameters()) + list(router.buffers()):
            t.fill_(float("nan") if t.is_floating_point() else 12345)


@pytest.mark.parametrize("case", list(RESET_CASES))
@pytest.mark.parametrize("route", ["meta", "trained"])
def test_reset_parameters_puts_back_every_buffer_and_the_null_rows(case, route):
    """Megatron-FSDP's `--init-model-with-meta-device` builds on the meta device, materialises
    with uninitialised memory and calls each module's `reset_parameters()`: the router must come
    out as if freshly built. Every buffer (enumerated, so a buffer added later is covered) equals
    a freshly built router's, in dtype and value; the null rows follow the null-init rule (the
    layer's own seeded draw, or zero), and the null bias is zero."""
    fresh = _build(case)
    if route == "meta":
        router = _build(case, meta=True)
        router.to_empty(device="cpu")
    else:  # a router that has trained: routed, counted, its budget control stepped
        router = _build(case)
        router.train()
        probs, _ = router(torch.randn(6, 2, HIDDEN, requires_grad=True))
        probs.sum().backward()
    _garbage(router)
    router.reset_parameters()

    fresh_buffers = dict(fresh.named_buffers())
    buffers = dict(router.named_buffers())
    assert buffers.keys() == fresh_buffers.keys() and buffers
    for name, want in fresh_buffers.items():
        got = buffers[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), (name, got, want)
    assert router.routing_stats() is None

    assert torch.isfinite(router.weight).all() and router.weight.abs().sum() > 0
    assert router.null_weight.dtype == fresh.null_weight.dtype
    if RESET_CASES[case][1].get("null_init") == "zero":
        assert torch.equal(router.null_weight, torch.zeros_like(router.null_weight))
    else:  # the layer's seeded draw, as at construction: equal to the fresh router's rows
        assert torch.equal(router.null_weight, fresh.null_weight)
        assert bool((router.null_weight != 0).all())
    if router.null_bias is not None:
        assert torch.equal(router.null_bias, torch.zeros_like(router.null_bias))
    assert router.bias is None or torch.isfinite(router.bias).all()
