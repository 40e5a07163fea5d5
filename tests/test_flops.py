"""FLOPs and iso-FLOP partners: hand-checked identities, and the CLI."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from megatron_nullmoe.flops import (
    DecoderShape,
    active_params_per_token,
    decoder_forward_flops,
    expected_real,
    iso_flop_partners,
)

ROOT = Path(__file__).resolve().parents[1]


def test_expected_real_and_partners_satisfy_the_iso_flop_identity():
    assert expected_real(topk=8, num_experts=64, num_null=64) == 4.0
    assert expected_real(topk=4, num_experts=8, num_null=8) == 2.0
    with pytest.raises(TypeError):  # keyword-only: E, k and Z cannot be passed in the wrong order
        expected_real(8, 64, 64)
    partners = iso_flop_partners(64, 4, max_topk=12)
    assert (8, 64) in partners and (4, 0) in partners
    for k, z in partners:
        assert Fraction(k * 64, 64 + z) == 4
    # E=6, k_b=4: Z = 6 (k-4) / 4 is an integer only for even k
    assert [k for k, _ in iso_flop_partners(6, 4, max_topk=10)] == [4, 6, 8, 10]


def test_decoder_flops_by_hand_and_linear_in_real_experts():
    d = DecoderShape(num_layers=2, hidden_size=4, ffn_hidden_size=8, seq_length=3, vocab_size=10,
                     num_moe_layers=1, num_experts=2, moe_ffn_hidden_size=5, topk=2,
                     num_null_experts=2, null_logit_rows=1)
    attention = 2 * 4 * 16 + 2 * 2 * 3 * 4  # projections + scores/values
    dense_mlp = 2 * 2 * 4 * 8
    router = 2 * 4 * (2 + 1)
    expert = 2 * 2 * 4 * 5
    logits = 2 * 4 * 10
    for r in (0.0, 1.0, 2.0):
        assert decoder_forward_flops(d, r) == 2 * attention + dense_mlp + router + r * expert + logits
    assert decoder_forward_flops(d) == decoder_forward_flops(d, 1.0)  # balanced: 2 * 2 / 4
    assert active_params_per_token(d, 2.0) - active_params_per_token(d, 1.0) == 2 * 4 * 5


def test_cli_partners_expected_and_recipe(capsys):
    from megatron_nullmoe.flops.__main__ import main

    main(["--partners", "--experts", "64", "--baseline-topk", "4", "--max-topk", "8"])
    assert "| 8 | 64 | 0.500 |" in capsys.readouterr().out
    main(["--expected", "--experts", "64", "--topk", "8", "--nulls", "64"])
    assert "= 4 (iso-FLOP with top-4)" in capsys.readouterr().out
    from megatron_nullmoe.train.flops import main as recipe_main

    recipe_main([str(ROOT / "examples/vlm_null_moe_gpu.yaml")])
    assert "expected real experts per token: 4.000" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="model.num_experts"):
        recipe_main([str(ROOT / "examples/vlm_null_moe_gpu.yaml"), "model.num_expert=3"])
    with pytest.raises(SystemExit):
        main(["--partners", "--experts", "64"])
    assert "--baseline-topk" in capsys.readouterr().err


def test_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "megatron_nullmoe.flops", "--partners",
                          "--experts", "8", "--baseline-topk", "2"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "| 4 | 8 | 0.500 |" in out.stdout


def test_one_formula_counted_by_hand_with_gqa_swiglu_and_a_plain_config():
    """megatron_lm.null_moe_flops goes through the shared formula (megatron_nullmoe.flops);
    Megatron-LM's convention: a multiply-add is 2 FLOPs, training = 3 x forward."""
    import argparse

    from megatron_nullmoe.megatron_lm import null_moe_flops

    base = dict(hidden_size=8, seq_length=4, num_layers=2, num_attention_heads=4,
                ffn_hidden_size=16, moe_ffn_hidden_size=12, num_experts=4, moe_router_topk=2,
                padded_vocab_size=10)
    gqa = argparse.Namespace(**base, group_query_attention=True, num_query_groups=2, swiglu=True,
                             moe_layer_freq=1)
    # per token and layer: attention 2*2*h*h*(1 + 2/4) + 2*2*s*h = 384 + 128; router 2*h*E = 64;
    # experts 1.5 * 2*3*h*f_moe = 864 (SwiGLU: 3 matrices); output layer 2*h*V = 160
    per_token = 2 * (384 + 128) + 2 * (64 + 864) + 160
    assert null_moe_flops(gqa, 1, 1.5) == 3 * 4 * per_token == 36480
    plain = argparse.Namespace(**base, group_query_attention=False, swiglu=False,
                               moe_layer_freq=[1, 0])
    # layer 0 MoE: attention 512 + 128, router 64, experts 1.5 * 2*2*h*f_moe = 576;
    # layer 1 dense: attention 640, MLP 2*2*h*f = 512; output layer 160
    per_token = (640 + 64 + 576) + (640 + 512) + 160
    assert null_moe_flops(plain, 1, 1.5) == 3 * 4 * per_token == 31104
    # a head size apart from hidden / heads (Qwen3: kv_channels): 4 heads of 4 channels, so the
    # attention is 16 wide: projections 2*2*h*16*(1 + 2/4) = 768, scores and values 2*2*s*16 = 256
    wide = argparse.Namespace(**{**vars(gqa), "kv_channels": 4})
    per_token = 2 * (768 + 256) + 2 * (64 + 864) + 160
    assert null_moe_flops(wide, 1, 1.5) == 3 * 4 * per_token
    # hidden / heads written out is the same model as leaving it out
    assert null_moe_flops(argparse.Namespace(**{**vars(gqa), "kv_channels": 2}), 1, 1.5) == 36480
