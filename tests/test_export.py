"""Issue 18: the Hugging Face export computes what megatron-core computes, and skips null picks.

Models are megatron-core GPTs built here with every router mode the trainer and Megatron-LM can
produce (gate normalisation x null-logit mode x pre-softmax, sigmoid scores with expert bias,
budget-control bias, the top-k scaling factor) and the architectures of the recipes (LayerNorm /
RMSNorm, learned / rotary positions, GELU / SwiGLU, grouped-query attention, dense layers between
MoE layers). Their weights are random with routing made non-trivial (selection biases set), and
the export's logits must equal megatron-core's on the same tokens (fp32, < 1e-4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_nullmoe import NullExpertConfig
from tests._models import VOCAB, build_gpt

ROOT = Path(__file__).resolve().parents[1]


def routers(model):
    return [l.mlp.router for l in model.decoder.layers if hasattr(l.mlp, "router")]


def max_diff(model, tokens) -> tuple[float, object]:
    from megatron_nullmoe.export.check import mcore_logits
    from megatron_nullmoe.export.source import hf_from_megatron

    hf_model, _ = hf_from_megatron_no_tokenizer(model)
    ref = mcore_logits(model, tokens)
    with torch.no_grad():
        out = hf_model(tokens, use_cache=False)
    return float((out.logits - ref).abs().max()), out


def hf_from_megatron_no_tokenizer(model):
    from megatron_nullmoe.export.hf import hf_config, hf_state_dict
    from megatron_nullmoe.export.hf_code.configuration_nullmoe import NullMoEConfig
    from megatron_nullmoe.export.hf_code.modeling_nullmoe import NullMoEForCausalLM

    hf_model = NullMoEForCausalLM(NullMoEConfig(**hf_config(model)))
    hf_model.load_state_dict(hf_state_dict(model), strict=True)
    return hf_model.eval(), None


def tokens(batch=3, length=16, seed=0):
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


ROUTER_MODES = [
    # (gate normalisation, null logits, pre-softmax, topk)
    (gate, logits, pre, k)
    for gate in ("renormalize", "keep_null_share")
    for logits in ("shared", "per_expert")
    for pre, k in ((False, 2), (True, 2), (True, 1))
]


@pytest.mark.parametrize("gate,logits,pre,k", ROUTER_MODES)
def test_export_logits_equal_megatron_core_for_every_router_mode(single_rank, gate, logits, pre, k):
    null = NullExpertConfig(num_null_experts=4, null_logits=logits, gate_normalization=gate,
                            target_real_per_token=1.0)
    model = build_gpt(null, topk=k, moe_router_pre_softmax=pre)
    diff, out = max_diff(model, tokens())
    assert diff < 1e-4, diff
    assert 0 < float(out.real_experts_per_token) < k  # some picks were null, some real


@pytest.mark.parametrize("name,null,config,kw", [
    ("sigmoid+expert bias+scaling", NullExpertConfig(num_null_experts=4),
     dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
          moe_router_load_balancing_type="none", moe_router_topk_scaling_factor=2.5), {}),
    ("sigmoid keep_null_share", NullExpertConfig(num_null_experts=2, gate_normalization="keep_null_share",
                                                 null_logits="per_expert"),
     dict(moe_router_score_function="sigmoid"), {}),
    ("pre-softmax slot_ratio gate scale x megatron-core's scaling",
     NullExpertConfig(num_null_experts=4, gate_normalization="keep_null_share",
                      gate_scale="slot_ratio"),
     dict(moe_router_pre_softmax=True, moe_router_topk_scaling_factor=1.5), {}),
    ("no nulls (plain top-2)", NullExpertConfig(), {}, {}),
    ("mixtral-style: RMSNorm rope SwiGLU GQA", NullExpertConfig(num_null_experts=4),
     dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
          num_query_groups=2), dict(position="rope")),
    ("qwen3-style: per-head q/k RMSNorm, head_dim 16 apart from 32 / 4, eps 1e-6",
     NullExpertConfig(num_null_experts=4),
     dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
          num_query_groups=2, qk_layernorm=True, kv_channels=16, layernorm_epsilon=1e-6),
     dict(position="rope")),
    ("olmoe-style: q/k RMSNorm over the whole projection, 1 key/value head",
     NullExpertConfig(num_null_experts=4),
     dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
          num_query_groups=1, qk_layernorm=True),
     dict(position="rope", qk_norm_scope="projection")),
    ("dense layers between MoE layers, 3 layers", NullExpertConfig(num_null_experts=8,
                                                                  target_real_per_token=1.0),
     {}, dict(layers=3, moe_freq=2)),
])
def test_export_logits_equal_megatron_core_for_every_architecture(single_rank, name, null, config, kw):
    model = build_gpt(null, **config, **kw)
    with torch.no_grad():  # norms away from 1, so that a q/k norm left out would show
        for p_name, p in model.named_parameters():
            if p_name.endswith("layernorm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    diff, _ = max_diff(model, tokens())
    assert diff < 1e-4, f"{name}: {diff}"


def test_null_picks_are_never_computed_and_all_null_tokens_get_zero(single_rank):
    """Each expert sees only the rows that picked it; a token whose picks are all null gets
    exactly zero from the MoE block (no expert runs for it)."""
    null = NullExpertConfig(num_null_experts=4, gate_normalization="keep_null_share")
    model = build_gpt(null, topk=2)
    hf_model, _ = hf_from_megatron_no_tokenizer(model)
    block = hf_model.model.layers[0].mlp
    seen = []
    for e, expert in enumerate(block.experts):
        expert.register_forward_hook(lambda m, inp, out, e=e: seen.append((e, inp[0].shape[0])))
    x = torch.randn(2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.bool)
    with torch.no_grad():
        index, _ = block.router(x.reshape(-1, 32))
        out, real, counted = block(x, mask)
    picked = {e: int((index == e).any(-1).sum()) for e in range(4)}
    assert dict(seen) == {e: n for e, n in picked.items() if n}
    assert int(real) == int((index < 4).sum()) and int(counted) == 16
    # every pick null: a very large selection bias on the null slots
    with torch.no_grad():
        block.router.selection_bias[4:] = 1e4
        seen.clear()
        out, real, _ = block(x, mask)
    assert seen == [] and int(real) == 0
    assert torch.equal(out, torch.zeros_like(out))


def test_padding_is_not_counted_and_left_padding_gives_the_same_logits(single_rank):
    null = NullExpertConfig(num_null_experts=4, target_real_per_token=1.0)
    model = build_gpt(null, position="rope", normalization="RMSNorm")
    hf_model, _ = hf_from_megatron_no_tokenizer(model)
    ids = tokens(1, 10)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 10)], dim=1).long()
    with torch.no_grad():
        hf_model.reset_routing_totals()
        plain = hf_model(ids, use_cache=False)
        first = hf_model.routing_totals()
        hf_model.reset_routing_totals()
        left = hf_model(padded, attention_mask=mask, use_cache=False)
        second = hf_model.routing_totals()
    assert torch.allclose(left.logits[:, 3:], plain.logits, atol=1e-5)
    assert first == second  # the 3 padding positions are not counted
    assert first["token_layers"] == 10 * 2


def test_cached_decoding_equals_full_recompute(single_rank):
    null = NullExpertConfig(num_null_experts=4, null_logits="per_expert")
    model = build_gpt(null, num_query_groups=2, position="rope", seq=32)
    hf_model, _ = hf_from_megatron_no_tokenizer(model)
    from megatron_nullmoe.inference.decode import hf_generate, mcore_generate

    prompt = [2, 17, 33, 9]
    assert hf_generate(hf_model, prompt, 20, stop_at_eos=False) == \
        mcore_generate(model, prompt, 20, 32, stop_at_eos=False)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny GPT null-MoE run trained by the trainer (budget control, keep-null-share), and its
    export folder, written by the command line."""
    from tests._train import run, tiny_text

    root = tmp_path_factory.mktemp("export")
    tiny_text(root, 400, 40, 16)
    run_dir = root / "run"
    run(["--config", str(ROOT / "examples/gpt_null_moe.yaml"), f"dir={run_dir}",
         f"data.path={root / 'train.jsonl'}", f"data.valid_path={root / 'val.jsonl'}",
         f"data.tokenizer={root / 'tok.model'}", "steps=8", "parallel.expert=1",
         "logging.eval_every=0", "logging.progress_bar=false", "logging.tensorboard=false",
         "model.null_experts.gate_normalization=keep_null_share"])
    out = cli(["-m", "megatron_nullmoe.export", "hf", str(run_dir), "--out", str(root / "hf")])
    assert out.returncode == 0, out.stderr
    assert "check: max |logits(export) - logits(megatron-core)|" in out.stdout
    return run_dir, root / "hf", out.stdout


def cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_export_folder_loads_with_auto_classes_and_equals_the_run(trained_run, single_rank):
    from megatron_nullmoe.export.check import mcore_logits
    from megatron_nullmoe.export.source import load_hf, load_megatron, resolve
    from megatron_nullmoe.run.tokenizer import Tokenizer

    run_dir, export, stdout = trained_run
    names = sorted(p.name for p in export.iterdir())
    assert names == sorted(["config.json", "configuration_nullmoe.py", "export.json",
                            "generation_config.json", "model.safetensors", "modeling_nullmoe.py",
                            "routing_math.py", "special_tokens_map.json",
                            "tokenization_nullmoe.py", "tokenizer.model", "tokenizer_config.json"])
    config = json.loads((export / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nullmoe.NullMoEForCausalLM"
    assert (config["num_null_experts"], config["router_topk"], config["moe_layers"]) == \
        (8, 4, [1, 0, 1, 0])
    # the remote code imports nothing of this project
    imports = {line.split()[1].split(".")[0] for name in ("modeling_nullmoe.py", "configuration_nullmoe.py",
                                                          "routing_math.py", "tokenization_nullmoe.py")
               for line in (export / name).read_text().splitlines()
               if line.startswith(("import ", "from ")) and not line.startswith("from .")}
    assert imports <= {"math", "os", "shutil", "dataclasses", "typing", "torch", "transformers",
                       "sentencepiece"}, imports
    model = load_megatron(resolve(run_dir))
    hf_model, hf_tok = load_hf(export)
    ids = tokens(2, 24, seed=3) % hf_model.config.vocab_size
    diff = float((hf_model(ids, use_cache=False).logits - mcore_logits(model, ids)).abs().max())
    assert diff < 1e-4
    # the budget-control bias reached the export
    bias = hf_model.model.layers[0].mlp.router.selection_bias
    assert bias[:8].abs().sum() == 0 and bias[8:].abs().min() > 0
    # tokenizer ids equal the trainer's
    ours = Tokenizer(run_dir / "tokenizer.model")
    for text in ("the cat sat on a mat", " birds  sing\tin trees", "unseen words: xyz 123!"):
        assert hf_tok(text)["input_ids"] == [2] + ours.encode(text)
        assert hf_tok.decode(ours.encode(text)) == ours.decode(ours.encode(text))


def test_generate_from_the_export_equals_the_megatron_core_loop(trained_run):
    run_dir, export, _ = trained_run
    outs = {}
    for name, source, extra in (("run", run_dir, []), ("export", export, []),
                                ("run-hf", run_dir, ["--backend", "hf"])):
        out = cli(["-m", "megatron_nullmoe.generate", str(source), "--prompt", "the cat",
                   "--max-new-tokens", "20", *extra])
        assert out.returncode == 0, out.stderr
        outs[name] = out.stdout
    assert outs["run"] == outs["export"] == outs["run-hf"]
    assert outs["run"].strip()
    sampled = [cli(["-m", "megatron_nullmoe.generate", str(export), "--prompt", "the",
                    "--max-new-tokens", "12", "--sample", "--seed", "5"]).stdout for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed repeats itself


@pytest.mark.slow
def test_bad_sources_and_requests_are_refused_with_the_reason(trained_run, tmp_path):
    run_dir, export, _ = trained_run
    cases = [
        (["-m", "megatron_nullmoe.export", "hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
         "does not exist; give a run folder"),
        (["-m", "megatron_nullmoe.export", "hf", str(run_dir), "--out", str(export)],
         "already holds files; give an empty or new folder, or --overwrite"),
        (["-m", "megatron_nullmoe.export", "hf", str(export), "--out", str(tmp_path / "o")],
         "is an export already"),
        (["-m", "megatron_nullmoe.generate", str(export), "--prompt", "x", "--max-new-tokens", "999"],
         "--max-new-tokens 999 pass the model's 64 positions"),
        (["-m", "megatron_nullmoe.generate", str(run_dir), "--image", "x.png"],
         "is a text-only model (GPT)"),
        (["-m", "megatron_nullmoe.generate", str(export), "--sample", "--temperature", "0"],
         "--temperature 0.0: give a number > 0"),
    ]
    (tmp_path / "empty").mkdir()
    hollow = tmp_path / "hollow" / "iter_0000008"  # a manifest, but no model files
    hollow.mkdir(parents=True)
    ckpt = next((run_dir / "checkpoints").glob("iter_*"))
    (hollow / "nullmoe.json").write_text((ckpt / "nullmoe.json").read_text())
    cases += [
        (["-m", "megatron_nullmoe.export", "hf", str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
         "is none of: a run folder"),
        (["-m", "megatron_nullmoe.export", "hf", str(hollow), "--out", str(tmp_path / "o"),
          "--config", str(run_dir / "config.yaml"), "--tokenizer", str(run_dir / "tokenizer.model")],
         f"checkpoint {hollow} is missing"),
    ]
    for args, message in cases:
        out = cli(args)
        assert out.returncode != 0 and message in out.stderr, (args, out.stderr[-800:])
    assert (export / "model.safetensors").is_file()  # the refused export left the old one alone
    # a corrupt checkpoint is named, and nothing is written
    ckpt = next((run_dir / "checkpoints").glob("iter_*"))
    victim = next(p for p in sorted(ckpt.rglob("*.distcp")))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    backup = victim.read_bytes()
    victim.write_bytes(bytes(data))
    try:
        out = cli(["-m", "megatron_nullmoe.export", "hf", str(run_dir), "--out", str(tmp_path / "c")])
    finally:
        victim.write_bytes(backup)
    assert out.returncode != 0 and "does not match its recorded sha256" in out.stderr
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- --format mixtral
MIXTRAL_ARCH = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                    num_query_groups=2, position="rope", rotary_base=500000)


def _mixtral_model(null, **kw):
    return build_gpt(null, **{**MIXTRAL_ARCH, **kw})


@pytest.mark.parametrize("null,k", [
    (NullExpertConfig(num_null_experts=4, gate_normalization="keep_null_share"), 2),  # 2 copies
    (NullExpertConfig(num_null_experts=3, gate_normalization="keep_null_share",
                      null_logits="per_expert"), 2),  # all 3 rows
    (NullExpertConfig(num_null_experts=1, gate_normalization="keep_null_share"), 3),  # Z < k
    (NullExpertConfig(), 2),  # plain top-2
])
def test_mixtral_export_loads_in_stock_transformers_and_equals(single_rank, tmp_path, null, k):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    from megatron_nullmoe.export.check import mcore_logits
    from megatron_nullmoe.export.mixtral import export_mixtral

    model = _mixtral_model(null, topk=k)
    ids = tokens()
    ref = mcore_logits(model, ids)
    out = export_mixtral(model, _tokenizer(tmp_path), tmp_path / "mixtral", {"source": "test"})
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and not (out / "modeling_nullmoe.py").exists()
    stock = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False).eval()
    assert isinstance(stock, MixtralForCausalLM)
    copies = 0 if not null.num_null_experts else (
        min(null.num_null_experts, k) if null.null_logits == "shared" else null.num_null_experts)
    assert stock.config.num_local_experts == 4 + copies
    with torch.no_grad():
        got = stock(ids).logits
    assert float((got - ref).abs().max()) < 1e-4


@pytest.mark.parametrize("null,extra,reason", [
    (NullExpertConfig(num_null_experts=4, gate_normalization="renormalize"), {},
     "gate_normalization='renormalize'"),
    (NullExpertConfig(num_null_experts=4, gate_normalization="keep_null_share",
                      target_real_per_token=1.0), {}, "a selection-only router bias"),
    (NullExpertConfig(num_null_experts=4, gate_normalization="keep_null_share"),
     dict(moe_router_pre_softmax=True), "router_pre_softmax=True"),
    (NullExpertConfig(), dict(normalization="LayerNorm"), "normalization='LayerNorm'"),
    (NullExpertConfig(), dict(position="learned_absolute"), "position_embedding_type"),
])
def test_mixtral_export_is_refused_where_it_is_not_exact(single_rank, tmp_path, null, extra, reason):
    from megatron_nullmoe.export.hf import ExportError
    from megatron_nullmoe.export.mixtral import export_mixtral

    if extra.get("position") == "learned_absolute":
        model = build_gpt(null, normalization="RMSNorm", gated_linear_unit=True,
                          activation_func=F.silu)
    else:
        model = _mixtral_model(null, **extra)
    with pytest.raises(ExportError, match="--format mixtral would not compute") as err:
        export_mixtral(model, _tokenizer(tmp_path), tmp_path / "m", {})
    assert reason in str(err.value) and "Use the default format" in str(err.value)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.tmp").exists()


def _tokenizer(tmp_path):
    from megatron_nullmoe.run.tokenizer import train_tokenizer

    path = tmp_path / "tok.model"
    if not path.exists():
        train_tokenizer([f"word{i} and more words {i * 7}" for i in range(200)], path,
                        vocab_size=VOCAB)
    return path
