"""Megatron-LM's own `pretrain()` continues a run without null slots with them (issue 19).

A top-2 GPT without null slots is trained and saved by the entry script (2 CPU ranks); the same
model with `--num-null-experts 4` loads it through Megatron-LM's `--pretrained-checkpoint`, as a
user switches an existing run:

- its first iteration's loss equals that of the same model continued without null slots (the
  routers start with no null pick);
- the compute schedule (2 -> 1 real experts per token over 10 iterations) is reached: over the
  second half of a 40-iteration run the realised rate averages within 2% of 1;
- stopped in the middle of the schedule and launched again with the same flags (`--load` and
  `--save` of its own folder, `--pretrained-checkpoint` of the source, as Megatron-LM users
  write it), the run continues exactly: every iteration's loss and realised rate bit-equal;
- `--finetune --load` and `--load --no-load-optim` switch the same weights;
- a plain `--load` of the source (its optimizer state) and a checkpoint of another architecture
  are refused by name.

Kept apart from test_megatron_lm_pretrain.py so that the two files run side by side (make test
runs 2 test files at a time).
"""

from __future__ import annotations

import math

import pytest

from megatron_nullmoe.megatron_lm.logs import iterations
from tests._megatron_lm_run import TINY, TOPK, pretrain, tensorboard


def with_flag(flags: list[str], flag: str, value) -> list[str]:
    i = flags.index(flag)
    return [*flags[:i + 1], str(value), *flags[i + 2:]]


def with_null_experts(flags: list[str], z: int) -> list[str]:
    """TINY with Z null slots, expert parallel 1 and no linear biases: with Z = 0 the entry
    script builds megatron-core's stock MoE layer, which runs on CPU only so (its alltoall
    dispatcher needs EP 1 there, and its expert bias add fails autograd's view check)."""
    return [*with_flag(with_flag(flags, "--num-null-experts", z), "--expert-model-parallel-size", 1),
            "--disable-bias-linear"]


# The target starts at k (no null pick) and is released to 1.0 over RAMP iterations.
ITERS, RAMP, STOP = 40, 10, 5
SWITCH = ["--null-expert-target-real-per-token", "1.0", "--null-expert-budget-update-rate", "0.05",
          "--null-expert-target-start-real-per-token", str(TOPK),
          "--null-expert-target-schedule-steps", str(RAMP)]


@pytest.fixture(scope="module")
def plain_source(tree, tmp_path_factory):
    """A top-2 run without null slots, 2 iterations, saved."""
    tmp = tmp_path_factory.mktemp("plain")
    pretrain(tree, "pretrain_gpt_nullmoe.py", tmp, *with_null_experts(TINY, 0),
             "--train-iters", "2", "--save", str(tmp / "ckpt"), "--save-interval", "1000")
    return tmp / "ckpt"


@pytest.fixture(scope="module")
def switched(tree, plain_source, tmp_path_factory):
    """The source switched to null slots for ITERS iterations: once straight, and once stopped
    at STOP (mid-schedule) and launched again with the same flags."""
    tmp = tmp_path_factory.mktemp("switched")
    flags = [*with_null_experts(TINY, 4), *SWITCH, "--pretrained-checkpoint", str(plain_source),
             "--train-iters", str(ITERS)]
    logs = {"straight": pretrain(tree, "pretrain_gpt_nullmoe.py", tmp / "straight", *flags,
                                 "--tensorboard-dir", str(tmp / "straight_tb"))}
    own = ["--load", str(tmp / "own"), "--save", str(tmp / "own"), "--save-interval", "1000"]
    logs["stopped"] = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp / "split", *flags, *own,
                               "--exit-interval", str(STOP))
    logs["resumed"] = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp / "split", *flags, *own,
                               "--tensorboard-dir", str(tmp / "resumed_tb"))
    return tmp, logs


def test_null_slots_switched_on_from_a_checkpoint_without_them(tree, plain_source, switched,
                                                               tmp_path):
    """--pretrained-checkpoint of a checkpoint without null slots: the first iteration's loss
    equals that of the same model continued without null slots (no null pick at the switch),
    and null slots come into use as the target is released."""
    tmp, logs = switched
    plain = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp_path / "plain",
                     *with_null_experts(TINY, 0), "--pretrained-checkpoint", str(plain_source),
                     "--train-iters", "1", "--tensorboard-dir", str(tmp_path / "tb0"))
    assert "without null slots" not in plain
    assert f"megatron-nullmoe: loaded {plain_source}" in logs["straight"]
    assert "2 router(s) start with no null picks" in logs["straight"]
    want = tensorboard(tmp_path / "tb0", "lm loss")
    got = tensorboard(tmp / "straight_tb", "lm loss")
    assert got[1] == want[1], (want, got)
    rates = tensorboard(tmp / "straight_tb", "real_experts_per_token")
    assert rates[1] == TOPK and rates[4] < TOPK


def test_finetune_and_no_load_optim_switch_the_same_weights(tree, plain_source, switched,
                                                           tmp_path):
    """The other loads users write: `--finetune --load` (weights only, like
    --pretrained-checkpoint: its first iteration's loss equals the straight switch's) and
    `--load --no-load-optim` (weights, iteration count and data position: it continues at the
    source's iteration 3, with no null pick there). Megatron-LM loads the LR schedule with the
    optimizer, so with --no-load-optim the schedule starts again (iteration 3 one step in)."""
    tmp, _ = switched
    nulls = [*with_null_experts(TINY, 4), *SWITCH]
    log = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp_path / "ft", *nulls, "--finetune",
                   "--load", str(plain_source), "--train-iters", "1",
                   "--tensorboard-dir", str(tmp_path / "ft_tb"))
    assert "2 router(s) start with no null picks" in log
    straight = tensorboard(tmp / "straight_tb", "lm loss")
    assert tensorboard(tmp_path / "ft_tb", "lm loss")[1] == straight[1]
    log = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp_path / "nlo", *nulls, "--load",
                   str(plain_source), "--no-load-optim", "--train-iters", "3",
                   "--tensorboard-dir", str(tmp_path / "nlo_tb"))
    assert "2 router(s) start with no null picks" in log
    lines = iterations(log)
    assert sorted(lines) == [3], sorted(lines)  # the source stopped at iteration 2
    # Megatron-LM prints the LR after the step's scheduler step: cosine 1e-3 -> 1e-4 over 3
    # iterations, one step in (a loaded schedule would be 3 steps in, at 1e-4).
    one_step_in = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi / 3))
    assert float(lines[3]["learning rate"]) == pytest.approx(one_step_in, rel=1e-3)
    assert tensorboard(tmp_path / "nlo_tb", "real_experts_per_token") == {3: TOPK}


def test_the_schedule_reaches_its_target_after_the_switch(switched):
    """2 -> 1 over RAMP iterations, then 1 to ITERS: over the second half of the run the
    realised rate (all ranks and layers, as Megatron-LM logs it) averages within 2% of 1.
    Measured: 0.993 at core_v0.16.1 and 1.008 at core_v0.19.0 over iterations 21..40 (each
    iteration within about 0.15 of 1)."""
    tmp, _ = switched
    rates = tensorboard(tmp / "straight_tb", "real_experts_per_token")
    assert sorted(rates) == list(range(1, ITERS + 1))
    assert rates[RAMP // 2] > 1.2  # still on the way down in the middle of the schedule
    tail = [rates[i] for i in range(ITERS // 2 + 1, ITERS + 1)]
    assert abs(sum(tail) / len(tail) - 1.0) <= 0.02, tail


def test_a_switched_run_stopped_mid_schedule_resumes_exactly(switched):
    """Stopped at STOP (of a RAMP-iteration schedule) and launched again with the same flags:
    Megatron-LM loads the run's own checkpoint (--pretrained-checkpoint is then not used, and the
    routers are not re-armed), and every later iteration's loss and realised rate equal the
    straight run's, bit for bit: the budget bias and the schedule's step came back exactly."""
    tmp, logs = switched
    assert "2 router(s) start with no null picks" in logs["stopped"]
    assert "start with no null picks" not in logs["resumed"]
    for tag in ("lm loss", "real_experts_per_token"):
        full = tensorboard(tmp / "straight_tb", tag)
        resumed = tensorboard(tmp / "resumed_tb", tag)
        assert sorted(resumed) == list(range(STOP + 1, ITERS + 1)), (tag, sorted(resumed))
        assert all(resumed[i] == full[i] for i in resumed), (tag, full, resumed)


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


def test_every_rank_agrees_on_a_load_whatever_its_stage_holds():
    """`agree` over every rank's fit: a dense stage's rank (nothing of its own to fit or refuse)
    refuses with the same message as the rank that found the reason, and reports the whole
    model's switch, each tensor counted once over replicas."""
    from megatron_nullmoe.megatron_lm.upcycle import Agreed, RankFit, agree
    from megatron_nullmoe.upcycle import UpcycleError

    def layer(i):
        return frozenset({(f"decoder.layers.{i}.mlp.router.null_weight", (0, 0)),
                          (f"decoder.layers.{i}.mlp.router.null_budget_bias", ())})

    dense, moe = RankFit(optimizer=True), RankFit(absent=layer(2) | layer(3), optimizer=True)
    for fits in ([dense, moe], [moe, dense]):
        with pytest.raises(UpcycleError, match=r"checkpoint c has no null-slot state \(4 tensors\)"
                                               ".*--no-load-optim"):
            agree(fits, "checkpoint c")
    weights_only = [RankFit(), RankFit(absent=layer(2) | layer(3)), RankFit(absent=layer(3)),
                    RankFit(absent=layer(2) | layer(3))]  # a replica; a stage of one layer
    assert agree(weights_only, "c") == Agreed(absent=4, widened=0, armed=2)
    assert agree([RankFit(), RankFit()], "c") == Agreed(absent=0, widened=0, armed=0)
    assert not agree([RankFit(), RankFit()], "c").fitted
    refused = [RankFit(), RankFit(refused="rank 1 says no"), RankFit(refused="rank 2 says no")]
    with pytest.raises(UpcycleError, match="^rank 1 says no$"):
        agree(refused, "c")
