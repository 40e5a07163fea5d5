"""Issue 34: `checkpoint.init_from=HF_DIR` of a Qwen3-MoE, and `export hf --format qwen3_moe`.

A random tiny Qwen3-MoE made with transformers (hidden 64, 4 heads over 2 key/value heads of
head_dim 32, apart from hidden / heads = 16; per-head q/k RMSNorm; rms_norm_eps 1e-6; 4 experts,
top-2; both gate rules of norm_topk_prob; once with a dense layer) imported with no null slots
computes transformers' logits, and exported again as Qwen3-MoE is the source, tensor for tensor.
With null slots switched on the trainer's first loss is the source's. What the trainer cannot
reproduce (Qwen2-MoE's shared experts, sliding windows, tied embeddings, a dense-layer pattern
moe_layer_freq cannot place) is refused by name, and so is what stock Qwen3-MoE cannot
express on export.
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


def _qwen3(folder, tokenizer, norm_topk_prob=True, mlp_only_layers=(), **extra):
    """A random Qwen3MoeForCausalLM saved with safetensors at `folder`, the tokenizer beside it.
    Weights are drawn wider than transformers' init (and norms away from 1) so that routing and
    every norm matter."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=48, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob, rms_norm_eps=1e-6,
        max_position_embeddings=32, rope_theta=1000000.0, mlp_only_layers=list(mlp_only_layers),
        tie_word_embeddings=False, **extra)
    return save_random(Qwen3MoeForCausalLM, config, folder, tokenizer, 3)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_text(tmp_path_factory.mktemp("hf_qwen3"), 200, 24, 12)


@pytest.mark.parametrize("norm_topk_prob,mlp_only_layers", [
    (True, ()), (False, ()), (True, (1,)),  # (1,): layer 0 MoE, layer 1 dense = moe_layer_freq 2
])
def test_qwen3_moe_imports_exactly_and_exports_back_as_itself(
        root, single_rank, tmp_path, norm_topk_prob, mlp_only_layers):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from megatron_nullmoe.export.check import mcore_logits
    from megatron_nullmoe.export.qwen3_moe import export_qwen3_moe

    folder = _qwen3(tmp_path / "qwen3", root / "tok.model", norm_topk_prob, mlp_only_layers)
    cfg, model, fresh = _imported(root, folder, "model.null_experts.num_null_experts=0")
    m = cfg.model
    assert (m.kv_channels, m.qk_layernorm, m.norm_epsilon, m.num_experts) == (32, True, 1e-6, 4)
    assert m.router_pre_softmax is (not norm_topk_prob) and fresh == []
    assert (m.moe_layer_freq, m.ffn_hidden_size) == ((2, 48) if mlp_only_layers else (1, 48))
    ids = tokens(3, 16)
    source = Qwen3MoeForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        want = source(ids).logits
    assert float((mcore_logits(model, ids) - want).abs().max()) < 1e-4

    again = export_qwen3_moe(model, folder / "tokenizer.model", tmp_path / "again", {})
    written, theirs = (Qwen3MoeConfig.from_pretrained(str(p)) for p in (again, folder))
    for key in ("head_dim", "rms_norm_eps", "norm_topk_prob", "num_experts", "mlp_only_layers",
                "moe_intermediate_size", "intermediate_size", "num_key_value_heads",
                "sliding_window", "rope_parameters"):
        assert getattr(written, key) == getattr(theirs, key), key
    a, b = safetensors(folder), safetensors(again)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        got = Qwen3MoeForCausalLM.from_pretrained(str(again)).eval()(ids).logits
    assert float((got - want).abs().max()) < 1e-4


def test_trainer_first_loss_with_null_slots_is_the_sources_and_export_defaults(root, tmp_path):
    from megatron_nullmoe.export.__main__ import default_format
    from megatron_nullmoe.run.config import load_run_config
    from tests.test_export import cli

    folder = _qwen3(tmp_path / "qwen3", root / "tok.model", norm_topk_prob=True)
    base = [f"checkpoint.init_from={folder}", "steps=2"]
    plain, nulls = tmp_path / "plain", tmp_path / "nulls"
    out = run([*_common(root, plain), *base, "model.null_experts.num_null_experts=0"])
    assert f"started from {folder} (a Hugging Face folder)" in out.stdout
    out = run([*_common(root, nulls), *base, "model.null_experts.num_null_experts=4",
               "model.null_experts.target_start_real_per_token=2.0",
               "model.null_experts.target_real_per_token=1.0",
               "model.null_experts.target_schedule_steps=2"])
    assert "2 router(s) start with no null picks" in out.stdout
    assert abs(losses(nulls)[1] - losses(plain)[1]) < 1e-4
    assert "qk_layernorm: true" in (nulls / "config.yaml").read_text()
    # the export's default format: the source family without null slots, nullmoe with them
    assert default_format(load_run_config(nulls / "config.yaml"))[0] == "nullmoe"
    done = cli(["-m", "megatron_nullmoe.export", "hf", str(plain), "--out", str(tmp_path / "hf")])
    assert done.returncode == 0, done.stderr
    assert "format: qwen3_moe (the family of" in done.stdout
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["architectures"] == ["Qwen3MoeForCausalLM"] and "auto_map" not in written


@pytest.mark.parametrize("edit,message", [
    ({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"},
     "architecture 'Qwen2MoeForCausalLM' cannot be imported: shared experts"),
    ({"use_sliding_window": True, "sliding_window": 8}, "sliding_window=8"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=true"),
    ({"mlp_only_layers": [0]}, "the MoE layers [1] are not layers 0, n, 2n, ..."),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling="),
    ({"attention_bias": True}, "attention_bias=true"),
])
def test_a_qwen3_folder_the_trainer_cannot_reproduce_is_refused_by_name(
        root, tmp_path, edit, message):
    from megatron_nullmoe.run.config import ConfigError, load_config

    folder = _qwen3(tmp_path / "qwen3", root / "tok.model")
    bad = edited_copy(folder, tmp_path, **edit)
    with pytest.raises(ConfigError, match="checkpoint.init_from=") as err:
        load_config(None, [*_common(root, tmp_path / "r"), f"checkpoint.init_from={bad}"])
    assert message in str(err.value)


def test_a_sliding_window_switched_off_is_not_refused(root, tmp_path):
    """Qwen3 configs keep sliding_window while use_sliding_window=false; transformers ignores it."""
    from megatron_nullmoe.run.config import load_config

    folder = _qwen3(tmp_path / "qwen3", root / "tok.model")
    kept = edited_copy(folder, tmp_path, use_sliding_window=False, sliding_window=4096)
    cfg = load_config(None, [*_common(root, tmp_path / "r"), f"checkpoint.init_from={kept}"])
    assert cfg.model.qk_layernorm and cfg.model.kv_channels == 32


# ----------------------------------------------------------------------------- --format qwen3_moe
QWEN3_ARCH = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                  num_query_groups=2, position="rope", rotary_base=1000000, qk_layernorm=True,
                  kv_channels=16, layernorm_epsilon=1e-6)


def _perturb_qk_norms(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.decoder.layers:
            for norm in (layer.self_attention.q_layernorm, layer.self_attention.k_layernorm):
                norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=g))
    return model


@pytest.mark.parametrize("null,pre", [
    (NullExpertConfig(num_null_experts=4, gate_normalization="keep_null_share"), False),
    (NullExpertConfig(num_null_experts=4, gate_normalization="keep_null_share",
                      gate_scale="none"), True),
    (NullExpertConfig(num_null_experts=3, gate_normalization="keep_null_share",
                      null_logits="per_expert", gate_scale="none"), True),
])
def test_qwen3_export_with_zero_experts_equals_megatron_core(single_rank, tmp_path, null, pre):
    from transformers import Qwen3MoeForCausalLM

    from megatron_nullmoe.export.check import mcore_logits
    from megatron_nullmoe.export.qwen3_moe import export_qwen3_moe
    from tests.test_export import _tokenizer

    model = _perturb_qk_norms(build_gpt(null, moe_router_pre_softmax=pre, **QWEN3_ARCH))
    ids = tokens()
    ref = mcore_logits(model, ids)
    out = export_qwen3_moe(model, _tokenizer(tmp_path), tmp_path / "q", {"source": "test"})
    stock = Qwen3MoeForCausalLM.from_pretrained(str(out)).eval()
    # pre-softmax: every null slot is in the softmax, so each is a zero expert
    copies = null.num_null_experts if pre or null.null_logits == "per_expert" else 2
    assert stock.config.num_experts == 4 + copies and stock.config.norm_topk_prob is (not pre)
    with torch.no_grad():
        got = stock(ids).logits
    assert float((got - ref).abs().max()) < 1e-4


@pytest.mark.parametrize("null,extra,reason", [
    (NullExpertConfig(num_null_experts=4, gate_normalization="renormalize"), {},
     "gate_normalization='renormalize'"),
    (NullExpertConfig(), dict(qk_layernorm=False), "qk_layernorm=False"),
    # pre-softmax gates with the default gate_scale='slot_ratio': every gate x (E + Z) / E
    (NullExpertConfig(num_null_experts=4, gate_normalization="keep_null_share"),
     dict(moe_router_pre_softmax=True), "moe_router_topk_scaling_factor=2.0"),
    (NullExpertConfig(num_null_experts=4, gate_normalization="keep_null_share",
                      target_real_per_token=1.0), {}, "a selection-only router bias"),
])
def test_qwen3_export_is_refused_where_it_is_not_exact(single_rank, tmp_path, null, extra, reason):
    from megatron_nullmoe.export.hf import ExportError
    from megatron_nullmoe.export.mixtral import export_mixtral
    from megatron_nullmoe.export.qwen3_moe import export_qwen3_moe
    from tests.test_export import _tokenizer

    model = build_gpt(null, **{**QWEN3_ARCH, **extra})
    with pytest.raises(ExportError, match="--format qwen3_moe would not compute") as err:
        export_qwen3_moe(model, _tokenizer(tmp_path), tmp_path / "q", {})
    assert reason in str(err.value) and not (tmp_path / "q").exists()
    if extra.get("qk_layernorm") is None:  # and Mixtral has no q/k norms at all
        with pytest.raises(ExportError, match="qk_layernorm=True: Mixtral has no q/k norms"):
            export_mixtral(model, _tokenizer(tmp_path), tmp_path / "m", {})


def test_the_vllm_plugin_reads_qk_layernorm():
    from megatron_nullmoe_vllm.config import ServeConfig, ServeConfigError

    fields = dict(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=32, ffn_hidden_size=96, moe_ffn_hidden_size=48,
                  moe_layers=[1], num_experts=4, num_null_experts=0, null_logits="shared",
                  router_topk=2, router_score_function="softmax", router_pre_softmax=False,
                  gate_normalization="renormalize", router_topk_scaling_factor=None,
                  normalization="RMSNorm", norm_eps=1e-6, position_embedding_type="rope",
                  rotary_base=10000, rotary_percent=1.0, max_position_embeddings=64,
                  activation="swiglu", tie_word_embeddings=False, vision_config=None)
    assert not ServeConfig.from_hf(SimpleNamespace(**fields, qk_layernorm=False)).qk_layernorm
    assert ServeConfig.from_hf(SimpleNamespace(**fields, qk_layernorm=True)).qk_layernorm
    # exports written before the field existed have no q/k norms
    assert not ServeConfig.from_hf(SimpleNamespace(**fields)).qk_layernorm
    with pytest.raises(ServeConfigError, match="moe_layers"):  # its other refusals still hold
        ServeConfig.from_hf(SimpleNamespace(**{**fields, "moe_layers": [1, 0]}, qk_layernorm=True))
