"""What a run counts: routing and dispatch statistics per logging interval, and model FLOPs from
the expert rows that actually ran, folded into running totals that every checkpoint carries.

Counts are reduced over the ranks whose tokens differ (`token_group`, the routers' own tensor x
data x context-parallel group) and gathered over pipeline stages (each holds its own layers), so
every rank logs the same global numbers.
"""

from __future__ import annotations

from megatron_nullmoe import collectives
from megatron_nullmoe.dispatch.stats import DispatchStats
from megatron_nullmoe.flops import train_flops_per_sample
from megatron_nullmoe.model_utils import dispatch_stats, routing_stats
from megatron_nullmoe.routing.stats import RoutingStats

# Running totals a resumed run continues from (saved in every checkpoint).
TOTALS = ("rows_dispatched", "rows_topk", "model_flops", "tokens", "null_picks", "slots",
          "skipped_steps", "teacher_flops")


class RunAccounting:
    """The run's statistics and FLOP counter; `totals` is the dict checkpoints save and load."""

    def __init__(self, model, shapes, global_batch_size: int, token_group, pp_group=None):
        self.model, self.shapes = model, shapes
        self.global_batch_size = global_batch_size
        self.token_group, self.pp_group = token_group, pp_group
        self.totals: dict = dict.fromkeys(TOTALS, 0)
        self.totals["model_flops"] = self.totals["teacher_flops"] = 0.0
        self._aside: tuple[dict, DispatchStats] | None = None  # see set_aside
        self.teacher = self.teacher_shapes = None

    def add_teacher(self, teacher, shapes) -> None:
        """A distillation teacher: its forward FLOPs, counted from the expert rows it ran, are
        part of the run's (model_flops) and kept apart too (teacher_flops)."""
        self.teacher, self.teacher_shapes = teacher, shapes

    def set_aside(self) -> None:
        """Takes the training counts not logged yet out of the routers and dispatchers, so that
        what an evaluation routes and dispatches can be read (and dropped) apart from them; the
        next `interval` adds them back. Without it, evaluation rows would count as training
        compute (at a training row's forward + backward cost) in the FLOPs and rows totals."""
        aside = (self.routing(), self.dispatch())
        self._aside = aside if self._aside is None else _merge(self._aside, aside)

    def routing(self) -> dict:
        """Routing statistics of all MoE layers since the last call, whichever pipeline stage
        holds them (per layer number, and "all")."""
        stats = routing_stats(self.model, self.token_group, reset=True)
        if self.pp_group is None:
            return stats
        mine = {k: (s.topk, {n: t.cpu() for n, t in s.counts.items()})
                for k, s in stats.items() if k != "all"}
        stages = collectives.gather_objects(mine, self.pp_group)
        merged = {k: RoutingStats(topk, counts)
                  for stage in stages for k, (topk, counts) in stage.items()}
        if merged:
            merged["all"] = sum(list(merged.values())[1:], list(merged.values())[0])
        return merged

    def dispatch(self) -> DispatchStats:
        """Rows moved by every dispatcher since the last call, over all ranks and stages."""
        rows = dispatch_stats(self.model, self.token_group, reset=True)
        if self.pp_group is not None:
            stages = collectives.gather_objects(rows.as_dict(), self.pp_group)
            rows = DispatchStats(**{k: sum(s[k] for s in stages) for k in stages[0]})
        return rows

    def interval(self) -> dict:
        """The logged statistics of the interval since the last call, totals updated."""
        stats, rows = self.routing(), self.dispatch()
        if self._aside is not None:
            (stats, rows), self._aside = _merge(self._aside, (stats, rows)), None
        self.totals["rows_dispatched"] += rows.rows_dispatched
        self.totals["rows_topk"] += rows.rows_topk
        out = {"moe/rows_dispatched_total": self.totals["rows_dispatched"],
               "moe/rows_topk_total": self.totals["rows_topk"],
               "moe/rows_over_topk": rows.rows_dispatched / max(rows.rows_topk, 1)}
        if "all" in stats:
            total = stats.pop("all")
            self.totals["null_picks"] += int(total.counts["null_picks"])
            self.totals["slots"] += int(total.counts["tokens"]) * total.topk
            out["null/all_total"] = self.totals["null_picks"] / max(self.totals["slots"], 1)
            by = total.null_fraction_by_modality()
            out.update({"null/all": total.null_fraction, "null/vision": by["vision"],
                        "null/text": by["text"], "moe/real_per_token": total.real_per_token,
                        # the worst layer's imbalance (loads summed over layers describe none)
                        "moe/max_over_mean_load": max(s.max_over_mean_load
                                                      for s in stats.values())})
            out.update({f"null/layer_{n}": s.null_fraction for n, s in stats.items()})
        return out

    def flops(self, rows_dispatched: int, steps: int, elapsed: float) -> dict:
        """Model FLOPs of `steps` steps from the expert rows actually computed, not from top-k
        (Megatron-LM's counter uses top-k and would overstate a null-MoE's work by k / realised):
        everything but the experts per sample, plus each real (token, expert) row's expert cost.
        Counting rows keeps the total exact and additive: the same however the steps are split
        into logging intervals (and so across a resume)."""
        decoder, _ = self.shapes
        if not steps or not decoder.num_moe_layers:
            return {}
        without_experts = train_flops_per_sample(*self.shapes, 0.0)
        per_row = (train_flops_per_sample(*self.shapes, 1.0) - without_experts) / (
            decoder.seq_length * decoder.num_moe_layers)
        flops = steps * self.global_batch_size * without_experts + rows_dispatched * per_row
        out = {}
        if self.teacher is not None:
            teacher = self._teacher_flops(steps)
            self.totals["teacher_flops"] += teacher
            flops += teacher
            out["throughput/teacher_flops_total"] = self.totals["teacher_flops"]
        self.totals["model_flops"] += flops
        return {"throughput/tflops_per_s": flops / elapsed / 1e12,
                "throughput/model_flops_total": self.totals["model_flops"], **out}

    def _teacher_flops(self, steps: int) -> float:
        """The teacher's forward FLOPs of `steps` training steps (it runs on every training
        micro-batch, never in evaluation): a third of training's 3 x forward, from its rows."""
        decoder, _ = self.teacher_shapes
        rows = dispatch_stats(self.teacher, self.token_group, reset=True).rows_dispatched
        without_experts = train_flops_per_sample(*self.teacher_shapes, 0.0) / 3
        per_row = (train_flops_per_sample(*self.teacher_shapes, 1.0) / 3 - without_experts) / (
            decoder.seq_length * max(decoder.num_moe_layers, 1))
        return steps * self.global_batch_size * without_experts + rows * per_row

    def close_interval(self, steps: int, elapsed: float) -> dict:
        """Folds the interval's counts and FLOPs into the totals; returns its logged values."""
        rows_before = self.totals["rows_dispatched"]
        out = self.interval()
        out.update(self.flops(self.totals["rows_dispatched"] - rows_before, steps, elapsed))
        return out


def _merge(a: tuple[dict, DispatchStats], b: tuple[dict, DispatchStats]) -> tuple[dict, DispatchStats]:
    """Routing stats (per layer and "all") and dispatch counts of two stretches, added."""
    keys = [*a[0], *(k for k in b[0] if k not in a[0])]  # layer order, then "all"
    keys = [*(k for k in keys if k != "all"), *(["all"] if "all" in keys else [])]
    routing = {k: a[0][k] + b[0][k] if k in a[0] and k in b[0] else a[0].get(k) or b[0][k]
               for k in keys}
    x, y = a[1].as_dict(), b[1].as_dict()
    return routing, DispatchStats(**{k: x[k] + y[k] for k in x})
