"""Model-level helpers: find null-expert routers and dispatchers, read and reduce their stats.

Everything is stored on the modules; these functions only walk the model. Process groups are
passed in: `group` is the set of ranks whose tokens differ (data x context parallel, plus tensor
parallel under sequence parallelism). With group=None the numbers are this rank's.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_nullmoe import collectives
from megatron_nullmoe.config import NullExpertConfigError
from megatron_nullmoe.dispatch import DispatchStats
from megatron_nullmoe.router import NullExpertRouter
from megatron_nullmoe.routing.stats import RoutingStats, SequenceShard, real_per_token


def null_routers(model: torch.nn.Module) -> list[NullExpertRouter]:
    """All null-expert routers of a model (or list of model chunks), in module order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for c in chunks for m in c.modules() if isinstance(m, NullExpertRouter)]


def check_routers(model):
    """Refuses a model whose MoE routers mix megatron-core's stock router and null-expert routers
    while the expert bias is on (e.g. multi-token-prediction layers, which `with_null_experts`
    does not convert): megatron-core updates every router's expert bias in one `torch.stack`,
    which fails on biases of E and E + Z slots. Call once after building the model (the
    trainer and the Megatron-LM builders do); returns the model."""
    from megatron.core.transformer.moe.router import TopKRouter

    chunks = model if isinstance(model, (list, tuple)) else [model]
    sizes: dict[int, list[str]] = {}
    for chunk in chunks:
        for name, m in chunk.named_modules():
            if isinstance(m, TopKRouter) and getattr(m, "enable_expert_bias", False):
                sizes.setdefault(int(m.expert_bias.numel()), []).append(name or type(m).__name__)
    if len(sizes) > 1:
        listed = "; ".join(f"{n} slots: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                           for n, names in sorted(sizes.items()))
        raise NullExpertConfigError(
            "moe_router_enable_expert_bias=True with routers of different slot counts ("
            f"{listed}): megatron-core stacks all routers' expert biases into one tensor. Give "
            "every MoE layer null experts (multi-token-prediction layers are not converted by "
            "with_null_experts), or turn the expert bias off")
    return model


def _dispatchers(model):
    """Null-aware dispatchers (they carry DispatchStats) of all MoE layers, in module order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    found = [getattr(m, "token_dispatcher", None) for c in chunks for m in c.modules()]
    return [d for d in found if isinstance(getattr(d, "stats", None), DispatchStats)]


def sequence_shard(router: NullExpertRouter) -> SequenceShard:
    """Which part of the decoder sequence this router's layer sees, from the process groups the
    router was built with: under sequence parallelism its tensor-parallel group's slice, and its
    context-parallel group's chunks."""
    tp, cp = getattr(router, "tp_group", None), getattr(router, "cp_group", None)
    sp = bool(getattr(router.config, "sequence_parallel", False))
    tp_size = tp.size() if sp and tp is not None else 1
    cp_size = cp.size() if cp is not None else 1
    return SequenceShard(tp_rank=tp.rank() if tp_size > 1 else 0, tp_size=tp_size,
                         cp_rank=cp.rank() if cp_size > 1 else 0, cp_size=cp_size)


def set_vision_mask(
    model, vision_mask_BS: Optional[torch.Tensor], pad_mask_BS: Optional[torch.Tensor] = None
) -> None:
    """Hands every router a [batch, seq] bool mask (True = vision token) for the next forwards,
    and optionally a [batch, seq] padding mask (True = padding) whose tokens stats leave out.

    Both cover the whole decoder sequence (for LLaVA: image tokens + text), the same on every
    tensor- and context-parallel rank; each router keeps them whole and cuts out the tokens it
    routes (`RoutingRecorder.token_mask`, knowing its `sequence_shard`). Used only for
    statistics and the modality-fixed control: the router's logits never see modality, and
    padding given here is still routed (models such as LLaVA do not pass a padding mask to MoE
    layers). None clears.
    """
    for router in null_routers(model):
        router.recorder.shard = sequence_shard(router)
        router.vision_mask = vision_mask_BS
        router.stats_pad_mask = pad_mask_BS


def token_group(model):
    """The ranks whose MoE layers route different tokens: the routers' own tensor x data x
    context parallel group (under sequence parallelism each tensor-parallel rank routes its own
    slice of the sequence; without it the tensor-parallel size is 1). None without routers."""
    routers = null_routers(model)
    return routers[0].tp_dp_cp_group if routers else None


def _reduce(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Sums of float64 copies over `group`, all in one collective."""
    if group is None or not tensors:
        return tensors
    flat = collectives.reduce_tensor(torch.cat([t.reshape(-1).double() for t in tensors]), group)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def routing_stats(model, group=None, reset: bool = False) -> dict:
    """Routing statistics per MoE layer (key: layer number) and summed over layers ("all").

    Counts are summed over `group` (one collective for all layers) before ratios are taken, so
    results are exact globally. Every rank of `group` must call this (it is a collective when
    group is given).
    """
    layers = []
    for i, router in enumerate(null_routers(model)):
        stats = router.routing_stats(reset=reset)
        if stats is not None:
            key = router.layer_number if router.layer_number is not None else i
            layers.append((key, stats, sorted(stats.counts)))
    reduced = iter(_reduce([s.counts[k] for _, s, keys in layers for k in keys], group))
    per_layer = {key: RoutingStats(s.topk, {k: next(reduced) for k in keys})
                 for key, s, keys in layers}
    out: dict = dict(per_layer)
    if per_layer:
        total = None
        for stats in per_layer.values():
            total = stats if total is None else total + stats
        out["all"] = total
    return out


def dispatch_stats(model, group=None, reset: bool = False) -> DispatchStats:
    """Rows and bytes moved by all null-aware dispatchers, summed over layers (and `group`)."""
    total = DispatchStats()
    dispatchers = _dispatchers(model)
    for d in dispatchers:
        for name, value in d.stats.as_dict().items():
            setattr(total, name, getattr(total, name) + value)
        if reset:
            d.stats.reset()
    names = [n for n in total.as_dict() if n != "steps"]
    if group is not None:
        reduced = collectives.reduce_values([getattr(total, n) for n in names], group)
        for n, v in zip(names, reduced):
            setattr(total, n, int(round(v)))
    return total


@torch.no_grad()
def update_null_budget(model) -> list[Optional[float]]:
    """One compute-budget control step for every router; call once per optimizer step, on every
    rank, after the step's forwards.

    Each router's [real picks, tokens] since the last call is summed over the router's own
    `tp_dp_cp_group` (the ranks whose tokens differ), for all routers sharing a group in one
    collective, so every rank's bias moves identically; then the counts restart. Under a
    compute schedule each router's target is that of its `budget_step` (the optimizer steps done
    before the step counted: the same on every rank, and checkpointed), computed on the device,
    and `budget_step` advances by one. Returns each router's realised real experts per token
    over those ranks (None where no token was counted), read to the host once.
    """
    routers = null_routers(model)
    groups: dict[int, tuple] = {}
    for router in routers:
        router.end_start()  # a step that started with no null pick is over
        groups.setdefault(id(router.tp_dp_cp_group), (router.tp_dp_cp_group, []))[1].append(router)
    realised: dict[int, Optional[float]] = {}
    for group, members in groups.values():
        counts_R2 = collectives.reduce_tensor(torch.stack([r.budget_counts for r in members]),
                                              group)
        for router, counts in zip(members, counts_R2):
            router.budget_counts.zero_()
            if router.budget is not None:  # a scheduled target: that of router.budget_step
                router.budget.step(router.null_budget_bias, counts, router.budget_step)
        for router, (real, tokens) in zip(members, counts_R2.tolist()):
            realised[id(router)] = real_per_token(real, tokens) if tokens > 0 else None
    return [realised[id(r)] for r in routers]


def start_null_slots_unpicked(model) -> int:
    """For null slots added to a trained model (its weights loaded, its null state fresh): each
    forward of the next step, in every router with budget control, places the null budget bias
    just below every token's k-th real choice, so that step (each of its micro-batches) picks
    only real experts, as the model without null slots did; `update_null_budget` ends the start,
    and the budget control then releases the bias towards its target (a compute schedule from k
    makes the release gradual). With top-k-then-softmax or sigmoid gates
    the outputs are then the source model's exactly, in both gate normalisations; pre-softmax
    gates still share their softmax with the null logits. Returns how many routers were armed
    (0: no router has budget control, and null slots are live from the first forward)."""
    armed = [r for r in null_routers(model) if r.budget is not None and r.num_null]
    for router in armed:
        router.arm_start()
    return len(armed)
