"""Issue 34: `checkpoint.init_from=HF_DIR` on more than one rank.

The import scatters each global tensor into the slice a rank holds (run/hf_layout.py's
`load_global`); these tests check that slice per layout on 2 gloo processes, with two folders
made with transformers: a Mixtral with grouped-query heads (4 over 2) and a Qwen3-MoE with
per-head q/k norms, head_dim 32 apart from hidden / heads, and a dense SwiGLU layer.

- Tensor parallel 2 and expert parallel 2, model level: the rank-gathered weights are the
  folder's tensors (the QKV rows of each rank's key/value groups, the gate and up halves of each
  rank's SwiGLU fc1, vocabulary rows, experts; q/k norms and routers whole on every rank), every
  element written once, and the logits are transformers' with null slots switched on (unpicked).
  The trainer refuses tensor parallelism on CPU (its non-TE norms refuse sequence parallelism,
  which megatron-core's MoE needs with TP > 1), so the TP model is built here without sequence
  parallelism: the weights' layout does not depend on it.
- Expert parallel 2 and pipeline parallel 2 in the trainer's own 2-process launch (marked slow):
  the first training loss, null slots off and on, is the one-rank import's. (Pipeline parallelism used to
  be refused: each stage called the other stage's tensors "without a place in this model".)

Legend: V vocabulary, B batch, L sequence.
"""

from __future__ import annotations


import pytest
import torch

from tests._dist import run_ranks
from tests._hf_folders import save_random
from tests._train import losses, run, tiny_text
from tests.test_hf_import import _common
from tests.test_hf_qwen3 import _qwen3

NULLS = ["model.null_experts.num_null_experts=4",
         "model.null_experts.target_start_real_per_token=2.0",
         "model.null_experts.target_real_per_token=1.0",
         "model.null_experts.target_schedule_steps=2"]


def _mixtral(folder, tokenizer):
    """A random MixtralForCausalLM (4 query heads over 2 key/value heads, 4 experts, top-2),
    weights drawn wide and norms away from 1 so that routing and every norm matter."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
                           rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False)
    return save_random(MixtralForCausalLM, config, folder, tokenizer, 5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(data root, {family: Hugging Face folder})."""
    root = tiny_text(tmp_path_factory.mktemp("hf_ranks"), 200, 24, 12)
    tok = root / "tok.model"
    return root, {"mixtral": _mixtral(root / "mixtral", tok),
                  # layer 1 dense: a SwiGLU fc1 split over tensor-parallel ranks
                  "qwen3_moe": _qwen3(root / "qwen3", tok, mlp_only_layers=(1,))}


# ----------------------------------------------------------------------------- model level
def _build(cfg):
    """The trainer's GPT (run/model.py's config and spec) at any tensor-parallel size on CPU:
    without sequence parallelism, which only cuts activations (its norms need TE)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_nullmoe.run.model import decoder_config, null_config
    from megatron_nullmoe.spec import with_null_experts

    config = decoder_config(cfg, torch.float32)
    config.sequence_parallel = False
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                      normalization=config.normalization)
    return GPTModel(config, with_null_experts(spec, null_config(cfg)),
                    vocab_size=cfg.model.vocab_size,
                    max_sequence_length=cfg.model.max_position_embeddings,
                    position_embedding_type="rope", rotary_base=cfg.model.rotary_base,
                    pg_collection=ProcessGroupCollection.use_mpu_process_groups())


def layout_worker(rank, world, root, folder, tp, ep, ids_BL):
    """One rank: the folder imported with null slots on (unpicked at the start); returns its
    pieces of every global tensor, its logits and the keys kept fresh."""
    from megatron.core import parallel_state as ps

    from megatron_nullmoe import parallel, start_null_slots_unpicked
    from megatron_nullmoe.export.check import mcore_logits
    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.run.hf_folder import load_hf_weights
    from megatron_nullmoe.run.hf_layout import _leaves, _where

    parallel.init_model_parallel(tp=tp, ep=ep, seed=1)
    cfg = load_config(None, [*_common(root, root / "new"), f"checkpoint.init_from={folder}",
                             f"parallel.tensor={tp}", f"parallel.expert={ep}", *NULLS])
    model = _build(cfg)
    fresh = load_hf_weights(folder, model)
    armed = start_null_slots_unpicked(model)
    # slices as (start, stop) pairs: torch.load's weights-only reader refuses slice objects
    pieces = [(sh.key, tuple(sh.global_shape),
               [(w.start, w.stop) if isinstance(w, slice) else w for w in _where(sh)],
               sh.data.detach().clone()) for sh in _leaves(model)]
    with torch.no_grad():
        logits = mcore_logits(model.eval(), ids_BL)  # [B, L, V / tp]: this rank's vocab rows
    return {"pieces": pieces, "logits": logits, "fresh": fresh, "armed": armed,
            "tp_rank": ps.get_tensor_model_parallel_rank()}


def _gathered(ranks) -> dict[str, torch.Tensor]:
    """{key: global tensor} from every rank's pieces; each element must be written, and where
    ranks hold the same element (replicas), with the same value."""
    full, seen = {}, {}
    for r in ranks:
        for key, shape, spans, data in r["pieces"]:
            where = tuple(slice(*w) if isinstance(w, tuple) else w for w in spans)
            t = full.setdefault(key, torch.full(shape, float("nan")))
            mask = seen.setdefault(key, torch.zeros(shape, dtype=torch.bool))
            before = t[where]
            assert torch.equal(before[mask[where]], data[mask[where]]), f"replicas differ: {key}"
            t[where] = data
            mask[where] = True
    missing = [k for k, m in seen.items() if not m.all()]
    assert not missing, f"elements no rank holds: {missing}"
    return full


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)], ids=["tensor2", "expert2"])
def test_ranks_hold_the_folders_tensors_and_compute_its_logits(folders, tmp_path, family, tp,
                                                               ep):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_nullmoe.run.hf_layout import Attention, family_name, to_hf

    root, by_family = folders
    folder = by_family[family]
    ids_BL = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    ranks = run_ranks(2, layout_worker, (root, folder, tp, ep, ids_BL), tmp_path)

    # the gathered weights, named as the folder names them, are its tensors exactly
    fresh = {k for r in ranks for k in r["fresh"]}  # the null-slot state the folder lacks
    full = {k: v for k, v in _gathered(ranks).items() if k not in fresh}
    qkv = full["decoder.layers.0.self_attention.linear_qkv.weight"]
    att = Attention(heads=4, groups=2, head_dim=qkv.shape[0] // (2 * (2 + 2)))
    ours = {family_name(k, family): v for k, v in to_hf(full, att, gated=True).items()}
    theirs = load_file(str(folder / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    different = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not different, different
    # only the null-slot state is fresh, and every router starts with no null pick
    for r in ranks:
        assert {k.rsplit(".", 1)[-1] for k in r["fresh"]} == \
            {"null_weight", "null_budget_bias", "budget_step"}
        assert r["armed"] == (2 if family == "mixtral" else 1)

    # the logits are transformers' (tensor parallel: each rank holds half the vocabulary)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(folder)).eval()(ids_BL).logits
    if tp > 1:
        got = [torch.cat([r["logits"] for r in sorted(ranks, key=lambda r: r["tp_rank"])], -1)]
    else:
        got = [r["logits"] for r in ranks]
    for logits in got:
        assert float((logits - want).abs().max()) < 1e-4


def test_a_pipeline_stage_leaves_only_other_stages_tensors_to_them():
    """Stage 2 of 2 over 2 layers: it holds layer 1, the final norm and the output layer."""
    from megatron_nullmoe.run.hf_layout import other_stage

    held = {"decoder.layers.1.self_attention.linear_qkv.weight", "decoder.final_layernorm.weight",
            "output_layer.weight"}
    elsewhere = ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]
    its_own = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.foo.weight",
               "lm_head.weight", "model.norm.bias"]
    nowhere = ["model.layers.2.self_attn.q_proj.weight", "model.rotary_emb.inv_freq"]
    assert [other_stage(n, held, 2) for n in elsewhere] == [True, True]
    assert not any(other_stage(n, held, 2) for n in its_own + nowhere)
    # one rank holding everything leaves nothing to another stage
    assert not other_stage("model.embed_tokens.weight", held | {
        "embedding.word_embeddings.weight", "decoder.layers.0.mlp.router.weight"}, 2)


# ----------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def one_rank_first_loss(folders, tmp_path_factory):
    """{family: the first loss of a one-rank import without null slots}."""
    root, by_family = folders
    out = {}
    for family, folder in by_family.items():
        run_dir = tmp_path_factory.mktemp("one_rank") / family
        run([*_common(root, run_dir), "data.micro_batch_size=4", "steps=1",
             f"checkpoint.init_from={folder}", "model.null_experts.num_null_experts=0"])
        out[family] = losses(run_dir)[1]
    return out


@pytest.mark.slow  # 7 trainer launches, ~2 minutes on 2 cores
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("layout,nulls", [
    ("parallel.expert=2", False), ("parallel.expert=2", True), ("parallel.pipeline=2", True),
])
def test_trainer_first_loss_on_two_ranks_is_the_one_rank_imports(
        folders, one_rank_first_loss, tmp_path, family, layout, nulls):
    """2 data-parallel ranks, one micro-batch of 4 each (the one-rank run: 2 of 4), the same
    8 sequences; expert parallel 2 splits the experts, pipeline parallel 2 the layers."""
    root, by_family = folders
    folder = by_family[family]
    run_dir = tmp_path / "run"
    out = run([*_common(root, run_dir), "data.micro_batch_size=4", "steps=1", layout,
               f"checkpoint.init_from={folder}",
               *(NULLS if nulls else ["model.null_experts.num_null_experts=0"])], ranks=2)
    assert f"started from {folder} (a Hugging Face folder)" in out.stdout
    if nulls:
        assert "start with no null picks" in out.stdout
    assert abs(losses(run_dir)[1] - one_rank_first_loss[family]) < 1e-4
