"""Export from a Megatron-LM checkpoint written by the project's GPT entry script.

Megatron-LM's own pretrain() runs launch/megatron_lm/pretrain_gpt_nullmoe.py on 2 CPU ranks with
expert parallel 2 (as tests/test_megatron_lm_pretrain.py does, with the Megatron-LM release tree
that matches the installed megatron-core; skipped without one), a Mixtral-style decoder (RMSNorm,
rope, SwiGLU, grouped-query attention, untied output layer, no biases), MoE on layers 0 and 2 of 3
(--moe-layer-freq 2), null experts with budget control, and a sentencepiece tokenizer, for a few
iterations with --save. The run goes through a small wrapper that, once pretrain() returns, runs
the model Megatron-LM trained and saved (built by Megatron-LM's model_provider with the entry
script's builder, on its 2 ranks) on fixed tokens, and compares Megatron-LM's own
`core_transformer_config_from_args` with `transformer_config` on the run's real args.

Checked here: the model `load_megatron_lm` rebuilds on one rank gives those logits; the export of
it gives its logits (< 1e-4); a Transformer Engine-named checkpoint loads the same; corrupt,
incomplete or unsupported checkpoints are refused with the reason.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests._megatron_lm_tree import ROOT
from tests._megatron_lm_run import CPU_FLAGS, TORCHRUN

ITERS = 3
TOKENS = (2, 16)  # batch, length of the reference logits
ARCH = [
    "--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "96",
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--position-embedding-type", "rope",
    "--rotary-base", "500000", "--swiglu", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--seq-length", "32",
    "--max-position-embeddings", "32",
    "--num-experts", "4", "--moe-ffn-hidden-size", "48", "--moe-router-topk", "2",
    "--moe-layer-freq", "2", "--num-null-experts", "4",
    "--null-expert-target-real-per-token", "1.0", "--null-expert-budget-update-rate", "0.05",
    "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
    "--moe-aux-loss-coeff", "0.01",
]
TRAIN = [
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2", "--min-lr", "1e-3",
    "--lr-decay-style", "constant", "--lr-warmup-iters", "0", "--train-iters", str(ITERS),
    "--mock-data", "--tokenizer-type", "GPTSentencePieceTokenizer",
    "--eval-iters", "0", "--eval-interval", "1000", "--num-workers", "0", "--log-interval", "1",
    "--seed", "1234", *CPU_FLAGS,
]

# Runs the entry script unchanged (runpy), recording the models its builder returns; after
# pretrain() returns, runs them on fixed tokens on every rank (expert parallel needs both) and
# compares the two configs. Rank 0 saves what it found.
CAPTURE = r'''
import dataclasses, functools, runpy, sys
import torch

entry, out = sys.argv[1], sys.argv[2]
sys.argv = [entry, *sys.argv[3:]]
import megatron_nullmoe.megatron_lm as mlm

built = []
builder = mlm.gpt_builder


def recording(*args, **kwargs):
    model = builder(*args, **kwargs)
    built.append(model)
    return model


mlm.gpt_builder = recording
runpy.run_path(entry, run_name="__main__")

from megatron.training import get_args
try:
    from megatron.training.argument_utils import core_transformer_config_from_args
except ImportError:
    from megatron.training.arguments import core_transformer_config_from_args
from megatron_nullmoe.megatron_lm.rebuild import CPU, transformer_config

args = get_args()
theirs, ours = core_transformer_config_from_args(args), transformer_config(args)


def norm(v):
    if isinstance(v, functools.partial):
        return (v.func, v.args, sorted(v.keywords.items()))
    return v


diff = {f.name: (repr(getattr(theirs, f.name, None)), repr(getattr(ours, f.name, None)))
        for f in dataclasses.fields(ours)
        if f.name not in CPU and f.name != "attention_backend"
        and norm(getattr(theirs, f.name, None)) != norm(getattr(ours, f.name, None))}
(model,) = built
model.eval()
ids = torch.randint(0, args.padded_vocab_size, (%d, %d), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None).float()
if torch.distributed.get_rank() == 0:
    torch.save({"ids": ids, "logits": logits, "config_diff": diff}, out)
''' % TOKENS


def torchrun(tree: Path, script: Path, folder: Path, *flags: str) -> str:
    """One torchrun on 2 CPU ranks with the Megatron-LM tree first on PYTHONPATH (as
    tests/test_megatron_lm_pretrain.py runs the entry scripts); returns its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_", "MASTER_"))}
    path = os.pathsep.join(p for p in (str(tree), str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(PYTHONPATH=path, OMP_NUM_THREADS="1")
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(script), *flags]
    out = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=420)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return log


@pytest.fixture(scope="module")
def trained(tree, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """(save folder, tokenizer, reference) of one Megatron-LM run of the GPT entry script."""
    from megatron_nullmoe.run.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("megatron_lm_export")
    texts = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(200)]
    tokenizer = train_tokenizer(texts, tmp / "tokenizer.model", vocab_size=100)
    script = tmp / "capture.py"
    script.write_text(CAPTURE)
    entry = ROOT / "launch" / "megatron_lm" / "pretrain_gpt_nullmoe.py"
    torchrun(tree, script, tmp, str(entry), str(tmp / "reference.pt"), *ARCH, *TRAIN,
             "--tokenizer-model", str(tokenizer), "--save", str(tmp / "save"),
             "--save-interval", str(ITERS))
    return tmp / "save", tokenizer, torch.load(tmp / "reference.pt", weights_only=False)


@pytest.fixture(scope="module")
def loaded(trained):
    from megatron_nullmoe.megatron_lm.rebuild import load_megatron_lm

    save, _, _ = trained
    return load_megatron_lm(save)


def logits(model, ids):
    from megatron_nullmoe.export.check import mcore_logits

    return mcore_logits(model, ids)


def test_config_equals_megatron_lms_own_except_the_cpu_layout(trained):
    _, _, reference = trained
    assert reference["config_diff"] == {}


def test_rebuilt_model_gives_the_logits_of_the_model_megatron_lm_trained(trained, loaded):
    from megatron_nullmoe.router import NullExpertRouter

    save, tokenizer, reference = trained
    model, tokenizer_path, step = loaded
    assert step == ITERS and tokenizer_path == tokenizer
    # Every MoE layer has null experts, and budget control moved their bias.
    routers = [m for m in model.modules() if isinstance(m, NullExpertRouter)]
    assert len(routers) == 2 and all(float(r.null_budget_bias) != 0.0 for r in routers)
    assert [i for i, layer in enumerate(model.decoder.layers) if hasattr(layer.mlp, "router")] \
        == [0, 2]  # --moe-layer-freq 2
    got = logits(model, reference["ids"])
    # Expert parallel 2 (alltoall) there, one rank here: only the order of the top-k sum differs.
    diff = float((got - reference["logits"]).abs().max())
    assert diff < 1e-5, diff


def test_export_of_the_rebuilt_model_matches_it(trained, loaded, tmp_path):
    for needed in ("safetensors", "transformers"):  # the export's writer and its check
        pytest.importorskip(needed)
    from megatron_nullmoe.export.check import max_logit_difference
    from megatron_nullmoe.export.hf import export_gpt

    save, _, _ = trained
    model, tokenizer_path, step = loaded
    provenance = {"source": str(save), "step": step}
    out = export_gpt(model, tokenizer_path, tmp_path / "export", provenance)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_null_experts"], config["moe_layers"]) == (4, [1, 0, 1])
    assert max_logit_difference(model, out) < 1e-4


def test_export_command_reads_a_megatron_lm_save_folder(trained, tmp_path, capsys):
    import inspect

    from megatron_nullmoe.export.source import resolve

    for needed in ("safetensors", "transformers"):
        pytest.importorskip(needed)
    if "megatron_lm" not in inspect.signature(resolve).parameters:
        pytest.skip("source.resolve does not take Megatron-LM checkpoints yet")
    from megatron_nullmoe.export.__main__ import main

    save, _, _ = trained
    main(["hf", str(save), "--out", str(tmp_path / "export")])
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'export'} (step {ITERS} of {save / f'iter_{ITERS:07d}'})" in out
    assert "check: max |logits(export) - logits(megatron-core)|" in out
    export = json.loads((tmp_path / "export" / "export.json").read_text())
    assert (export["step"], export["run"]) == (ITERS, save.name)


def test_source_and_detection(trained, tmp_path):
    from megatron_nullmoe.megatron_lm.checkpoint import (
        MegatronLMCheckpointError,
        is_megatron_lm_checkpoint,
        megatron_lm_source,
        read_common_state,
        tokenizer_from_args,
    )
    from megatron_nullmoe.export.source import SourceError

    save, tokenizer, _ = trained
    iteration = save / f"iter_{ITERS:07d}"
    assert is_megatron_lm_checkpoint(save) and is_megatron_lm_checkpoint(iteration)
    ours = tmp_path / "run" / "checkpoints" / "iter_0000002"
    ours.mkdir(parents=True)
    (ours / "nullmoe.json").write_text("{}")
    (ours / "metadata.json").write_text("{}")
    assert not is_megatron_lm_checkpoint(ours) and not is_megatron_lm_checkpoint(tmp_path)
    source = megatron_lm_source(save)
    assert (source.kind, source.path, source.tokenizer, source.step) == (
        "megatron-lm", iteration, tokenizer, ITERS)
    assert source.vocab_size == 128
    args = copy.copy(read_common_state(iteration)["args"])
    args.tokenizer_type = "NullTokenizer"
    found, why = tokenizer_from_args(args)
    assert found is None and "--tokenizer-type NullTokenizer" in why
    # The run's tokenizer gone: the source names the reason and asks for --tokenizer.
    moved = tmp_path / "moved.model"
    tokenizer.rename(moved)
    try:
        with pytest.raises(MegatronLMCheckpointError,
                           match=r"no tokenizer for .*--tokenizer-model .* does not exist here; "
                                 "give --tokenizer PATH"):
            megatron_lm_source(save)
        assert megatron_lm_source(save, moved).tokenizer == moved
    finally:
        moved.rename(tokenizer)
    with pytest.raises(MegatronLMCheckpointError, match="--tokenizer 'nope.model' does not exist"):
        megatron_lm_source(save, "nope.model")
    assert issubclass(MegatronLMCheckpointError, SourceError)


def test_transformer_engine_names_load_the_same(trained, loaded, tmp_path):
    """A checkpoint written with Transformer Engine layers names a MoE layer's pre-MLP norm
    `pre_mlp_layernorm.weight`, where megatron-core's local spec (the CPU run's) names it
    `mlp.linear_fc1.layer_norm_weight`. Simulated by saving the rebuilt model under TE's names."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    from megatron_nullmoe.megatron_lm.checkpoint import TRACKER, read_common_state
    from megatron_nullmoe.megatron_lm.rebuild import load_megatron_lm

    save, _, reference = trained
    model, _, _ = loaded
    state = read_common_state(save / f"iter_{ITERS:07d}")
    args = copy.copy(state["args"])
    args.transformer_impl = "transformer_engine"
    moe = [i for i, layer in enumerate(model.decoder.layers) if hasattr(layer.mlp, "router")]
    sharded = model.sharded_state_dict(metadata=dict(state["content_metadata"]))
    for item in sharded.values():
        for i in moe:
            local = f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"
            if getattr(item, "key", None) == local:
                item.key = f"decoder.layers.{i}.pre_mlp_layernorm.weight"
    te = tmp_path / "te" / f"iter_{ITERS:07d}"
    te.mkdir(parents=True)
    dist_checkpointing.save({"model": sharded, "args": args, "iteration": ITERS,
                             "checkpoint_version": 3.0}, str(te))
    (te.parent / TRACKER).write_text(str(ITERS))
    keys = set(load_tensors_metadata(str(te)))
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in keys
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" not in keys
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in keys  # dense: TE fuses it too
    again, _, step = load_megatron_lm(te.parent)
    assert step == ITERS
    assert torch.equal(logits(again, reference["ids"]), logits(model, reference["ids"]))


def _broken(save: Path, tmp: Path, name: str) -> Path:
    copied = tmp / name
    shutil.copytree(save, copied)
    return copied


def test_corrupt_incomplete_or_unsupported_checkpoints_are_refused(trained, tmp_path):
    from megatron_nullmoe.megatron_lm.checkpoint import (
        TRACKER,
        MegatronLMCheckpointError,
        read_common_state,
    )
    from megatron_nullmoe.megatron_lm.rebuild import load_megatron_lm, transformer_config

    save, _, _ = trained
    name = f"iter_{ITERS:07d}"

    def refused(path, match):
        with pytest.raises(MegatronLMCheckpointError, match=match):
            load_megatron_lm(path)

    refused(tmp_path / "nothing", "does not exist")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "is not a Megatron-LM checkpoint")
    s = _broken(save, tmp_path, "tracker")
    (s / TRACKER).write_text("7")
    refused(s, r"names iteration 7, but .*iter_0000007 does not exist")
    (s / TRACKER).write_text("garbage")
    refused(s, "holds 'garbage', not an iteration number")
    s = _broken(save, tmp_path, "no_metadata")
    (s / name / "metadata.json").unlink()
    refused(s, "has no metadata.json: the save did not finish")
    s = _broken(save, tmp_path, "no_index")
    (s / name / ".metadata").unlink()
    refused(s / name, r"has no \.metadata")
    s = _broken(save, tmp_path, "missing_shard")
    sorted((s / name).glob("*.distcp"))[-1].unlink()
    refused(s, rf"{name}: cannot read")
    s = _broken(save, tmp_path, "truncated")
    for shard in (s / name).glob("*.distcp"):
        data = shard.read_bytes()
        shard.write_bytes(data[:64])
    refused(s, rf"{name}: cannot read")
    legacy = tmp_path / "legacy" / "iter_0000001"
    (legacy / "mp_rank_00").mkdir(parents=True)
    refused(legacy, "legacy 'torch' format")

    args = read_common_state(save / name)["args"]
    for setting, value, match in (
        ("multi_latent_attention", True, "--multi-latent-attention=True: multi-latent"),
        ("position_embedding_type", "yarn", "--position-embedding-type=yarn"),
        ("window_size", (128, 0), "--window-size=.*Transformer Engine"),
        ("use_legacy_models", True, "--use-legacy-models"),
    ):
        changed = copy.copy(args)
        setattr(changed, setting, value)
        with pytest.raises(MegatronLMCheckpointError, match=match):
            transformer_config(changed)
    assert isinstance(args, argparse.Namespace)


def test_megatron_lms_attention_switches_in_the_environment_do_not_stop_the_cpu_build(
        trained, monkeypatch):
    """Megatron-LM's initialize sets NVTE_FLASH_ATTN and friends in the process (an export run
    after training in one process inherits them); the local CPU build ignores them."""
    from megatron_nullmoe.megatron_lm.rebuild import load_megatron_lm

    save, tokenizer, _ = trained
    monkeypatch.setenv("NVTE_FLASH_ATTN", "1")
    monkeypatch.setenv("NVTE_FUSED_ATTN", "0")
    model = load_megatron_lm(save, tokenizer)[0]
    assert model is not None
    import os

    assert os.environ["NVTE_FLASH_ATTN"] == "1"  # left as it was
