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
"""

from __future__ import annotations

import os
from typing import Callable

from megatron_nullmoe.model_utils import start_null_slots_unpicked
from megatron_nullmoe.upcycle import UpcycleError, fit_request, saved_shapes


class _DistCheckpointing:
    """megatron.core.dist_checkpointing with `load` fitted to a source without null slots."""

    def __init__(self, wrapped, owner: "UpcycleLoad"):
        self._wrapped, self._owner = wrapped, owner

    def __getattr__(self, name):
        return getattr(self._wrapped, name)

    def load(self, sharded_state_dict, checkpoint_dir, *args, **kwargs):
        models = tuple(k for k in sharded_state_dict if str(k).startswith("model"))
        fit = None
        if models:
            fit = fit_request(sharded_state_dict, saved_shapes(checkpoint_dir),
                              where=f"checkpoint {checkpoint_dir}", only_under=models)
            if fit.absent and "optimizer" in sharded_state_dict:
                raise UpcycleError(
                    f"checkpoint {checkpoint_dir} has no null-slot state ({len(fit.absent)} "
                    "tensors), so its optimizer state does not fit a model with null slots: load "
                    "its weights with --pretrained-checkpoint or --finetune, or add "
                    "--no-load-optim to --load")
        loaded = self._wrapped.load(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        if fit is not None and (fit.absent or fit.widened):
            fit.restore(loaded)
            self._owner.fitted.append((str(checkpoint_dir), fit))
        return loaded


class UpcycleLoad:
    """Loads of checkpoints without null slots for Megatron-LM's load_checkpoint."""

    def __init__(self):
        self.fitted: list = []

    def load_checkpoint(self, load_checkpoint: Callable) -> Callable:
        def loaded(model, *args, **kwargs):
            self.fitted.clear()
            out = load_checkpoint(model, *args, **kwargs)
            if self.fitted:
                path, fit = self.fitted[-1]
                armed = start_null_slots_unpicked(model) if fit.fresh_budget_bias else 0
                if os.environ.get("RANK", "0") == "0":
                    print(f"megatron-nullmoe: loaded {path}, a checkpoint without null slots: "
                          f"{len(fit.absent)} null-slot tensors start fresh"
                          + (f"; {armed} router(s) start with no null picks (budget bias below "
                             "every token's k-th real choice at the first forward)" if armed
                             else ""), flush=True)
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
