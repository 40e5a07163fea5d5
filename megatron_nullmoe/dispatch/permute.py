"""The permutation of real (token, expert) rows, sized on the host so that nothing waits.

megatron-core's unfused permute finds the selected rows with `masked_select` (0.16.1, a
device-to-host sync per call) or needs their count as `num_out_tokens` (0.17+), which a caller
must read back from the device (another sync per layer). Here the row count R comes from the split sizes the dispatcher already holds on the host,
and a stable sort puts the selected pairs first in expert-major order, the order megatron-core's
`unpermute` (scatter-add by token index) undoes.

Shape legend: T tokens, H hidden, E experts (columns of the map), R selected rows.
"""

from __future__ import annotations

from typing import Optional

import torch


def permute(x_TH: torch.Tensor, map_TE: torch.Tensor, probs_TE: Optional[torch.Tensor],
            num_rows: int):
    """Rows of the pairs `map_TE` selects, grouped by expert, tokens ascending within an
    expert -> (x_RH, probs_R or None, token_R). `num_rows` must equal map_TE.sum()."""
    num_tokens = map_TE.shape[0]
    selected_ET = map_TE.t().reshape(-1).to(torch.int8)  # expert-major flattening
    order_R = torch.argsort(selected_ET, descending=True, stable=True)[:num_rows]
    token_R = order_R % num_tokens
    x_RH = x_TH.index_select(0, token_R)
    probs_R = None
    if probs_TE is not None:
        probs_R = probs_TE.t().reshape(-1).index_select(0, order_R)
    return x_RH, probs_R, token_R
