"""Megatron-LM layouts that a null-expert run used to stop on, through Megatron-LM's own code.

- Pipeline parallelism with a stage that holds no MoE layer (a dense first stage, as DeepSeek-style
  layouts have): every rank must enter the same collectives whatever its stage holds. Trained
  through the real `pretrain()` on 2 CPU ranks with a 2-minute collective timeout, so that a rank
  that skips a collective fails the test in minutes instead of hanging it.
- A checkpoint without null slots loaded into that layout (`--pretrained-checkpoint`, or a plain
  `--load` whose optimizer state cannot fit): the load's decisions are agreed over every rank's
  request, so the "loaded a checkpoint without null slots" message prints with a dense first
  stage (rank 0 holds no router), and a refused load stops every rank with the same message. The
  refusal is run as a plain launcher runs it (srun: one process per rank, no torchrun agent to
  kill the others), so each rank's own output says why it stopped.
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
import time

import pytest

from megatron_nullmoe.megatron_lm.logs import iterations
from megatron_nullmoe.parallel import free_port
from tests._megatron_lm_run import TINY, TOPK, pretrain
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


# PP 2, 4 layers, MoE on the last two only (stage 0, rank 0, holds no router); a short collective
# timeout, so that a rank left waiting in a collective fails in minutes.
DENSE_FIRST = [*_with(TINY, num_layers="4", expert_model_parallel_size="1"),
               "--pipeline-model-parallel-size", "2", "--moe-layer-freq", "[0,0,1,1]",
               "--disable-bias-linear", "--distributed-timeout-minutes", "2"]


@pytest.fixture(scope="module")
def dense_first_source(tree, tmp_path_factory):
    """DENSE_FIRST without null slots, 2 iterations, saved with its optimizer state."""
    tmp = tmp_path_factory.mktemp("dense_first")
    pretrain(tree, "pretrain_gpt_nullmoe.py", tmp, *_with(DENSE_FIRST, num_null_experts="0"),
             "--train-iters", "2", "--save", str(tmp / "ckpt"), "--save-interval", "1000")
    return tmp / "ckpt"


def test_a_dense_first_stage_reports_the_switch_to_null_slots(tree, dense_first_source,
                                                              tmp_path):
    """--pretrained-checkpoint of the source with --num-null-experts 4: rank 0 (the dense stage,
    no null-slot tensor of its own) says what the load did for the whole model, the last stage's
    two routers are armed to start without null picks, and the run trains."""
    log = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp_path, *DENSE_FIRST,
                   "--pretrained-checkpoint", str(dense_first_source), "--train-iters", "2",
                   "--null-expert-target-real-per-token", "1.0",
                   "--null-expert-budget-update-rate", "0.05")
    said = re.findall(r"megatron-nullmoe: loaded (\S+)/iter_0+2, a checkpoint without null slots: (\d+) "
                      r"null-slot tensors start fresh; (\d+) router\(s\) start with no null picks",
                      log)
    # printed once (rank 0), counting the model's tensors once whatever the stages and replicas:
    # 2 MoE layers x (null logit rows, budget bias)
    assert said == [(str(dense_first_source), "4", "2")], log[-4000:]
    lines = iterations(log)
    assert sorted(lines) == [1, 2], log[-4000:]
    # Armed: the first step picks only real experts, in each of its 2 micro-batches (PP 2 with
    # DP 1: the start bias is placed at every forward of the step, lowered where a later
    # micro-batch needs it; placed from the first alone, 1 pick in 1024 went to a null slot)
    assert float(lines[1]["real_experts_per_token"]) == TOPK, lines[1]


def per_rank(tree, folder, *flags: str, deadline: float = 300) -> list[tuple[int, str, float]]:
    """The entry script as plain launchers (srun, mpirun) run it: one process per rank with
    RANK/WORLD_SIZE/MASTER_* set, no agent that stops the others when one fails. Returns each
    rank's (exit status, output, seconds); a rank still running at `deadline` is killed (-9)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_", "MASTER_",
                                                                      "LOCAL_"))}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    folder.mkdir(parents=True, exist_ok=True)
    script = ROOT / "launch" / "megatron_lm" / "pretrain_gpt_nullmoe.py"
    start, procs = time.monotonic(), []
    for rank in range(2):
        out = open(folder / f"rank{rank}.log", "w+")
        procs.append((subprocess.Popen(
            [sys.executable, str(script), *flags], cwd=folder, stdout=out,
            stderr=subprocess.STDOUT, text=True,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}), out))
    found = []
    for proc, out in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.seek(0)
        found.append((proc.returncode, out.read(), time.monotonic() - start))
        out.close()
    return found


REFUSED = {
    # a plain --load: the source's optimizer state cannot fit a model with null slots
    "optimizer": ([], ["--load"], ("its optimizer state does not fit a model with null slots",
                                   "--pretrained-checkpoint or --finetune, or add --no-load-optim")),
    # another architecture: only the last stage holds the tensors that differ
    "architecture": (["--num-experts", "8"], ["--pretrained-checkpoint"],
                     ("does not fit this model: only null-slot router state",
                      "decoder.layers.3.mlp.router.weight (saved [4, 64], this model [8, 64])")),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_refused_load_stops_every_rank_with_the_same_message(tree, dense_first_source,
                                                               tmp_path, case):
    """A load refused by what only the last stage holds: the dense stage's rank refuses as the
    last stage's does, with the same message, well before the 2-minute collective timeout.
    Before the fix only the last stage refused, and rank 0 went on into the checkpoint load:
    here it failed there when gloo saw its peer exit ("Connection closed by peer"), without a
    word on why; with NCCL it waits for the collective timeout."""
    changed, load, wanted = REFUSED[case]
    flags = list(DENSE_FIRST)
    for i in range(0, len(changed), 2):
        flags[flags.index(changed[i]) + 1] = changed[i + 1]
    ranks = per_rank(tree, tmp_path, *flags, *load, str(dense_first_source), "--train-iters", "3")
    for rank, (status, log, seconds) in enumerate(ranks):
        assert status not in (0, -9), (rank, status, log[-3000:])
        assert "UpcycleError: " in log, (rank, log[-3000:])
        for text in wanted:
            assert text in log, (rank, text, log[-3000:])
        assert seconds < 110, (rank, seconds)  # refused, not the collective timeout
    messages = [re.search(r"UpcycleError: (.*)", log).group(1) for _, log, _ in ranks]
    assert messages[0] == messages[1], messages


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
