"""Null-aware all-gather dispatcher.

By design this moves every token: each rank gathers all tokens of the EP group, then runs its
local experts on the real rows routed to them (null picks never become rows in the expert GEMMs).
It suits small EP sizes; prefer `alltoall` when communication matters.

Shape legend: T local tokens, G = T * P gathered tokens, H hidden, L local experts, Q local rows.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import unpermute

from megatron_nullmoe.dispatch import comm
from megatron_nullmoe.dispatch.base import NullTokenDispatcher
from megatron_nullmoe.dispatch.permute import permute


class NullAllGatherDispatcher(NullTokenDispatcher):
    """All-gather over the expert-parallel group; experts compute only their real rows."""

    def dispatch_preprocess(self, tokens, routing_map, probs):
        self.hidden_shape = tokens.shape
        self.routing_map = routing_map
        return tokens.reshape(-1, self.hidden_shape[-1]), probs

    def token_dispatch(self, x_TH, probs_TE):
        self.num_tokens = x_TH.shape[0]
        self.own_rows = self.routing_map.sum()  # on the device: read with the split sizes
        if self.ep_size > 1:
            with torch.no_grad():
                self.routing_map = comm.all_gather(self.ep_group, self.routing_map.to(torch.uint8)).bool()
            probs_TE = comm.all_gather(self.ep_group, probs_TE)
            x_TH = comm.all_gather(self.ep_group, x_TH)
        return x_TH, probs_TE

    def dispatch_postprocess(self, x_GH, probs_GE):
        first, last = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
        self.local_map_GL = self.routing_map[:, first:last].contiguous()
        self.gathered_shape = x_GH.shape
        # the dispatch's one device-to-host read: rows per local expert, and this rank's own rows
        *per_expert, own_rows = torch.cat(
            [self.local_map_GL.sum(dim=0), self.own_rows.view(1)]).tolist()
        tokens_per_expert = torch.tensor(per_expert, dtype=torch.long)
        x_QH, probs_Q, self.sorted_indices_Q = permute(
            x_GH, self.local_map_GL, probs_GE[:, first:last], sum(per_expert))
        self._record(
            rows_dispatched=own_rows,
            rows_computed=x_QH.shape[0],
            rows_sent_remote=self.num_tokens * (self.ep_size - 1),
            row_bytes=(x_GH.shape[-1] * x_GH.element_size()
                       + probs_GE.shape[-1] * probs_GE.element_size()),
        )
        return x_QH, tokens_per_expert, probs_Q

    def combine_preprocess(self, y_QH):
        return unpermute(
            y_QH, self.sorted_indices_Q, restore_shape=self.gathered_shape, routing_map=self.local_map_GL
        )

    def token_combine(self, y_GH):
        if self.ep_size > 1:
            y_GH = comm.reduce_scatter(self.ep_group, y_GH)
        return y_GH

    def combine_postprocess(self, y_TH):
        self.routing_map = None
        return y_TH.view(self.hidden_shape)
