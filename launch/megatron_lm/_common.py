"""What both entry scripts share: finding Megatron-LM, and running it on CPU when CUDA is absent."""

from __future__ import annotations

import os
import sys

NEEDS = ("this script runs Megatron-LM's training loop and needs a Megatron-LM checkout whose "
         "megatron-core matches the installed one (tag core_v0.16.1 for megatron-core 0.16.1) on "
         "PYTHONPATH:\n    git clone -b core_v0.16.1 https://github.com/NVIDIA/Megatron-LM\n"
         "    export PYTHONPATH=$PWD/Megatron-LM:$PYTHONPATH")


def require_megatron_lm(module: str):
    """Imports one of Megatron-LM's top-level scripts (pretrain_gpt, pretrain_vlm) or exits."""
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
