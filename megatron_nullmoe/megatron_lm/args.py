"""`--num-null-experts` and companions for Megatron-LM's argument parser, and args -> config.

Megatron-LM's `parse_args` builds its parser with allow_abbrev=False, rejects unknown flags, and
hands the parser to `extra_args_provider` (which must return it). `core_transformer_config_from_args`
copies every args attribute whose name is a TransformerConfig field, so our dests deliberately
match no TransformerConfig field (all start with `num_null_` or `null_expert_`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import typing
from typing import Callable, Optional, Sequence

from megatron_nullmoe.config import NullExpertConfig, NullExpertConfigError, saved_defaults

# Not offered as Megatron-LM flags: Megatron-LM's forward steps do not hand the routers a vision
# mask, which the modality-fixed control needs (our trainer does).
NOT_FOR_MEGATRON_LM = ("vision_topk", "text_topk")

# What a resume (`--load` without `--finetune`) of a checkpoint trained with null slots must keep:
# the gate rule changes what every expert output is scaled by, and its defaults changed in 2026-12.
RESUME_KEEPS = ("gate_normalization", "gate_scale")


def _dest(name: str) -> str:
    """NullExpertConfig field -> args attribute: `num_null_experts`, else `null_expert_<name>`
    (never a TransformerConfig field name, which core_transformer_config_from_args would copy)."""
    return name if name == "num_null_experts" else f"null_expert_{name.removeprefix('null_')}"


def _flag(name: str) -> str:
    """NullExpertConfig field -> its Megatron-LM flag (`--num-null-experts`, `--null-expert-...`)."""
    return "--" + _dest(name).replace("_", "-")


def _fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(NullExpertConfig) if f.name not in NOT_FOR_MEGATRON_LM]


# flag -> NullExpertConfig field, derived from NullExpertConfig (a new field is a new flag)
FLAGS = {_flag(f.name): f.name for f in _fields()}


def add_null_moe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the null-expert flags to a Megatron-LM parser; returns it (extra_args_provider).

    One flag per NullExpertConfig field, with its default, type, choices and help."""
    hints = typing.get_type_hints(NullExpertConfig)
    group = parser.add_argument_group(title="null experts (megatron-nullmoe)")
    for flag, name in FLAGS.items():
        f = next(f for f in _fields() if f.name == name)
        kind = hints[name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {"type": kind}
        group.add_argument(flag, dest=_dest(name), default=f.default, help=f.metadata.get("help"),
                           **extra)
    return parser


def null_run_defaults(argv: Sequence[str]) -> Callable:
    """An extra_args_provider that defaults `--expert-tensor-parallel-size` to 1 for a run with
    null experts (`--num-null-experts` > 0 in argv, the command line Megatron-LM parses).

    megatron-core sets expert tensor parallelism to the tensor-parallel size when it is unset,
    and null experts refuse expert TP > 1 (config.check), so every TP > 1 run would stop; whole
    experts on each rank (expert parallelism may then span the tensor-parallel ranks) is what
    they support. A flag on the command line wins, and a run without null experts keeps
    Megatron-LM's default. Says so once (rank 0) where it changes the layout (TP > 1)."""
    peek = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    peek.add_argument("--num-null-experts", type=int, default=0)
    peek.add_argument("--tensor-model-parallel-size", type=int, default=1)
    peek.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    seen, _ = peek.parse_known_args(list(argv))

    def provider(parser):
        if not seen.num_null_experts or seen.expert_tensor_parallel_size is not None:
            return parser
        parser.set_defaults(expert_tensor_parallel_size=1)
        if seen.tensor_model_parallel_size > 1 and os.environ.get("RANK", "0") == "0":
            print("megatron-nullmoe: --expert-tensor-parallel-size 1 with null experts (Megatron-"
                  f"LM's default, the tensor-parallel size {seen.tensor_model_parallel_size}, is "
                  "not supported); pass the flag to set it yourself", flush=True)
        return parser

    return provider


def chain_args_providers(*providers: Optional[Callable]) -> Callable:
    """One extra_args_provider that applies several in turn (e.g. ours and Megatron-LM's own)."""
    def provider(parser):
        for p in providers:
            if p is not None:
                parser = p(parser)
        return parser
    return provider


def entry_args_provider(argv: Sequence[str], *others: Optional[Callable]) -> Callable:
    """The entry scripts' extra_args_provider: the null-expert flags, the defaults of a null run
    (`null_run_defaults(argv)`), then the script's own providers."""
    return chain_args_providers(add_null_moe_args, null_run_defaults(argv), *others)


def null_config_from_args(args) -> NullExpertConfig:
    """NullExpertConfig from Megatron-LM's parsed args (after validate_args)."""
    missing = [name for name in FLAGS.values() if not hasattr(args, _dest(name))]
    if missing:
        raise NullExpertConfigError(
            f"args lack {', '.join(_flag(m) for m in missing)}: pass "
            "add_null_moe_args as (or inside) Megatron-LM's extra_args_provider")
    cfg = NullExpertConfig(**{name: getattr(args, _dest(name)) for name in FLAGS.values()})
    if cfg.num_null_experts and not getattr(args, "num_experts", None):
        raise NullExpertConfigError(
            f"--num-null-experts={cfg.num_null_experts} needs a MoE model: set --num-experts")
    return cfg


def apply_saved_defaults(args):
    """A copy of a run's args (Megatron-LM's saved or parsed Namespace) in which every null-expert
    flag the args do not name holds its value from before the flag existed
    (`config.saved_defaults`): a plain Megatron-LM run, or one written before the flag. The one
    place where older runs read the old defaults (the resume check, the export's rebuild); the
    args given are left as they are."""
    out = copy.copy(args)
    saved = saved_defaults()
    for name in FLAGS.values():
        if not hasattr(out, _dest(name)):
            setattr(out, _dest(name), saved[name])
    return out


def check_resume_args(checkpoint_args, args) -> None:
    """Refuses a resume whose gate rule differs from the one its checkpoint trained with.

    Megatron-LM checks a few architecture flags of a resumed checkpoint (`check_checkpoint_args`)
    and takes every other flag from the command line, so a run started before the gate defaults
    changed would resume under the new rule without a word. A checkpoint that does not name a
    flag had its value before the flag existed (`config.saved_defaults`); one trained without
    null slots is not checked (switching null experts on is a load, not a change)."""
    trained, now = apply_saved_defaults(checkpoint_args), apply_saved_defaults(args)
    if not getattr(trained, _dest("num_null_experts")):
        return
    diffs = [(name, getattr(trained, _dest(name)), getattr(now, _dest(name)))
             for name in RESUME_KEEPS]
    diffs = [(name, old, new) for name, old, new in diffs if old != new]
    if diffs:
        flags = " ".join(f"{_flag(n)} {old}" for n, old, _ in diffs)
        said = "; ".join(f"{_flag(n)} is {new!r} here, {old!r} in the checkpoint"
                         for n, old, new in diffs)
        raise NullExpertConfigError(
            f"this resume would change the gate rule the checkpoint trained with: {said} (the "
            f"defaults became keep_null_share and slot_ratio in 2026-12). Pass {flags} to resume "
            "as it trained, or --finetune to start a new run from its weights")


def install_resume_check(checkpointing) -> None:
    """Wraps `check_checkpoint_args` of megatron.training.checkpointing (passed in: this package
    never imports Megatron-LM), which `load_checkpoint` calls on a resume, with
    `check_resume_args` after Megatron-LM's own checks."""
    original = checkpointing.check_checkpoint_args
    if getattr(original, "_null_moe_checked", False):
        return

    def checked(checkpoint_args, *rest, **kwargs):
        out = original(checkpoint_args, *rest, **kwargs)
        check_resume_args(checkpoint_args, checkpointing.get_args())
        return out

    checked._null_moe_checked = True
    checkpointing.check_checkpoint_args = checked
