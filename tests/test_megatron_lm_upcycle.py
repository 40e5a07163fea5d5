"""Megatron-LM's own `pretrain()` continues a run without null slots with them (issue 19).

A top-2 GPT without null slots is trained and saved by the entry script (2 CPU ranks); the same
model with `--num-null-experts 4` loads it through Megatron-LM's `--pretrained-checkpoint`, and
its first iteration's loss equals that of the same model continued without null slots (the
routers start with no null pick); a plain `--load` (optimizer state) and a checkpoint of another
architecture are refused by name. Kept apart from test_megatron_lm_pretrain.py so that the two
files run side by side (make test runs 2 test files at a time).
"""

from __future__ import annotations

import pytest

from tests.test_megatron_lm_pretrain import TINY, TOPK, pretrain, tensorboard, tree  # noqa: F401


def with_flag(flags: list[str], flag: str, value) -> list[str]:
    i = flags.index(flag)
    return [*flags[:i + 1], str(value), *flags[i + 2:]]


def with_null_experts(flags: list[str], z: int) -> list[str]:
    """TINY with Z null slots, expert parallel 1 and no linear biases: with Z = 0 the entry
    script builds megatron-core's stock MoE layer, which runs on CPU only so (its alltoall
    dispatcher needs EP 1 there, and its expert bias add fails autograd's view check)."""
    return [*with_flag(with_flag(flags, "--num-null-experts", z), "--expert-model-parallel-size", 1),
            "--disable-bias-linear"]


# The target starts at k (no null pick) and is released to 1.0 over 4 steps.
SWITCH = ["--null-expert-target-real-per-token", "1.0", "--null-expert-budget-update-rate", "0.05",
          "--null-expert-target-start-real-per-token", str(TOPK),
          "--null-expert-target-schedule-steps", "4"]


@pytest.fixture(scope="module")
def plain_source(tree, tmp_path_factory):
    """A top-2 run without null slots, 2 iterations, saved."""
    tmp = tmp_path_factory.mktemp("plain")
    pretrain(tree, "pretrain_gpt_nullmoe.py", tmp, *with_null_experts(TINY, 0),
             "--train-iters", "2", "--save", str(tmp / "ckpt"), "--save-interval", "1000")
    return tmp / "ckpt"


def test_null_slots_switched_on_from_a_checkpoint_without_them(tree, plain_source, tmp_path):
    """--pretrained-checkpoint of a checkpoint without null slots: the first iteration's loss
    equals that of the same model continued without null slots (no null pick at the switch),
    and null slots come into use as the target is released."""
    tail = ["--pretrained-checkpoint", str(plain_source), "--train-iters", "4"]
    plain = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp_path / "plain",
                     *with_null_experts(TINY, 0), *tail, "--tensorboard-dir", str(tmp_path / "tb0"))
    assert "without null slots" not in plain
    log = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp_path / "up", *with_null_experts(TINY, 4),
                   *SWITCH, *tail,
                   "--tensorboard-dir", str(tmp_path / "tb1"))
    assert f"megatron-nullmoe: loaded {plain_source}" in log
    assert "2 router(s) start with no null picks" in log
    want, got = tensorboard(tmp_path / "tb0", "lm loss"), tensorboard(tmp_path / "tb1", "lm loss")
    assert got[1] == want[1], (want, got)
    rates = tensorboard(tmp_path / "tb1", "real_experts_per_token")
    assert rates[1] == TOPK and rates[4] < TOPK


def test_a_checkpoint_without_null_slots_is_refused_where_it_cannot_fit(tree, plain_source,
                                                                        tmp_path):
    """Its optimizer state (a plain --load) and a checkpoint of another architecture are
    refused, naming the flags to use or the tensors that differ."""
    env_fail = {"check": False}
    nulls = with_null_experts(TINY, 4)
    log = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp_path / "a", *nulls, "--load",
                   str(plain_source), "--train-iters", "3", **env_fail)
    assert "its optimizer state does not fit a model with null slots" in log
    assert "--pretrained-checkpoint or --finetune, or add --no-load-optim" in log
    bigger = [*nulls, "--pretrained-checkpoint", str(plain_source), "--train-iters", "3"]
    bigger[bigger.index("--num-experts") + 1] = "8"
    log = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp_path / "b", *bigger, **env_fail)
    assert "does not fit this model: only null-slot router state" in log
    assert "router.weight (saved [2, 4, 64], this model [2, 8, 64])" in log, log[-3000:]
