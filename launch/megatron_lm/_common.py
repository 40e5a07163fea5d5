"""What both entry scripts share: finding Megatron-LM, running it on CPU when CUDA is absent, and
calling its pretrain() through whichever entry API the release has."""

from __future__ import annotations

import inspect
import os
import sys
import typing

NEEDS = ("this script runs Megatron-LM's training loop and needs a Megatron-LM checkout whose "
         "release matches the installed megatron-core (tag core_v0.16.1 for megatron-core 0.16.1, "
         "core_v0.19.0 for 0.19.x) on PYTHONPATH:\n"
         "    git clone -b core_v0.16.1 https://github.com/NVIDIA/Megatron-LM\n"
         "    export PYTHONPATH=$PWD/Megatron-LM:$PYTHONPATH")


def require_megatron_lm(module: str):
    """Imports one of Megatron-LM's top-level scripts (pretrain_gpt, pretrain_vlm) or exits."""
    if not hasattr(typing, "override"):
        # Megatron-LM core_v0.19 imports typing.override (Python 3.12+), a marker with no effect
        # at run time; typing_extensions (a torch dependency) has the same for Python 3.11.
        import typing_extensions

        typing.override = typing_extensions.override
    try:
        import importlib

        script = importlib.import_module(module)
        from megatron.training import pretrain  # noqa: F401
    except ImportError as err:
        sys.exit(f"{sys.argv[0]}: cannot import Megatron-LM's {module} ({err}).\n{NEEDS}")
    return script


def cpu_if_no_cuda() -> None:
    """Without CUDA, adapts Megatron-LM's training loop to CPU (gloo) and says so once."""
    from megatron_nullmoe._mcore.cpu_megatron_lm import enable_for_megatron_lm

    adapted = enable_for_megatron_lm()
    if adapted and os.environ.get("RANK", "0") == "0":
        print("megatron-nullmoe: no CUDA, running Megatron-LM on CPU (gloo): "
              + "; ".join(adapted), flush=True)


def run_pretrain(datasets_provider, model_provider, forward_step, *, extra_args_provider,
                 args_defaults, **ranks) -> None:
    """Megatron-LM's pretrain() with our flags. Up to core_v0.17 it parses the flags itself
    (extra_args_provider=, args_defaults=); from core_v0.18 it takes a config container built
    from flags parsed first (parse_and_validate_args). Keywords only: the positions changed."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    step = dict(train_valid_test_dataset_provider=datasets_provider, model_provider=model_provider,
                model_type=ModelType.encoder_or_decoder, forward_step_func=forward_step, **ranks)
    if "cfg_container" not in inspect.signature(pretrain).parameters:
        pretrain(**step, extra_args_provider=extra_args_provider, args_defaults=args_defaults)
        return
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra_args_provider,
                                   args_defaults=args_defaults)
    pretrain(cfg_container=pretrain_cfg_container_from_args(args), **step)
