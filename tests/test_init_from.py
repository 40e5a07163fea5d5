"""Issue 19, items 1-2: null experts switched on in a model that already has checkpoints.

In-process (one CPU rank): a megatron-core GPT without null slots is saved with dist_checkpointing;
the same architecture with null slots loads it (`init_weights_from`: only null-slot router state
may be missing, a saved expert bias of E slots fills the first E of E + Z) and, armed with
`start_null_slots_unpicked`, its first forward computes the source's logits, in both gate
normalisations and with sigmoid scores and expert bias. A different architecture is refused with
the differences listed. End to end (2 ranks, expert parallel 2): `checkpoint.init_from` in the
trainer, and a resume in the middle of the compute schedule that follows the switch is exact.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_nullmoe import NullExpertConfig, routing_stats, start_null_slots_unpicked
from megatron_nullmoe.run.checkpoint import MANIFEST, CheckpointError, locate
from megatron_nullmoe.train.checkpoint import init_weights_from
from tests._models import VOCAB, build_gpt

BUDGET = dict(num_null_experts=4, target_real_per_token=1.0, target_start_real_per_token=2.0,
              target_schedule_steps=10)


def save_source(model, path):
    """A checkpoint as the trainer writes it (dist_checkpointing + manifest), model only."""
    from megatron.core import dist_checkpointing

    path.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(path))
    (path / MANIFEST).write_text(json.dumps({"step": 7, "identity": {}, "files": {}}))
    return path


def logits(model, seed=0):
    from megatron_nullmoe.export.check import mcore_logits

    ids = torch.randint(4, VOCAB, (3, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return mcore_logits(model, ids)


def scramble(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


SOURCES = {
    "renormalize": ({}, {"gate_normalization": "renormalize"}),
    "keep_null_share": ({}, {"gate_normalization": "keep_null_share"}),
    "per_expert_keep": ({}, {"gate_normalization": "keep_null_share", "null_logits": "per_expert"}),
    "sigmoid": ({"moe_router_score_function": "sigmoid"}, {"gate_normalization": "renormalize"}),
}


@pytest.mark.parametrize("name", list(SOURCES))
def test_first_forward_after_the_switch_computes_the_source(single_rank, tmp_path, name):
    config, null = SOURCES[name]
    source = build_gpt(NullExpertConfig(), **config)
    want = logits(source)
    path = save_source(source, tmp_path / "iter_0000007")

    model = build_gpt(NullExpertConfig(**BUDGET, **null), **config)
    scramble(model)
    step, fresh = init_weights_from(path, model, {})
    assert step == 7
    routers = [l.mlp.router for l in model.decoder.layers]
    suffixes = sorted({k.rsplit(".", 1)[-1] for k in fresh})
    assert suffixes == ["budget_step", "null_budget_bias", "null_weight"]
    assert len(fresh) == 3 * len(routers)

    # without arming, the null slots are live and the outputs jump
    routing_stats(model, reset=True)
    assert not torch.allclose(logits(model), want, atol=1e-3)
    assert routing_stats(model, reset=True)["all"].null_fraction > 0

    assert start_null_slots_unpicked(model) == len(routers)
    got = logits(model)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert routing_stats(model, reset=True)["all"].null_fraction == 0.0
    for router in routers:
        assert router.start_unpicked and float(router.null_budget_bias) < 0
        router.end_start()  # as update_null_budget does at the step's end
    # the bias sits just below the closest token: lifting it by twice the margin picks nulls
    for router in routers:
        router.null_budget_bias += 2e-3
    logits(model)
    assert routing_stats(model, reset=True)["all"].null_fraction > 0


def test_an_expert_bias_of_e_slots_fills_the_first_e_of_e_plus_z(single_rank, tmp_path):
    """Sigmoid scores with aux-loss-free balancing (DeepSeek-V3 style): no budget control (the
    two would fight over the null slots), so nothing is armed and the null slots' bias stays as built."""
    config = {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
              "moe_router_load_balancing_type": "none"}
    source = build_gpt(NullExpertConfig(), **config)
    for i, layer in enumerate(source.decoder.layers):  # as trained: a non-zero expert bias
        layer.mlp.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, 4) * (i + 1))
    path = save_source(source, tmp_path / "iter_0000007")
    model = build_gpt(NullExpertConfig(num_null_experts=4), **config)
    scramble(model)
    before = [layer.mlp.router.expert_bias.clone() for layer in model.decoder.layers]
    _, fresh = init_weights_from(path, model, {})
    assert sorted({k.rsplit(".", 1)[-1] for k in fresh}) == ["null_weight"]
    for i, layer in enumerate(model.decoder.layers):
        bias = layer.mlp.router.expert_bias
        assert bias.shape == (8,) and bias.dtype == torch.float32
        assert torch.equal(bias[:4], torch.linspace(-0.05, 0.05, 4) * (i + 1))
        assert torch.equal(bias[4:], before[i][4:])  # the null slots' as the model had them
    assert start_null_slots_unpicked(model) == 0


def test_a_different_architecture_is_refused_with_what_differs(single_rank, tmp_path):
    path = save_source(build_gpt(NullExpertConfig()), tmp_path / "iter_0000007")
    # the manifest's identity lists differences by name ...
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["identity"] = {"model": {"hidden_size": 32, "num_experts": 4}}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as err:
        init_weights_from(path, build_gpt(NullExpertConfig(**BUDGET)), {
            "model": {"hidden_size": 32, "num_experts": 8, "null_experts": {"num_null_experts": 4}}},
            may_differ=("model.null_experts.",))
    assert "model.num_experts: checkpoint 4, this run 8" in str(err.value)
    assert "hidden_size" not in str(err.value) and "null_experts" not in str(err.value)
    # ... and a tensor that does not fit is refused by key and shape, never loaded in part
    model = build_gpt(NullExpertConfig(**BUDGET), experts=8)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(CheckpointError) as err:
        init_weights_from(path, model, {})
    text = str(err.value)
    assert "only null-slot router state" in text
    assert "decoder.layers.1.mlp.router.weight (saved [4, 32], this model [8, 32])" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


def test_locate_finds_the_newest_checkpoint_of_a_run(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        (run / "checkpoints" / f"iter_{step:07d}").mkdir(parents=True)
        (run / "checkpoints" / f"iter_{step:07d}" / MANIFEST).write_text("{}")
    (run / "config.yaml").write_text("checkpoint: {dir: null}\n")
    assert locate(run).name == "iter_0000004"
    (run / "checkpoints" / "latest").write_text("iter_0000002\n")
    assert locate(run / "checkpoints").name == "iter_0000002"
    assert locate(run / "checkpoints" / "iter_0000004").name == "iter_0000004"
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        locate(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        locate(tmp_path / "nope")


# ----------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    from tests._train import tiny_text

    return tiny_text(tmp_path_factory.mktemp("init_from"), 200, 24, 12)


def _args(root, run_dir, *extra):
    """The schedule tests' tiny GPT (top-4 over 8 experts, 8 null slots), 4 sequences a
    micro-batch: 2 micro-batches a step on each of 2 data-parallel ranks."""
    from tests.test_budget_schedule import _args as schedule_args

    return schedule_args(root, run_dir, "data.micro_batch_size=4", *extra)


@pytest.fixture(scope="module")
def source_run(text_data, tmp_path_factory):
    """One rank, top-4 over 8 experts, no null slots, 3 steps."""
    from tests._train import run

    source = tmp_path_factory.mktemp("init_from_source") / "source"
    run(_args(text_data, source, "steps=3", "model.null_experts.num_null_experts=0"))
    return source


SWITCH = ["model.null_experts.target_real_per_token=2.0",
          "model.null_experts.target_start_real_per_token=4.0",
          "model.null_experts.target_schedule_steps=6", "model.null_experts.budget_update_rate=0.05"]


def test_trainer_starts_from_a_run_without_null_slots_and_resumes_mid_schedule(
        text_data, source_run, tmp_path):
    """Source: one rank, top-4 over 8 experts, no null slots. Two continuations on 2 ranks with
    expert parallel 2 (the checkpoint reshards), 8 null slots and the target 4 -> 2 over 6 steps:
    8 steps straight, and 4 steps + a stop + a resume to 8 (which resumes its own checkpoint, not
    the source). The same losses and router state; the first step runs all k real experts."""
    from tests._train import losses, run
    from tests.test_budget_schedule import _read_router_state, _records

    source = source_run
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["parallel.expert=2", f"checkpoint.init_from={source}", *SWITCH]
    out = run(_args(text_data, straight, "steps=8", *common), ranks=2)
    assert f"started from {source}/checkpoints/iter_0000003 (step 3 of its run)" in out.stdout
    assert "2 router(s) start with no null picks" in out.stdout
    first = next(r for r in _records(straight) if r.get("step") == 1 and "train/loss" in r)
    assert first["moe/real_per_token"] > 3.9  # k = 4: (almost) no null pick at the switch

    run(_args(text_data, resumed, "steps=8", "exit_at_step=4", *common), ranks=2)
    out = run(_args(text_data, resumed, "steps=8", *common), ranks=2)
    assert "resumed from" in out.stdout and "started from" not in out.stdout
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 8
    a = _read_router_state(straight / "checkpoints" / "iter_0000008")
    b = _read_router_state(resumed / "checkpoints" / "iter_0000008")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [float(v) for k, v in a.items() if k.endswith("budget_step")] == [8.0, 8.0]


def test_trainer_refuses_a_source_of_another_architecture(text_data, source_run, tmp_path):
    from tests._train import run

    source = source_run
    out = run(_args(text_data, tmp_path / "up", "steps=2", "model.num_experts=4",
                    f"checkpoint.init_from={source}"), check=False)
    assert out.returncode != 0
    assert "checkpoint.init_from=" in out.stderr and \
        "model.num_experts: checkpoint 8, this run 4" in out.stderr
    # refused before anything is written into the new run folder
    assert not (tmp_path / "up" / "config.yaml").exists()
    assert not list((tmp_path / "up").rglob("iter_*"))
