"""Issue 34: self-distillation from the frozen source while null experts are switched on.

The KL against torch's kl_div (values and gradients, with a temperature), and over vocabulary
shards on 2 ranks against the whole vocabulary. The config's refusals. In the trainer: with the
teacher = the source and null slots switched on unpicked, the first KL is ~0 and grows as the
null slots open; the LM term of the first step is the plain run's; the teacher's forward FLOPs
are counted by hand; weight 0 is today's run bit for bit; the teacher stays frozen, outside the
optimizer and the checkpoint, and one batch's KL is the hand computation; a 2-rank run with
expert parallel 2 resumes exactly; a Hugging Face teacher starts at KL ~0; a teacher of another
vocabulary is refused by name.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from megatron_nullmoe.train.kl import vocab_parallel_kl
from tests._dist import run_ranks


def _reference(t, s, temperature):
    return F.kl_div(F.log_softmax(s.float() / temperature, -1),
                    F.log_softmax(t.float() / temperature, -1), log_target=True,
                    reduction="none").sum(-1)


# ------------------------------------------------------------------------------- the KL itself
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_equals_kl_div_with_its_gradient(temperature):
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 3, 11, generator=g) * 3, torch.randn(2, 3, 11, generator=g) * 3
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    got, want = vocab_parallel_kl(t, s1, None, temperature), _reference(t, s2, temperature)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    w = torch.randn(2, 3, generator=g)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-7)
    assert float(vocab_parallel_kl(t, t, None, temperature).abs().max()) < 1e-6
    # bf16 logits: computed in fp32, the gradient in the student's dtype
    sb = s.bfloat16().requires_grad_()
    out = vocab_parallel_kl(t.bfloat16(), sb, None, temperature)
    out.sum().backward()
    assert out.dtype == torch.float32 and sb.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="share the vocabulary"):
        vocab_parallel_kl(t[..., :5], s)


def _shard_worker(rank, world, temperature):
    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(4, 5, 12, generator=g) * 2, torch.randn(4, 5, 12, generator=g) * 2
    cols = slice(rank * 6, (rank + 1) * 6)
    mine = s[..., cols].clone().requires_grad_()
    kl = vocab_parallel_kl(t[..., cols], mine, torch.distributed.group.WORLD, temperature)
    w = torch.arange(20.0).reshape(4, 5)
    (kl * w).sum().backward()
    return {"kl": kl.detach(), "grad": mine.grad, "t": t, "s": s, "w": w}


def test_kl_over_vocabulary_shards_equals_the_whole_vocabulary(tmp_path):
    """Tensor parallelism's vocab-sharded logits, on 2 gloo ranks: every rank gets the whole
    KL, and its slice of the whole gradient."""
    ranks = run_ranks(2, _shard_worker, (2.0,), tmp_path)
    r0 = ranks[0]
    s = r0["s"].clone().requires_grad_()
    want = _reference(r0["t"], s, 2.0)
    (want * r0["w"]).sum().backward()
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["kl"], want.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r["grad"], s.grad[..., rank * 6:(rank + 1) * 6],
                                   rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("overrides,message", [
    (["distill.weight=0.5"], "distill.weight=0.5 needs a teacher: give distill.teacher=PATH"),
    (["distill.weight=0.5", "checkpoint.init_from=/src"],
     "distill.weight=0.5 with model.kind=vlm: distillation is done for model.kind=gpt only"),
    (["model.kind=gpt", "distill.weight=1", "distill.teacher=/t", "parallel.pipeline=2"],
     "distill.weight=1.0 with parallel.pipeline=2"),
    (["distill.temperature=0"], "distill.temperature=0.0 is not valid: expected > 0"),
    (["distill.weight=-1"], "distill.weight=-1.0 is not valid: expected >= 0"),
    (["distill.wieght=1"], "did you mean 'distill.weight'"),
])
def test_config_refusals_are_named(overrides, message):
    from megatron_nullmoe.run.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_the_teacher_defaults_to_init_from_and_none_switches_it_off():
    from megatron_nullmoe.run.config import load_config

    gpt = ["model.kind=gpt", "checkpoint.init_from=/src"]
    assert load_config(None, gpt).distill_teacher is None  # weight 0: off
    assert load_config(None, [*gpt, "distill.weight=0.5"]).distill_teacher == "/src"
    assert load_config(None, [*gpt, "distill.weight=0.5", "distill.teacher=/t"]
                       ).distill_teacher == "/t"
    for off in ("none", "None", "''"):
        assert load_config(None, [*gpt, "distill.weight=0.5", f"distill.teacher={off}"]
                           ).distill_teacher is None


# ----------------------------------------------------------------------------- in the trainer
@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    from tests._train import tiny_text

    return tiny_text(tmp_path_factory.mktemp("distill"), 200, 24, 12)


@pytest.fixture(scope="module")
def source_run(text_data, tmp_path_factory):
    """One rank, top-4 over 8 experts, no null slots, 3 steps."""
    from tests._train import run
    from tests.test_init_from import _args

    source = tmp_path_factory.mktemp("distill_source") / "source"
    run(_args(text_data, source, "steps=3", "model.null_experts.num_null_experts=0"))
    return source


def _switch(source):
    from tests.test_init_from import SWITCH

    return [f"checkpoint.init_from={source}", *SWITCH]


def _records(run_dir) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            out[record["step"]] = record
    return out


def _checkpoint_keys(checkpoint) -> set:
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)


@pytest.fixture(scope="module")
def runs(text_data, source_run, tmp_path_factory):
    """6 steps on one rank after the switch: plain, distilling (weight 1), and weight 0."""
    from tests._train import run
    from tests.test_init_from import _args

    root = tmp_path_factory.mktemp("distill_runs")
    out = {}
    for name, extra in (("plain", []), ("distill", ["distill.weight=1"]),
                        ("weight0", ["distill.weight=0", f"distill.teacher={source_run}"])):
        out[name] = root / name
        out[name + "_stdout"] = run(_args(text_data, out[name], "steps=6",
                                          *_switch(source_run), *extra)).stdout
    return out


def test_first_kl_is_zero_and_grows_as_null_slots_open(runs, source_run):
    assert f"distilling from {source_run}/checkpoints/iter_0000003" in runs["distill_stdout"]
    assert "| kl " in runs["distill_stdout"]
    plain, distill = _records(runs["plain"]), _records(runs["distill"])
    kl = {step: r["train/kl"] for step, r in distill.items()}
    assert kl[1] < 1e-5  # the student is the teacher at the switch
    assert kl[6] > 1e-3 and kl[6] > kl[4] > kl[2]  # null slots open: the student moves away
    # the LM term is computed as without distillation
    assert distill[1]["train/loss"] == plain[1]["train/loss"]
    assert all("train/kl" not in r for r in plain.values())


def test_the_teachers_forward_flops_are_counted(runs, text_data):
    """At the first step both runs route alike (no null pick), so the distilling run counts the
    plain run's FLOPs plus the teacher's forward: a top-4 model's, by hand."""
    from megatron_nullmoe.flops import decoder_forward_flops
    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.train.flops import shapes_from_config
    from tests.test_init_from import _args

    plain, distill = _records(runs["plain"])[1], _records(runs["distill"])[1]
    args = _args(text_data, runs["plain"], "model.null_experts.num_null_experts=0")
    cfg = load_config(args[1], args[2:])  # the source's recipe: top-4, no null slots
    decoder, _ = shapes_from_config(cfg, 80)
    assert decoder.null_logit_rows == 0 and decoder.topk == 4
    teacher = cfg.data.global_batch_size * decoder.seq_length * decoder_forward_flops(decoder, 4.0)
    assert distill["throughput/teacher_flops_total"] == pytest.approx(teacher, rel=1e-9)
    assert distill["throughput/model_flops_total"] == pytest.approx(
        plain["throughput/model_flops_total"] + teacher, rel=1e-9)


def test_weight_zero_is_todays_run_bit_for_bit(runs):
    plain, zero = _records(runs["plain"]), _records(runs["weight0"])
    assert [r["train/loss"] for r in zero.values()] == [r["train/loss"] for r in plain.values()]
    assert [r["train/grad_norm"] for r in zero.values()] == \
        [r["train/grad_norm"] for r in plain.values()]
    assert "distilling" not in runs["weight0_stdout"]


def test_the_teacher_is_not_in_the_checkpoint(runs):
    keys = _checkpoint_keys(runs["distill"] / "checkpoints" / "iter_0000006")
    assert keys == _checkpoint_keys(runs["plain"] / "checkpoints" / "iter_0000006")


def _trainer_worker(rank, world, args):
    """A Trainer in this process: the teacher's state, the optimizer's parameters, and one
    batch's KL as the trainer computes it and by hand, after 3 steps (the student has moved)."""
    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.train.loop import Trainer

    t = Trainer(load_config(args[1], args[2:]))
    teacher = t.distiller.teacher
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    student_before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    optimized = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
    for _ in range(3):
        t.train_step()
    batch = {k: v.to(t.device) for k, v in t.data.next_train().items()}
    t._distilling = True
    output, loss_func = t._forward_step(iter([batch]), t.ddp)
    t._distilling = False
    _, _, reports = loss_func(output)
    with torch.no_grad():
        zt = teacher(batch["input_ids"], batch["position_ids"], None)
        zs = t.model(batch["input_ids"], batch["position_ids"], None)
    mask = batch["loss_mask"].float()
    per_token = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True,
                         reduction="none").sum(-1)
    return {
        "trainer_kl": float(reports["kl"][0] / reports["kl"][1]),
        "hand_kl": float((per_token * mask).sum() / mask.sum()),
        "teacher_unchanged": all(torch.equal(before[n], p) for n, p in teacher.named_parameters()),
        "student_moved": any(not torch.equal(student_before[n], p)
                             for n, p in t.model.named_parameters()),
        "teacher_frozen": all(not p.requires_grad for p in teacher.parameters()),
        "teacher_eval": not any(m.training for m in teacher.modules()),
        "teacher_in_optimizer": any(id(p) in optimized for p in teacher.parameters()),
        "teacher_grads": [n for n, p in teacher.named_parameters() if p.grad is not None],
    }


def test_the_teacher_stays_frozen_and_one_batch_kl_is_the_hand_computation(
        text_data, source_run, tmp_path):
    from tests.test_init_from import _args

    args = _args(text_data, tmp_path / "inproc", "steps=6", *_switch(source_run),
                 "distill.weight=1", "faults.stall_timeout_s=null")
    (r,) = run_ranks(1, _trainer_worker, (args,), tmp_path)
    assert r["hand_kl"] > 1e-4  # the student has moved away from the teacher
    assert r["trainer_kl"] == pytest.approx(r["hand_kl"], rel=1e-5)
    assert r["teacher_unchanged"] and r["student_moved"]
    assert r["teacher_frozen"] and r["teacher_eval"] and not r["teacher_in_optimizer"]
    assert r["teacher_grads"] == []


def test_two_ranks_expert_parallel_distil_and_resume_exactly(text_data, source_run, runs,
                                                             tmp_path):
    """2 ranks, expert parallel 2 (teacher and student both split their experts over the ranks):
    6 steps straight and 3 + a resume to 6 give the same losses and KL; the first step is the
    one-rank run's."""
    from tests._train import run
    from tests.test_init_from import _args

    common = ["parallel.expert=2", *_switch(source_run), "distill.weight=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(_args(text_data, straight, "steps=6", *common), ranks=2)
    run(_args(text_data, resumed, "steps=6", "exit_at_step=3", *common), ranks=2)
    out = run(_args(text_data, resumed, "steps=6", *common), ranks=2)
    assert "resumed from" in out.stdout and "distilling from" in out.stdout
    a, b = _records(straight), _records(resumed)
    assert [(r["train/loss"], r["train/kl"]) for r in a.values()] == \
        [(r["train/loss"], r["train/kl"]) for r in b.values()]
    assert len(a) == 6 and a[1]["train/kl"] < 1e-5 and a[6]["train/kl"] > 1e-3
    one = _records(runs["distill"])
    assert a[1]["train/loss"] == pytest.approx(one[1]["train/loss"], abs=1e-5)


def test_a_teacher_that_cannot_teach_is_refused_by_name(text_data, source_run, tmp_path):
    from megatron_nullmoe.run.config import ConfigError, load_config
    from megatron_nullmoe.run.tokenizer import train_tokenizer
    from megatron_nullmoe.train.distill import resolve_teacher
    from tests._train import run
    from tests.test_init_from import _args

    student = load_config(None, ["model.kind=gpt", "distill.weight=1",
                                 f"distill.teacher={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"distill.teacher=.*nope: not a run folder"):
        resolve_teacher(student.distill_teacher, student)
    texts = [json.loads(l)["text"] for l in (text_data / "train.jsonl").read_text().splitlines()]
    small = train_tokenizer(texts, tmp_path / "small.model", vocab_size=60)
    out = run(_args(text_data, tmp_path / "r", "steps=1", "distill.weight=1",
                    f"distill.teacher={source_run}", f"data.tokenizer={small}"), check=False)
    assert out.returncode != 0
    assert f"distill.teacher={source_run} cannot teach this run: its vocabulary has 80 ids, " \
           "the student's 60" in out.stderr
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_a_hugging_face_teacher_starts_at_zero_kl(mixtral, tmp_path):
    from tests._train import run
    from tests.test_hf_import import _common

    root, _, folder = mixtral
    run_dir = tmp_path / "hf"
    out = run([*_common(root, run_dir), f"checkpoint.init_from={folder}", "steps=3",
               "model.null_experts.num_null_experts=4",
               "model.null_experts.target_start_real_per_token=2.0",
               "model.null_experts.target_real_per_token=1.0",
               "model.null_experts.target_schedule_steps=2", "distill.weight=0.5"])
    assert f"distilling from {folder} (a Hugging Face folder)" in out.stdout
    kl = {step: r["train/kl"] for step, r in _records(run_dir).items()}
    assert kl[1] < 1e-5 and kl[3] > kl[1]


from tests.test_hf_import import mixtral  # noqa: E402,F401  (the fixture: a tiny Mixtral export)
