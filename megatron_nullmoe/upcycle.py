"""Null slots added to a trained model: which saved tensors may be missing, and how a load fits.

A checkpoint of a model without null slots (or with fewer) lacks only router state: the null
logit rows, the budget-control bias and the schedule position (`NULL_STATE`), and holds an
expert bias of E slots where the model has E + Z. `fit_request` takes a dist_checkpointing load
request (a sharded state dict, any nesting) and the checkpoint's tensor metadata, and returns the
request that checkpoint can serve plus what to do after the load; anything else that does not
fit is refused with every key named. Both front ends use it: the trainer's `checkpoint.init_from`
and the Megatron-LM entry scripts (megatron_lm/upcycle.py). The first forward after the switch is
`start_null_slots_unpicked` (model_utils).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from megatron_nullmoe.errors import NullMoEError

NULL_STATE = ("router.null_weight", "router.null_bias", "router.null_budget_bias",
              "router.budget_step")


class UpcycleError(NullMoEError, ValueError):
    """A checkpoint that does not fit the model beyond the null-slot state."""


@dataclasses.dataclass
class Fit:
    """What a fitted load leaves to do: `absent` (paths in the request of tensors the checkpoint
    lacks: they keep the model's values), `widened` ((path, full tensor, saved width) of expert
    biases to pad back after the load)."""

    absent: list[tuple] = dataclasses.field(default_factory=list)
    absent_keys: list[str] = dataclasses.field(default_factory=list)
    widened: list[tuple] = dataclasses.field(default_factory=list)

    @property
    def fresh_budget_bias(self) -> bool:
        """The source had no budget bias: the routers start with `start_null_slots_unpicked`."""
        return any(k.endswith("router.null_budget_bias") for k in self.absent_keys)

    def restore(self, loaded) -> None:
        """After the load: expert biases padded back to E + Z with the model's null entries."""
        for path, full, width in self.widened:
            padded = full.clone()
            padded[..., :width] = get_leaf(loaded, path)
            set_leaf(loaded, path, padded)


def saved_shapes(checkpoint_dir) -> dict[str, tuple]:
    """{ShardedTensor key: global shape} of a dist_checkpointing checkpoint."""
    from megatron.core import dist_checkpointing

    return {k: tuple(v.global_shape)
            for k, v in dist_checkpointing.load_tensors_metadata(str(checkpoint_dir)).items()}


def fit_request(request, saved: dict[str, tuple], where: str = "the checkpoint",
                only_under: tuple = ()) -> Fit:
    """Fits `request` (changed in place) to a checkpoint with tensors `saved`: drops null-slot
    state the checkpoint lacks, narrows an expert bias saved for fewer slots. `only_under`: top
    keys of the request to look at (e.g. "model"); all by default. UpcycleError if anything else
    is missing or shaped differently."""
    fit, refused = Fit(), []
    for path, sh in list(sharded_leaves(request)):
        if only_under and path[0] not in only_under:
            continue
        shape = saved.get(sh.key)
        if shape is None:
            if sh.key.endswith(NULL_STATE):
                fit.absent.append(path)
                fit.absent_keys.append(sh.key)
            else:
                refused.append(f"{sh.key} (not saved)")
        elif shape != tuple(sh.global_shape):
            if (sh.key.endswith("router.expert_bias") and shape[:-1] == tuple(sh.global_shape[:-1])
                    and shape[-1] < sh.global_shape[-1]):
                fit.widened.append((path, sh.data.detach().clone(), shape[-1]))
            else:
                refused.append(f"{sh.key} (saved {list(shape)}, this model "
                               f"{list(sh.global_shape)})")
    if refused:
        raise UpcycleError(
            f"{where} does not fit this model: only null-slot router state ({', '.join(NULL_STATE)})"
            f" may be missing. Mismatched: {'; '.join(sorted(set(refused)))}")
    for path in fit.absent:
        pop_leaf(request, path)
    for path, full, width in fit.widened:
        sh = get_leaf(request, path)
        narrow = full[..., :width].clone()
        set_leaf(request, path, dataclasses.replace(
            sh, data=narrow, local_shape=tuple(narrow.shape),
            global_shape=tuple(sh.global_shape[:-1]) + (width,)))
    return fit


def sharded_leaves(tree, prefix: tuple = ()) -> Iterator[tuple[tuple, object]]:
    """(path, ShardedTensor) for every ShardedTensor in a nested sharded state dict."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    items = tree.items() if isinstance(tree, dict) else enumerate(tree) \
        if isinstance(tree, list) else ()
    for k, v in items:
        if isinstance(v, ShardedTensor):
            yield prefix + (k,), v
        elif isinstance(v, (dict, list)):
            yield from sharded_leaves(v, prefix + (k,))


def get_leaf(tree, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def set_leaf(tree, path: tuple, value) -> None:
    get_leaf(tree, path[:-1])[path[-1]] = value


def pop_leaf(tree, path: tuple) -> None:
    del get_leaf(tree, path[:-1])[path[-1]]


def state_dict_name(path: tuple) -> str:
    return ".".join(str(k) for k in path)



