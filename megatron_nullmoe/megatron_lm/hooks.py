"""Per-step work the entry scripts add to Megatron-LM's training loop, and FLOPs at the realised rate.

Megatron-LM gives a script no per-optimizer-step hook (core_v0.16.1's train() overwrites
config.finalize_model_grads_func), so `TrainingLoopHooks.install` rebinds two names of
`megatron.training.training` that train() looks up at each call (core_v0.16.1 to core_v0.19.0):

- `train_step`: after every optimizer step, the step's realised real experts per token are
  summed over all ranks, then budget control runs (one collective over the routers' own group).
  Running it after the step, not at the next step's first micro-batch, means a checkpoint saved
  after step N holds the bias updated for step N (the routers' per-step counts are not
  checkpointed) and, under a compute schedule (`--null-expert-target-start-real-per-token`),
  the routers' `budget_step` = N, so a run resumed at N continues exactly as an uninterrupted one.
- `num_floating_point_operations`: Megatron-LM multiplies its routed-expert term by
  moe_router_topk, overstating a null-MoE's work by k / realised. The wrapper evaluates the same
  formula with the last step's realised rate in place of top-k, so the TFLOP/s in Megatron-LM's
  log line and the FLOPs it accumulates (and checkpoints) count the experts that ran.

- the MoE metrics report (`track_moe_metrics` up to core_v0.17, the metrics tracker's `report`
  from core_v0.18): training_log names the metrics it reports from the load-balancing flags only.
  Up to core_v0.17 it prints every recorded metric but reduces across ranks only those named
  (ours showed the last rank's own values); from core_v0.18 it prints only those named. The
  wrapper adds the null-expert metrics to the names.

`null_moe_flops(args, batch_size, real_per_token)` is a standalone count for scripts of its own.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Callable, Optional

import torch

from megatron_nullmoe import collectives
from megatron_nullmoe.model_utils import null_routers, update_null_budget
from megatron_nullmoe.routing.stats import real_per_token

NULL_METRICS = ("null_slot_fraction", "real_experts_per_token")  # recorded by NullExpertRouter


class TrainingLoopHooks:
    """Budget control and realised-rate FLOPs for Megatron-LM's own training loop.

    Budget control sums each router's counts over the router's own group (its tp_dp_cp group,
    the ranks whose tokens differ), as the project's trainer does. `real_per_token` is the last
    training step's realised real experts per token over all ranks and MoE layers (None before
    the first step, and without null experts).

    Whether the run has null experts is read from the run's args (`get_args`, Megatron-LM's own,
    set by `install`), never from the modules a rank holds: under pipeline parallelism a stage
    may hold no MoE layer (a dense first stage, the embedding alone), and every rank must enter
    the same world collectives whatever its stage holds (a rank without routers adds zeros).
    """

    def __init__(self, get_args: Optional[Callable] = None):
        self.real_per_token: Optional[float] = None
        self._get_args = get_args
        self._chunks: dict[int, torch.nn.Module] = {}
        self._said = False

    def null_experts(self) -> bool:
        """Whether this run has null experts: from its args, the same on every rank."""
        if self._get_args is None:
            raise RuntimeError("TrainingLoopHooks needs the run's args: call install(training) "
                               "or pass get_args=")
        args = self._get_args()
        return bool(getattr(args, "num_null_experts", 0) and getattr(args, "num_experts", None))

    def forward_step(self, forward_step: Callable) -> Callable:
        """Wraps Megatron-LM's forward_step(data_iterator, model, ...) to learn the model chunks."""
        @functools.wraps(forward_step)
        def step(data_iterator, model, *args, **kwargs):
            if model.training:
                self._chunks[id(model)] = model
            return forward_step(data_iterator, model, *args, **kwargs)

        return step

    def after_step(self) -> None:
        """Once per optimizer step on every rank: realised rate of the step over the world (every
        pipeline stage's layers; one collective that every rank enters, a stage without routers
        with zeros), then budget control (collectives only over the routers' own groups, which
        lie within one stage)."""
        if not self.null_experts():
            return
        chunks = list(self._chunks.values())
        routers = null_routers(chunks)
        local = (torch.stack([r.budget_counts for r in routers]).sum(0).double() if routers
                 else torch.zeros(2, dtype=torch.float64))  # [real picks, tokens]
        real, tokens = collectives.reduce_tensor(local).tolist()
        if tokens > 0:
            self.real_per_token = real_per_token(real, tokens)
        update_null_budget(chunks)

    def train_step(self, train_step: Callable) -> Callable:
        @functools.wraps(train_step)
        def step(*args, **kwargs):
            out = train_step(*args, **kwargs)
            self.after_step()
            return out

        return step

    def flops(self, num_floating_point_operations: Callable) -> Callable:
        """Megatron-LM's FLOPs function with the routed-expert term at the realised rate."""
        @functools.wraps(num_floating_point_operations)
        def counted(args, batch_size, *rest, **kwargs):
            if self.real_per_token is None or not getattr(args, "num_experts", None):
                return num_floating_point_operations(args, batch_size, *rest, **kwargs)
            realised = copy.copy(args)  # the formula also writes to args; keep those writes off
            realised.moe_router_topk = self.real_per_token
            flops = num_floating_point_operations(realised, batch_size, *rest, **kwargs)
            if not self._said and os.environ.get("RANK", "0") == "0":
                self._said = True
                topk = num_floating_point_operations(copy.copy(args), batch_size, *rest, **kwargs)
                print("megatron-nullmoe: Megatron-LM's FLOPs and TFLOP/s count realised real "
                      f"experts per token, not top-k; first step: {self.real_per_token!r} of "
                      f"{args.moe_router_topk}, {flops!r} FLOPs ({topk!r} at top-k)", flush=True)
            return flops

        return counted

    def metrics_report(self, report: Callable) -> Callable:
        """A MoE metrics report (track_names=...) that also names the null-expert metrics.

        The report all-reduces each named metric over the pipeline group, after creating it as
        zeros where a stage recorded none: the names must be the same on every rank, so they
        follow the run's args, not whether this rank's stage has routers."""
        @functools.wraps(report)
        def reported(*args, track_names=None, **kwargs):
            if track_names is not None and self.null_experts():
                track_names = [*track_names, *(m for m in NULL_METRICS if m not in track_names)]
            return report(*args, track_names=track_names, **kwargs)

        return reported

    def install(self, training) -> None:
        """Rebinds `train_step`, `num_floating_point_operations` and the MoE metrics report in
        megatron.training.training (the module, passed in: this package never imports it), and
        reads the run's args through its `get_args`."""
        if self._get_args is None:
            self._get_args = training.get_args
        training.train_step = self.train_step(training.train_step)
        training.num_floating_point_operations = self.flops(training.num_floating_point_operations)
        if hasattr(training, "track_moe_metrics"):  # up to core_v0.17
            training.track_moe_metrics = self.metrics_report(training.track_moe_metrics)
        if hasattr(training, "get_moe_metrics_tracker"):  # core_v0.18+: one tracker object
            tracker = training.get_moe_metrics_tracker()
            tracker.report = self.metrics_report(tracker.report)


def decoder_shape_from_args(args):
    """The FLOP formulas' DecoderShape of a Megatron-LM GPT config (GQA, SwiGLU, and MoE on the
    layers `--moe-layer-freq` marks, as Megatron-LM reads it)."""
    from megatron_nullmoe.flops import DecoderShape, moe_layer_pattern

    layers = args.num_layers
    pattern = moe_layer_pattern(layers, getattr(args, "moe_layer_freq", 1))
    experts = getattr(args, "num_experts", None) or 0
    groups = (args.num_query_groups if getattr(args, "group_query_attention", False)
              else args.num_attention_heads)
    return DecoderShape(
        num_layers=layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        seq_length=args.seq_length, vocab_size=args.padded_vocab_size,
        num_moe_layers=sum(pattern) if experts else 0, num_experts=experts,
        moe_ffn_hidden_size=getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size,
        topk=getattr(args, "moe_router_topk", 0) or 0,
        kv_ratio=groups / args.num_attention_heads, gated_mlp=bool(getattr(args, "swiglu", False)),
        attention_width=args.num_attention_heads * (getattr(args, "kv_channels", None) or 0))


def null_moe_flops(args, batch_size: int, real_per_token: float) -> float:
    """Training FLOPs of one step for a Megatron-LM GPT config, experts counted at the realised
    rate: the project's one formula (megatron_nullmoe.flops), which counts as Megatron-LM does
    (GQA, SwiGLU, the router, the output layer; training = 3 x forward)."""
    from megatron_nullmoe.flops import decoder_forward_flops

    shape = decoder_shape_from_args(args)
    return 3 * batch_size * shape.seq_length * decoder_forward_flops(shape, real_per_token)
