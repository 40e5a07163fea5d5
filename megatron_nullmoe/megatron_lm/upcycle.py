"""Megatron-LM loads a checkpoint without null slots into a model with them.

Users add `--num-null-experts` to a run that already has checkpoints and load one as they always
do: `--pretrained-checkpoint DIR` or `--finetune --load DIR` (weights only: iteration, optimizer
and data restart), or `--load DIR --no-load-optim` (weights, iteration count and data position;
Megatron-LM loads the LR schedule with the optimizer, so it restarts too). Megatron-LM
asks dist_checkpointing for every tensor of the model, and a source without null slots lacks the
null-slot router state. `UpcycleLoad.install` puts a thin wrapper around the `dist_checkpointing`
that megatron.training.checkpointing calls: before each load it reads the checkpoint's tensor
metadata and fits the model part of the request (`megatron_nullmoe.upcycle.fit_request`: only the
null-slot state may be missing, an expert bias of E slots fills the first E of E + Z; anything
else is refused with the keys named). Megatron-LM then loads the model non-strictly (its own
fallback after a strict load fails), and `load_checkpoint`'s wrapper arms the routers whose budget
bias was missing (`start_null_slots_unpicked`): the first step picks what the source picked.

Optimizer state of a source without null slots cannot fill a model with them (Megatron-LM keys
it by parameter position); such a load is refused with the flags that skip it.

Every rank decides together. A rank's request holds only its pipeline stage's tensors: a dense
stage (or the embedding alone) has no router, so on its own it would find nothing to fit or
refuse, go on into dist_checkpointing's load and wait there for ranks that refused. So each rank
fits its own request, then one gather over the world (`agree`; dist_checkpointing.load is itself
entered by every rank) gives every rank the same view of the whole model: all refuse with the
same message or all load, and rank 0 reports the switch whatever its own stage holds.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

from megatron_nullmoe import collectives
from megatron_nullmoe.model_utils import start_null_slots_unpicked
from megatron_nullmoe.upcycle import UpcycleError, fit_request, saved_shapes, sharded_leaves

BUDGET_BIAS = "router.null_budget_bias"  # a router has it iff it has budget control and nulls


@dataclasses.dataclass(frozen=True)
class RankFit:
    """One rank's fit of its own request, in plain values (gathered across ranks). Tensors are
    named (key, global offset), so replicas of one tensor on other ranks count once."""

    refused: Optional[str] = None
    absent: frozenset = frozenset()  # null-slot tensors the checkpoint lacks
    widened: frozenset = frozenset()  # expert biases saved for fewer slots
    optimizer: bool = False  # the request asks for optimizer state


@dataclasses.dataclass(frozen=True)
class Agreed:
    """What the load does to the whole model, the same on every rank."""

    absent: int  # null-slot tensors that start fresh
    widened: int  # expert biases padded to E + Z
    armed: int  # routers whose budget bias starts fresh: they start with no null pick

    @property
    def fitted(self) -> bool:
        return bool(self.absent or self.widened)


def agree(fits: list[RankFit], where: str) -> Agreed:
    """Every rank's fit -> one decision: UpcycleError (the lowest rank's refusal, or optimizer
    state asked of a checkpoint without null-slot state anywhere in the model), else what the
    load does. Pure: the same list gives the same answer on every rank."""
    refused = next((f.refused for f in fits if f.refused), None)
    if refused:
        raise UpcycleError(refused)
    absent = frozenset().union(*(f.absent for f in fits))
    if absent and any(f.optimizer for f in fits):
        raise UpcycleError(
            f"{where} has no null-slot state ({len(absent)} tensors), so its optimizer state "
            "does not fit a model with null slots: load its weights with --pretrained-checkpoint "
            "or --finetune, or add --no-load-optim to --load")
    return Agreed(absent=len(absent),
                  widened=len(frozenset().union(*(f.widened for f in fits))),
                  armed=sum(1 for key, _ in absent if key.endswith(BUDGET_BIAS)))


def fit_rank(request, checkpoint_dir):
    """(this rank's Fit or None, its RankFit): fits the model part of `request` in place."""
    models = tuple(k for k in request if str(k).startswith("model"))
    optimizer = "optimizer" in request
    if not models:
        return None, RankFit(optimizer=optimizer)
    names = {path: (sh.key, tuple(sh.global_offset))
             for m in models for path, sh in sharded_leaves(request[m], (m,))}
    try:
        fit = fit_request(request, saved_shapes(checkpoint_dir),
                          where=f"checkpoint {checkpoint_dir}", only_under=models)
    except UpcycleError as err:
        return None, RankFit(refused=str(err), optimizer=optimizer)
    return fit, RankFit(absent=frozenset(names[p] for p in fit.absent),
                        widened=frozenset(names[p] for p, _, _ in fit.widened),
                        optimizer=optimizer)


class _DistCheckpointing:
    """megatron.core.dist_checkpointing with `load` fitted to a source without null slots."""

    def __init__(self, wrapped, owner: "UpcycleLoad"):
        self._wrapped, self._owner = wrapped, owner

    def __getattr__(self, name):
        return getattr(self._wrapped, name)

    def load(self, sharded_state_dict, checkpoint_dir, *args, **kwargs):
        """Every rank: fit its request, agree over the world (one gather), then all refuse or
        all load. No rank returns or raises before the gather."""
        fit, mine = fit_rank(sharded_state_dict, checkpoint_dir)
        agreed = agree(collectives.gather_objects(mine), f"checkpoint {checkpoint_dir}")
        loaded = self._wrapped.load(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        if fit is not None and fit.widened:
            fit.restore(loaded)
        if agreed.fitted:  # the same on every rank
            self._owner.fitted.append((str(checkpoint_dir), fit, agreed))
        return loaded


class UpcycleLoad:
    """Loads of checkpoints without null slots for Megatron-LM's load_checkpoint."""

    def __init__(self):
        self.fitted: list = []

    def load_checkpoint(self, load_checkpoint: Callable) -> Callable:
        def loaded(model, *args, **kwargs):
            self.fitted.clear()
            out = load_checkpoint(model, *args, **kwargs)
            if self.fitted:  # agreed over every rank, so rank 0 reports a switch it holds no part of
                path, fit, agreed = self.fitted[-1]
                if fit is not None and fit.fresh_budget_bias:
                    start_null_slots_unpicked(model)  # this rank's routers, no collective
                if os.environ.get("RANK", "0") == "0":
                    print(f"megatron-nullmoe: loaded {path}, a checkpoint without null slots: "
                          f"{agreed.absent} null-slot tensors start fresh"
                          + (f"; {agreed.armed} router(s) start with no null picks (budget bias "
                             "below every token's k-th real choice at the first forward)"
                             if agreed.armed else ""), flush=True)
            return out

        return loaded

    def install(self, training, checkpointing) -> None:
        """Wraps `load_checkpoint` in megatron.training.training and the `dist_checkpointing`
        that megatron.training.checkpointing calls (both passed in: this package never imports
        Megatron-LM)."""
        if not isinstance(checkpointing.dist_checkpointing, _DistCheckpointing):
            checkpointing.dist_checkpointing = _DistCheckpointing(
                checkpointing.dist_checkpointing, self)
        training.load_checkpoint = self.load_checkpoint(training.load_checkpoint)
