"""Pure routing math for null-expert MoE: top-k over real + null slots, gates, real-only outputs.

No Megatron imports, no module state: every function takes tensors and returns tensors, so it can
be checked against hand-computed cases and reused by any router. Balancing losses are not here:
the router hands all S slots to megatron-core's own loss functions, so that with Z = 0 they are
TopKRouter's exactly. The balanced expectation k * E / (E + Z) is `flops.expected_real`.

Shape legend: T tokens, H hidden, E real experts, Z null slots, S = E + Z slots, K top-k.
Slots are laid out real first: columns [0, E) are real experts, [E, S) are null slots.

Standalone on purpose (torch and typing only): every Hugging Face export carries this very file
as `routing_math.py`, and its remote code routes with it.
"""

from typing import NamedTuple, Optional

import torch

SCORE_FUNCTIONS = ("softmax", "sigmoid")
GATE_NORMALIZATIONS = ("renormalize", "keep_null_share")
GATE_SCALES = ("none", "slot_ratio")


class SlotRouting(NamedTuple):
    """The outcome of top-k over all S slots, before null picks are dropped.

    picked_TK: at each of the K picks, the value gates are made from: the logit (softmax after
        top-k), the softmax probability over all S slots (pre-softmax), or the sigmoid score.
    index_TK: the chosen slot of each pick.
    """

    picked_TK: torch.Tensor
    index_TK: torch.Tensor


def expand_null_logits(real_TE: torch.Tensor, null_TN: torch.Tensor, num_null: int) -> torch.Tensor:
    """Builds the [T, S] slot logits from real logits and null logits.

    `null_TN` has N = 1 column (the "shared" mode: one learned null logit replicated in all Z slots,
    so it acts as a learned per-token threshold) or N = Z columns ("per_expert" mode, AdaMoE-style).
    """
    if num_null == 0:
        return real_TE
    if null_TN.shape[-1] == 1:
        null_TZ = null_TN.expand(*null_TN.shape[:-1], num_null)
    elif null_TN.shape[-1] == num_null:
        null_TZ = null_TN
    else:
        raise ValueError(
            f"null logits have {null_TN.shape[-1]} columns; expected 1 (shared) or {num_null}"
        )
    return torch.cat([real_TE, null_TZ], dim=-1)


def topk_over_slots(
    logits_TS: torch.Tensor,
    topk: int,
    score_function: str = "softmax",
    pre_softmax: bool = False,
    selection_bias_S: Optional[torch.Tensor] = None,
) -> SlotRouting:
    """Top-k over all slots, as megatron-core's top-k router selects over its experts.

    `selection_bias_S` shifts *which* slots are picked, never the gates (aux-loss-free balancing
    and null budget control). It is added to the logits for softmax and to the sigmoid scores for
    sigmoid, which is where megatron-core adds its expert bias.
    """
    scores_TS, select_TS = selection_values(logits_TS, score_function, selection_bias_S)
    _, index_TK = torch.topk(select_TS, k=topk, dim=-1)
    if score_function == "softmax" and pre_softmax:
        scores_TS = torch.softmax(logits_TS, dim=-1, dtype=torch.float32).type_as(logits_TS)
    return SlotRouting(torch.gather(scores_TS, -1, index_TK), index_TK)


def selection_values(
    logits_TS: torch.Tensor,
    score_function: str = "softmax",
    selection_bias_S: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores_TS, select_TS): the scores gates are made from (the logits for softmax, the
    sigmoid rounded to the logits' dtype, as megatron-core rounds it) and the values top-k
    selects on (scores plus `selection_bias_S`). The one place both are computed, so that
    anything reasoning about which slots get picked sees the very values, dtype and rounding of
    the selection (`unpicked_gap_T`)."""
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function={score_function!r}; valid: {SCORE_FUNCTIONS}")
    if score_function == "softmax":
        scores_TS = logits_TS
    else:
        scores_TS = torch.sigmoid(logits_TS.float()).type_as(logits_TS)
    select_TS = scores_TS if selection_bias_S is None else scores_TS + selection_bias_S
    return scores_TS, select_TS


def unpicked_gap_T(
    logits_TS: torch.Tensor,
    topk: int,
    num_real: int,
    score_function: str = "softmax",
    selection_bias_S: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per token, float64 [T]: its k-th best real selection value minus its best null one, from
    the values `topk_over_slots` selects on with the same bias. Adding less than the smallest gap
    to every null slot's selection bias makes top-k pick real experts only (min(k, E) of them).
    The gap is taken from the rounded selection values themselves: bf16 sigmoid scores lie
    ~2e-3 apart near 0.5, so a gap from unrounded fp32 scores can be wrong by more than any small
    margin."""
    _, select_TS = selection_values(logits_TS, score_function, selection_bias_S)
    kth_T = select_TS[:, :num_real].topk(min(topk, num_real), dim=-1).values[:, -1]
    return kth_T.double() - select_TS[:, num_real:].max(dim=-1).values.double()


def gate_scale_factor(gate_scale: str, num_real: int, num_null: int,
                      score_function: str = "softmax", pre_softmax: bool = False) -> float:
    """The factor `gate_scale` puts on every real gate.

    "slot_ratio": (E + Z) / E on pre-softmax gates, 1 otherwise. Pre-softmax gates are softmax
    probabilities over all E + Z slots, so adding Z null slots shrinks each real gate by about
    E / (E + Z) against the same router over E experts (a uniform router gives 1 / (E + Z)
    against 1 / E); the factor restores the scale the experts' outputs had without null slots.
    Gates normalised over the k picks (top-k then softmax, sigmoid) do not depend on the number
    of slots, and keep factor 1. "none": 1.
    """
    if gate_scale not in GATE_SCALES:
        raise ValueError(f"gate_scale={gate_scale!r}; valid: {GATE_SCALES}")
    if gate_scale == "none" or not num_null or score_function != "softmax" or not pre_softmax:
        return 1.0
    return (num_real + num_null) / num_real


def real_gates(
    routing: SlotRouting,
    num_real: int,
    score_function: str = "softmax",
    pre_softmax: bool = False,
    gate_normalization: str = "renormalize",
    scaling_factor: Optional[float] = None,
) -> torch.Tensor:
    """Real-expert gate of each pick, [T, K] (exactly zero at null picks).

    Base gates follow megatron-core: softmax over the k picked logits (top-k then softmax); the
    all-slot softmax probability (pre-softmax, not renormalised); sigmoid scores divided by their
    sum when k > 1. Then:
    - "renormalize": the null picks' share goes to the real picks in proportion. For top-k-then-
      softmax and sigmoid the null values are masked out before normalising, so the null logit is
      not in the gate graph at all and gets exactly zero task-loss gradient. (Pre-softmax gates
      still depend on it through the all-slot softmax denominator.)
    - "keep_null_share": gates as computed over all k picks; the null share is simply not spent,
      and the task loss reaches the null logit.
    A token whose picks are all null gets zero gates (no routed output), never a NaN.
    """
    if gate_normalization not in GATE_NORMALIZATIONS:
        raise ValueError(
            f"gate_normalization={gate_normalization!r}; valid: {GATE_NORMALIZATIONS}"
        )
    picked_TK, index_TK = routing
    topk = index_TK.shape[-1]
    is_real_TK = index_TK < num_real
    renorm = gate_normalization == "renormalize"
    if score_function == "softmax" and not pre_softmax:
        if renorm:
            any_real_T1 = is_real_TK.any(dim=-1, keepdim=True)
            masked = torch.where(is_real_TK, picked_TK, torch.full_like(picked_TK, float("-inf")))
            picked_TK = torch.where(any_real_T1, masked, torch.zeros_like(picked_TK))
        gates_TK = torch.softmax(picked_TK, dim=-1, dtype=torch.float32).type_as(picked_TK)
    elif score_function == "softmax":
        gates_TK = picked_TK
        if renorm:
            real_sum_T1 = (picked_TK * is_real_TK).sum(dim=-1, keepdim=True)
            safe_T1 = torch.where(real_sum_T1 > 0, real_sum_T1, torch.ones_like(real_sum_T1))
            gates_TK = picked_TK * (picked_TK.sum(dim=-1, keepdim=True) / safe_T1)
    else:
        norm_TK = picked_TK * is_real_TK if renorm else picked_TK
        gates_TK = picked_TK
        if topk > 1:
            norm_T1 = norm_TK.sum(dim=-1, keepdim=True)
            # megatron-core's `sum + 1e-20`; a token with no real pick divides by 1 (no inf grad).
            denom_T1 = torch.where(norm_T1 > 0, norm_T1 + 1e-20, torch.ones_like(norm_T1))
            gates_TK = picked_TK / denom_T1
    gates_TK = gates_TK * is_real_TK
    if scaling_factor:
        gates_TK = gates_TK * scaling_factor
    return gates_TK


def scatter_real(
    gates_TK: torch.Tensor, index_TK: torch.Tensor, num_real: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turns per-pick gates into megatron-core's router outputs over real experts only.

    Returns (probs_TE, routing_map_TE). Null picks are routed to a scratch column that is cut off,
    so they never appear in the map: a null slot never becomes a row anywhere downstream.
    """
    num_tokens = gates_TK.shape[0]
    is_real_TK = index_TK < num_real
    col_TK = torch.where(is_real_TK, index_TK, torch.full_like(index_TK, num_real))
    probs_TE1 = gates_TK.new_zeros(num_tokens, num_real + 1).scatter(1, col_TK, gates_TK)
    map_TE1 = torch.zeros(
        num_tokens, num_real + 1, dtype=torch.bool, device=gates_TK.device
    ).scatter(1, col_TK, is_real_TK)
    return probs_TE1[:, :num_real], map_TE1[:, :num_real]


def slot_map(index_TK: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Boolean [T, S] map of the chosen slots (real and null)."""
    out = torch.zeros(index_TK.shape[0], num_slots, dtype=torch.bool, device=index_TK.device)
    return out.scatter(1, index_TK, True)


def cap_picks(index_TK: torch.Tensor, k_T: torch.Tensor, num_real: int) -> torch.Tensor:
    """Keeps the first k_T[t] picks of token t and turns the others into null picks (slot
    `num_real`), so that gates and scatter treat them as null. Picks are in descending order of
    selection score (torch.topk's order), so token t keeps its k_T[t] best experts. This is the
    modality-fixed control: a fixed number of real experts per token type, with no learned choice.
    """
    keep_TK = torch.arange(index_TK.shape[-1], device=index_TK.device) < k_T.unsqueeze(-1)
    return torch.where(keep_TK, index_TK, torch.full_like(index_TK, num_real))
