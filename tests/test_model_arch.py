"""Mixtral-style decoders from a recipe: model.normalization, position_embedding, rotary_base,
activation and num_query_groups reach megatron-core's GPTModel, train, count in the FLOPs, and
are refused by recipe key when they cannot work.

On CPU megatron-core's local spec builds the norms with WrappedTorchNorm (no apex), which makes
torch.nn.RMSNorm for normalization=RMSNorm (0.16.1 and 0.19.x alike).

Shape legend: B batch, S sequence, H hidden, F MLP hidden.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_nullmoe.run.config import ConfigError, load_config
from tests._train import ROOT, losses, run, tiny_demo

GPT = str(ROOT / "examples" / "gpt_null_moe.yaml")
HEADS, GROUPS, HIDDEN, FFN, MOE_FFN = 4, 2, 64, 128, 32
HEAD_DIM = HIDDEN // HEADS
SMALL = ["model.num_layers=2", f"model.hidden_size={HIDDEN}", f"model.ffn_hidden_size={FFN}",
         f"model.num_attention_heads={HEADS}", f"model.moe_ffn_hidden_size={MOE_FFN}",
         "model.num_experts=4", "model.router_topk=2", "model.null_experts.num_null_experts=4",
         "model.null_experts.target_real_per_token=null", "parallel.expert=1"]
MIXTRAL = ["model.normalization=RMSNorm", "model.position_embedding=rope",
           "model.rotary_base=500000", "model.activation=swiglu",
           f"model.num_query_groups={GROUPS}"]


def _build(overrides):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_nullmoe.run.model import build_model, check_model

    cfg = load_config(GPT, overrides)
    check_model(cfg, torch.float32)
    model, _ = build_model(cfg, 128, ProcessGroupCollection.use_mpu_process_groups(),
                           torch.float32)
    return cfg, model


def test_mixtral_keys_reach_the_built_gpt(single_rank):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    cfg, model = _build([*SMALL, *MIXTRAL])
    config = model.config
    assert config.normalization == "RMSNorm" and config.num_query_groups == GROUPS
    assert config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
    assert config.layernorm_epsilon == 1e-5  # megatron-core's default, untouched
    # RMSNorm: every decoder norm, the final one included
    layers = model.decoder.layers
    norms = [m for layer in layers for m in (layer.input_layernorm, layer.pre_mlp_layernorm)]
    assert all(type(n) is torch.nn.RMSNorm for n in norms + [model.decoder.final_layernorm])
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    # rope: a rotary embedding with the recipe's base, and no learned position table
    assert isinstance(model.rotary_pos_emb, RotaryEmbedding)
    expected = 1.0 / 500000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq.float(), expected)
    assert not hasattr(model.embedding, "position_embeddings")
    assert not any("position_embeddings" in n for n, _ in model.named_parameters())
    # GQA: q for 4 heads, k and v for 2 groups
    for layer in layers:
        assert layer.self_attention.linear_qkv.weight.shape == ((HEADS + 2 * GROUPS) * HEAD_DIM,
                                                                HIDDEN)
    # swiglu: fc1 holds gate and up (2F rows), fc2 maps F back; experts as the dense MLP
    assert cfg.model.moe_layer_freq == 2  # layer 0 MoE, layer 1 dense
    dense = layers[1].mlp
    assert dense.linear_fc1.weight.shape == (2 * FFN, HIDDEN)
    assert dense.linear_fc2.weight.shape == (HIDDEN, FFN)
    fc1 = {n: p for n, p in model.named_parameters()
           if ".experts." in n and n.endswith("linear_fc1.weight")}
    fc2 = {n: p for n, p in model.named_parameters()
           if ".experts." in n and n.endswith("linear_fc2.weight")}
    assert len(fc1) == len(fc2) == 4  # 4 real experts in the one MoE layer (null slots: none)
    assert all(p.shape == (2 * MOE_FFN, HIDDEN) for p in fc1.values())
    assert all(p.shape == (HIDDEN, MOE_FFN) for p in fc2.values())
    # ... and computes silu(x W_gate) * (x W_up) W_2, gate the first half of fc1
    x_SBH = torch.randn(3, 2, HIDDEN)
    with torch.no_grad():
        out_SBH, _ = dense(x_SBH)
        gate_W, up_W = dense.linear_fc1.weight.split(FFN)
        by_hand = (torch.nn.functional.silu(x_SBH @ gate_W.T) * (x_SBH @ up_W.T)
                   ) @ dense.linear_fc2.weight.T
    torch.testing.assert_close(out_SBH, by_hand)
    # and the whole model runs forward and backward
    ids_BS = torch.randint(0, 128, (2, 8))
    loss_BS = model(ids_BS, torch.arange(8).expand(2, 8), None, labels=ids_BS)
    assert loss_BS.shape == (2, 8) and torch.isfinite(loss_BS).all()
    loss_BS.mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_defaults_build_todays_decoder(single_rank):
    """No new key given: LayerNorm, learned positions, GELU with two matrices, MHA."""
    _, model = _build(SMALL)
    config = model.config
    assert config.normalization == "LayerNorm" and not config.gated_linear_unit
    assert config.activation_func is torch.nn.functional.gelu
    assert config.num_query_groups == HEADS
    assert getattr(model, "rotary_pos_emb", None) is None
    assert model.embedding.position_embeddings.weight.shape[1] == HIDDEN
    layer = model.decoder.layers[1]
    assert type(layer.input_layernorm) is torch.nn.LayerNorm
    assert layer.self_attention.linear_qkv.weight.shape == (3 * HIDDEN, HIDDEN)
    assert layer.mlp.linear_fc1.weight.shape == (FFN, HIDDEN)


def test_mixtral_style_vlm_language_model(single_rank):
    """LLaVA: the language decoder takes the keys; the ViT and the projector keep LayerNorm and
    GELU and their learned positions."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_nullmoe.run.model import build_model, check_model
    from tests._train import TINY

    cfg = load_config(str(ROOT / "examples" / "demo_vlm.yaml"),
                      [*TINY, f"model.num_attention_heads={HEADS}", *MIXTRAL])
    check_model(cfg, torch.float32)
    model, info = build_model(cfg, 128, ProcessGroupCollection.use_mpu_process_groups(),
                              torch.float32)
    language = model.language_model
    assert language.position_embedding_type == "rope" and language.rotary_pos_emb is not None
    assert not hasattr(language.embedding, "position_embeddings")
    assert type(language.decoder.final_layernorm) is torch.nn.RMSNorm
    assert language.config.gated_linear_unit and language.config.num_query_groups == GROUPS
    vision, projection = model.vision_model, model.vision_projection
    assert not vision.config.gated_linear_unit and vision.config.normalization == "LayerNorm"
    assert not any(type(m) is torch.nn.RMSNorm for m in vision.modules())
    assert vision.position_embeddings is not None  # the ViT's learned positions
    assert not projection.config.gated_linear_unit
    assert projection.encoder.linear_fc1.weight.shape[0] == cfg.model.ffn_hidden_size
    # the ViT attends over all its patches on CPU too (megatron-core 0.16's local spec is causal)
    from megatron.core.transformer.enums import AttnMaskType

    masks = {layer.self_attention.attn_mask_type for layer in vision.decoder.layers}
    assert masks == {AttnMaskType.no_mask}
    image = torch.randn(1, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
    changed = image.clone()
    changed[..., -8:, -8:] += 1.0  # only the last patch
    with torch.no_grad():
        first = vision(image)[0, 0], vision(changed)[0, 0]
    assert not torch.allclose(*first)  # the first patch sees the last one


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return tiny_demo(tmp_path_factory.mktemp("data") / "demo", train_samples=128)


def test_mixtral_style_gpt_trains_through_the_cli(demo, tmp_path):
    out = tmp_path / "gpt"
    run(["--config", GPT, *SMALL, *MIXTRAL, "data.kind=jsonl",
         f"data.path={demo}/text/train.jsonl", f"data.valid_path={demo}/text/val.jsonl",
         f"data.tokenizer={demo}/tokenizer.model", "data.seq_length=24", "data.micro_batch_size=8", "data.global_batch_size=8",
         "optim.warmup_steps=1", "optim.lr=0.003", "logging.progress_bar=false",
         "logging.tensorboard=false", "logging.log_every=1", "logging.eval_every=0",
         "checkpoint.save_every=0", "steps=4", f"dir={out}"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    by_step = losses(out)
    assert sorted(by_step) == [1, 2, 3, 4] and all(math.isfinite(v) for v in by_step.values())
    assert by_step[4] < by_step[1]  # 128 pieces: a fresh model starts near ln 128 = 4.85
    saved = load_config(str(out / "config.yaml"))
    assert (saved.model.normalization, saved.model.position_embedding, saved.model.activation,
            saved.model.num_query_groups, saved.model.rotary_base) == (
                "RMSNorm", "rope", "swiglu", GROUPS, 500000)


# ----------------------------------------------------------------------------- FLOPs
def test_swiglu_and_gqa_flops_differ_by_the_formula():
    """Per token and layer, attention projections cost 4 h^2 (1 + g/n) (q and o: 2 h^2; k and v:
    2 h^2 g/n) and each MLP 2 m h f FLOPs with m = 3 matrices for swiglu instead of 2."""
    from megatron_nullmoe.flops import decoder_forward_flops
    from megatron_nullmoe.train.flops import shapes_from_config

    base = ["model.num_layers=4", "model.hidden_size=96", "model.ffn_hidden_size=192",
            "model.num_attention_heads=4", "model.moe_layer_freq=2", "model.num_experts=8",
            "model.moe_ffn_hidden_size=96", "model.router_topk=4",
            "model.null_experts.num_null_experts=8", "data.seq_length=32"]
    mha, _ = shapes_from_config(load_config(GPT, base), vocab_size=1000)
    gqa, _ = shapes_from_config(load_config(GPT, [*base, "model.activation=swiglu",
                                                  "model.num_query_groups=1"]), 1000)
    assert (mha.kv_ratio, mha.gated_mlp) == (1.0, False)
    assert (gqa.kv_ratio, gqa.gated_mlp) == (0.25, True)
    h, f, fe, seq, layers, moe, vocab = 96, 192, 96, 32, 4, 2, 1000
    r = 4 * 8 / (8 + 8)  # balanced real experts per token: k E / (E + Z) = 2
    router = 2 * h * (8 + 1)  # 8 real rows + 1 shared null row

    def by_hand(kv: float, matrices: int) -> float:
        attention = 4 * h * h * (1 + kv) + 4 * seq * h
        mlp = 2 * matrices * h * f
        experts = r * 2 * matrices * h * fe
        return (layers * attention + (layers - moe) * mlp + moe * (router + experts)
                + 2 * h * vocab)

    assert decoder_forward_flops(mha) == pytest.approx(by_hand(1.0, 2), rel=1e-12)
    assert decoder_forward_flops(gqa) == pytest.approx(by_hand(0.25, 3), rel=1e-12)
    # the difference: k/v shrink by 3/4 (4 layers x 4 h^2 x -0.75), every MLP gains a matrix
    diff = (layers * 4 * h * h * (0.25 - 1.0) + (layers - moe) * 2 * h * f
            + moe * r * 2 * h * fe)
    assert decoder_forward_flops(gqa) - decoder_forward_flops(mha) == pytest.approx(diff,
                                                                                   rel=1e-12)
    assert diff == 4 * 4 * 96 * 96 * -0.75 + 2 * 2 * 96 * 192 + 2 * 2 * 2 * 96 * 96


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides,needles", [
    (["model.num_query_groups=3"], ["model.num_query_groups=3", "model.num_attention_heads=4",
                                    "1, 2, 4"]),
    (["model.num_query_groups=0"], ["model.num_query_groups=0", ">= 1"]),
    (["model.activation=relu"], ["model.activation='relu'", "gelu, swiglu"]),
    (["model.normalization=rmsnorm"], ["model.normalization='rmsnorm'", "LayerNorm, RMSNorm"]),
    (["model.position_embedding=rotary"], ["model.position_embedding='rotary'", "rope"]),
    (["model.position_embedding=rope", "model.hidden_size=60", "model.num_attention_heads=4"],
     ["model.position_embedding=rope", "15 must be even"]),
    (["model.num_query_groups=4", "model.num_attention_heads=12", "model.hidden_size=96",
      "parallel.tensor=3"], ["model.num_query_groups=4", "parallel.tensor=3"]),
])
def test_bad_architecture_is_refused_by_key(overrides, needles):
    from megatron_nullmoe.run.model import check_model

    with pytest.raises(ConfigError) as err:  # at load (type, range, choice) or at the check
        check_model(load_config(GPT, [*SMALL, *overrides]), torch.float32)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_rmsnorm_is_refused_where_the_local_norm_is_apex(monkeypatch):
    """Without TE and with apex, the local spec's final norm is FusedLayerNorm (LayerNorm only)."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_nullmoe.run import model

    class FusedLayerNorm:  # stands in for apex's; only its identity matters
        pass

    monkeypatch.setattr(model, "_default_use_te", lambda: False)
    monkeypatch.setattr(gpt_layer_specs, "LNImpl", FusedLayerNorm)
    cfg = load_config(GPT, [*SMALL, "model.normalization=RMSNorm"])
    with pytest.raises(ConfigError, match="model.normalization=RMSNorm.*FusedLayerNorm"):
        model.check_model(cfg, torch.float32)
    model.check_model(load_config(GPT, SMALL), torch.float32)  # LayerNorm builds there


def test_router_topk_scaling_factor_reaches_megatron_core_and_scales_every_gate():
    from megatron_nullmoe.routing import math as rmath
    from megatron_nullmoe.run.model import decoder_config

    cfg = load_config(str(ROOT / "examples/gpt_null_moe.yaml"), ["model.router_topk_scaling_factor=2.5"])
    assert decoder_config(cfg, torch.float32).moe_router_topk_scaling_factor == 2.5
    assert decoder_config(load_config(str(ROOT / "examples/gpt_null_moe.yaml")),
                          torch.float32).moe_router_topk_scaling_factor is None
    routing = rmath.topk_over_slots(torch.randn(5, 12), 4)
    plain = rmath.real_gates(routing, 8, gate_normalization="keep_null_share")
    scaled = rmath.real_gates(routing, 8, gate_normalization="keep_null_share", scaling_factor=2.5)
    assert torch.allclose(scaled, 2.5 * plain)
    with pytest.raises(ConfigError, match="router_topk_scaling_factor"):
        load_config(str(ROOT / "examples/gpt_null_moe.yaml"), ["model.router_topk_scaling_factor=0"])
