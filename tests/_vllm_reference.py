"""Exports and their reference continuations for tests/test_vllm_serve.py, in a process of its own.

    python tests/_vllm_reference.py OUT_DIR MODE [MODE ...]
    python tests/_vllm_reference.py --captions OUT_DIR

For each MODE (a key of MODES): a random megatron-core GPT with null experts (tests/_models.py's
builder; hidden 64 over 2 heads, so head size 32, which vLLM's CPU attention takes), its null
router rows scaled up so that some tokens pick only null slots and others only real experts,
exported by megatron_nullmoe.export.hf.export_gpt to OUT_DIR/MODE. Then the project's generate on
each prompt (the library path of `python -m megatron_nullmoe.generate EXPORT`: its text, and the
token ids of the same greedy decode), with the routers' picks counted. Writes
OUT_DIR/reference.json. A process of its own because megatron-core's parallel state and vLLM's
engine each set up torch.distributed.

--captions: the demo's caption text without its images (`make demo-data`'s text/{train,val}.jsonl
and tokenizer, from the same scenes, but fewer and without megatron-energon) in OUT_DIR, for the
test that trains the GPT recipe.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PROMPTS = ["word3 and more", "words 14 word7", "and"]
NEW_TOKENS = 12
SIZE = dict(hidden_size=64, num_attention_heads=2, ffn_hidden_size=96, moe_ffn_hidden_size=48)

# mode -> (NullExpertConfig fields, TransformerConfig fields, build_gpt keywords)
MODES = {
    # the recipes' defaults: LayerNorm, learned positions, GELU; a dense layer between MoE layers
    "gelu_shared_renorm_dense": (dict(num_null_experts=4, gate_normalization="renormalize"),
                                 {}, dict(layers=3, moe_freq=2)),
    # Mixtral-style: RMSNorm, rope, SwiGLU, GQA; per-expert null logits, pre-softmax gates with
    # the slot-ratio gate scale, keep_null_share, the budget bias at selection
    "swiglu_rope_gqa_perexpert_presoftmax": (
        dict(num_null_experts=4, null_logits="per_expert", gate_normalization="keep_null_share",
             gate_scale="slot_ratio", target_real_per_token=1.0),
        dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
             num_query_groups=1, moe_router_pre_softmax=True),
        dict(position="rope")),
    # a Qwen3-MoE import's attention: per-head q/k RMSNorm, a head size (64) apart from hidden /
    # heads (32), norm eps 1e-6; post-softmax gates over the picks
    "qwen3_qknorm_headdim": (
        dict(num_null_experts=4),
        dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
             qk_layernorm=True, kv_channels=64, layernorm_epsilon=1e-6),
        dict(position="rope", rotary_base=1000000)),
    # an OLMoE import's attention: q/k RMSNorms over the whole projection (2 heads x 32 for q,
    # 1 x 32 for k), pre-softmax gates (norm_topk_prob false) with the slot-ratio gate scale
    "olmoe_projection_qknorm": (
        dict(num_null_experts=4, gate_normalization="keep_null_share"),
        dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
             qk_layernorm=True, num_query_groups=1, moe_router_pre_softmax=True),
        dict(position="rope", qk_norm_scope="projection")),
    # sigmoid scores with the expert bias and megatron-core's top-k scaling factor
    "sigmoid_expert_bias_scaling": (
        dict(num_null_experts=4),
        dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
             moe_router_load_balancing_type="none", moe_router_topk_scaling_factor=2.5), {}),
}


def build_export(mode: str, tokenizer: Path, out: Path) -> None:
    from megatron_nullmoe import NullExpertConfig
    from megatron_nullmoe.export.hf import export_gpt
    from tests._models import build_gpt

    null, config, kw = MODES[mode]
    model = build_gpt(NullExpertConfig(**null), seq=64, **{**SIZE, **config}, **kw)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in model.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            attention = layer.self_attention
            for norm in (getattr(attention, "q_layernorm", None),
                         getattr(attention, "k_layernorm", None)):
                if norm is not None and hasattr(norm, "weight"):  # away from 1: the weight counts
                    norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=g))
            if router is not None and router.null_weight is not None:
                # null logits spread far wider than the real ones: per token, either every pick
                # is null (0 real experts) or none is
                router.null_weight.copy_(torch.randn(router.null_weight.shape, generator=g) * 2.0)
    export_gpt(model, tokenizer, out, {"source": f"tests/_vllm_reference.py {mode}"},
               overwrite=True)


def reference(export: Path) -> dict:
    from megatron_nullmoe import generate
    from megatron_nullmoe.export.source import load_hf
    from megatron_nullmoe.inference.decode import hf_generate, prompt_ids
    from megatron_nullmoe.run.tokenizer import UNK, Tokenizer

    hf_model, _ = load_hf(export)
    tokenizer = Tokenizer(export / "tokenizer.model")
    picks = []
    for module in hf_model.modules():
        if type(module).__name__ == "NullMoERouter":
            module.register_forward_hook(lambda m, i, out: picks.append(out[0] < m.num_real))
    out = {"prompts": [], "k": hf_model.config.router_topk}
    for prompt in PROMPTS:
        picks.clear()
        ids = prompt_ids(tokenizer, prompt)
        new = hf_generate(hf_model, ids, NEW_TOKENS)
        real_T = torch.cat(picks).sum(-1)
        # the command itself (its entry point is stable while its module moves): stdout is the text
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            generate.main([str(export), "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS)])
        text = stdout.getvalue()[:-1]  # print's newline
        out["prompts"].append(dict(
            prompt=prompt, prompt_ids=ids, new_ids=new, text=text,
            text_without_unk=tokenizer.decode([i for i in new if i != UNK]),
            tokens_with_0_real=int((real_T == 0).sum()),
            tokens_with_k_real=int((real_T == hf_model.config.router_topk).sum()),
            # (token, MoE layer) pairs routed, and the real picks among their k each: the rows
            # an engine that skips null picks computes for this prompt
            token_layers=int(real_T.numel()), real_picks=int(real_T.sum())))
    return out


def captions(out_dir: str, train: int = 2048, val: int = 64) -> None:
    from megatron_nullmoe.run.tokenizer import train_tokenizer
    from megatron_nullmoe.train.data import shapes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = {"train": [shapes.scene(0, i).caption for i in range(train)],
            "val": [shapes.scene(0, train + i).caption for i in range(val)]}
    for split, lines in text.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    train_tokenizer(text["train"] + shapes.vocabulary_text(), out / "tokenizer.model")


def main(out_dir: str, modes: list[str]) -> None:
    import os

    from megatron_nullmoe import parallel
    from megatron_nullmoe._mcore import cpu as cpu_compat
    from megatron_nullmoe.run.tokenizer import train_tokenizer

    cpu_compat.enable()  # as tests/conftest.py: megatron-core on CPU, one gloo rank
    os.environ["MASTER_PORT"] = str(parallel.free_port())
    parallel.init_distributed(rank=0, world_size=1, backend="gloo")
    parallel.init_model_parallel(seed=1234)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer([f"word{i} and more words {i * 7}" for i in range(200)],
                                out / "tok.model", vocab_size=96)
    result = {}
    for mode in modes:
        build_export(mode, tokenizer, out / mode)
        result[mode] = reference(out / mode)
    (out / "reference.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "--captions":
        captions(sys.argv[2])
    else:
        main(sys.argv[1], sys.argv[2:])
