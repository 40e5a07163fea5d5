"""Megatron-LM's pretrain_gpt.py with null experts: the same flags plus --num-null-experts & co.

    export PYTHONPATH=/path/to/Megatron-LM:$PYTHONPATH   # tag core_v0.16.1 ... core_v0.19.0
    torchrun ... launch/megatron_lm/pretrain_gpt_nullmoe.py <pretrain_gpt.py flags> \
        --num-experts 8 --moe-router-topk 4 --num-null-experts 8 --moe-token-dispatcher-type alltoall

Reuses Megatron-LM's forward step, datasets, tokenizer and training loop; ours are the model
builder (megatron_nullmoe.megatron_lm.gpt_builder) and TrainingLoopHooks: budget control after
each optimizer step, and Megatron-LM's FLOPs and TFLOP/s counted at the realised real experts
per token instead of top-k. Without CUDA it runs on CPU (see _common.cpu_if_no_cuda) with
`--distributed-backend gloo --transformer-impl local --use-cpu-initialization
--no-gradient-accumulation-fusion` and Megatron-LM's --no-*-fusion flags.
"""

from __future__ import annotations

import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_if_no_cuda, require_megatron_lm, run_pretrain  # noqa: E402


def main() -> None:
    pretrain_gpt = require_megatron_lm("pretrain_gpt")
    cpu_if_no_cuda()
    from megatron.training import checkpointing as megatron_checkpointing
    from megatron.training import training as megatron_training
    from model_provider import model_provider

    from megatron_nullmoe.megatron_lm import entry_args_provider, gpt_builder, install

    modelopt = getattr(pretrain_gpt, "add_modelopt_args", None)
    extra = entry_args_provider(
        sys.argv[1:], modelopt if getattr(pretrain_gpt, "has_nvidia_modelopt", False) else None)
    # step hooks, loading checkpoints without null slots, the resume check
    hooks = install(megatron_training, megatron_checkpointing)
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    run_pretrain(
        pretrain_gpt.train_valid_test_datasets_provider, partial(model_provider, gpt_builder),
        hooks.forward_step(pretrain_gpt.forward_step), extra_args_provider=extra,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        get_embedding_ranks=pretrain_gpt.get_embedding_ranks,
    )


if __name__ == "__main__":
    main()
