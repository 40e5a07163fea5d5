"""What both null-aware dispatchers share: megatron-core's constructor and the row/byte counters.

Subclasses implement megatron-core's MoETokenDispatcher phases (dispatch_preprocess ...
combine_postprocess) and call `_record` once per dispatch, when the rows they move are known.
"""

from __future__ import annotations

from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_nullmoe.dispatch.stats import DispatchStats


class NullTokenDispatcher(MoETokenDispatcher):
    """A MoETokenDispatcher built as MoELayer builds megatron-core's own, counting what it moves.

    `num_tokens` (the T local tokens of the current dispatch) must be set before `_record`.
    """

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.topk = config.moe_router_topk
        self.stats = DispatchStats()

    def _record(self, *, rows_dispatched: int, rows_computed: int, rows_sent_remote: int,
                row_bytes: int) -> None:
        """Counts one dispatch against a standard top-k MoE (T * k rows) on the same tokens.

        row_bytes: what one row sent to another rank weighs (hidden vector plus gates).
        """
        self.stats.add(
            rows_dispatched=rows_dispatched,
            rows_topk=self.num_tokens * self.topk,
            rows_computed=rows_computed,
            rows_sent_remote=rows_sent_remote,
            bytes_sent_remote=rows_sent_remote * row_bytes,
        )
