"""`python -m megatron_nullmoe.flops`: iso-FLOP partners, expected real experts, a recipe's FLOPs.

The formulas are the package (`megatron_nullmoe.flops`), which imports nothing of the trainer.
This entry sits above both: `--config` reads a training recipe through `megatron_nullmoe.train`,
and only then (so `--partners` and `--expected` never load the trainer).
"""

from __future__ import annotations

import argparse

from megatron_nullmoe import flops


def _fmt(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.1f} "


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m megatron_nullmoe.flops",
                                description=flops.__doc__.split("\n")[0])
    p.add_argument("--config", help="a training recipe (YAML); prints its FLOPs per token")
    p.add_argument("--vocab-size", type=int, default=32000, help="for --config (default 32000)")
    p.add_argument("--partners", action="store_true", help="iso-FLOP (k, Z) for --experts and --baseline-topk")
    p.add_argument("--expected", action="store_true", help="expected real experts of --experts/--topk/--nulls")
    p.add_argument("--experts", type=int)
    p.add_argument("--baseline-topk", type=int)
    p.add_argument("--topk", type=int)
    p.add_argument("--nulls", type=int)
    p.add_argument("--max-topk", type=int, default=16)
    p.add_argument("overrides", nargs="*", help="key=value overrides for --config")
    a = p.parse_args(argv)
    for flag, value, low in (("--experts", a.experts, 1), ("--baseline-topk", a.baseline_topk, 1),
                             ("--topk", a.topk, 1), ("--nulls", a.nulls, 0), ("--max-topk", a.max_topk, 1)):
        if value is not None and value < low:
            p.error(f"{flag}={value}: expected >= {low}")
    if a.partners:
        if a.experts is None or a.baseline_topk is None:
            p.error("--partners needs --experts E and --baseline-topk K_B")
        if a.baseline_topk > a.experts:
            p.error(f"--baseline-topk={a.baseline_topk} exceeds --experts={a.experts}")
        print(f"iso-FLOP partners of top-{a.baseline_topk} over E={a.experts}: k * E / (E + Z) = "
              f"{a.baseline_topk}")
        print("| k | Z (num_null_experts) | null share Z/(E+Z) |\n|---|---|---|")
        for k, z in flops.iso_flop_partners(a.experts, a.baseline_topk, a.max_topk):
            print(f"| {k} | {z} | {z / (a.experts + z):.3f} |")
        return
    if a.expected:
        if a.experts is None or a.topk is None or a.nulls is None:
            p.error("--expected needs --experts E, --topk K and --nulls Z")
        if a.topk > a.experts + a.nulls:
            p.error(f"--topk={a.topk} exceeds the {a.experts + a.nulls} slots (E + Z)")
        r = flops.expected_real(topk=a.topk, num_experts=a.experts, num_null=a.nulls)
        print(f"expected real experts per token: {a.topk} * {a.experts} / ({a.experts} + {a.nulls}) "
              f"= {r:g} (iso-FLOP with top-{r:g})" if float(r).is_integer() else
              f"expected real experts per token: {r:.4f} (no integer top-k baseline matches)")
        return
    if not a.config:
        p.error("give --config RECIPE, --partners or --expected")
    import warnings

    import torch

    from megatron_nullmoe.train.config import ConfigError, load_config

    warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core's config chatter

    from megatron_nullmoe.config import NullExpertConfigError
    from megatron_nullmoe.train.flops import shapes_from_config
    from megatron_nullmoe.train.model import decoder_config, null_config

    try:
        cfg = load_config(a.config, a.overrides)
        null_config(cfg).check(decoder_config(cfg, torch.float32))
        decoder, vision = shapes_from_config(cfg, a.vocab_size)
    except (ConfigError, NullExpertConfigError) as err:
        raise SystemExit(f"config error: {err}") from None
    r = decoder.expected_real_per_token
    print(f"{cfg.name}: E={decoder.num_experts}, k={decoder.topk}, Z={decoder.num_null_experts}, "
          f"{decoder.num_moe_layers} MoE of {decoder.num_layers} layers, {decoder.seq_length} "
          f"positions, vocab {a.vocab_size}")
    print(f"expected real experts per token: {r:.3f} (top-k would run {decoder.topk})")
    print("| | active params / token | forward FLOPs / token | train FLOPs / sample |")
    print("|---|---|---|---|")
    for label, rr in (("expected (balanced)", r), (f"if every slot were real (top-{decoder.topk})",
                                                   float(decoder.topk))):
        print(f"| {label} | {_fmt(flops.active_params_per_token(decoder, rr))} | "
              f"{_fmt(flops.decoder_forward_flops(decoder, rr))}FLOP | "
              f"{_fmt(flops.train_flops_per_sample(decoder, vision, rr))}FLOP |")


if __name__ == "__main__":
    main()
