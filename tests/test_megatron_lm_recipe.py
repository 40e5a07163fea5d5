"""The Megatron-LM shell recipe is accepted by Megatron-LM's own argument parser at every release
tree at hand (`../shared/megatron-lm/` archives, or MEGATRON_LM_PATH): its flags, ours through the
entry script's extra_args_provider, and the resilience flags, parsed by the real `parse_args`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests._megatron_lm_tree import ROOT, archive_tags, unpack

RECIPE = ROOT / "examples" / "megatron_lm" / "train_mixtral_8x7b_null_moe.sh"
PARSE = r"""
import dataclasses, json, os, sys
sys.path.insert(0, os.path.join(os.environ["ROOT"], "launch", "megatron_lm"))
import _common
_common.require_megatron_lm("pretrain_gpt")   # what the entry script does first
from megatron.training.arguments import parse_args
from megatron_nullmoe.megatron_lm import add_null_moe_args, null_config_from_args
sys.argv = ["pretrain_gpt_nullmoe.py", *json.loads(os.environ["RECIPE_ARGV"])]
args = parse_args(extra_args_provider=add_null_moe_args)
print("PARSED " + json.dumps({
    "null": dataclasses.asdict(null_config_from_args(args)), "experts": args.num_experts,
    "topk": args.moe_router_topk, "exit_signal_handler": args.exit_signal_handler,
    "exit_duration_in_mins": args.exit_duration_in_mins,
    "timeout": args.distributed_timeout_minutes}))
"""


def _trees() -> list:
    if os.environ.get("MEGATRON_LM_PATH"):
        return [pytest.param(os.environ["MEGATRON_LM_PATH"], id="MEGATRON_LM_PATH")]
    tags = archive_tags()
    if not tags:
        return [pytest.param(None, marks=pytest.mark.skip(
            reason="no Megatron-LM tree: set MEGATRON_LM_PATH or put the release archives in "
                   "../shared/megatron-lm/"))]
    return [pytest.param(archive, id=tag) for tag, archive in sorted(tags.items())]


def _recipe_argv() -> list[str]:
    out = subprocess.run(["bash", str(RECIPE), "/ckpt", "/tok.model", "/data"], text=True,
                         capture_output=True, env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1"})
    assert out.returncode == 0, out.stderr
    argv = out.stdout.split()
    script = next(i for i, a in enumerate(argv) if a.endswith("pretrain_gpt_nullmoe.py"))
    return argv[script + 1:]


@pytest.mark.parametrize("source", _trees())
def test_recipe_flags_parse_at_this_release(source):
    tree = source if isinstance(source, str) else unpack(source)
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT}", "ROOT": str(ROOT),
           "RECIPE_ARGV": json.dumps(_recipe_argv()), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", PARSE], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("PARSED "))
    parsed = json.loads(line.removeprefix("PARSED "))
    assert parsed["null"]["num_null_experts"] == 8 and parsed["experts"] == 8
    assert parsed["topk"] * 8 / (8 + 8) == 2  # iso-FLOP with the stock top-2 recipe
    assert parsed["exit_signal_handler"] is True and parsed["exit_duration_in_mins"] == 1410
    assert parsed["timeout"] == 10
