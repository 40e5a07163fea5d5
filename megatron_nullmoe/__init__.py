"""megatron-nullmoe: null experts for Megatron-Core MoE layers.

A token-choice router picks top-k over E real experts plus Z zero-compute null slots, so each token
runs between 0 and k real experts; only real (token, expert) rows are permuted, sent and computed.
After "Improving MoE Compute Efficiency by Composing Weight and Data Sparsity" (arXiv 2601.15370).
"""

import warnings

# megatron-core warns at import on every machine without TE/apex (all CPU machines); the
# fallbacks it announces are the intended path there.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

# First: refuses a megatron-core release outside the supported range with one clear message.
from megatron_nullmoe._mcore import MCORE_VERSION, MegatronCoreVersionError
from megatron_nullmoe.config import NullExpertConfig, NullExpertConfigError
from megatron_nullmoe.layer import NullExpertMoELayer, null_moe_layer, null_router
from megatron_nullmoe.model_utils import (
    check_routers,
    dispatch_stats,
    null_routers,
    routing_stats,
    set_vision_mask,
    start_null_slots_unpicked,
    update_null_budget,
)
from megatron_nullmoe.router import NullExpertRouter
from megatron_nullmoe.spec import with_null_experts

__all__ = [
    "MCORE_VERSION",
    "MegatronCoreVersionError",
    "NullExpertConfig",
    "NullExpertConfigError",
    "NullExpertMoELayer",
    "NullExpertRouter",
    "check_routers",
    "null_moe_layer",
    "dispatch_stats",
    "null_router",
    "null_routers",
    "routing_stats",
    "set_vision_mask",
    "start_null_slots_unpicked",
    "update_null_budget",
    "with_null_experts",
]
