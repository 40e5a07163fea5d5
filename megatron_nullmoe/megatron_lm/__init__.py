"""Null experts for existing Megatron-LM recipes: flags, args -> config, builders, step hooks,
and reading the checkpoints a run writes (`checkpoint.py`, `rebuild.py`).

Megatron-LM's training scripts are not on the package registry (only megatron-core is), so this
package never imports `megatron.training` at import time; the entry scripts in launch/megatron_lm/
do, with a Megatron-LM checkout on PYTHONPATH, and hand its modules to `install`.
"""

from megatron_nullmoe.megatron_lm.args import (
    add_null_moe_args,
    chain_args_providers,
    entry_args_provider,
    install_resume_check,
    null_config_from_args,
    null_run_defaults,
)
from megatron_nullmoe.megatron_lm.builders import (
    gpt_builder,
    llava_builder,
    llava_specs,
    null_decoder_spec,
)
from megatron_nullmoe.megatron_lm.hooks import TrainingLoopHooks, null_moe_flops
from megatron_nullmoe.megatron_lm.upcycle import UpcycleLoad

__all__ = [
    "TrainingLoopHooks", "UpcycleLoad", "add_null_moe_args", "chain_args_providers",
    "entry_args_provider", "gpt_builder", "install", "install_resume_check", "llava_builder",
    "llava_specs", "null_config_from_args", "null_decoder_spec", "null_moe_flops",
    "null_run_defaults",
]


def install(training, checkpointing) -> TrainingLoopHooks:
    """Everything an entry script adds to Megatron-LM's loop, given its modules
    `megatron.training.training` and `megatron.training.checkpointing`:

    - `TrainingLoopHooks`: budget control after each optimizer step, FLOPs at the realised rate,
      the null-expert metrics in the MoE report;
    - `UpcycleLoad`: a checkpoint without null slots loads (--pretrained-checkpoint, --finetune,
      --load);
    - the resume check: a resume keeps the gate rule its checkpoint trained with.

    Returns the hooks: the script wraps its forward step with `hooks.forward_step`, which is how
    they learn the model chunks."""
    hooks = TrainingLoopHooks()
    hooks.install(training)
    UpcycleLoad().install(training, checkpointing)
    install_resume_check(checkpointing)
    return hooks
