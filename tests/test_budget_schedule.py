"""A compute schedule for the budget target (issue 19, item 3).

`target_real_per_token` can move from `target_start_real_per_token` (at optimizer step 0) to its
own value over `target_schedule_steps` steps, linearly or along a half cosine. The config's pure
`target_at(step)` / `mean_target(steps)` are checked by hand; the routers compute the same target
on the device from their `budget_step` buffer (checkpointed), step by step, without a host read;
the trainer resumes mid-schedule exactly and logs the target; the realised rate reaches the end
target; the recipe keys, the Megatron-LM flags and the sweep's FLOP planning know the schedule.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_nullmoe import NullExpertConfig, NullExpertConfigError, update_null_budget
from tests._models import HIDDEN, build_layer, moe_config

LINEAR = NullExpertConfig(num_null_experts=8, target_real_per_token=2.0,
                          target_start_real_per_token=4.0, target_schedule_steps=8)
COSINE = NullExpertConfig(num_null_experts=8, target_real_per_token=2.0,
                          target_start_real_per_token=4.0, target_schedule_steps=4,
                          target_schedule="cosine")


# ------------------------------------------------------------------------- the schedule, by hand
def test_linear_schedule_by_hand():
    assert [LINEAR.target_at(s) for s in range(11)] == [
        4.0, 3.75, 3.5, 3.25, 3.0, 2.75, 2.5, 2.25, 2.0, 2.0, 2.0]
    assert LINEAR.target_at(10**9) == 2.0
    assert LINEAR.mean_target(1) == 4.0
    assert LINEAR.mean_target(4) == (4 + 3.75 + 3.5 + 3.25) / 4
    assert LINEAR.mean_target(8) == 3.125  # the ramp alone: (4 + 2.25) / 2
    assert LINEAR.mean_target(12) == (8 * 3.125 + 4 * 2.0) / 12  # ramp, then the end value
    # an interval's mean (what the trainer logs): steps 6 .. 11
    assert LINEAR.mean_target(12, first_step=6) == (2.5 + 2.25 + 4 * 2.0) / 6
    # upward too
    up = NullExpertConfig(num_null_experts=8, target_real_per_token=3.0,
                          target_start_real_per_token=1.0, target_schedule_steps=2)
    assert [up.target_at(s) for s in range(4)] == [1.0, 2.0, 3.0, 3.0]


def test_cosine_schedule_by_hand():
    h = math.sqrt(0.5)  # cos(pi / 4)
    want = [4.0, 4.0 - 2.0 * (1 - h) / 2, 3.0, 4.0 - 2.0 * (1 + h) / 2, 2.0, 2.0]
    got = [COSINE.target_at(s) for s in range(6)]
    assert got == pytest.approx(want, rel=1e-15, abs=0)
    assert got[0] == 4.0 and got[4:] == [2.0, 2.0]  # exact ends
    # a half cosine is point-symmetric about its middle: steps 1 and 3 add up to 6
    assert COSINE.mean_target(4) == pytest.approx((4.0 + 6.0 + 3.0) / 4, rel=1e-15)
    assert COSINE.mean_target(6) == pytest.approx((13.0 + 2 * 2.0) / 6, rel=1e-15)
    # slow at both ends, fast in the middle (the linear ramp moves 0.5 per step)
    steps = [got[i] - got[i + 1] for i in range(4)]
    assert steps[0] < 0.5 < steps[1] and steps[3] < 0.5 < steps[2]


def test_without_a_schedule_the_target_is_constant():
    c = NullExpertConfig(num_null_experts=8, target_real_per_token=1.5)
    assert not c.target_scheduled
    assert [c.target_at(s) for s in (0, 1, 1000)] == [1.5, 1.5, 1.5]
    assert c.mean_target(7) == 1.5 and c.mean_target(9, first_step=3) == 1.5
    with pytest.raises(NullExpertConfigError, match="target_real_per_token=None"):
        NullExpertConfig(num_null_experts=8).target_at(0)
    with pytest.raises(ValueError, match="at least one step"):
        LINEAR.mean_target(0)
    with pytest.raises(ValueError, match="step=-1"):
        LINEAR.target_at(-1)


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs,message", [
    (dict(target_start_real_per_token=3.0, target_schedule_steps=4),
     r"target_start_real_per_token=3\.0 .*None without target_real_per_token"),
    (dict(target_real_per_token=2.0, target_start_real_per_token=3.0),
     r"target_schedule_steps=0 .*an integer >= 1 with target_start_real_per_token"),
    (dict(target_real_per_token=2.0, target_schedule_steps=5),
     r"target_schedule_steps=5 .*0 without target_start_real_per_token"),
    (dict(target_real_per_token=2.0, target_schedule="cosine"),
     r"target_schedule='cosine' .*without target_start_real_per_token"),
    (dict(target_real_per_token=2.0, target_start_real_per_token=3.0, target_schedule_steps=4,
          target_schedule="exponential"), r"target_schedule='exponential' .*'linear', 'cosine'"),
    (dict(target_real_per_token=2.0, target_start_real_per_token=0.0, target_schedule_steps=4),
     r"target_start_real_per_token=0\.0 .*a number > 0"),
    (dict(target_schedule_steps=-1), r"target_schedule_steps=-1 .*an integer >= 0"),
    (dict(target_real_per_token=2.0, target_start_real_per_token=3.0, target_schedule_steps=2.5),
     r"target_schedule_steps=2\.5 .*an integer"),
    (dict(target_real_per_token=2.0, target_start_real_per_token=3.0, target_schedule_steps=True),
     r"target_schedule_steps=True .*an integer"),
])
def test_schedule_settings_are_checked(kwargs, message):
    with pytest.raises(NullExpertConfigError, match=message):
        NullExpertConfig(num_null_experts=4, **kwargs)


def test_the_start_is_checked_against_top_k():
    config = moe_config(num_experts=4, topk=2)
    nc = NullExpertConfig(num_null_experts=4, target_real_per_token=1.0,
                          target_start_real_per_token=2.5, target_schedule_steps=3)
    with pytest.raises(NullExpertConfigError,
                       match=r"target_start_real_per_token=2\.5 .*in \(0, top-k=2\]"):
        nc.check(config)
    NullExpertConfig(num_null_experts=4, target_real_per_token=1.0,
                     target_start_real_per_token=2.0, target_schedule_steps=3).check(config)


def test_recipe_keys_carry_the_schedule_and_name_refusals():
    from megatron_nullmoe.run.config import ConfigError, load_config

    keys = ["model.null_experts.num_null_experts=8", "model.null_experts.target_real_per_token=2",
            "model.null_experts.target_start_real_per_token=4",
            "model.null_experts.target_schedule_steps=8"]
    cfg = load_config(None, keys)
    assert cfg.model.null_experts == LINEAR
    assert load_config(None, [*keys, "model.null_experts.target_schedule=cosine"]
                       ).model.null_experts.target_schedule == "cosine"
    with pytest.raises(ConfigError, match="model.null_experts.target_schedule='cos' is not valid: "
                                          "one of linear, cosine"):
        load_config(None, [*keys, "model.null_experts.target_schedule=cos"])
    with pytest.raises(ConfigError, match="model.null_experts: target_schedule_steps=0"):
        load_config(None, [*keys[:3]])
    with pytest.raises(ConfigError, match=r"model.null_experts.target_schedule_steps=-2 .*>= 0"):
        load_config(None, [*keys[:3], "model.null_experts.target_schedule_steps=-2"])


def test_megatron_lm_flags_exist_and_parse():
    import argparse

    from megatron_nullmoe.megatron_lm import add_null_moe_args, null_config_from_args
    from megatron_nullmoe.megatron_lm.args import FLAGS

    assert {"--null-expert-target-start-real-per-token", "--null-expert-target-schedule-steps",
            "--null-expert-target-schedule"} <= set(FLAGS)
    parser = add_null_moe_args(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args([])
    assert (args.null_expert_target_start_real_per_token, args.null_expert_target_schedule_steps,
            args.null_expert_target_schedule) == (None, 0, "linear")
    args = parser.parse_args([
        "--num-null-experts", "8", "--null-expert-target-real-per-token", "2",
        "--null-expert-target-start-real-per-token", "4",
        "--null-expert-target-schedule-steps", "4", "--null-expert-target-schedule", "cosine"])
    args.num_experts = 8
    assert null_config_from_args(args) == COSINE
    for bad in (["--null-expert-target-schedule", "exp"],
                ["--null-expert-target-schedule-steps", "2.5"],
                ["--null-expert-target-start-real-per-token", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    args = parser.parse_args(["--num-null-experts", "8",
                              "--null-expert-target-schedule-steps", "4"])
    args.num_experts = 8
    with pytest.raises(NullExpertConfigError, match="target_schedule_steps=4"):
        null_config_from_args(args)


def test_sweep_plans_a_scheduled_run_at_its_mean_target():
    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.sweep.checks import _why, expected_real_per_token

    keys = ["model.num_experts=8", "model.router_topk=4", "model.null_experts.num_null_experts=8",
            "model.null_experts.target_real_per_token=2",
            "model.null_experts.target_start_real_per_token=4",
            "model.null_experts.target_schedule_steps=8", "steps=12"]
    cfg = load_config(None, keys)
    assert expected_real_per_token(cfg) == LINEAR.mean_target(12) == 2.75
    assert "target_start_real_per_token=4 -> target_real_per_token=2" in _why(cfg)
    assert expected_real_per_token(load_config(None, keys[:4] + ["steps=12"])) == 2.0


# --------------------------------------------------------------------------- the routers' side
def _scheduled_layer(nc: NullExpertConfig, **overrides):
    return build_layer(moe_config(num_experts=8, topk=4, **overrides), nc)


def test_routers_follow_the_schedule_step_by_step(single_rank):
    """Before each update the control's target (computed on the device from budget_step) is
    target_at(step); the update moves the bias by rate x sign(realised - that target) and
    advances budget_step by one."""
    for nc in (LINEAR, COSINE):
        torch.manual_seed(0)
        layer = _scheduled_layer(nc)
        router = layer.router
        opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
        for step in range(nc.target_schedule_steps + 3):
            assert router.budget_step.dtype == torch.float64 and float(router.budget_step) == step
            target = router.budget_target()
            assert isinstance(target, torch.Tensor) and target.dtype == torch.float64
            assert float(target) == pytest.approx(nc.target_at(step), rel=1e-15, abs=0)
            if nc is LINEAR:
                assert float(target) == nc.target_at(step)  # the same arithmetic: bit-equal
            x = torch.randn(32, 4, HIDDEN)
            out, _ = layer(x)
            opt.zero_grad()
            (out ** 2).mean().backward()
            opt.step()
            before = float(router.null_budget_bias)
            realised = update_null_budget(layer)[0]
            moved = float(router.null_budget_bias) - before
            want = math.copysign(nc.budget_update_rate, realised - nc.target_at(step))
            assert moved == pytest.approx(want, rel=1e-5), (step, realised)
        assert float(router.budget_step) == nc.target_schedule_steps + 3


def test_the_schedule_state_is_a_buffer_only_where_a_schedule_is_set(single_rank):
    """Routers without a schedule keep exactly the state keys they had before schedules existed
    (so their old checkpoints load, strictly); scheduled ones checkpoint budget_step, which no
    bf16 cast touches."""
    from megatron.core.transformer.module import Float16Module

    plain = _scheduled_layer(NullExpertConfig(num_null_experts=8, target_real_per_token=2.0))
    assert plain.router.budget_step is None
    assert not [k for k in plain.router.state_dict() if "budget_step" in k]
    assert plain.router.budget_target() == 2.0
    fresh = _scheduled_layer(NullExpertConfig(num_null_experts=8, target_real_per_token=2.0))
    fresh.router.load_state_dict(plain.router.state_dict())  # strict
    assert _scheduled_layer(NullExpertConfig(num_null_experts=8)).router.budget_target() is None

    config = moe_config(num_experts=8, topk=4, bf16=True)
    layer = build_layer(config, LINEAR)
    assert "budget_step" in layer.router.state_dict()
    Float16Module(config, layer)
    assert layer.router.weight.dtype == torch.bfloat16
    assert layer.router.budget_step.dtype == torch.float64  # exact past bf16's 256 steps
    layer.router.budget_step.fill_(1000.0)
    update_null_budget(layer)
    assert float(layer.router.budget_step) == 1001.0


def test_a_scheduled_budget_step_reads_nothing_back(single_rank):
    """The scheduled target is computed on the device: update_null_budget of 4 scheduled layers
    still reads to the host once (as without a schedule, tests/test_cluster_path.py)."""
    from megatron_nullmoe.host_syncs import count_host_syncs

    for nc in (LINEAR, COSINE):
        layers = [_scheduled_layer(nc) for _ in range(4)]
        x = torch.randn(16, 4, HIDDEN)
        for layer in layers:
            layer(x)
        with count_host_syncs() as syncs:
            update_null_budget(torch.nn.ModuleList(layers))
        assert syncs.total <= 1, dict(syncs.by_op)
        assert all(float(l.router.budget_step) == 1.0 for l in layers)


# ----------------------------------------------------------------------------------- trainer
def _read_router_state(checkpoint) -> dict:
    """Every router's null_budget_bias and budget_step from a dist_checkpointing folder."""
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    keys = [k for k in md if k.endswith((".null_budget_bias", ".budget_step"))]
    state = {k: torch.empty(md[k].size, dtype=md[k].properties.dtype) for k in keys}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state


SCHEDULE = ["model.null_experts.target_real_per_token=2.0",
            "model.null_experts.target_start_real_per_token=4.0",
            "model.null_experts.target_schedule_steps=8"]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    from tests._train import tiny_text

    return tiny_text(tmp_path_factory.mktemp("schedule"), 200, 24, 12)


def _args(root, run_dir, *extra):
    from tests._train import ROOT

    return ["--config", str(ROOT / "examples/gpt_null_moe.yaml"), f"dir={run_dir}",
            f"data.path={root / 'train.jsonl'}", f"data.valid_path={root / 'val.jsonl'}",
            f"data.tokenizer={root / 'tok.model'}", "data.seq_length=16", "model.num_layers=2",
            "model.moe_layer_freq=1", "model.hidden_size=64", "model.ffn_hidden_size=128",
            "model.moe_ffn_hidden_size=64", "data.micro_batch_size=8", "data.global_batch_size=16",
            "optim.warmup_steps=2", "parallel.expert=1", "logging.eval_every=0",
            "logging.log_every=1", "logging.progress_bar=false", "logging.tensorboard=false",
            "checkpoint.save_every=0", *extra]


def _records(run_dir) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_resumes_mid_schedule_exactly_and_logs_the_target(text_data, tmp_path):
    """12 steps straight against 6 steps, a stop with a checkpoint, and a resume to 12: the same
    losses, targets and final budget state (budget_step = 12 in every router)."""
    from tests._train import losses, run

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = run(_args(text_data, straight, "steps=12", *SCHEDULE))
    assert "(target 4.00)" in out.stdout and "(target 2.00)" in out.stdout  # the progress line
    run(_args(text_data, resumed, "steps=12", "exit_at_step=6", *SCHEDULE))
    assert (resumed / "checkpoints" / "iter_0000006").is_dir()
    mid = _read_router_state(resumed / "checkpoints" / "iter_0000006")
    assert [float(v) for k, v in mid.items() if k.endswith("budget_step")] == [6.0, 6.0]
    out = run(_args(text_data, resumed, "steps=12", *SCHEDULE))
    assert "resumed from" in out.stdout

    assert losses(straight) == losses(resumed) and len(losses(straight)) == 12
    records = _records(straight)
    targets = {r["step"]: r["moe/target_real_per_token"] for r in records if "train/loss" in r}
    assert targets == {s: LINEAR.target_at(s - 1) for s in range(1, 13)}  # log_every=1
    assert targets == {r["step"]: r["moe/target_real_per_token"] for r in _records(resumed)
                       if "train/loss" in r}
    a = _read_router_state(straight / "checkpoints" / "iter_0000012")
    b = _read_router_state(resumed / "checkpoints" / "iter_0000012")
    assert a.keys() == b.keys() and len(a) == 4  # two MoE layers: bias and step each
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert [float(v) for k, v in a.items() if k.endswith("budget_step")] == [12.0, 12.0]
    # the bias moved (a sign controller can be back at 0 at any one step, so both are read)
    assert any(float(v) != 0.0 for state in (mid, a) for k, v in state.items()
               if k.endswith("null_budget_bias")), (mid, a)


LONG_STEPS, RAMP, TAIL_FROM = 96, 32, 49
SCHEDULE_LONG = [f"steps={LONG_STEPS}", "model.null_experts.target_real_per_token=2.0",
                 "model.null_experts.target_start_real_per_token=3.0",
                 f"model.null_experts.target_schedule_steps={RAMP}",
                 # a step the sign control can follow with, at an LR that leaves the router calm
                 "model.null_experts.budget_update_rate=0.01", "optim.lr=3e-4",
                 "optim.min_lr=3e-5"]


def test_the_realised_rate_reaches_the_end_target(text_data, tmp_path):
    """A longer run: 3.0 -> 2.0 over 32 steps, then 2.0 to step 96. Over the second half of the
    run the realised real experts per token (moe/real_per_token: both MoE layers, all tokens)
    averages within 2% of the end target. Measured on CPU (megatron-core 0.16.1 and 0.19.2
    alike): 1.9975 over steps 49..96 (per-step spread 0.11), 1.9875 over the last 32."""
    from tests._train import run

    run_dir = tmp_path / "long"
    run(_args(text_data, run_dir, *SCHEDULE_LONG))
    train = [r for r in _records(run_dir) if "train/loss" in r]
    assert len(train) == LONG_STEPS
    sched = NullExpertConfig(num_null_experts=8, target_real_per_token=2.0,
                             target_start_real_per_token=3.0, target_schedule_steps=RAMP)
    assert [r["moe/target_real_per_token"] for r in train] == [
        sched.target_at(s) for s in range(LONG_STEPS)]
    tail = [r["moe/real_per_token"] for r in train if r["step"] >= TAIL_FROM]
    mean_tail = sum(tail) / len(tail)
    assert abs(mean_tail - 2.0) <= 0.02 * 2.0, (mean_tail, tail)
