"""Megatron-LM layouts that a null-expert run used to stop on, through Megatron-LM's own code.

- Pipeline parallelism with a stage that holds no MoE layer (a dense first stage, as DeepSeek-style
  layouts have): every rank must enter the same collectives whatever its stage holds. Trained
  through the real `pretrain()` on 2 CPU ranks with a 2-minute collective timeout, so that a rank
  that skips a collective fails the test in minutes instead of hanging it.
- Tensor parallelism > 1: megatron-core sets expert tensor parallelism to the tensor-parallel size
  when unset, which null experts refuse. Megatron-LM's own `parse_args` and `validate_args` with
  the entry scripts' extra_args_provider give the run `--expert-tensor-parallel-size 1`; without
  it (Megatron-LM alone) the refusal names that flag. (The real `pretrain()` with TP > 1 cannot
  run here: Megatron-LM's validate_args asks the GPU's architecture under TP > 1.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests._megatron_lm_run import TINY, TOPK, iterations, pretrain
from tests._megatron_lm_tree import ROOT

ITERS = 3


def _with(flags: list[str], **values: str) -> list[str]:
    """TINY with some flags' values replaced (e.g. expert_model_parallel_size="1")."""
    out = list(flags)
    for name, value in values.items():
        out[out.index("--" + name.replace("_", "-")) + 1] = value
    return out


def test_pipeline_with_a_stage_without_moe_layers_trains(tree, tmp_path):
    """PP 2, 4 layers, MoE on the last two only: stage 0 holds no router. Before the fix its rank
    skipped the step's world all-reduce and both ranks timed out in gloo send/recv."""
    flags = [*_with(TINY, num_layers="4", expert_model_parallel_size="1"),
             "--pipeline-model-parallel-size", "2", "--moe-layer-freq", "[0,0,1,1]",
             "--disable-bias-linear", "--train-iters", str(ITERS),
             "--distributed-timeout-minutes", "2",
             "--null-expert-target-real-per-token", "1.0",
             "--null-expert-budget-update-rate", "0.05"]
    log = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp_path, *flags)
    lines = iterations(log)
    assert sorted(lines) == list(range(1, ITERS + 1)), log[-4000:]
    for fields in lines.values():  # printed by the last stage, reduced over the pipeline
        assert 0.0 < float(fields["null_slot_fraction"]) < 1.0
        assert 0.0 < float(fields["real_experts_per_token"]) < TOPK
    # Rank 0 is the dense stage: it knows the world's realised rate (it entered the all-reduce)
    # and counts Megatron-LM's FLOPs at it.
    said = re.search(r"count realised real experts per token, not top-k; first step: (\S+) of "
                     r"(\d+)", log)
    assert said, log[-4000:]
    assert 0.0 < float(said.group(1)) < TOPK


PROBE = """
import contextlib, io, json, os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "launch", "megatron_lm"))
from _common import require_megatron_lm
require_megatron_lm("pretrain_gpt")
from megatron.training import arguments
arguments.get_device_arch_version = lambda: 9  # asked under TP > 1; there is no GPU here
from megatron_nullmoe import NullExpertConfigError
from megatron_nullmoe.megatron_lm import add_null_moe_args, entry_args_provider, null_config_from_args
found = []
for mode, argv in json.loads(sys.argv[1]):
    sys.argv = ["pretrain_gpt_nullmoe.py", *argv]
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        provider = entry_args_provider(argv) if mode == "entry" else add_null_moe_args
        args = arguments.parse_args(extra_args_provider=provider)
    arguments.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    config = arguments.core_transformer_config_from_args(args)
    try:
        null_config_from_args(args).check(config)
        refused = None
    except NullExpertConfigError as err:
        refused = str(err)
    found.append(dict(etp=config.expert_tensor_parallel_size, refused=refused,
                      said=said.getvalue()))
print("PROBE", json.dumps(found))
"""


def megatron_lm_args(tree, *cases: tuple[str, list[str]]) -> list[dict]:
    """For each (mode, flags): Megatron-LM's parse_args + validate_args +
    core_transformer_config_from_args as rank 0 of 2, with the entry scripts' provider ("entry")
    or our flags alone ("plain"), then the null experts' check of the config. One process for
    all cases: [{etp, refused, said (what the providers printed)}]."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_", "MASTER_"))}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", CUDA_DEVICE_MAX_CONNECTIONS="1")
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "PROBE" in out.stdout, log[-4000:]
    return json.loads(out.stdout.split("PROBE", 1)[1].splitlines()[0])


TP2 = [*_with(TINY, expert_model_parallel_size="1"), "--tensor-model-parallel-size", "2",
       "--sequence-parallel", "--disable-bias-linear", "--train-iters", "2"]
NOTE = "megatron-nullmoe: --expert-tensor-parallel-size 1 with null experts"


def test_tensor_parallel_null_runs_get_expert_tp_one_and_refusals_name_the_flag(tree):
    entry, plain, given = megatron_lm_args(
        tree, ("entry", TP2), ("plain", TP2),
        ("entry", [*TP2, "--expert-tensor-parallel-size", "2"]))
    assert (entry["etp"], entry["refused"]) == (1, None)
    assert NOTE in entry["said"] and "tensor-parallel size 2" in entry["said"]
    # Megatron-LM alone: expert TP follows TP, and the refusal says which flag to pass.
    assert plain["etp"] == 2 and NOTE not in plain["said"]
    assert plain["refused"].startswith("expert_tensor_parallel_size=2 is not valid with null "
                                       "experts")
    assert "--expert-tensor-parallel-size 1" in plain["refused"]
    # A value on the command line is kept (and refused by name).
    assert given["etp"] == 2 and "--expert-tensor-parallel-size 1" in given["refused"]
    assert NOTE not in given["said"]
