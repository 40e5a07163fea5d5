"""Routing statistics: what the router chose, counted so that counts add across steps and ranks.

Counts (not ratios) are what is accumulated and reduced; ratios are derived at read time, so a sum
over micro-batches and ranks gives exact global numbers whatever the token counts per rank.
`RoutingRecorder` is a router's side of it: the masks the model hands in for the next forwards
(vision tokens, padding) and the counts accumulated since the last read.

Shape legend: T tokens, E real experts, K top-k, M modalities (0 = text, 1 = vision).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

MODALITIES = ("text", "vision")


def count_routing(
    index_TK: torch.Tensor,
    num_real: int,
    valid_T: Optional[torch.Tensor] = None,
    vision_T: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Counts one routing decision. Padding tokens (valid_T False) are not counted.

    Returns float64 count tensors:
      tokens [], null_picks [], real_hist [K+1] (tokens by number of real experts),
      expert_tokens [E], modality_tokens [M], modality_null_picks [M].
    """
    topk = index_TK.shape[-1]
    real_T = (index_TK < num_real).sum(dim=-1)
    weight_T = torch.ones_like(real_T, dtype=torch.float64)
    if valid_T is not None:
        weight_T = weight_T * valid_T.reshape(-1).to(torch.float64)
    null_T = (topk - real_T).to(torch.float64)
    real_hist = torch.zeros(topk + 1, dtype=torch.float64, device=index_TK.device)
    real_hist.index_add_(0, real_T, weight_T)
    picks_TK = torch.where(index_TK < num_real, index_TK, torch.full_like(index_TK, num_real))
    expert_tokens = torch.zeros(num_real + 1, dtype=torch.float64, device=index_TK.device)
    expert_tokens.index_add_(0, picks_TK.reshape(-1), weight_T.repeat_interleave(topk))
    if vision_T is None:
        vision_T = torch.zeros_like(real_T, dtype=torch.bool)
    modality_T = vision_T.reshape(-1).long()
    modality_tokens = torch.zeros(len(MODALITIES), dtype=torch.float64, device=index_TK.device)
    modality_tokens.index_add_(0, modality_T, weight_T)
    modality_null = torch.zeros_like(modality_tokens).index_add_(0, modality_T, weight_T * null_T)
    return {
        "tokens": weight_T.sum(),
        "null_picks": (weight_T * null_T).sum(),
        "real_hist": real_hist,
        "expert_tokens": expert_tokens[:num_real],
        "modality_tokens": modality_tokens,
        "modality_null_picks": modality_null,
    }


@dataclass
class RoutingStats:
    """Derived routing statistics of one layer (or summed over layers), from raw counts."""

    topk: int
    counts: dict[str, torch.Tensor] = field(repr=False)

    def _get(self, name: str) -> torch.Tensor:
        return self.counts[name].double().cpu()

    @property
    def tokens(self) -> float:
        return float(self._get("tokens"))

    @property
    def null_fraction(self) -> float:
        """Share of the k picks per token that went to null slots."""
        return float(self._get("null_picks")) / max(self.tokens * self.topk, 1.0)

    @property
    def real_per_token(self) -> float:
        """Mean number of real experts a token ran: the realised compute rate."""
        return self.topk * (1.0 - self.null_fraction)

    @property
    def real_histogram(self) -> list[float]:
        """Fraction of tokens that ran 0, 1, ..., k real experts."""
        hist = self._get("real_hist")
        return (hist / max(float(hist.sum()), 1.0)).tolist()

    @property
    def expert_tokens(self) -> list[float]:
        return self._get("expert_tokens").tolist()

    @property
    def max_over_mean_load(self) -> float:
        """Load imbalance across real experts: max tokens per expert over the mean."""
        load = self._get("expert_tokens")
        mean = float(load.mean()) if load.numel() else 0.0
        return float(load.max()) / mean if mean > 0 else 0.0

    def null_fraction_by_modality(self) -> dict[str, Optional[float]]:
        """Null-slot share per modality; None for a modality that had no tokens."""
        tokens, nulls = self._get("modality_tokens"), self._get("modality_null_picks")
        return {
            name: (float(nulls[i]) / (float(tokens[i]) * self.topk) if tokens[i] > 0 else None)
            for i, name in enumerate(MODALITIES)
        }

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "null_fraction": self.null_fraction,
            "real_per_token": self.real_per_token,
            "real_histogram": self.real_histogram,
            "expert_tokens": self.expert_tokens,
            "max_over_mean_load": self.max_over_mean_load,
            "null_fraction_by_modality": self.null_fraction_by_modality(),
        }

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        if other.topk != self.topk:
            raise ValueError(f"cannot add stats of top-{self.topk} and top-{other.topk} layers")
        keys = set(self.counts) & set(other.counts)
        if self.counts["expert_tokens"].shape != other.counts["expert_tokens"].shape:
            keys.discard("expert_tokens")
        return RoutingStats(self.topk, {k: self._get(k) + other._get(k) for k in keys} | {
            k: self._get(k) for k in set(self.counts) - keys
        })


class RoutingRecorder:
    """One router's statistics: the current vision and padding masks and the running counts.

    The masks are [batch, seq] bool tensors from the model (`set_vision_mask`); tokens reach the
    router flattened from [seq, batch], so they are transposed before use.
    """

    def __init__(self, num_real: int, topk: int):
        self.num_real, self.topk = num_real, topk
        self.vision_mask: Optional[torch.Tensor] = None
        self.pad_mask: Optional[torch.Tensor] = None
        self.counts: Optional[dict[str, torch.Tensor]] = None

    @staticmethod
    def token_mask(mask: Optional[torch.Tensor], num_tokens: int, device) -> Optional[torch.Tensor]:
        """A [batch, seq] mask in the router's token order ([T] = [seq * batch]), or None."""
        if mask is None:
            return None
        if mask.numel() != num_tokens:
            raise ValueError(
                f"vision/padding mask has {mask.numel()} entries but this MoE layer routes "
                f"{num_tokens} tokens; pass a [batch, seq] bool mask for the sequence this layer "
                "sees")
        return mask.to(device=device).transpose(0, 1).reshape(-1)

    def vision_T(self, num_tokens: int, device) -> Optional[torch.Tensor]:
        return self.token_mask(self.vision_mask, num_tokens, device)

    @torch.no_grad()
    def add(self, index_TK: torch.Tensor, pad_T: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Counts one routing decision (padding from the router's input and from the model's
        mask left out), adds it to the running counts and returns it."""
        num_tokens, device = index_TK.shape[0], index_TK.device
        extra_pad_T = self.token_mask(self.pad_mask, num_tokens, device)
        if extra_pad_T is not None:
            pad_T = extra_pad_T if pad_T is None else pad_T | extra_pad_T
        counts = count_routing(index_TK, self.num_real, None if pad_T is None else ~pad_T,
                               self.vision_T(num_tokens, device))
        if self.counts is None:
            self.counts = {k: v.clone() for k, v in counts.items()}
        else:
            for key, value in counts.items():
                self.counts[key] += value
        return counts

    def read(self, reset: bool = False) -> Optional[RoutingStats]:
        """Statistics accumulated since the last reset (this rank only), or None."""
        if self.counts is None:
            return None
        stats = RoutingStats(self.topk, {k: v.clone() for k, v in self.counts.items()})
        if reset:
            self.counts = None
        return stats
