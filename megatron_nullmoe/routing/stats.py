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


def real_per_token(real_picks, tokens):
    """Mean number of real experts a token ran (the realised compute rate): real (token, expert)
    picks over counted tokens, 0 without tokens. Tensors stay on their device (no host read);
    the one definition the router's metrics, the statistics and Megatron-LM's FLOPs use."""
    if isinstance(tokens, torch.Tensor):
        return real_picks / tokens.clamp(min=1.0)
    return real_picks / max(tokens, 1.0)


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
        return real_per_token(self.tokens * self.topk - float(self._get("null_picks")),
                              self.tokens)

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


@dataclass(frozen=True)
class SequenceShard:
    """The part of the decoder sequence that one rank's MoE layers route.

    megatron-core splits the sequence first over context-parallel ranks, load-balanced for causal
    attention: 2 * cp chunks, rank r holding chunks r and 2 * cp - 1 - r
    (`get_batch_on_this_cp_rank`, also inside LLaVA's `_process_embedding_token_parallel`); then,
    with sequence parallelism, the rank's part into tp contiguous pieces over tensor-parallel
    ranks (`scatter_to_sequence_parallel_region`).
    The default is the whole sequence.
    """

    tp_rank: int = 0
    tp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1

    @property
    def parts(self) -> int:
        return self.tp_size * self.cp_size

    def where(self) -> str:
        """For error messages: which part of the sequence this rank routes."""
        if self.parts == 1:
            return ""
        return (f" on this rank, which holds 1/{self.parts} of the sequence (tensor-parallel "
                f"rank {self.tp_rank} of {self.tp_size} with sequence parallelism, "
                f"context-parallel rank {self.cp_rank} of {self.cp_size})")

    def split_rule(self) -> str:
        """For error messages: what the whole sequence length must divide into."""
        rule = []
        if self.cp_size > 1:
            rule.append(f"{2 * self.cp_size} context-parallel chunks")
        if self.tp_size > 1:
            rule.append(f"{self.tp_size} sequence-parallel pieces")
        return f", seq splitting into {', then '.join(rule)}" if rule else ""

    def positions(self, seq_len: int, device=None) -> Optional[torch.Tensor]:
        """Sequence positions this rank holds, in its order; None if seq_len does not split."""
        cp_chunks = 2 * self.cp_size if self.cp_size > 1 else 1
        if seq_len % cp_chunks or (seq_len // self.cp_size) % self.tp_size:
            return None
        chunk = seq_len // cp_chunks
        pos = torch.arange(seq_len, device=device)
        if self.cp_size > 1:
            pos = pos.view(cp_chunks, chunk)[[self.cp_rank, cp_chunks - 1 - self.cp_rank]]
        piece = seq_len // self.parts
        return pos.reshape(-1)[self.tp_rank * piece : (self.tp_rank + 1) * piece]


class RoutingRecorder:
    """One router's statistics: the current vision and padding masks and the running counts.

    The masks are [batch, seq] bool tensors over the whole decoder sequence, as the model's
    caller knows them (`set_vision_mask`). Tokens reach the router flattened from [seq, batch],
    and under sequence or context parallelism only this rank's `shard` of the sequence: masks
    are cut to the shard and transposed before use, here and nowhere else.
    """

    def __init__(self, num_real: int, topk: int, shard: SequenceShard = SequenceShard()):
        self.num_real, self.topk = num_real, topk
        self.shard = shard
        self.vision_mask: Optional[torch.Tensor] = None
        self.pad_mask: Optional[torch.Tensor] = None
        self.counts: Optional[dict[str, torch.Tensor]] = None

    def token_mask(self, mask: Optional[torch.Tensor], num_tokens: int, device
                   ) -> Optional[torch.Tensor]:
        """A [batch, seq] mask in the router's token order ([T] = this rank's [seq, batch]), or
        None. Raises if the mask does not cover the sequence this layer's tokens come from."""
        if mask is None:
            return None
        shard = self.shard
        pos = None
        if mask.dim() == 2 and mask.numel() == num_tokens * shard.parts:
            pos = shard.positions(mask.shape[1], device=mask.device)
        if pos is None:
            raise ValueError(
                f"vision/padding mask has {mask.numel()} entries but this MoE layer routes "
                f"{num_tokens} tokens{shard.where()}; pass a [batch, seq] bool mask of the whole "
                f"decoder sequence ({num_tokens * shard.parts} entries{shard.split_rule()}), not "
                f"one of shape {list(mask.shape)}")
        if shard.parts > 1:
            mask = mask[:, pos]
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

    def clear(self) -> None:
        """Drops the running counts (the masks stay: the model hands them in per batch)."""
        self.counts = None

    def read(self, reset: bool = False) -> Optional[RoutingStats]:
        """Statistics accumulated since the last reset (this rank only), or None."""
        if self.counts is None:
            return None
        stats = RoutingStats(self.topk, {k: v.clone() for k, v in self.counts.items()})
        if reset:
            self.counts = None
        return stats
