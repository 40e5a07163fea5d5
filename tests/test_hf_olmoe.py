"""Issue 34: `checkpoint.init_from=HF_DIR` of an OLMoE, its q/k norm over the whole projection.

OLMoE's q_norm/k_norm are RMSNorms over all heads of the q and k projections at once (an
[heads x head_dim] weight), not per head as Qwen3's: `model.qk_norm_scope=projection` puts
megatron_nullmoe/qk_norm.py's norms in the spec. A random tiny OlmoeForCausalLM made with
transformers (hidden 64, 2 heads of 32 over 1 or 2 key/value heads, 4 experts, top-2, norm
weights away from 1) imported with no null slots computes transformers' logits; exported in the
default format (remote code) and as stock OLMoE it computes them again. With null slots switched
on, the first loss is the source's where gates are renormalised over the picks
(norm_topk_prob=true) and, with OLMoE's own pre-softmax gates (false), the routers start with no
null picks while the gates shrink (README). What cannot be reproduced is refused by name.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_nullmoe import NullExpertConfig
from tests._models import build_gpt
from tests._hf_folders import edited_copy, safetensors, save_random
from tests._train import losses, run, tiny_text
from tests.test_export import tokens
from tests.test_hf_import import _common, _imported


def _olmoe(folder, tokenizer, norm_topk_prob=False, kv_heads=1, **extra):
    """A random OlmoeForCausalLM saved with safetensors at `folder`, the tokenizer beside it.
    Weights are drawn wider than transformers' init, norms away from 1, so every one counts."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=kv_heads, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob, rms_norm_eps=1e-5, max_position_embeddings=32,
        rope_theta=10000.0, tie_word_embeddings=False, **extra)
    return save_random(OlmoeForCausalLM, config, folder, tokenizer, 4)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_text(tmp_path_factory.mktemp("hf_olmoe"), 200, 24, 12)


def test_the_projection_norm_is_one_rms_norm_over_all_heads():
    from megatron_nullmoe.qk_norm import rms_norm_heads

    g = torch.Generator().manual_seed(0)
    x_SBND, w = torch.randn(3, 2, 4, 8, generator=g) * 5, torch.randn(32, generator=g)
    want = F.rms_norm(x_SBND.flatten(-2), (32,), w, eps=1e-5).unflatten(-1, (4, 8))
    assert torch.allclose(rms_norm_heads(x_SBND, w.view(4, 8), 1e-5), want, atol=1e-6)
    per_head = F.rms_norm(x_SBND, (8,), eps=1e-5)  # what qk_layernorm alone would compute
    assert not torch.allclose(rms_norm_heads(x_SBND, torch.ones(4, 8), 1e-5), per_head, atol=1e-3)


@pytest.mark.parametrize("kv_heads,norm_topk_prob", [(1, False), (2, True)])
def test_olmoe_imports_exactly_and_exports_back(root, single_rank, tmp_path, kv_heads,
                                                norm_topk_prob):
    from transformers import OlmoeForCausalLM

    from megatron_nullmoe.export.check import max_logit_difference, mcore_logits
    from megatron_nullmoe.export.hf import export_gpt
    from megatron_nullmoe.export.olmoe import export_olmoe

    folder = _olmoe(tmp_path / "olmoe", root / "tok.model", norm_topk_prob, kv_heads)
    cfg, model, fresh = _imported(root, folder, "model.null_experts.num_null_experts=0")
    m = cfg.model
    assert (m.qk_layernorm, m.qk_norm_scope, m.kv_channels, m.num_query_groups) == \
        (True, "projection", None, kv_heads)
    assert m.router_pre_softmax is (not norm_topk_prob) and fresh == []
    attention = model.decoder.layers[0].self_attention
    assert attention.q_layernorm.weight.shape == (64,)
    assert attention.k_layernorm.weight.shape == (32 * kv_heads,)
    ids = tokens(3, 16)
    source = OlmoeForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        want = source(ids).logits
    assert float((mcore_logits(model, ids) - want).abs().max()) < 1e-4

    # the default format: NullMoEForCausalLM's remote code reads qk_norm_scope
    remote = export_gpt(model, folder / "tokenizer.model", tmp_path / "nullmoe", {})
    assert json.loads((remote / "config.json").read_text())["qk_norm_scope"] == "projection"
    assert max_logit_difference(model, remote) < 1e-4
    # stock OLMoE: the source again, tensor for tensor
    again = export_olmoe(model, folder / "tokenizer.model", tmp_path / "again", {})
    a, b = safetensors(folder), safetensors(again)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        got = OlmoeForCausalLM.from_pretrained(str(again)).eval()(ids).logits
    assert float((got - want).abs().max()) < 1e-4


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_trainer_first_loss_with_null_slots(root, tmp_path, norm_topk_prob):
    """Gates over the picks (true): the first loss is the source's. OLMoE's own pre-softmax gates
    (false): the null slots start unpicked, but join the softmax and shrink every real gate, so
    the first loss moves (README: "With norm_topk_prob: false ...")."""
    from megatron_nullmoe.export.__main__ import default_format
    from megatron_nullmoe.run.config import load_run_config

    folder = _olmoe(tmp_path / "olmoe", root / "tok.model", norm_topk_prob)
    base = [f"checkpoint.init_from={folder}", "steps=1"]
    plain, nulls = tmp_path / "plain", tmp_path / "nulls"
    run([*_common(root, plain), *base, "model.null_experts.num_null_experts=0"])
    out = run([*_common(root, nulls), *base, "model.null_experts.num_null_experts=4",
               "model.null_experts.target_start_real_per_token=2.0",
               "model.null_experts.target_real_per_token=1.0",
               "model.null_experts.target_schedule_steps=2"])
    assert "2 router(s) start with no null picks" in out.stdout
    moved = abs(losses(nulls)[1] - losses(plain)[1])
    assert (moved < 1e-4) if norm_topk_prob else (moved > 1e-4)
    assert "qk_norm_scope: projection" in (nulls / "config.yaml").read_text()
    assert default_format(load_run_config(plain / "config.yaml"))[0] == "olmoe"
    assert default_format(load_run_config(nulls / "config.yaml"))[0] == "nullmoe"


def test_the_cli_exports_an_olmoe_import_as_olmoe(root, tmp_path):
    from tests.test_export import cli

    folder = _olmoe(tmp_path / "olmoe", root / "tok.model")
    plain = tmp_path / "plain"
    run([*_common(root, plain), f"checkpoint.init_from={folder}", "steps=1",
         "model.null_experts.num_null_experts=0"])
    done = cli(["-m", "megatron_nullmoe.export", "hf", str(plain), "--out", str(tmp_path / "hf")])
    assert done.returncode == 0, done.stderr
    assert "format: olmoe (the family of" in done.stdout
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["architectures"] == ["OlmoeForCausalLM"] and "auto_map" not in written


@pytest.mark.parametrize("edit,message", [
    ({"clip_qkv": 8.0}, "clip_qkv=8.0 (queries, keys and values are not clamped)"),
    ({"head_dim": 16}, "head_dim=16 (a projection-wide q/k norm of hidden_size=64"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=true"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling="),
    ({"attention_bias": True}, "attention_bias=true"),
])
def test_an_olmoe_folder_the_trainer_cannot_reproduce_is_refused_by_name(
        root, tmp_path, edit, message):
    from megatron_nullmoe.run.config import ConfigError, load_config

    folder = _olmoe(tmp_path / "olmoe", root / "tok.model")
    bad = edited_copy(folder, tmp_path, **edit)
    with pytest.raises(ConfigError, match="checkpoint.init_from=") as err:
        load_config(None, [*_common(root, tmp_path / "r"), f"checkpoint.init_from={bad}"])
    assert message in str(err.value)


@pytest.mark.parametrize("overrides,message", [
    (["model.qk_norm_scope=heads"],
     "model.qk_norm_scope='heads' is not valid: one of head, projection"),
    (["model.qk_norm_scope=projection"],
     "model.qk_norm_scope='projection' with model.qk_layernorm=false"),
    (["model.qk_norm_scope=projection", "model.qk_layernorm=true", "parallel.tensor=2",
      "model.normalization=RMSNorm"],
     "model.qk_norm_scope='projection' with parallel.tensor=2: each rank would hold a slice"),
    (["model.qk_norm_scope=projection", "model.qk_layernorm=true"],
     "with model.normalization='LayerNorm': the projection-wide q/k norm is an RMSNorm"),
])
def test_the_recipe_key_is_checked_by_name(overrides, message):
    """Its value when the recipe is read, its fit with the other keys where the decoder's
    architecture is checked (check_decoder, which the trainer's validation runs)."""
    from megatron_nullmoe.run.config import ConfigError, load_config
    from megatron_nullmoe.run.model import check_decoder

    with pytest.raises(ConfigError) as err:
        check_decoder(load_config(None, ["model.kind=gpt", *overrides]))
    assert message in str(err.value)


def test_the_norm_refuses_tensor_parallelism_by_itself():
    """For code that puts it into a spec without the recipe's check (Megatron-LM's entries)."""
    from megatron_nullmoe.qk_norm import ProjectionKeyNorm, QKNormError

    config = SimpleNamespace(tensor_model_parallel_size=2, normalization="RMSNorm",
                             num_attention_heads=4, num_query_groups=2)
    with pytest.raises(QKNormError, match="tensor parallel size 2"):
        ProjectionKeyNorm(config=config, hidden_size=16, eps=1e-5)


# ----------------------------------------------------------------------------- exports
OLMOE_ARCH = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                  num_query_groups=2, position="rope", qk_layernorm=True,
                  qk_norm_scope="projection")


def test_stock_formats_without_the_projection_norm_refuse_it(single_rank, tmp_path):
    from megatron_nullmoe.export.hf import ExportError
    from megatron_nullmoe.export.mixtral import export_mixtral
    from megatron_nullmoe.export.olmoe import export_olmoe
    from megatron_nullmoe.export.qwen3_moe import export_qwen3_moe
    from tests.test_export import _tokenizer

    model = build_gpt(NullExpertConfig(), **OLMOE_ARCH)
    with pytest.raises(ExportError, match="qwen3_moe would not compute") as err:
        export_qwen3_moe(model, _tokenizer(tmp_path), tmp_path / "q", {})
    assert "qk_norm_scope='projection': Qwen3-MoE normalises each query and key head" in \
        str(err.value)
    with pytest.raises(ExportError, match="qk_layernorm=True: Mixtral has no q/k norms"):
        export_mixtral(model, _tokenizer(tmp_path), tmp_path / "m", {})
    per_head = build_gpt(NullExpertConfig(), **{**OLMOE_ARCH, "qk_norm_scope": "head"})
    with pytest.raises(ExportError, match="qk_norm_scope='head': every OLMoE layer normalises"):
        export_olmoe(per_head, _tokenizer(tmp_path), tmp_path / "o", {})


def test_olmoe_export_with_zero_experts_equals_megatron_core(single_rank, tmp_path):
    """Null slots as zero experts, pre-softmax gates (OLMoE's norm_topk_prob=false)."""
    from transformers import OlmoeForCausalLM

    from megatron_nullmoe.export.check import mcore_logits
    from megatron_nullmoe.export.olmoe import export_olmoe
    from tests.test_export import _tokenizer

    null = NullExpertConfig(num_null_experts=4, gate_normalization="keep_null_share",
                            gate_scale="none")
    model = build_gpt(null, moe_router_pre_softmax=True, **OLMOE_ARCH)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.decoder.layers:
            for norm in (layer.self_attention.q_layernorm, layer.self_attention.k_layernorm):
                norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=g))
    ids = tokens()
    out = export_olmoe(model, _tokenizer(tmp_path), tmp_path / "o", {"source": "test"})
    stock = OlmoeForCausalLM.from_pretrained(str(out)).eval()
    assert stock.config.num_experts == 8 and stock.config.norm_topk_prob is False
    with torch.no_grad():
        got = stock(ids).logits
    assert float((got - mcore_logits(model, ids)).abs().max()) < 1e-4


def test_the_vllm_plugin_reads_qk_norm_scope():
    from megatron_nullmoe_vllm.config import ServeConfig, ServeConfigError

    fields = dict(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, ffn_hidden_size=96, moe_ffn_hidden_size=48,
                  moe_layers=[1], num_experts=4, num_null_experts=0, null_logits="shared",
                  router_topk=2, router_score_function="softmax", router_pre_softmax=True,
                  gate_normalization="renormalize", router_topk_scaling_factor=None,
                  normalization="RMSNorm", norm_eps=1e-5, position_embedding_type="rope",
                  rotary_base=10000, rotary_percent=1.0, max_position_embeddings=64,
                  activation="swiglu", tie_word_embeddings=False, vision_config=None,
                  qk_layernorm=True)
    assert ServeConfig.from_hf(SimpleNamespace(**fields)).qk_norm_scope == "head"  # older
    whole = ServeConfig.from_hf(SimpleNamespace(**fields, qk_norm_scope="projection"))
    assert whole.qk_norm_scope == "projection"
    with pytest.raises(ServeConfigError, match="qk_norm_scope='rows' cannot be served"):
        ServeConfig.from_hf(SimpleNamespace(**fields, qk_norm_scope="rows"))
