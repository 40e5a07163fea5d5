"""Megatron-LM integration without Megatron-LM: the flag contract, args -> config -> spec -> model.

Megatron-LM is not on the package registry, so these tests use what its `parse_args` produces:
an argparse parser with allow_abbrev=False into which our `add_null_moe_args` is chained, and a
namespace carrying the attribute names Megatron-LM's arguments.py and gpt_builders.py use
(core_v0.16.1). `config_from_args` mimics `core_transformer_config_from_args`: every args attribute
named like a TransformerConfig field is copied, and num_moe_experts comes from --num-experts.
Checked by hand against a real core_v0.16.1 checkout as well (see BENCHMARKS.md / closing note).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_nullmoe import _mcore
from megatron_nullmoe import NullExpertConfig, NullExpertConfigError, NullExpertRouter, null_routers
from megatron_nullmoe.megatron_lm import (
    TrainingLoopHooks,
    add_null_moe_args,
    chain_args_providers,
    gpt_builder,
    llava_builder,
    llava_specs,
    null_config_from_args,
    null_decoder_spec,
    null_moe_flops,
)

ROOT = Path(__file__).resolve().parents[1]


def megatron_parser() -> argparse.ArgumentParser:
    """The slice of Megatron-LM's parser these tests need, built the way parse_args builds it."""
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--moe-token-dispatcher-type", default="allgather")
    p.add_argument("--moe-layer-freq", type=eval, default=1)
    p.add_argument("--transformer-impl", default="transformer_engine")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    args = add_null_moe_args(megatron_parser()).parse_args(argv)
    defaults = dict(  # what validate_args and the rest of arguments.py leave on args
        ffn_hidden_size=64, moe_ffn_hidden_size=32, normalization="LayerNorm", qk_l2_norm=False,
        spec=None, padded_vocab_size=64, max_position_embeddings=16, fp16_lm_cross_entropy=False,
        untie_embeddings_and_output_weights=False, position_embedding_type="learned_absolute",
        rotary_percent=1.0, rotary_base=10000, use_rope_scaling=False, mtp_num_layers=None,
        use_legacy_models=False, experimental_attention_variant=None,
        heterogeneous_layers_config_path=None, moe_grouped_gemm=False, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01,
        expert_tensor_parallel_size=1)
    for k, v in defaults.items():
        setattr(args, k, v)
    return args


def config_from_args(args) -> TransformerConfig:
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    return TransformerConfig(**kw, num_moe_experts=args.num_experts)


MIXTRAL_STYLE = ["--num-experts", "8", "--moe-router-topk", "4", "--moe-token-dispatcher-type",
                 "alltoall", "--transformer-impl", "local", "--moe-layer-freq", "[1,0,1,0]"]


# ------------------------------------------------------------------------- the flag contract
def test_flags_defaults_and_values():
    args = parse([])
    assert null_config_from_args(args) == NullExpertConfig()
    args = parse(MIXTRAL_STYLE + ["--num-null-experts", "8", "--null-expert-logits", "per_expert",
                                  "--null-expert-gate-normalization", "keep_null_share",
                                  "--null-expert-gate-scale", "slot_ratio",
                                  "--null-expert-target-real-per-token", "2",
                                  "--null-expert-budget-update-rate", "0.05"])
    assert null_config_from_args(args) == NullExpertConfig(
        num_null_experts=8, null_logits="per_expert", gate_normalization="keep_null_share",
        gate_scale="slot_ratio", target_real_per_token=2.0, budget_update_rate=0.05)


def test_flags_are_strict_like_megatron_lm():
    for bad in (["--num-null-experts", "x"], ["--null-expert-logits", "shard"], ["--num-null", "4"]):
        with pytest.raises(SystemExit):
            add_null_moe_args(megatron_parser()).parse_args(bad)


def test_dests_never_collide_with_transformer_config_fields():
    """core_transformer_config_from_args copies same-named attributes onto the config."""
    ours = set(vars(add_null_moe_args(argparse.ArgumentParser()).parse_args([])))
    assert ours and not ours & {f.name for f in dataclasses.fields(TransformerConfig)}


def test_chained_providers_return_the_parser():
    def theirs(parser):
        parser.add_argument("--freeze-ViT", action="store_true")
        return parser
    parser = chain_args_providers(add_null_moe_args, None, theirs)(megatron_parser())
    args = parser.parse_args(["--num-null-experts", "2", "--freeze-ViT"])
    assert args.num_null_experts == 2 and args.freeze_ViT


def test_args_without_our_flags_or_experts_are_refused():
    with pytest.raises(NullExpertConfigError, match="extra_args_provider"):
        null_config_from_args(megatron_parser().parse_args([]))
    with pytest.raises(NullExpertConfigError, match="--num-experts"):
        null_config_from_args(parse(["--num-null-experts", "4"]))


# --------------------------------------------------------------- args -> config -> spec/model
def test_spec_follows_moe_layer_freq_and_builds_a_null_gpt(single_rank):
    args = parse(MIXTRAL_STYLE + ["--num-null-experts", "8"])
    config = config_from_args(args)
    spec = null_decoder_spec(args, config)
    parts = [_mcore.moe_parts(s.submodules.mlp) for s in spec.layer_specs]
    routers = [p[1].router if p and p[0] is MoELayer else None for p in parts]
    assert [r is not None for r in routers] == [True, False, True, False]
    assert all(r.func is NullExpertRouter for r in routers if r is not None)
    model = gpt_builder(args, True, True, config=config)
    assert [r.layer_number for r in null_routers(model)] == [1, 3]
    assert null_routers(model)[0].num_slots == 16
    ids = torch.randint(0, 64, (2, 16))
    model(ids, torch.arange(16).expand(2, 16), None, labels=ids).mean().backward()
    assert null_routers(model)[0].null_weight.grad is not None


def test_without_nulls_the_spec_is_megatron_cores_own(single_rank):
    args = parse(MIXTRAL_STYLE)
    model = gpt_builder(args, True, True, config=config_from_args(args))
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert routers and not any(isinstance(r, NullExpertRouter) for r in routers)


def test_a_stage_without_moe_layers_is_left_alone(single_rank):
    args = parse(MIXTRAL_STYLE[:-2] + ["--moe-layer-freq", "[0,0,0,0]", "--num-null-experts", "4"])
    config = config_from_args(args)
    spec = null_decoder_spec(args, config)
    assert all(_mcore.moe_parts(s.submodules.mlp) is None for s in spec.layer_specs)


def test_unsupported_megatron_features_are_refused(single_rank):
    args = parse(MIXTRAL_STYLE + ["--num-null-experts", "4"])
    args.mtp_num_layers = 1
    with pytest.raises(NullExpertConfigError, match="--mtp-num-layers"):
        null_decoder_spec(args, config_from_args(args))
    args = parse(MIXTRAL_STYLE + ["--num-null-experts", "4"])
    args.moe_token_dispatcher_type = "flex"
    with pytest.raises(NullExpertConfigError, match="moe_token_dispatcher_type"):
        null_decoder_spec(args, config_from_args(args))


def _moe_config(**fields) -> TransformerConfig:
    """A TransformerConfig as megatron-core builds it (its __post_init__ has run)."""
    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=8,
                             moe_router_topk=4, moe_token_dispatcher_type="alltoall",
                             add_bias_linear=False, use_cpu_initialization=True, **fields)


def test_overlap_moe_expert_parallel_comm_is_refused_by_name(single_rank):
    """Its overlap would be lost: the null dispatcher reads its row counts on the host while the
    dispatch runs on the communication stream."""
    args = parse(MIXTRAL_STYLE + ["--num-null-experts", "8"])
    config = _moe_config(expert_model_parallel_size=2, bf16=True,
                         overlap_moe_expert_parallel_comm=True)
    with pytest.raises(NullExpertConfigError) as err:
        null_decoder_spec(args, config)
    said = str(err.value)
    assert said.startswith("overlap_moe_expert_parallel_comm=True is not valid with null experts")
    assert "blocks the host" in said and "Leave --overlap-moe-expert-parallel-comm off" in said
    null_decoder_spec(args, _moe_config(expert_model_parallel_size=2, bf16=True))


# CUDA graph scopes by megatron-core's names (CudaGraphScope up to 0.18, CudaGraphModule from
# 0.19; "full" and an empty scope are the whole layer): refused when the graph holds the MoE layer.
GRAPHS = [
    ("transformer_engine", ["attn"], False),
    ("transformer_engine", [], True),
    ("transformer_engine", ["moe_router"], True),
    ("transformer_engine", ["moe_router", "moe_preprocess"], True),
    ("transformer_engine", ["attn", "moe_router"], True),
    ("local", ["attn"], True),  # the local implementation graphs the whole layer for attn
    ("local", [], True),
]


@pytest.mark.parametrize("impl,scope,refused", GRAPHS)
def test_cuda_graphs_are_refused_only_when_they_hold_the_moe_layer(single_rank, impl, scope,
                                                                    refused):
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    key = "cuda_graph_modules" if "cuda_graph_modules" in names else "cuda_graph_scope"
    config = _moe_config(cuda_graph_impl=impl, **{key: list(scope)})
    null = NullExpertConfig(num_null_experts=8)
    if not refused:
        null.check(config)
        return
    with pytest.raises(NullExpertConfigError) as err:
        null.check(config)
    said = str(err.value)
    assert said.startswith(f"cuda_graph_impl={impl!r} is not valid with null experts")
    assert f"{key}=" in said and "--cuda-graph-scope attn" in said


def test_a_full_iteration_cuda_graph_is_refused(single_rank):
    """megatron-core 0.19 names it as an implementation, earlier releases as a scope."""
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    config = (_moe_config(cuda_graph_impl="full_iteration") if "cuda_graph_modules" in names
              else _moe_config(cuda_graph_impl="local", cuda_graph_scope=["full_iteration"]))
    with pytest.raises(NullExpertConfigError, match="is not valid with null experts"):
        NullExpertConfig(num_null_experts=8).check(config)


def test_llava_specs_fix_pretrain_vlm_and_the_model_runs(single_rank):
    """Dense projector (pretrain_vlm.py hands it MoE submodules) and a real pre-MLP norm on MoE
    layers (its TE llava spec has none)."""
    args = parse(MIXTRAL_STYLE[:-2] + ["--num-layers", "2", "--num-null-experts", "4"])
    config = config_from_args(args)
    language, projector = llava_specs(args, config)
    assert isinstance(projector, MLPSubmodules) and projector.linear_fc1 is not None
    assert language.submodules.pre_mlp_layernorm is not IdentityOp
    assert _mcore.moe_parts(language.submodules.mlp)[1].router.func is NullExpertRouter
    for name, value in dict(encoder_num_layers=1, decoder_seq_length=32, img_h=32, img_w=32,
                            patch_dim=8, disable_vision_class_token=True).items():
        setattr(args, name, value)
    model = llava_builder(args, config)
    assert len(null_routers(model)) == 2
    ids = torch.randint(0, 64, (2, 17))
    ids[:, 0] = -200
    loss, mask = model(torch.rand(2, 3, 32, 32), ids, torch.arange(17).expand(2, 17), None,
                       labels=ids, loss_mask=torch.ones(2, 17))
    assert loss.shape == (2, 32)  # 16 image tokens + 17 text - the placeholder
    (loss * mask).sum().backward()


def test_training_loop_hooks_step_budget_after_each_optimizer_step(single_rank):
    args = parse(MIXTRAL_STYLE + ["--num-null-experts", "8",
                                  "--null-expert-target-real-per-token", "1.0"])
    model = gpt_builder(args, True, True, config=config_from_args(args))
    router = null_routers(model)[0]
    hooks = TrainingLoopHooks(get_args=lambda: args)
    seen = []

    def forward_step(data_iterator, model):
        seen.append(float(router.null_budget_bias))
        ids = next(data_iterator)
        return model(ids, torch.arange(16).expand(2, 16), None, labels=ids)

    forward = hooks.forward_step(forward_step)

    def train_step(data, micro_batches):  # Megatron-LM's: the micro-batches, then the optimizer
        for _ in range(micro_batches):
            forward(data, model)
        return "step output"

    data = iter([torch.randint(0, 64, (2, 16)) for _ in range(6)])
    step = hooks.train_step(train_step)
    assert hooks.real_per_token is None
    assert step(data, 3) == "step output"
    # The bias moved once, after the step (real/token above the 1.0 target), for the next step.
    assert seen == [0.0] * 3 and float(router.null_budget_bias) > 0.0
    assert 1.0 < hooks.real_per_token <= 4
    step(data, 3)
    assert seen[3] == seen[4] == seen[5] > 0.0 and float(router.null_budget_bias) > seen[5]
    model.eval()
    with torch.no_grad():
        forward(iter([torch.randint(0, 64, (2, 16))]), model)  # evaluation does not count
    assert float(router.budget_counts[1]) == 0.0


def test_training_loop_hooks_enter_the_same_collectives_whatever_the_stage_holds(monkeypatch):
    """Under pipeline parallelism a stage may hold no MoE layer. Every rank of a run with null
    experts (read from its args, the same everywhere) enters the step's world all-reduce, a
    stage without routers with zeros, and names the null metrics in the MoE report (which
    all-reduces each name over the pipeline group); a run without null experts enters none."""
    from megatron_nullmoe.megatron_lm import hooks as hooks_module

    reduced = []

    def world_sum(tensor, group=None, op="sum"):
        reduced.append((tensor.clone(), group))
        return tensor + torch.tensor([6.0, 4.0], dtype=tensor.dtype)  # the other stage's counts

    monkeypatch.setattr(hooks_module.collectives, "reduce_tensor", world_sum)
    run = parse(MIXTRAL_STYLE + ["--num-null-experts", "4"])
    dense = torch.nn.Sequential(torch.nn.Linear(4, 4))  # this stage's chunk: no MoE layer
    hooks = TrainingLoopHooks(get_args=lambda: run)
    hooks.forward_step(lambda data, model: None)(None, dense)
    hooks.after_step()
    assert len(reduced) == 1 and reduced[0][1] is None  # the world
    assert reduced[0][0].dtype == torch.float64 and reduced[0][0].tolist() == [0.0, 0.0]
    assert hooks.real_per_token == 1.5  # the world's rate, known on a stage without routers
    names = []
    hooks.metrics_report(lambda *a, track_names=None: names.append(track_names))(
        1.0, 1, track_names=["load_balancing_loss"])
    assert names == [["load_balancing_loss", "null_slot_fraction", "real_experts_per_token"]]

    plain = TrainingLoopHooks(get_args=lambda: parse(MIXTRAL_STYLE))
    plain.after_step()
    plain.metrics_report(lambda *a, track_names=None: names.append(track_names))(
        1.0, 1, track_names=["load_balancing_loss"])
    assert len(reduced) == 1 and plain.real_per_token is None
    assert names[-1] == ["load_balancing_loss"]
    with pytest.raises(RuntimeError, match="install"):
        TrainingLoopHooks().after_step()


def test_null_runs_default_expert_tensor_parallelism_to_one(capsys):
    """megatron-core sets expert TP to TP when unset, which null experts refuse: the entries'
    provider defaults it to 1 for a run with null experts (and says so under TP > 1), keeps a
    value on the command line, and leaves runs without null experts to Megatron-LM."""
    from megatron_nullmoe.megatron_lm import null_run_defaults

    def parsed(argv):
        parser = megatron_parser()
        parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
        parser.add_argument("--expert-tensor-parallel-size", type=int, default=None)
        return chain_args_providers(add_null_moe_args, null_run_defaults(argv))(
            parser).parse_args(argv)

    null_tp2 = ["--num-experts", "4", "--num-null-experts", "4", "--tensor-model-parallel-size",
                "2"]
    assert parsed(null_tp2).expert_tensor_parallel_size == 1
    assert "--expert-tensor-parallel-size 1 with null experts" in capsys.readouterr().out
    assert parsed([*null_tp2, "--expert-tensor-parallel-size", "2"]).expert_tensor_parallel_size == 2
    assert parsed(null_tp2[:2] + null_tp2[4:]).expert_tensor_parallel_size is None
    assert parsed(null_tp2[:4]).expert_tensor_parallel_size == 1
    assert capsys.readouterr().out == ""  # nothing changes under TP 1: no note


def test_training_loop_hooks_count_megatron_lm_flops_at_the_realised_rate():
    def megatron_flops(args, batch_size, *rest):  # linear in top-k, and writes to args
        args.num_query_groups = args.num_attention_heads
        return batch_size * (100 + 10 * args.moe_router_topk) + sum(rest)

    hooks = TrainingLoopHooks()
    counted = hooks.flops(megatron_flops)
    moe = dict(num_experts=8, moe_router_topk=4, num_attention_heads=2)
    assert counted(argparse.Namespace(**moe), 2) == 2 * 140  # no step yet: Megatron-LM's figure
    hooks.real_per_token = 1.5
    args = argparse.Namespace(**moe)
    assert counted(args, 2, 7) == 2 * 115 + 7
    assert args.moe_router_topk == 4 and not hasattr(args, "num_query_groups")
    dense = argparse.Namespace(num_experts=None, moe_router_topk=2, num_attention_heads=2)
    assert counted(dense, 1) == 120


def test_flops_count_realised_experts_like_megatron_lm_counts_topk():
    args = argparse.Namespace(hidden_size=8, seq_length=4, num_layers=2, num_attention_heads=2,
                              group_query_attention=False, swiglu=False, moe_layer_freq=1,
                              num_experts=4, ffn_hidden_size=16, moe_ffn_hidden_size=16,
                              padded_vocab_size=10, moe_router_topk=2)
    # Megatron-LM's counter at top-k: 3*2*B*s*(L*(2h^2(1+1) + 2sh) + L*(2*h*f*k + h*E) + h*V)
    topk = 3 * 2 * 1 * 4 * (2 * (2 * 64 * 2 + 2 * 4 * 8) + 2 * (2 * 8 * 16 * 2 + 8 * 4) + 8 * 10)
    assert null_moe_flops(args, 1, 2.0) == topk
    assert null_moe_flops(args, 1, 2.0) - null_moe_flops(args, 1, 1.0) == 3 * 2 * 4 * 2 * 2 * 8 * 16


@pytest.mark.parametrize("script", ["pretrain_gpt_nullmoe.py", "pretrain_vlm_nullmoe.py"])
def test_entry_scripts_without_megatron_lm_say_what_to_do(script):
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "megatron_lm" / script)],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 1
    assert "Megatron-LM" in out.stderr and "PYTHONPATH" in out.stderr and "core_v0.16.1" in out.stderr


def test_mixtral_recipe_adds_null_experts_at_matched_flops(tmp_path):
    recipe = ROOT / "examples" / "megatron_lm" / "train_mixtral_8x7b_null_moe.sh"
    out = subprocess.run(["bash", str(recipe), "/ckpt", "/tok.model", "/data"], capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1"})
    assert out.returncode == 0, out.stderr
    argv = out.stdout.split()
    assert argv[0] == "torchrun" and argv[argv.index("--master-port") + 2].endswith(
        "launch/megatron_lm/pretrain_gpt_nullmoe.py")
    args, _ = add_null_moe_args(megatron_parser()).parse_known_args(argv)
    null = null_config_from_args(args)
    assert (args.num_experts, args.moe_router_topk, null.num_null_experts) == (8, 4, 8)
    assert args.moe_router_topk * args.num_experts / (args.num_experts + null.num_null_experts) == 2
    # the gate rule the text study measured: all-slot softmax, then the defaults' scaled gates
    assert "--moe-router-pre-softmax" in argv
    assert (null.gate_normalization, null.gate_scale) == ("keep_null_share", "slot_ratio")


def test_a_resume_keeps_the_gate_rule_its_checkpoint_trained_with():
    """check_resume_args, which the entry scripts install after Megatron-LM's own
    check_checkpoint_args: a checkpoint with null slots must resume under its own gate rule; one
    that does not name a flag had the value from before the flag existed; one without null slots
    (switching them on) is not checked."""
    from types import SimpleNamespace

    from megatron_nullmoe import NullExpertConfigError
    from megatron_nullmoe.megatron_lm import install_resume_check
    from megatron_nullmoe.megatron_lm.args import check_resume_args

    run = parse(["--num-experts", "4", "--num-null-experts", "4"])  # today's defaults
    old = SimpleNamespace(num_null_experts=4, null_expert_gate_normalization="renormalize",
                          null_expert_gate_scale="none")
    with pytest.raises(NullExpertConfigError) as err:
        check_resume_args(old, run)
    said = str(err.value)
    assert ("--null-expert-gate-normalization is 'keep_null_share' here, 'renormalize' in the "
            "checkpoint; --null-expert-gate-scale is 'slot_ratio' here, 'none' in the "
            "checkpoint") in said
    assert ("Pass --null-expert-gate-normalization renormalize --null-expert-gate-scale none to "
            "resume as it trained, or --finetune") in said
    check_resume_args(old, parse(["--num-experts", "4", "--num-null-experts", "4",
                                  "--null-expert-gate-normalization", "renormalize",
                                  "--null-expert-gate-scale", "none"]))
    # written before --null-expert-gate-scale existed: it trained with "none"
    before = SimpleNamespace(num_null_experts=4, null_expert_gate_normalization="keep_null_share")
    with pytest.raises(NullExpertConfigError, match="--null-expert-gate-scale none to resume"):
        check_resume_args(before, run)
    # a plain MoE checkpoint, with or without the flags, gets null slots switched on
    check_resume_args(SimpleNamespace(num_experts=4), run)
    check_resume_args(SimpleNamespace(num_null_experts=0, null_expert_gate_scale="none"), run)
    check_resume_args(SimpleNamespace(**{k: getattr(run, k) for k in vars(run)}), run)

    # installed around Megatron-LM's own check, which runs first; installing twice wraps once
    calls = []
    checkpointing = SimpleNamespace(check_checkpoint_args=lambda a, **kw: calls.append(kw),
                                    get_args=lambda: run)
    install_resume_check(checkpointing)
    install_resume_check(checkpointing)
    checkpointing.check_checkpoint_args(SimpleNamespace(num_experts=4), skip_args={"x"})
    assert calls == [{"skip_args": {"x"}}]
    with pytest.raises(NullExpertConfigError):
        checkpointing.check_checkpoint_args(old)
    assert len(calls) == 2
