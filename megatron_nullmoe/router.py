"""NullExpertRouter: megatron-core's TopKRouter over E real experts plus Z zero-compute null slots.

The router holds the logits of all S = E + Z slots, calls the pure math in `routing.math`, and
returns megatron-core's router contract restricted to real experts: (probs [T, E], routing_map
[T, E] bool). Null picks never appear in the map, so downstream they never become rows.

Balancing losses (aux_loss, seq_aux_loss, global_aux_loss), z-loss and the expert bias cover all S
slots: uniform use of slots is what drives the null rate to Z / S. With Z = 0 every output equals
TopKRouter's for the same weights and input.

Shape legend: T tokens, H hidden, E real experts, Z null slots, S = E + Z, K top-k.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    get_default_pg_collection,
    get_tokens_per_expert_and_token_count,
    switch_load_balancing_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_nullmoe import _mcore, collectives
from megatron_nullmoe.config import NullExpertConfig
from megatron_nullmoe.routing import math as rmath
from megatron_nullmoe.routing.budget import BudgetControl, TargetSchedule
from megatron_nullmoe.routing.stats import RoutingRecorder, RoutingStats, real_per_token

def _home_device(config) -> torch.device:
    """Where megatron-core's MoE modules live once built: the current GPU, unless there is none
    or the model is initialised on the CPU (then `model.cuda()` moves it, router included)."""
    if torch.cuda.is_available() and not getattr(config, "use_cpu_initialization", False):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# (load-balancing type, name in megatron-core's tracker, group attribute, group includes DP)
_BALANCING_LOSSES = (
    ("aux_loss", "load_balancing_loss", "tp_cp_group", False),
    ("seq_aux_loss", "seq_load_balancing_loss", "tp_cp_group", False),
    ("global_aux_loss", "global_load_balancing_loss", "tp_dp_cp_group", True),
)


class NullExpertRouter(TopKRouter):
    """Top-k router over real experts and null slots; returns real columns only.

    Built by megatron-core's MoELayer as `router(config=..., pg_collection=...)` (0.17+ adds
    `is_mtp_layer=`, handed on to TopKRouter, which scales an MTP layer's balancing loss by it);
    the null settings are bound with `functools.partial(NullExpertRouter, null_config=...)` (see
    `with_null_experts`).
    """

    def __init__(self, config, pg_collection=None, *, null_config: NullExpertConfig,
                 is_mtp_layer: bool = False):
        null_config.check_once(config)
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection,
                         **_mcore.accepted_kwargs(TopKRouter.__init__, is_mtp_layer=is_mtp_layer))
        self.is_mtp_layer = is_mtp_layer
        self.null_config = null_config
        self.num_real = config.num_moe_experts
        self.num_null = null_config.num_null_experts
        self.num_slots = self.num_real + self.num_null
        # Every real gate's factor: megatron-core's top-k scaling times the null gate scale.
        scale = (config.moe_router_topk_scaling_factor or 1.0) * rmath.gate_scale_factor(
            null_config.gate_scale, self.num_real, self.num_null,
            config.moe_router_score_function, bool(config.moe_router_pre_softmax))
        self.gate_scaling: Optional[float] = None if scale == 1.0 else scale
        # TopKRouter builds its weight on the CPU and moves it to the current GPU in its first
        # gating(); this router puts everything it holds there now, so forward moves nothing.
        # (A weight built elsewhere, e.g. on the meta device for deferred init, stays there.)
        if self.weight.device.type == "cpu":
            home = _home_device(config)
            self.weight.data = self.weight.data.to(home)
            if self.bias is not None:
                self.bias.data = self.bias.data.to(home)
        device = self.weight.device

        self.null_weight = None
        self.null_bias = None
        if null_config.num_null_logits:
            rows = null_config.num_null_logits
            self.null_weight = torch.nn.Parameter(
                torch.empty(rows, config.hidden_size, dtype=torch.float32, device=device)
            )
            if config.add_bias_linear:
                self.null_bias = torch.nn.Parameter(torch.zeros(rows, device=device))
            self._init_null_parameters()

        # megatron-core sizes these by E; with nulls they count all S slots.
        if self.enable_expert_bias:
            self.register_buffer("local_tokens_per_expert", self._zeros(self.num_slots), False)
            self.register_buffer("expert_bias", self._zeros(self.num_slots))
        if self.global_tokens_per_expert is not None:
            self.register_buffer("global_tokens_per_expert", self._zeros(self.num_slots), False)

        # Compute-budget control: a selection bias on null slots and the step's [real picks,
        # tokens], in buffers so that they are checkpointed and moved with the model. With a
        # compute schedule, also the optimizer steps the control has taken (`budget_step`,
        # checkpointed: the schedule's position on resume). Only scheduled routers have it, so
        # that checkpoints of routers without a schedule keep exactly the keys they always had.
        self.budget: Optional[BudgetControl] = None
        schedule = None
        if self.num_null and null_config.target_real_per_token is not None:
            if null_config.target_scheduled:
                schedule = TargetSchedule(null_config.target_start_real_per_token,
                                          null_config.target_real_per_token,
                                          null_config.target_schedule_steps,
                                          null_config.target_schedule)
            self.budget = BudgetControl(null_config.target_real_per_token,
                                        null_config.budget_update_rate, self.num_real,
                                        self.num_slots, schedule)
            self.register_buffer("null_budget_bias", self._zeros(()))
        else:
            self.null_budget_bias = None
        if schedule is not None:
            self.register_buffer("budget_step", self._zeros((), torch.float64))
        else:
            self.budget_step = None
        self.register_buffer("budget_counts", self._zeros(2, torch.float64), False)
        self.recorder = RoutingRecorder(self.num_real, self.topk)
        # Set by `start_null_slots_unpicked` (null slots added to a trained model): each forward
        # of the next step first places the budget bias just below every token's k-th real
        # choice; `end_start` (from `update_null_budget`, at the step's end) stops it.
        self.start_unpicked = False
        self._start_placed = False
        self._null_state_built = True

    # Router.__init__ calls reset_parameters before this class has built its state.
    _null_state_built = False

    def reset_parameters(self) -> None:
        """Puts every parameter and buffer back to its construction value: megatron-core's weight
        and bias by its own rule, the null rows by `_init_null_parameters` (the layer's seeded
        draw or zero, as `null_init` says), the null bias and every buffer (budget bias, step
        and counts, expert bias and token counts, global balancing counts) to zero, and the
        routing statistics cleared. Megatron-FSDP's meta-device initialisation builds the model
        on the meta device, materialises it with uninitialised memory and then calls this on each
        module, so anything left out here would start as garbage. Every buffer of this router
        starts at zero; `tests/test_router_init.py` checks that against a freshly built one."""
        super().reset_parameters()
        if not self._null_state_built:
            return
        if self.null_weight is not None:
            self._init_null_parameters()
        with torch.no_grad():
            if self.null_bias is not None:
                self.null_bias.zero_()
            for buf in self._buffers.values():
                if buf is not None:
                    buf.zero_()
        self.recorder.clear()

    def set_layer_number(self, layer_number: int) -> None:
        """megatron-core numbers a router's layer after building it: the null rows are drawn
        again from their layer's stream."""
        super().set_layer_number(layer_number)
        if self.null_weight is not None:
            self._init_null_parameters()

    @property
    def budget_control(self) -> bool:
        return self.budget is not None

    def budget_target(self):
        """The budget target of the next optimizer step: a float64 scalar on the router's device
        with a compute schedule (from `budget_step`, not read to the host), the constant target
        (a float) without one, None without budget control."""
        return None if self.budget is None else self.budget.target_for(self.budget_step)

    # The model hands these in before each forward (`set_vision_mask`); statistics use them, and
    # the modality-fixed control reads the vision mask.
    @property
    def vision_mask(self) -> Optional[torch.Tensor]:
        return self.recorder.vision_mask

    @vision_mask.setter
    def vision_mask(self, mask: Optional[torch.Tensor]) -> None:
        self.recorder.vision_mask = mask

    @property
    def stats_pad_mask(self) -> Optional[torch.Tensor]:
        return self.recorder.pad_mask

    @stats_pad_mask.setter
    def stats_pad_mask(self, mask: Optional[torch.Tensor]) -> None:
        self.recorder.pad_mask = mask

    def _zeros(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.weight.device)

    def _init_null_parameters(self) -> None:
        """Null rows draw from a random stream of their own, seeded by the run's seed and the
        layer number, and leave the model's stream untouched: with one seed, every parameter a
        model without null slots has starts bit-equal in every variant (so paired comparisons
        cancel the initialisation), and the null rows differ from layer to layer. With
        `null_init="zero"` they start at zero (a null logit of 0 for every token)."""
        on_meta = self.null_weight.device.type == "meta"
        if self.null_config.null_init == "zero" and not on_meta:
            with torch.no_grad():
                self.null_weight.zero_()
        elif self.config.perform_initialization and not on_meta:
            devices = [self.null_weight.device] if self.null_weight.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(null_init_seed(torch.initial_seed(), self.layer_number))
                self.config.init_method(self.null_weight)
        self.null_weight.data = self.null_weight.data.to(dtype=self.config.params_dtype)
        setattr(self.null_weight, "sequence_parallel", self.config.sequence_parallel)
        if self.null_bias is not None:
            self.null_bias.data = self.null_bias.data.to(dtype=self.config.params_dtype)
            setattr(self.null_bias, "sequence_parallel", self.config.sequence_parallel)

    # ----------------------------------------------------------------------------- logits
    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Slot logits [..., S] in the router dtype."""
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype, input.dtype
        )
        weight, bias = self.weight, self.bias
        if self.null_weight is not None:
            weight = torch.cat([self.weight, self.null_weight.to(self.weight.dtype)])
            if bias is not None:
                bias = torch.cat([self.bias, self.null_bias.to(self.bias.dtype)])
        logits = _mcore.gating_linear(input, weight, bias, dtype)
        if self.null_weight is None:
            return logits
        return rmath.expand_null_logits(
            logits[..., : self.num_real], logits[..., self.num_real :], self.num_null
        )

    def arm_start(self) -> None:
        """The next step's forwards pick no null slot (see `_place_budget_bias_below_real`)."""
        self.start_unpicked, self._start_placed = True, False

    def end_start(self) -> None:
        """The step that started unpicked is over: budget control alone moves the bias now."""
        self.start_unpicked, self._start_placed = False, False

    def selection_bias(self, without_budget: bool = False) -> Optional[torch.Tensor]:
        """Bias on slot selection only: expert bias (sigmoid) plus the null budget bias (as 0
        with `without_budget`)."""
        bias = self.expert_bias if self.enable_expert_bias else None
        if self.budget is not None:
            null_S = self.budget.selection_bias_S(
                torch.zeros_like(self.null_budget_bias) if without_budget
                else self.null_budget_bias)
            bias = null_S if bias is None else bias + null_S
        return bias

    # ---------------------------------------------------------------------------- routing
    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Top-k over S slots -> (probs [T, E], routing_map [T, E]); attaches balancing losses.

        padding_mask ([seq, batch], True = padding) removes tokens from losses, expert-bias counts,
        budget control and statistics; padding tokens are still routed, as in TopKRouter.
        """
        seq_length, bsz = logits.shape[:2]
        logits_TS = logits.reshape(-1, self.num_slots)
        pad_T = padding_mask.reshape(-1) if padding_mask is not None else None
        logits_TS = self.apply_z_loss(logits_TS, padding_mask=pad_T)
        if self.start_unpicked:
            self._place_budget_bias_below_real(logits_TS)

        routing = rmath.topk_over_slots(
            logits_TS,
            self.topk,
            score_function=self.score_function,
            pre_softmax=self.config.moe_router_pre_softmax,
            selection_bias_S=self.selection_bias(),
        )
        if self.null_config.modality_topk is not None:
            routing = routing._replace(index_TK=rmath.cap_picks(
                routing.index_TK, self._modality_topk_T(logits_TS.shape[0]), self.num_real))
        gates_TK = rmath.real_gates(
            routing,
            self.num_real,
            score_function=self.score_function,
            pre_softmax=self.config.moe_router_pre_softmax,
            gate_normalization=self.null_config.gate_normalization,
            scaling_factor=self.gate_scaling,
        )
        probs_TE, map_TE = rmath.scatter_real(gates_TK, routing.index_TK, self.num_real)

        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            probs_TE = self._attach_balancing_losses(probs_TE, logits_TS, pad_T, seq_length, bsz)
        # capped picks (modality-fixed control) sit in slot num_slots: counted as taking no slot
        slots_TS = rmath.slot_map(routing.index_TK, self.num_slots + 1)[:, : self.num_slots]
        self._apply_expert_bias(slots_TS, padding_mask=pad_T)
        self._record(routing.index_TK, pad_T)
        return probs_TE, map_TE

    @torch.no_grad()
    def _place_budget_bias_below_real(self, logits_TS: torch.Tensor) -> None:
        """Null slots added to a trained model start unpicked: the budget bias goes to
        `START_MARGIN` below the smallest gap, over this forward's tokens on every rank of the
        router's token group (one collective, on the logits' device), between a token's k-th real
        selection value and its best null one, taken from the values selection compares (in the
        router dtype, bf16 sigmoid rounding included: `rmath.unpicked_gap_T`). Every forward
        of the first step (each micro-batch) places it, lower where its tokens need it, so the
        whole step picks exactly what the model without null slots picks (and so, with
        top-k-then-softmax or sigmoid gates, computes what it computes); `update_null_budget`
        ends the start at the step's end, and the budget control releases the bias from there."""
        if self.budget is None or not self.num_null:
            self.start_unpicked = False
            return
        gap_T = rmath.unpicked_gap_T(logits_TS, self.topk, self.num_real, self.score_function,
                                     self.selection_bias(without_budget=True))
        gap = gap_T.min() if gap_T.numel() else torch.tensor(0.0, dtype=torch.float64,
                                                              device=gap_T.device)
        gap = collectives.reduce_tensor(gap.reshape(1), self.tp_dp_cp_group, op="min")[0]
        bias = (gap - START_MARGIN).to(self.null_budget_bias.device, self.null_budget_bias.dtype)
        if self._start_placed:  # a later micro-batch of the first step: only ever lower
            bias = torch.minimum(bias, self.null_budget_bias)
        self.null_budget_bias.copy_(bias)
        self._start_placed = True

    def _attach_balancing_losses(self, probs_TE, logits_TS, pad_T, seq_length, bsz):
        """Switch-style losses over all S slots, through megatron-core's own loss functions."""
        map_TS, scores_TS = compute_routing_scores_for_aux_loss(
            logits_TS, self.topk, self.score_function, fused=False, padding_mask=pad_T
        )
        for kind, name, group_attr, group_has_dp in _BALANCING_LOSSES:
            coeff = self.get_aux_loss_coeff(kind)
            if coeff == 0:
                continue
            group = getattr(self, group_attr)
            per_seq = kind == "seq_aux_loss"
            m_TS = map_TS.reshape(seq_length, -1) if per_seq else map_TS
            s_TS = scores_TS.reshape(seq_length, -1) if per_seq else scores_TS
            counts_S, local_tokens, total_tokens = get_tokens_per_expert_and_token_count(
                routing_map=m_TS,
                reduce_group=group,
                topk=self.topk * (bsz if per_seq else 1),
                with_padding_mask=pad_T is not None,
            )
            if kind == "global_aux_loss":
                self.global_tokens_per_expert += counts_S
                self.ga_steps += 1
                counts_S = self.global_tokens_per_expert / self.ga_steps
            loss = switch_load_balancing_loss_func(
                probs=s_TS,
                tokens_per_expert=counts_S,
                total_num_tokens=total_tokens,
                topk=self.topk,
                num_experts=self.num_slots,
                moe_aux_loss_coeff=coeff,
                fused=False,
            )
            if per_seq:
                loss = loss / bsz
            probs_TE = self.attach_and_log_load_balancing_loss(
                probs_TE, coeff, loss, name, group,
                valid_token_count=local_tokens, **_mcore.dp_avg_kwargs(group_has_dp),
            )
        return probs_TE

    def _modality_topk_T(self, num_tokens: int) -> torch.Tensor:
        """Real experts each token keeps under the modality-fixed control, from the vision mask."""
        vision_T = self.recorder.vision_T(num_tokens, self.weight.device)
        if vision_T is None:
            raise RuntimeError(
                "vision_topk/text_topk (the modality-fixed control) need the batch's vision mask: "
                "call megatron_nullmoe.set_vision_mask(model, vision_BS) before each forward")
        k_vision, k_text = self.null_config.modality_topk
        return torch.where(vision_T, k_vision, k_text)

    def _apply_expert_bias(self, routing_map, padding_mask=None):
        """Counts slot use for aux-loss-free balancing (updated by the training loop).

        Overrides megatron-core 0.16.1, whose version broadcasts the [T] padding mask against the
        last ([S]) dimension of the map and fails whenever padding is given.
        """
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & (~padding_mask).unsqueeze(-1)
                self.local_tokens_per_expert += routing_map.sum(dim=0)

    # ------------------------------------------------------------------------ statistics
    def _record(self, index_TK: torch.Tensor, pad_T: Optional[torch.Tensor]) -> None:
        """Counts each training token's routing once: statistics, the budget control's counts and
        megatron-core's per-layer metrics. Under activation recomputation the first forward of a
        layer runs without grad and the recompute (in backward) with grad, so only the pass with
        grad is counted, as it is where the balancing losses attach. In eval mode every forward
        counts."""
        if self.training and not torch.is_grad_enabled():
            return
        counts = self.recorder.add(index_TK, pad_T)
        if not self.training:
            return
        with torch.no_grad():
            real_picks = counts["tokens"] * self.topk - counts["null_picks"]
            self.budget_counts += torch.stack([real_picks, counts["tokens"]])
            if self.layer_number is None:
                return
            # megatron-core files MTP layers after the decoder layers in its tracker
            layer = self.layer_number + (self.config.num_layers if self.is_mtp_layer else 0)
            real = real_per_token(real_picks, counts["tokens"])
            null_share = counts["null_picks"] / (counts["tokens"].clamp(min=1.0) * self.topk)
            for name, value in (("null_slot_fraction", null_share),
                                ("real_experts_per_token", real)):
                _mcore.record_metric(name, value.float(), layer, self.config, self.tp_dp_cp_group)

    def routing_stats(self, reset: bool = False) -> Optional[RoutingStats]:
        """Routing statistics accumulated since the last reset, on this rank only."""
        return self.recorder.read(reset)

    # -------------------------------------------------------------------- exact state
    def _apply(self, fn, *args, **kwargs):
        """Device moves apply to every tensor; dtype casts (`Float16Module` calls `.bfloat16()`
        on the whole model, buffers included) skip the state that must stay exact: the budget
        bias, counts and step and the expert-bias state keep their dtype and their exact values."""
        exact = {name: buf for name, buf in self._buffers.items()
                 if name in EXACT_BUFFERS and buf is not None}
        out = super()._apply(fn, *args, **kwargs)
        for name, before in exact.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(device=after.device)
        return out


# How far below the smallest (k-th real - best null) selection gap a switched-on router's budget
# bias starts: clear of rounding, and little enough for the budget control to release quickly.
START_MARGIN = 1e-3

# Router buffers whose dtype no cast may change: counts must add exactly and a bias must still
# move by a small step when it is large.
EXACT_BUFFERS = ("null_budget_bias", "budget_counts", "budget_step", "expert_bias",
                 "local_tokens_per_expert", "global_tokens_per_expert")


def null_init_seed(run_seed: int, layer_number: Optional[int]) -> int:
    """The seed of a layer's null rows: apart from the model's stream and from other layers'."""
    return (run_seed * 1_000_003 + 7_919 * (layer_number or 0) + 0x6E756C6C) % (2**63)


def null_router(null_config: NullExpertConfig):
    """Router builder for `MoESubmodules.router`: called as builder(config=, pg_collection=)
    (and, from megatron-core 0.17, is_mtp_layer=)."""
    return functools.partial(NullExpertRouter, null_config=null_config)
