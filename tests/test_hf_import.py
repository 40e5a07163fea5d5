"""Issue 34, first step: `checkpoint.init_from=HF_DIR` starts a run from a Hugging Face Mixtral.

A tiny Mixtral-style model (RMSNorm, rope, SwiGLU, grouped-query attention, top-2 of 4) is
trained here and exported as stock Mixtral. Imported back with no null slots it computes the
source's logits, and exported again it is the same Mixtral (|diff| < 1e-4, fp32). In the trainer
with null slots switched on, the first loss is the source's (no jump). A folder without
config.json, another architecture, a recipe key that disagrees, a setting the trainer cannot
reproduce and a tensor that does not fit are each refused by name.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests._train import ROOT, losses, run, tiny_text

ARCH = ["model.kind=gpt", "model.num_layers=2", "model.hidden_size=64",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.normalization=RMSNorm",
        "model.position_embedding=rope", "model.rotary_base=500000", "model.activation=swiglu",
        "model.moe_layer_freq=1", "model.num_experts=4", "model.router_topk=2",
        "model.router_pre_softmax=false", "model.moe_ffn_hidden_size=32",
        "model.ffn_hidden_size=64", "model.max_position_embeddings=32"]


def _common(root, run_dir):
    return [f"dir={run_dir}", "data.kind=jsonl", f"data.path={root / 'train.jsonl'}",
            f"data.valid_path={root / 'val.jsonl'}", "data.seq_length=12",
            "data.micro_batch_size=8", "data.global_batch_size=8", "optim.warmup_steps=1",
            "logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every=1",
            "logging.eval_every=0", "parallel.expert=1"]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(data root, the source run, its stock-Mixtral export)."""
    from tests.test_export import cli

    root = tiny_text(tmp_path_factory.mktemp("hf_import"), 200, 24, 12)
    source = root / "source"
    run([*_common(root, source), *ARCH, f"data.tokenizer={root / 'tok.model'}", "steps=3",
         "model.null_experts.num_null_experts=0"])
    out = cli(["-m", "megatron_nullmoe.export", "hf", str(source), "--format", "mixtral",
               "--out", str(root / "mixtral")])
    assert out.returncode == 0, out.stderr
    return root, source, root / "mixtral"


def _imported(root, folder, *extra):
    """A fresh model built from `checkpoint.init_from=folder` alone (no architecture keys) and
    the folder's weights, one CPU rank, fp32."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.run.hf_folder import load_hf_weights
    from megatron_nullmoe.run.model import build_model

    cfg = load_config(None, [*_common(root, root / "new"), f"checkpoint.init_from={folder}",
                             *extra])
    model, _ = build_model(cfg, cfg.model.vocab_size,
                           ProcessGroupCollection.use_mpu_process_groups(), torch.float32,
                           use_te=False)
    fresh = load_hf_weights(folder, model)
    return cfg, model.eval(), fresh


def test_mixtral_round_trips_through_the_import(mixtral, single_rank, tmp_path):
    from transformers import MixtralForCausalLM

    from megatron_nullmoe.export.check import mcore_logits
    from megatron_nullmoe.export.mixtral import export_mixtral
    from megatron_nullmoe.export.source import load_megatron, resolve

    root, source, folder = mixtral
    cfg, model, fresh = _imported(root, folder, "model.null_experts.num_null_experts=0")
    # the architecture and the tokenizer came from the folder
    assert (cfg.model.kind, cfg.model.hidden_size, cfg.model.num_query_groups,
            cfg.model.rotary_base, cfg.model.normalization) == ("gpt", 64, 2, 500000, "RMSNorm")
    assert cfg.data.tokenizer == str(folder / "tokenizer.model") and fresh == []
    ids = torch.randint(4, cfg.model.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    want = mcore_logits(load_megatron(resolve(source)), ids)
    assert float((mcore_logits(model, ids) - want).abs().max()) < 1e-5
    again = export_mixtral(model, folder / "tokenizer.model", tmp_path / "again", {})
    first, second = (MixtralForCausalLM.from_pretrained(str(p)).eval() for p in (folder, again))
    with torch.no_grad():
        a, b = first(ids).logits, second(ids).logits
    assert float((a - want).abs().max()) < 1e-4 and float((b - a).abs().max()) < 1e-4


def test_null_slots_start_fresh_and_unpicked(mixtral, single_rank):
    from megatron_nullmoe import start_null_slots_unpicked
    from megatron_nullmoe.export.check import mcore_logits

    root, _, folder = mixtral
    _, plain, _ = _imported(root, folder, "model.null_experts.num_null_experts=0")
    _, model, fresh = _imported(root, folder, "model.null_experts.num_null_experts=4",
                                "model.null_experts.target_real_per_token=1.0")
    assert sorted({k.rsplit(".", 1)[-1] for k in fresh}) == \
        ["null_budget_bias", "null_weight"]
    assert start_null_slots_unpicked(model) == 2
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    assert float((mcore_logits(model, ids) - mcore_logits(plain, ids)).abs().max()) < 1e-5


def test_trainer_first_loss_with_null_slots_is_the_sources(mixtral, tmp_path):
    root, _, folder = mixtral
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
    saved = (nulls / "config.yaml").read_text()
    assert "hidden_size: 64" in saved and "vocab_size:" in saved  # the run folder is whole


def _copy(folder, tmp_path, edit=None, drop=()):
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    if edit:
        config.update(edit)
    (out / "config.json").write_text(json.dumps(config))
    for name in drop:
        (out / name).unlink()
    return out


@pytest.mark.parametrize("edit,drop,message", [
    (None, ("config.json",), "holds safetensors but no config.json"),
    ({"architectures": ["GptOssForCausalLM"]}, (),
     "architecture 'GptOssForCausalLM' cannot be imported (valid: MixtralForCausalLM, "
     "Qwen3MoeForCausalLM, OlmoeForCausalLM)"),
    ({"sliding_window": 4096}, (), "sliding_window=4096"),
    ({"tie_word_embeddings": True}, (), "tie_word_embeddings=true"),
    ({"hidden_act": "gelu"}, (), "hidden_act='gelu'"),
])
def test_a_folder_the_import_cannot_reproduce_is_refused(mixtral, tmp_path, edit, drop, message):
    from megatron_nullmoe.run.config import ConfigError, load_config

    root, _, folder = mixtral
    bad = _copy(folder, tmp_path, edit, drop)
    with pytest.raises(ConfigError, match="checkpoint.init_from=") as err:
        load_config(None, [*_common(root, tmp_path / "r"), f"checkpoint.init_from={bad}"])
    assert message in str(err.value)


def test_recipe_keys_that_disagree_are_each_named(mixtral, tmp_path):
    from megatron_nullmoe.run.config import ConfigError, load_config

    root, _, folder = mixtral
    with pytest.raises(ConfigError) as err:
        load_config(str(ROOT / "examples/gpt_null_moe.yaml"),
                    [f"checkpoint.init_from={folder}", "model.hidden_size=64"])
    text = str(err.value)
    assert "model.num_layers: recipe 4, Hugging Face config 2" in text
    assert "model.moe_layer_freq: recipe 2, Hugging Face config 1" in text
    assert "model.num_experts: recipe 8, Hugging Face config 4" in text
    # it agrees (hidden_size), or the recipe leaves it out and the folder fills it (normalization)
    assert "model.hidden_size" not in text and "normalization" not in text


def test_a_tensor_that_does_not_fit_is_refused_by_name(mixtral, single_rank, tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_nullmoe.run.checkpoint import CheckpointError

    root, _, folder = mixtral
    bad = _copy(folder, tmp_path)
    weights = load_file(str(bad / "model.safetensors"))
    del weights["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    weights["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        _imported(root, bad, "model.null_experts.num_null_experts=0")
    text = str(err.value)
    assert "decoder.layers.1.mlp.experts.experts.linear_fc1.weight (not in the source)" in text
    assert "decoder.layers.0.self_attention.linear_proj.weight (source [64, 32], this model " \
           "[64, 64])" in text


def test_a_tokenizer_with_more_ids_than_the_vocab_is_refused(mixtral, tmp_path):
    from megatron_nullmoe.run.tokenizer import train_tokenizer

    root, _, folder = mixtral
    big = train_tokenizer([f"word{i} other{i * 3} thing{i * 7}" for i in range(400)],
                          tmp_path / "big.model", vocab_size=160)
    out = run([*_common(root, tmp_path / "r"), f"checkpoint.init_from={folder}", "steps=1",
               f"data.tokenizer={big}"], check=False)
    assert out.returncode != 0 and "more than model.vocab_size=" in out.stderr
