"""Perplexity on packed windows, and the real experts per token inference ran on them.

A window is seq_length + 1 tokens (as the trainer's jsonl data cuts them, train/data/text.py): the
model reads its first L tokens at positions 0..L-1 and predicts its last L, so every window
contributes L predictions and there is no padding. The mean negative log-likelihood is over all
predicted positions of all windows (natural log); perplexity is its exponential.

`evaluate` runs the exported model (NullMoEForCausalLM, from an export folder or converted in
memory) without a KV cache and reads the real experts per token from the model's own routing
totals: the real (non-null) picks its MoE layers made, per token and MoE layer. `mcore_mean_nll`
computes the same mean through the megatron-core GPTModel's per-token loss, for comparison.

Shape legend: N windows, B windows per batch, L predicted positions (seq_length), V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class EvaluationError(ValueError):
    """A request that cannot be evaluated (no data, windows too long or too few, ...)."""


def _check(windows_NL: torch.Tensor, batch_size: int) -> None:
    if windows_NL.dim() != 2 or windows_NL.shape[0] < 1 or windows_NL.shape[1] < 2:
        raise EvaluationError(f"windows must be [N >= 1, seq_length + 1 >= 2] token ids; got shape "
                         f"{tuple(windows_NL.shape)}")
    if batch_size < 1:
        raise EvaluationError(f"--batch-size {batch_size}: give 1 or more")


def _summary(nll_sum: float, tokens: int, windows: int) -> dict:
    mean = nll_sum / tokens
    perplexity = math.exp(mean) if mean < 700 else float("inf")
    return {"mean_nll": mean, "perplexity": perplexity, "tokens": tokens, "windows": windows}


@torch.no_grad()
def evaluate(hf_model, windows_NL: torch.Tensor, batch_size: int = 8) -> dict:
    """Mean NLL, perplexity, predicted tokens and windows through a NullMoEForCausalLM, plus
    `real_experts_per_token` (MoE-layer mean over every input token; None without MoE layers),
    `real_picks` and `token_layers`. Resets the model's routing totals first."""
    _check(windows_NL, batch_size)
    hf_model.reset_routing_totals()
    nll_sum, tokens = 0.0, 0
    for start in range(0, windows_NL.shape[0], batch_size):
        batch_BL1 = windows_NL[start:start + batch_size].long()
        inputs_BL, targets_BL = batch_BL1[:, :-1], batch_BL1[:, 1:]
        logits_BLV = hf_model(input_ids=inputs_BL, use_cache=False).logits.float()
        nll = F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]),
                              targets_BL.reshape(-1), reduction="none")
        nll_sum += float(nll.double().sum())
        tokens += targets_BL.numel()
    out = _summary(nll_sum, tokens, windows_NL.shape[0])
    totals = hf_model.routing_totals()
    real = totals["real_experts_per_token"]
    out.update(real_experts_per_token=None if math.isnan(real) else real,
               real_picks=totals["real_picks"], token_layers=totals["token_layers"])
    return out


@torch.no_grad()
def mcore_mean_nll(model, windows_NL: torch.Tensor, batch_size: int = 8) -> dict:
    """The same mean NLL (and perplexity, tokens, windows) through a megatron-core GPTModel in
    eval mode: its forward with labels returns the per-token loss [B, L]."""
    _check(windows_NL, batch_size)
    nll_sum, tokens = 0.0, 0
    for start in range(0, windows_NL.shape[0], batch_size):
        batch_BL1 = windows_NL[start:start + batch_size].long()
        inputs_BL, labels_BL = batch_BL1[:, :-1], batch_BL1[:, 1:].contiguous()
        B, L = inputs_BL.shape
        position_ids = torch.arange(L).expand(B, L)
        loss_BL = model(inputs_BL, position_ids, None, labels=labels_BL)
        nll_sum += float(loss_BL.double().sum())
        tokens += labels_BL.numel()
    return _summary(nll_sum, tokens, windows_NL.shape[0])
