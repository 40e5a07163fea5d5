"""Megatron-LM's own `pretrain()` with null experts, on CPU: 2 ranks, EP 2, gloo, `--mock-data`.

The entry scripts in launch/megatron_lm/ run unchanged Megatron-LM from a release tree (see
tests/_megatron_lm_tree.py; skipped when none is found). What is checked, in Megatron-LM's own
log line: a finite loss and the null-expert metrics; that a run stopped at iteration N
(`--exit-interval`) and resumed to 2N continues exactly as an uninterrupted one; and that the
FLOPs Megatron-LM accumulates count realised real experts per token, not top-k.

Resume on CPU needed two fixes of ours: Megatron-LM builds its data iterators after restoring the
checkpoint's RNG states, and each DataLoader iterator draws a seed from the CPU generator, which on
CPU is also dropout's (see _mcore/cpu_megatron_lm.py); and budget control now steps after each
optimizer step, so the checkpoint holds the bias for the last step (megatron_lm/hooks.py).

Megatron-LM prints, at the second iteration of every run (fresh or resumed), the mean of the
run's first two iterations: on a run's first iteration training_log logs without resetting its
accumulators (`should_reset = not is_first_iteration`, core_v0.16.1 to core_v0.19.0). With
`--log-interval 1` the resumed run's line N+2 therefore differs from the uninterrupted run's,
although training is identical. The per-iteration loss Megatron-LM writes to TensorBoard is taken
from the step itself, so the resume test compares those for every iteration (exactly), and
checks line N+2 against that mean. With `--log-interval L > 1` and N a multiple of L, every
interval line of the resumed run matches.
"""

from __future__ import annotations

import math
import re

import pytest

from megatron_nullmoe.megatron_lm.logs import iterations
from tests._megatron_lm_run import TINY, TOPK, pretrain, tensorboard

N = 3  # stop at N, resume to 2N
GPT = [*TINY, "--train-iters", str(2 * N)]
# Budget control moves a null bias after every step: the resume must carry it over exactly.
BUDGET = ["--null-expert-target-real-per-token", "1.0", "--null-expert-budget-update-rate", "0.05"]


@pytest.fixture(scope="module")
def gpt(tree, tmp_path_factory):
    """An uninterrupted run to 2N, and one stopped at N and resumed to 2N."""
    tmp = tmp_path_factory.mktemp("gpt")
    logs = {}
    logs["full"] = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp, *GPT, *BUDGET,
                            "--save", str(tmp / "full_ckpt"), "--save-interval", "1000",
                            "--tensorboard-dir", str(tmp / "full_tb"))
    ckpt = ["--save", str(tmp / "ckpt"), "--save-interval", "1000"]
    logs["first"] = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp, *GPT, *BUDGET, *ckpt,
                             "--exit-interval", str(N))
    logs["resumed"] = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp, *GPT, *BUDGET, *ckpt,
                               "--load", str(tmp / "ckpt"), "--tensorboard-dir",
                               str(tmp / "resumed_tb"))
    return tmp, logs


def assert_null_metrics(lines: dict[int, dict[str, str]], expected: range) -> None:
    assert sorted(lines) == list(expected)
    for fields in lines.values():
        assert math.isfinite(float(fields["lm loss"]))
        assert 0.0 < float(fields["null_slot_fraction"]) < 1.0
        assert 0.0 < float(fields["real_experts_per_token"]) < TOPK


def test_gpt_pretrain_runs_on_cpu_with_null_expert_metrics(gpt):
    _, logs = gpt
    assert logs["full"].count("megatron-nullmoe: no CUDA, running Megatron-LM on CPU (gloo):") == 1
    assert_null_metrics(iterations(logs["full"]), range(1, 2 * N + 1))


def test_resume_continues_exactly_like_an_uninterrupted_run(gpt):
    tmp, logs = gpt
    full, first, resumed = (iterations(logs[k]) for k in ("full", "first", "resumed"))
    assert sorted(first) == list(range(1, N + 1)) and sorted(resumed) == list(range(N + 1, 2 * N + 1))
    assert all(first[i]["lm loss"] == full[i]["lm loss"] for i in first)
    # The resumed run's first iteration, as printed, and every step's grad norm.
    assert resumed[N + 1]["lm loss"] == full[N + 1]["lm loss"]
    assert [resumed[i]["grad norm"] for i in resumed] == [full[i]["grad norm"] for i in resumed]
    # Every resumed iteration's own loss, as Megatron-LM writes it to TensorBoard: bit-equal.
    tb_full = tensorboard(tmp / "full_tb", "lm loss")
    tb_resumed = tensorboard(tmp / "resumed_tb", "lm loss")
    assert sorted(tb_resumed) == list(range(N + 1, 2 * N + 1))
    assert all(tb_resumed[i] == tb_full[i] for i in tb_resumed), (tb_full, tb_resumed)
    # Megatron-LM's own printing: line N+2 of a resumed run is the mean of its first two steps.
    mean = (tb_full[N + 1] + tb_full[N + 2]) / 2
    assert float(resumed[N + 2]["lm loss"]) == pytest.approx(mean, rel=1e-6)


def test_megatron_lm_flops_count_realised_experts_not_topk(gpt):
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    tmp, logs = gpt
    # Megatron-LM's own FLOPs function, evaluated by the hook at the first step's rate and at top-k.
    said = re.search(r"Megatron-LM's FLOPs and TFLOP/s count realised real experts per token, "
                     r"not top-k; first step: (\S+) of (\d+), (\S+) FLOPs \((\S+) at top-k\)",
                     logs["full"])
    assert said, "no FLOPs line"
    first, topk, at_first, at_topk = (float(x) for x in said.groups())
    assert topk == TOPK and first < TOPK and at_first < at_topk
    slope = (at_topk - at_first) / (topk - first)  # the count is linear in experts per token
    # What Megatron-LM accumulated (and checkpointed) is that count at each step's realised rate,
    # the rate Megatron-LM logs for the step (over all ranks and layers).
    rates = tensorboard(tmp / "full_tb", "real_experts_per_token")
    assert sorted(rates) == list(range(1, 2 * N + 1)) and rates[1] == pytest.approx(first, rel=1e-6)
    expected = sum(at_topk - slope * (topk - r) for r in rates.values())
    state = load_common_state_dict(tmp / "full_ckpt" / f"iter_{2 * N:07d}")
    assert state["iteration"] == 2 * N
    assert state["num_floating_point_operations_so_far"] == pytest.approx(expected, rel=1e-6)
    assert expected < 2 * N * at_topk * 0.9


def test_vlm_pretrain_runs_on_cpu_with_null_expert_metrics(tree, tmp_path):
    vlm = [*TINY, "--train-iters", "2", "--img-h", "32", "--img-w", "32", "--patch-dim", "16",
           "--dataloader-seq-length", "64"]
    log = pretrain(tree, "pretrain_vlm_nullmoe.py", tmp_path, *vlm)
    assert "running Megatron-LM on CPU (gloo)" in log
    assert_null_metrics(iterations(log), range(1, 3))


def test_a_resume_that_would_change_the_gate_rule_is_refused(tree, gpt):
    """The fixture's checkpoint trained with the default gate rule (keep_null_share, slot_ratio);
    resuming it under the old defaults' rule is refused by name before a step is taken, and the
    checkpoint folder is left as it was."""
    tmp, _ = gpt
    ckpt = tmp / "ckpt"
    before = sorted((p.relative_to(ckpt), p.stat().st_mtime_ns) for p in ckpt.rglob("*"))
    log = pretrain(tree, "pretrain_gpt_nullmoe.py", tmp, *GPT, *BUDGET, "--load", str(ckpt),
                   "--save", str(ckpt), "--save-interval", "1000", "--train-iters", str(3 * N),
                   "--null-expert-gate-normalization", "renormalize", check=False)
    assert ("this resume would change the gate rule the checkpoint trained with: "
            "--null-expert-gate-normalization is 'renormalize' here, 'keep_null_share' in the "
            "checkpoint") in log, log[-4000:]
    assert "Pass --null-expert-gate-normalization keep_null_share to resume" in log
    assert not iterations(log)
    assert sorted((p.relative_to(ckpt), p.stat().st_mtime_ns) for p in ckpt.rglob("*")) == before
