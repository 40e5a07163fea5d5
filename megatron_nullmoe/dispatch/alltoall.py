"""Null-aware all-to-all token dispatcher: only real (token, expert) rows are permuted, sent and
computed.

The router's map holds real experts only, so the permutation has exactly R = number of real
assignments rows (no `T * topk` static size, no padding, no zero-weight rows). Split sizes are
exchanged as counts and read to the host once per dispatch (a dynamic row count needs them
there); that read is the dispatch's only device-to-host sync.
A rank may send or receive zero rows; a token with zero real experts gets an exact zero output.

Phases follow megatron-core's MoETokenDispatcher contract. NOTE numbers mark the row layout:
  NOTE 1 permute: local tokens -> rows grouped by global expert id (expert-major).
  NOTE 2 all-to-all: rank q receives, from every rank p, p's rows for q's local experts, ordered
         [source rank][local expert].
  NOTE 3 sort: [source rank][local expert] -> [local expert][source rank] for the expert GEMMs.
  NOTE 4..6 undo 3, 2, 1 in reverse; the unpermute scatter-adds gated expert outputs per token.

Shape legend: T tokens, H hidden, E real experts, L local experts, P expert-parallel ranks,
R real rows this rank sends, Q rows this rank's experts compute.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import unpermute

from megatron_nullmoe.dispatch import comm
from megatron_nullmoe.dispatch.base import NullTokenDispatcher
from megatron_nullmoe.dispatch.permute import permute


def _reorder(x: torch.Tensor, sizes_AB: List[List[int]]) -> torch.Tensor:
    """Chunks laid out [a][b] with sizes_AB[a][b] -> laid out [b][a]."""
    flat = [n for row in sizes_AB for n in row]
    chunks = torch.split(x, flat, dim=0)
    num_a, num_b = len(sizes_AB), len(sizes_AB[0])
    return torch.cat([chunks[a * num_b + b] for b in range(num_b) for a in range(num_a)], dim=0)


class NullAlltoAllDispatcher(NullTokenDispatcher):
    """All-to-all over the expert-parallel group moving real rows only. CPU/gloo and CUDA/NCCL."""

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None):
        super().__init__(num_local_experts, local_expert_indices, config, pg_collection)
        self.num_experts = config.num_moe_experts
        self.ep_rank = dist.get_rank(self.ep_group) if self.ep_size > 1 else 0

    # -------------------------------------------------------------------------- dispatch
    def dispatch_preprocess(self, tokens, routing_map, probs):
        """Rows per expert, counted on the device; no collective and no host read here."""
        self.hidden_shape = tokens.shape
        x_TH = tokens.reshape(-1, self.hidden_shape[-1])
        self.hidden_shape_before_permute = x_TH.shape
        self.routing_map = routing_map
        self.counts_E = routing_map.sum(dim=0)
        self.num_tokens = x_TH.shape[0]
        return x_TH, probs

    def token_dispatch(self, x_TH, probs_TE):
        """Split sizes to the host (the dispatch's one device-to-host read: the counts of every
        rank of the EP group, gathered first), NOTE 1 permute sized by them, then NOTE 2: the
        real rows (and their gates) cross the EP group."""
        L, off = self.num_local_experts, self.local_expert_indices[0]
        if self.ep_size > 1:
            counts = comm.all_gather(self.ep_group, self.counts_E.unsqueeze(0)).tolist()
        else:
            counts = [self.counts_E.tolist()]
        mine = counts[self.ep_rank]
        x_RH, probs_R, self.sorted_indices_R = permute(x_TH, self.routing_map, probs_TE,
                                                       sum(mine))
        self.input_splits = [sum(mine[p * L : (p + 1) * L]) for p in range(self.ep_size)]
        # recv_PL[p][l]: rows rank p sends to local expert l of this rank.
        self.recv_PL = [row[off : off + L] for row in counts]
        self.output_splits = [sum(r) for r in self.recv_PL]
        x_QH = comm.all_to_all(self.ep_group, x_RH, self.output_splits, self.input_splits)
        probs_Q = comm.all_to_all(self.ep_group, probs_R, self.output_splits, self.input_splits)

        self._record(
            rows_dispatched=x_RH.shape[0],
            rows_computed=x_QH.shape[0],
            rows_sent_remote=x_RH.shape[0] - self.input_splits[self.ep_rank],
            row_bytes=x_RH.shape[-1] * x_RH.element_size() + probs_R.element_size(),
        )
        return x_QH, probs_Q

    def dispatch_postprocess(self, x_QH, probs_Q):
        """NOTE 3: group received rows by local expert; returns host tokens_per_expert."""
        tokens_per_expert = torch.tensor(
            [sum(self.recv_PL[p][l] for p in range(self.ep_size)) for l in range(self.num_local_experts)],
            dtype=torch.long,
        )
        if self.num_local_experts > 1 and self.ep_size > 1:
            x_QH = _reorder(x_QH, self.recv_PL)
            probs_Q = _reorder(probs_Q, self.recv_PL)
        return x_QH, tokens_per_expert, probs_Q

    # --------------------------------------------------------------------------- combine
    def combine_preprocess(self, y_QH):
        """NOTE 4: undo NOTE 3."""
        if self.num_local_experts > 1 and self.ep_size > 1:
            recv_LP = [list(col) for col in zip(*self.recv_PL)]
            y_QH = _reorder(y_QH, recv_LP)
        return y_QH

    def token_combine(self, y_QH):
        """NOTE 5: rows travel back to the ranks that own their tokens."""
        return comm.all_to_all(self.ep_group, y_QH, self.input_splits, self.output_splits)

    def combine_postprocess(self, y_RH):
        """NOTE 6: sum each token's expert outputs; tokens with no real expert stay exactly 0."""
        out_TH = unpermute(
            y_RH,
            self.sorted_indices_R,
            restore_shape=self.hidden_shape_before_permute,
            routing_map=self.routing_map,
        )
        self.routing_map = None
        return out_TH.view(self.hidden_shape)
