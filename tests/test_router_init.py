"""A router's starting state: what the first forward picks when null slots are switched on, and
what `reset_parameters` (meta-device initialisation) puts back."""

import pytest
import torch

from megatron_nullmoe import NullExpertConfig, NullExpertRouter
from tests._models import HIDDEN, moe_config

pytestmark = pytest.mark.usefixtures("single_rank")

BATCHES = 300

# (score function, router input dtype, moe_router_dtype): bf16 logits round the selection
# scores (sigmoid ones to ~2e-3 near 0.5), fp32 and the fp32 router dtype do not.
START_CASES = {
    "sigmoid_bf16": ("sigmoid", torch.bfloat16, None),
    "softmax_bf16": ("softmax", torch.bfloat16, None),
    "sigmoid_fp32": ("sigmoid", torch.float32, None),
    "softmax_fp32": ("softmax", torch.float32, None),
    "sigmoid_bf16_in_fp32_router": ("sigmoid", torch.bfloat16, "fp32"),
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
    failed = []
    for seed in range(BATCHES):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            router.weight.copy_(torch.randn(8, HIDDEN, generator=g) * 0.3)
            router.null_weight.copy_(torch.randn(1, HIDDEN, generator=g) * 0.3)
        x = torch.randn(16, 4, HIDDEN, generator=g).to(dtype)
        router.start_unpicked = True
        with torch.no_grad():
            _, map_TE = router(x)
        assert not router.start_unpicked
        real_T = map_TE.sum(-1)
        if not bool((real_T == 2).all()):
            failed.append((seed, int((real_T < 2).sum())))
    assert failed == [], f"{len(failed)} of {BATCHES} batches picked a null slot: {failed[:5]}"
