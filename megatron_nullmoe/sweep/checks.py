"""What a planned sweep is checked for before anything runs, and what it will cost.

- iso-FLOP: with `iso_flop:` in the sweep file, the variants of each group must spend the same
  expected real experts per token at every grid point: the budget target
  (`model.null_experts.target_real_per_token`; under a compute schedule its mean over the run's
  steps, `NullExpertConfig.mean_target(steps)`) where budget control is on, else the balanced
  expectation k * E / (E + Z) (flops.expected_real). The first variant of a group is its reference;
  a variant more than `tolerance` (relative) away is refused with the keys that set its rate.
- runtime: what the trainer would refuse only after start-up (top-k against E + Z, a budget target
  above k, megatron-core's own config checks, world size against parallel sizes and batch).
- cost: training FLOPs of every run from flops.train_flops_per_sample at its expected rate, x
  global batch x steps; GPU-hours from an assumed per-GPU peak and MFU.
"""

from __future__ import annotations

import warnings
from typing import Optional

from megatron_nullmoe.flops import expected_real, train_flops_per_sample
from megatron_nullmoe.run.config import ConfigError, RunConfig
from megatron_nullmoe.sweep.spec import Run, Sweep, SweepError
from megatron_nullmoe.train.flops import shapes_from_config


def expected_real_per_token(cfg: RunConfig) -> float:
    null = cfg.model.null_experts
    if null.num_null_experts and null.target_real_per_token is not None:
        return null.mean_target(cfg.steps)  # the constant target without a schedule
    if null.modality_topk is not None:  # the modality-fixed control: exact, per position
        vision, text = cfg.image_tokens, cfg.data.seq_length
        return (vision * null.vision_topk + text * null.text_topk) / (vision + text)
    return expected_real(topk=cfg.model.router_topk, num_experts=cfg.model.num_experts,
                         num_null=null.num_null_experts)


def _why(cfg: RunConfig) -> str:
    null, m = cfg.model.null_experts, cfg.model
    if null.num_null_experts and null.target_scheduled:
        return (f"model.null_experts.target_start_real_per_token="
                f"{null.target_start_real_per_token:g} -> target_real_per_token="
                f"{null.target_real_per_token:g} over target_schedule_steps="
                f"{null.target_schedule_steps} ({null.target_schedule}), mean over steps="
                f"{cfg.steps} = {expected_real_per_token(cfg):g}")
    if null.num_null_experts and null.target_real_per_token is not None:
        return f"model.null_experts.target_real_per_token={null.target_real_per_token:g}"
    if null.modality_topk is not None:
        return (f"model.null_experts.vision_topk={null.vision_topk} over {cfg.image_tokens} image "
                f"positions and text_topk={null.text_topk} over data.seq_length="
                f"{cfg.data.seq_length} = {expected_real_per_token(cfg):g}")
    return (f"model.router_topk={m.router_topk} x model.num_experts={m.num_experts} / "
            f"({m.num_experts} + model.null_experts.num_null_experts={null.num_null_experts}) = "
            f"{expected_real_per_token(cfg):g}")


def check_iso_flop(sweep: Sweep, runs: list[Run]) -> None:
    if sweep.iso_flop is None:
        return
    tol = sweep.iso_flop.tolerance
    by_point: dict[tuple, dict[str, RunConfig]] = {}
    for run in runs:
        by_point.setdefault(run.point, {}).setdefault(run.variant, run.cfg)
    for point, cfgs in by_point.items():
        at = "".join(f", {axis}={label}" for axis, label in point)
        for group, names in sweep.iso_flop.groups.items():
            ref = expected_real_per_token(cfgs[names[0]])
            for name in names[1:]:
                r = expected_real_per_token(cfgs[name])
                if abs(r - ref) > tol * ref:
                    raise SweepError(
                        f"variants.{name} is not iso-FLOP with variants.{names[0]} "
                        f"(iso_flop.groups.{group}{at}): {_why(cfgs[name])} against "
                        f"{_why(cfgs[names[0]])} real experts per token, {abs(r - ref) / ref:.1%} "
                        f"apart > iso_flop.tolerance={tol:g}")


def check_runtime(runs: list[Run], world_size: int) -> None:
    """The trainer's start-up checks, once per distinct config, on the launching machine."""
    from megatron_nullmoe.run.model import check_decoder
    from megatron_nullmoe.train.validate import check

    seen = set()
    for run in runs:
        if run.label in seen:
            continue
        seen.add(run.label)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check_decoder(run.cfg)
            check(run.cfg, world_size)
        except ConfigError as err:
            raise SweepError(f"{run.label} (world size {world_size}): {err}") from None


def vocab_size(cfg: RunConfig, given: Optional[int]) -> tuple[int, str]:
    """The vocabulary for the FLOP estimate: given, else the recipe's tokenizer, else 32000."""
    if given:
        return given, "--vocab-size"
    path = cfg.tokenizer_path
    if path.exists():  # a file, or a folder holding one (load_tokenizer)
        from megatron_nullmoe.run.tokenizer import load_tokenizer

        return load_tokenizer(path).vocab_size, str(path)
    return 32000, "assumed (no tokenizer file here; give --vocab-size)"


def run_flops(cfg: RunConfig, vocab: int) -> float:
    """Training FLOPs of a whole run at its expected real experts per token."""
    per_sample = train_flops_per_sample(*shapes_from_config(cfg, vocab), expected_real_per_token(cfg))
    return per_sample * cfg.data.global_batch_size * cfg.steps


def estimate(runs: list[Run], vocab: int, gpu_tflops: float, mfu: float) -> list[dict]:
    """Per run: expected real experts per token, FLOPs, and GPU-hours at gpu_tflops x mfu."""
    out = []
    for run in runs:
        flops = run_flops(run.cfg, vocab)
        out.append({"run": run.key, "label": run.label, "real_per_token":
                    expected_real_per_token(run.cfg), "steps": run.cfg.steps, "flops": flops,
                    "gpu_hours": flops / (gpu_tflops * 1e12 * mfu) / 3600})
    return out
