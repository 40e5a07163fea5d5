"""Null-aware token dispatchers, chosen by megatron-core's `moe_token_dispatcher_type` name."""

from __future__ import annotations

from megatron_nullmoe.dispatch.allgather import NullAllGatherDispatcher
from megatron_nullmoe.dispatch.alltoall import NullAlltoAllDispatcher
from megatron_nullmoe.dispatch.stats import DispatchStats

DISPATCHERS = {
    "alltoall": NullAlltoAllDispatcher,
    "allgather": NullAllGatherDispatcher,
}


def build_dispatcher(moe_layer, pg_collection):
    """The null-aware dispatcher for a megatron-core MoELayer, by its config's dispatcher name."""
    name = moe_layer.config.moe_token_dispatcher_type
    if name not in DISPATCHERS:
        raise ValueError(
            f"moe_token_dispatcher_type={name!r} has no null-expert dispatcher; "
            f"valid: {sorted(DISPATCHERS)}"
        )
    return DISPATCHERS[name](
        moe_layer.num_local_experts,
        moe_layer.local_expert_indices,
        config=moe_layer.config,
        pg_collection=pg_collection,
    )


__all__ = ["DISPATCHERS", "DispatchStats", "build_dispatcher"]
