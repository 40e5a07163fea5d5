"""Runs Megatron-LM's own entry points (launch/megatron_lm/) on 2 CPU ranks over gloo, as a user
runs them: the release tree first on PYTHONPATH (tests/_megatron_lm_tree.py finds it; the `tree`
fixture in conftest.py skips without one), a tiny GPT's flags, and readers of what Megatron-LM
prints and writes to TensorBoard. Shared by the test_megatron_lm_*.py and export tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests._megatron_lm_tree import ROOT

TORCHRUN = Path(sys.executable).parent / "torchrun"
TOPK = 2
CPU_FLAGS = [
    "--transformer-impl", "local", "--distributed-backend", "gloo", "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
]
TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "0",
    "--num-experts", "4", "--moe-router-topk", str(TOPK), "--num-null-experts", "4",
    "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
    "--moe-aux-loss-coeff", "0.01",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--eval-iters", "0", "--eval-interval", "1000", "--num-workers", "0",
    "--log-interval", "1", "--seed", "1234", *CPU_FLAGS,
]


def pretrain(tree: Path, script: str, folder: Path, *flags: str, check: bool = True) -> str:
    """One torchrun of an entry script on 2 CPU ranks, with the Megatron-LM tree first on
    PYTHONPATH (as a user runs it); returns its output (asserts success, or with check=False
    failure)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_", "MASTER_"))}
    path = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    env.update(PYTHONPATH=path, OMP_NUM_THREADS="1")
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2",
           str(ROOT / "launch" / "megatron_lm" / script), *flags]
    folder.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=420)
    log = out.stdout + out.stderr
    assert (out.returncode == 0) == check, log[-4000:]
    return log


def tensorboard(folder: Path, tag: str) -> dict[int, float]:
    """What Megatron-LM wrote to TensorBoard for each iteration (the step's own value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}
