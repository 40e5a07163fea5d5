"""Compute-budget control: holds the realised real experts per token at a target.

One scalar bias on the null slots' selection scores (selection only, like megatron-core's
aux-loss-free expert bias: gates never see it) moves by a fixed step after every optimizer step,
up when the step ran more real experts per token than the target, down when fewer. The state
(the bias and the step's [real picks, tokens] counts) lives in the router's buffers, so that it is
checkpointed and moved with the model, and stays float32 / float64 under bf16 wrappers (a bf16
bias stops moving by 0.01 once |bias| >= 4; bf16 counts are inexact above 256). This class is the
rule that reads and updates them; the counts are summed over ranks by the caller, for all routers
in one collective (`model_utils.update_null_budget`).
"""

from __future__ import annotations

import torch


class BudgetControl:
    """The sign-update rule of one router: `target` real experts per token, steps of `rate`."""

    def __init__(self, target: float, rate: float, num_real: int, num_slots: int):
        self.target, self.rate = target, rate
        self.num_real, self.num_slots = num_real, num_slots

    def selection_bias_S(self, null_bias: torch.Tensor) -> torch.Tensor:
        """[S] bias for slot selection: 0 on real experts, the control's bias on null slots."""
        bias_S = torch.zeros(self.num_slots, device=null_bias.device)
        bias_S[self.num_real :] = null_bias
        return bias_S

    @torch.no_grad()
    def step(self, null_bias: torch.Tensor, counts: torch.Tensor) -> None:
        """Moves `null_bias` in place by the sign of (realised - target), from `counts` ([real
        picks, tokens] since the last step, already summed over the ranks whose tokens differ).
        No step without tokens. Runs on the device, reading nothing back to the host."""
        error = counts[0] - self.target * counts[1]
        null_bias += (self.rate * torch.sign(error)).to(null_bias.dtype)
