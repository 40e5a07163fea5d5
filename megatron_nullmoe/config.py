"""The plugin's own knobs, and the one place where they are checked against a TransformerConfig.

Every error names the field, the value it had, and what would be valid. Nothing falls back
silently: a megatron-core MoE option whose code path assumes exactly `moe_router_topk` rows per
token (capacity, padding, fused permute, DeepEP metadata, static CUDA graphs) is refused.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from megatron_nullmoe.dispatch import DISPATCHERS
from megatron_nullmoe.errors import NullMoEError
from megatron_nullmoe.routing.math import GATE_NORMALIZATIONS, GATE_SCALES  # the math defines them

NULL_LOGIT_MODES = ("shared", "per_expert")
NULL_INITS = ("normal", "zero")
TARGET_SCHEDULES = ("linear", "cosine")
SUPPORTED_DISPATCHERS = tuple(DISPATCHERS)  # the names with a null-aware dispatcher


# What a field meant in a config or checkpoint that does not name it (written before the field
# existed, or a plain Megatron-LM run): an older run resumes, exports and evaluates as it
# trained, whatever the field's default is now. gate_normalization was "renormalize" by default
# until 2026-12.
BEFORE_FIELD = {"gate_normalization": "renormalize", "gate_scale": "none"}

# (id of a TransformerConfig, NullExpertConfig) -> that TransformerConfig, for `check_once`
_CHECKED: dict[tuple[int, "NullExpertConfig"], weakref.ref] = {}


class NullExpertConfigError(NullMoEError, ValueError):
    """A null-expert setting, or a megatron-core setting that null experts cannot honour."""

    what = "config error"


def _fail(name: str, value: Any, valid: str) -> None:
    raise NullExpertConfigError(f"{name}={value!r} is not valid with null experts: {valid}")


def _knob(default: Any, help: str, **check: Any) -> Any:
    """A field with what every front end shows of it: the help text, and `choices`, `min` or
    `above` for the range. The recipe loader (run/config.py) and the Megatron-LM flags
    (megatron_lm/args.py) are built from these fields; this class's own checks are the authority."""
    return field(default=default, metadata={"help": help, **check})


@dataclass(frozen=True)
class NullExpertConfig:
    """Null-expert settings of a MoE layer.

    num_null_experts: Z, the number of zero-compute slots added to the E real experts. The router
        takes top-k over E + Z slots; each token runs between 0 and k real experts.
    null_logits: "shared" (default): one learned router row gives one null logit per token,
        replicated in the Z slots (a learned threshold). "per_expert": Z router rows (AdaMoE).
    null_init: the null rows' starting values. "normal" (default): the model's init_method, as the
        real experts' router rows, from a random stream of their own (so every other parameter
        starts as it would without null slots). "zero": every null logit starts at 0 for every
        token, a flat threshold, and the seed no longer draws which tokens skip experts at the
        start (per_expert rows then start tied, and top-k breaks the tie by slot order).
    gate_normalization: "keep_null_share" (default): the null picks' share is dropped, and the
        task loss reaches the null logit. "renormalize": real gates take over the null picks'
        share, so the null logit gets no task-loss gradient (only the balancing and z losses
        shape it).
    gate_scale: "slot_ratio" (default): pre-softmax gates (probabilities over all E + Z slots)
        times (E + Z) / E, the scale a real gate has over E experts alone
        (`routing.math.gate_scale_factor`); gates normalised over the k picks (post-softmax,
        sigmoid) are left as they are. "none": gates as computed. It multiplies with
        megatron-core's moe_router_topk_scaling_factor.
        These two defaults are the gate rule that won the text study (BENCHMARKS.md, issue 17);
        until 2026-12 they were "renormalize" and "none". Saved configs, run folders and
        checkpoints name both fields, so an older run resumes, exports and evaluates as it
        trained; one that names neither reads the old values (`BEFORE_FIELD`).
    target_real_per_token: optional compute-budget control. When set, a bias on the null slots is
        moved every step so that the realised mean number of real experts per token tracks this
        target (in (0, k]). Off by default.
    budget_update_rate: step size of that bias per update (sign update, as aux-loss-free bias).
    target_start_real_per_token, target_schedule_steps, target_schedule: a compute schedule for
        that target. With a start, the target moves from `target_start_real_per_token` (at
        optimizer step 0) to `target_real_per_token` (reached at step `target_schedule_steps`,
        constant after), linearly or along a half cosine (`target_at`). None (default): the
        target is constant.
    vision_topk, text_topk: the modality-fixed control (no null slots): vision tokens keep their
        best `vision_topk` real experts and text tokens their best `text_topk`, out of the router's
        top-k. Needs the model's vision mask at every forward (`set_vision_mask`; the trainer
        does this). A fixed rule against which the learned null allocation is compared.
    """

    num_null_experts: int = _knob(
        0, "Z zero-compute null slots added to the E real experts; top-k is taken over E + Z "
        "slots (0: standard MoE)", min=0)
    null_logits: str = _knob(
        "shared", "shared: one learned null logit replicated in the Z slots; per_expert: one "
        "router row per null slot (AdaMoE)", choices=NULL_LOGIT_MODES)
    null_init: str = _knob(
        "normal", "the null rows' starting values: normal: the model's init_method, as a real "
        "expert's router row; zero: every null logit starts at 0 (a flat threshold)",
        choices=NULL_INITS)
    gate_normalization: str = _knob(
        "keep_null_share", "keep_null_share: the null picks' share is dropped (the task loss "
        "reaches the null logit); renormalize: real gates take over the null share",
        choices=GATE_NORMALIZATIONS)
    gate_scale: str = _knob(
        "slot_ratio", "slot_ratio: pre-softmax gates (over all E + Z slots) x (E + Z) / E, the "
        "scale of a gate over E experts alone; none: as computed", choices=GATE_SCALES)
    target_real_per_token: Optional[float] = _knob(
        None, "compute-budget control: hold the realised real experts per token at this value "
        "(in (0, top-k]); off by default", above=0)
    budget_update_rate: float = _knob(
        1e-2, "step size of the budget-control bias per optimizer step", above=0)
    target_start_real_per_token: Optional[float] = _knob(
        None, "compute schedule: the budget target at step 0 (in (0, top-k]), moving to "
        "target_real_per_token over target_schedule_steps optimizer steps; None: constant target",
        above=0)
    target_schedule_steps: int = _knob(
        0, "compute schedule: optimizer steps from target_start_real_per_token to "
        "target_real_per_token (constant after); needs a start when >= 1", min=0)
    target_schedule: str = _knob(
        "linear", "compute schedule's shape: linear, or cosine (a half cosine from the start to "
        "the end)", choices=TARGET_SCHEDULES)
    vision_topk: Optional[int] = _knob(
        None, "modality-fixed control (no null slots): real experts each vision token keeps "
        "(with text_topk)", min=0)
    text_topk: Optional[int] = _knob(
        None, "modality-fixed control: real experts each text token keeps (with vision_topk)",
        min=0)

    def __post_init__(self) -> None:
        if isinstance(self.num_null_experts, bool) or not isinstance(self.num_null_experts, int):
            _fail("num_null_experts", self.num_null_experts, "an integer >= 0")
        if self.num_null_experts < 0:
            _fail("num_null_experts", self.num_null_experts, "an integer >= 0")
        if self.null_logits not in NULL_LOGIT_MODES:
            _fail("null_logits", self.null_logits, f"one of {NULL_LOGIT_MODES}")
        if self.null_init not in NULL_INITS:
            _fail("null_init", self.null_init, f"one of {NULL_INITS}")
        if self.gate_normalization not in GATE_NORMALIZATIONS:
            _fail("gate_normalization", self.gate_normalization, f"one of {GATE_NORMALIZATIONS}")
        if self.gate_scale not in GATE_SCALES:
            _fail("gate_scale", self.gate_scale, f"one of {GATE_SCALES}")
        if self.target_real_per_token is not None and not self.target_real_per_token > 0:
            _fail("target_real_per_token", self.target_real_per_token, "None or a number > 0")
        if not self.budget_update_rate > 0:
            _fail("budget_update_rate", self.budget_update_rate, "a number > 0")
        self._check_schedule()
        for name in ("vision_topk", "text_topk"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                _fail(name, value, "None or an integer >= 0")
        if (self.vision_topk is None) != (self.text_topk is None):
            _fail("vision_topk" if self.vision_topk is None else "text_topk", None,
                  "set vision_topk and text_topk together (the modality-fixed control), or neither")
        if self.modality_topk is not None and self.num_null_experts:
            _fail("num_null_experts", self.num_null_experts,
                  "0 with vision_topk/text_topk: the modality-fixed control has no null slots")

    def _check_schedule(self) -> None:
        start, steps = self.target_start_real_per_token, self.target_schedule_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            _fail("target_schedule_steps", steps, "an integer >= 0")
        if self.target_schedule not in TARGET_SCHEDULES:
            _fail("target_schedule", self.target_schedule, f"one of {TARGET_SCHEDULES}")
        if start is None:
            if steps:
                _fail("target_schedule_steps", steps,
                      "0 without target_start_real_per_token: a schedule needs its start (set "
                      "target_start_real_per_token), or give 0 for a constant target")
            if self.target_schedule != "linear":
                _fail("target_schedule", self.target_schedule,
                      "'linear' (the default) without target_start_real_per_token: the shape "
                      "of a schedule needs its start (set target_start_real_per_token)")
            return
        if not start > 0:
            _fail("target_start_real_per_token", start, "None or a number > 0")
        if self.target_real_per_token is None:
            _fail("target_start_real_per_token", start,
                  "None without target_real_per_token: the schedule moves the budget target "
                  "from this start to target_real_per_token (its end); set both, or neither")
        if steps < 1:
            _fail("target_schedule_steps", steps,
                  "an integer >= 1 with target_start_real_per_token (the optimizer steps from "
                  "the start to target_real_per_token)")

    @property
    def target_scheduled(self) -> bool:
        """Whether the budget target follows a schedule (else it is constant)."""
        return self.target_start_real_per_token is not None

    def target_at(self, step: int) -> float:
        """The budget target (real experts per token) of the optimizer step that follows `step`
        steps done: the start at step 0, `target_real_per_token` from `target_schedule_steps` on
        (and at every step without a schedule). Linear: start + (end - start) * step / steps;
        cosine: start + (end - start) * (1 - cos(pi * step / steps)) / 2. The routers compute
        the same on the device (`routing.budget.BudgetControl.target_for`)."""
        end = self.target_real_per_token
        if end is None:
            _fail("target_real_per_token", None, "a number > 0 for a budget target")
        if step < 0:
            raise ValueError(f"step={step!r}: give the optimizer steps done so far (>= 0)")
        if not self.target_scheduled or step >= self.target_schedule_steps:
            return float(end)
        start, frac = self.target_start_real_per_token, step / self.target_schedule_steps
        if self.target_schedule == "linear":
            weight = frac
        else:
            weight = 0.5 * (1.0 - math.cos(math.pi * frac))
        return start + (end - start) * weight

    def mean_target(self, total_steps: int, first_step: int = 0) -> float:
        """The budget target averaged over optimizer steps first_step .. total_steps - 1 (each
        step routes the same number of tokens): a run's planned real experts per token, for FLOP
        planning (`mean_target(steps)`), or an interval's (`mean_target(b, first_step=a)`)."""
        if total_steps <= first_step:
            raise ValueError(f"mean_target(total_steps={total_steps!r}, first_step={first_step!r})"
                             ": give at least one step (total_steps > first_step)")
        if not self.target_scheduled:
            return self.target_at(first_step)
        ramp_end = min(total_steps, max(first_step, self.target_schedule_steps))
        total = math.fsum(self.target_at(s) for s in range(first_step, ramp_end))
        total += (total_steps - ramp_end) * self.target_at(ramp_end)
        return total / (total_steps - first_step)

    @property
    def modality_topk(self) -> Optional[tuple[int, int]]:
        """(vision, text) real experts per token of the modality-fixed control, or None."""
        if self.vision_topk is None:
            return None
        return self.vision_topk, self.text_topk

    @property
    def num_null_logits(self) -> int:
        """Router rows the null slots need: 1 when shared, Z per expert, 0 without nulls."""
        if self.num_null_experts == 0:
            return 0
        return 1 if self.null_logits == "shared" else self.num_null_experts

    def check_once(self, config: Any) -> None:
        """`check`, unless this pair was checked already: every router of a model is built with
        the same TransformerConfig object, so a model's routers check it once between them."""
        key = (id(config), self)
        seen = _CHECKED.get(key)
        if seen is not None and seen() is config:
            return
        self.check(config)
        _CHECKED[key] = weakref.ref(config, lambda _, key=key: _CHECKED.pop(key, None))

    def check(self, config: Any) -> None:
        """Checks this config against a megatron-core TransformerConfig; raises on conflicts."""
        num_experts = config.num_moe_experts
        topk = config.moe_router_topk
        if not num_experts:
            _fail("num_moe_experts", num_experts, "null experts need a MoE layer (>= 1 experts)")
        num_slots = num_experts + self.num_null_experts
        if topk > num_slots:
            _fail(
                "moe_router_topk",
                topk,
                f"at most num_moe_experts + num_null_experts = {num_experts} + "
                f"{self.num_null_experts} = {num_slots}",
            )
        if self.target_real_per_token is not None and self.target_real_per_token > topk:
            _fail("target_real_per_token", self.target_real_per_token, f"in (0, top-k={topk}]")
        start = self.target_start_real_per_token
        if start is not None and start > topk:
            _fail("target_start_real_per_token", start,
                  f"in (0, top-k={topk}] (the schedule's start, like target_real_per_token)")
        if (self.target_real_per_token is not None and self.num_null_experts
                and getattr(config, "moe_router_enable_expert_bias", False)):
            _fail("target_real_per_token", self.target_real_per_token,
                  "None with moe_router_enable_expert_bias=True: the expert bias and the "
                  "compute-budget control would both steer the null slots toward different "
                  "targets and drift without limit; use one of them (the expert bias balances "
                  "slot use, budget control holds real experts per token)")
        if self.modality_topk is not None and max(self.modality_topk) > topk:
            name = "vision_topk" if self.vision_topk > topk else "text_topk"
            _fail(name, getattr(self, name), f"at most moe_router_topk={topk} (kept out of top-k)")
        if config.moe_token_dispatcher_type not in SUPPORTED_DISPATCHERS:
            _fail(
                "moe_token_dispatcher_type",
                config.moe_token_dispatcher_type,
                f"one of {SUPPORTED_DISPATCHERS} (flex/DeepEP metadata assumes top-k real rows "
                "per token)",
            )
        lb = config.moe_router_load_balancing_type
        lb_types = lb if isinstance(lb, list) else [lb]
        valid_lb = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
        for kind in lb_types:
            if kind not in valid_lb:
                _fail("moe_router_load_balancing_type", lb, f"a subset of {valid_lb}")
        refused = {
            "moe_expert_capacity_factor": (None, "None (dropless); capacity assumes T*topk rows"),
            "moe_pad_expert_input_to_capacity": (False, "False; padding creates non-real rows"),
            "moe_router_num_groups": (None, "None; group-limited routing is not supported"),
            "moe_router_group_topk": (None, "None; group-limited routing is not supported"),
            "moe_permute_fusion": (False, "False; the fused permute allocates static T*topk rows"),
            "moe_router_fusion": (False, "False; the fused top-k kernel knows only real experts"),
            "moe_router_padding_for_quantization": (False, "False; padding rows are not real"),
            "moe_shared_expert_overlap": (False, "False; not implemented in null dispatchers"),
            "moe_enable_routing_replay": (False, "False; replay records top-k over real experts"),
            "moe_router_force_load_balancing": (False, "False; random logits skip null slots"),
            "moe_router_force_biased": (None, "None; biased random logits skip null slots"),
            "expert_tensor_parallel_size": (1, "1; expert tensor parallelism is not supported "
                                            "(megatron-core defaults it to the tensor-parallel "
                                            "size; Megatron-LM: --expert-tensor-parallel-size 1)"),
            "overlap_moe_expert_parallel_comm": (False, OVERLAP_REFUSED),
        }
        for name, (allowed, why) in refused.items():
            value = getattr(config, name, allowed)
            if value != allowed and not (allowed is False and not value):
                _fail(name, value, why)
        graphed = _graphed_moe_scope(config)
        if graphed is not None:
            _fail("cuda_graph_impl", config.cuda_graph_impl,
                  f"'none', or a scope that leaves the MoE layers out (graphs assume a static row "
                  f"count per step): here {graphed[0]}={graphed[1]} graphs them"
                  f"{'' if graphed[1] else ' (empty: the whole layer)'}. "
                  f"Keep to {'/'.join(GRAPH_SCOPES_WITHOUT_MOE)} (Megatron-LM: --cuda-graph-impl "
                  "transformer_engine --cuda-graph-scope attn, or --cuda-graph-modules attn from "
                  "core_v0.19); the local implementation graphs a whole layer for attn")


# megatron-core's CUDA graph scope names (CudaGraphScope to 0.18, CudaGraphModule from 0.19) that
# leave the MoE layer's router and dispatch outside the graph; an empty scope is the whole layer.
GRAPH_SCOPES_WITHOUT_MOE = ("attn", "mlp", "mamba")
OVERLAP_REFUSED = (
    "False; the null dispatcher reads its row counts on the host (.tolist()) inside the "
    "dispatch, which blocks the host while the dispatch runs on the communication stream, so "
    "nothing would overlap. Leave --overlap-moe-expert-parallel-comm off (the null dispatcher "
    "already sends only real rows); --overlap-grad-reduce and --overlap-param-gather still "
    "overlap the data-parallel communication")


def _graphed_moe_scope(config: Any) -> Optional[tuple[str, list]]:
    """(field, scope names) of a CUDA graph setting that captures the MoE layers, else None.

    Per-layer graphs ("transformer_engine", "local") capture what their scope names; the local
    implementation graphs a whole TransformerLayer (its MoE too) when the scope names attn.
    A full-iteration graph ("full_iteration" impl from 0.19, scope before) captures everything."""
    impl = getattr(config, "cuda_graph_impl", "none")
    if impl == "none":
        return None
    name = "cuda_graph_modules" if hasattr(config, "cuda_graph_modules") else "cuda_graph_scope"
    scope = getattr(config, name, None) or []
    scope = scope.split(",") if isinstance(scope, str) else scope
    names = [getattr(s, "name", s) for s in (scope if isinstance(scope, list) else [scope])]
    safe = set(GRAPH_SCOPES_WITHOUT_MOE) - ({"attn"} if impl == "local" else set())
    if impl == "full_iteration" or not names or not set(names) <= safe:
        return name, names
    return None


def saved_defaults() -> dict[str, Any]:
    """Each NullExpertConfig field's value for a config or checkpoint that does not name it: the
    value it had in effect before the field existed (`BEFORE_FIELD`), else its default."""
    return {f.name: BEFORE_FIELD.get(f.name, f.default) for f in fields(NullExpertConfig)}
