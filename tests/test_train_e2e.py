"""End-to-end training runs: real processes, real megatron-core, real energon data and checkpoints.

Each run is `python -m megatron_nullmoe.train` (1 rank) or `torchrun -m megatron_nullmoe.train`
(2 ranks, expert parallel 2, gloo) on a tiny generated dataset. Sizes are the smallest that still
learn; a whole file stays around a minute on 2 cores.

Why the learning thresholds are safe: the tokenizer has 128 pieces, so guessing costs
ln 128 = 4.85 nats, and a fresh model starts near that. Captions are short and mostly predictable
(fixed grammar), so 30 steps bring the loss to ~2.4 on 1 rank and ~1.9 on 2 ranks (measured);
we ask for a drop of at least 1.5 nats, well inside both.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests._train import ROOT, losses, run, tiny_demo, vlm_args



@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return tiny_demo(tmp_path_factory.mktemp("data") / "demo")


def test_vlm_two_ranks_expert_parallel_learns_and_reports(demo, tmp_path):
    out = tmp_path / "run"
    run(vlm_args(demo, out, "steps=30", "parallel.expert=2", "logging.eval_every=30",
                 "logging.log_every=10", "logging.tensorboard=true"), ranks=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["world_size"] == 2
    assert summary["final_train_loss"] < summary["initial_train_loss"] - 1.5
    assert summary["final_val_loss"] < 4.85 - 1.5
    # Null experts at work: k=4 over 8 real + 8 null slots; rows are real assignments only.
    assert 0 < summary["real_experts_per_token"] < 4
    assert 0 < summary["rows_dispatched"] < summary["rows_standard_topk"]
    for key in ("null_rate_vision", "null_rate_text", "tokens_per_s"):
        assert summary[key] is not None and summary[key] > 0, key
    # FLOPs come from the realised real experts per token: below what top-4 would claim.
    from megatron_nullmoe.flops import train_flops_per_sample
    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.train.flops import shapes_from_config

    cfg = load_config(str(out / "config.yaml"))
    shapes = shapes_from_config(cfg, vocab_size=128)
    per_sample_topk = train_flops_per_sample(*shapes, real_per_token=4.0)
    per_sample_none = train_flops_per_sample(*shapes, real_per_token=0.0)
    samples = 30 * cfg.data.global_batch_size
    assert samples * per_sample_none < summary["model_flops_total"] < samples * per_sample_topk
    assert (out / "training.png").stat().st_size > 10_000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "iter_0000030" / "nullmoe.json").is_file()


def test_resume_reproduces_the_uninterrupted_run_exactly(demo, tmp_path):
    """2 ranks: stop after 4 steps, resume to 8; every loss equals the uninterrupted run's."""
    common = ["steps=8", "parallel.expert=2", "checkpoint.save_every=100"]
    run(vlm_args(demo, tmp_path / "full", *common), ranks=2)
    run(vlm_args(demo, tmp_path / "split", *common, "exit_after_steps=4"), ranks=2)
    assert (tmp_path / "split/checkpoints/latest").read_text().strip() == "iter_0000004"
    assert not (tmp_path / "split" / "summary.json").exists()
    resumed = run(vlm_args(demo, tmp_path / "split", *common), ranks=2)
    assert "resumed from" in resumed.stdout
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 9))
    assert split == full  # bit-equal floats: data position, RNG, optimizer and schedule restored


@pytest.mark.parametrize("kind,suffix", [("jsonl", ".jsonl"), ("indexed", "_text_document")])
def test_one_rank_gpt_on_text_learns(demo, tmp_path, kind, suffix):
    out = tmp_path / "gpt"
    run(["--config", str(ROOT / "examples/gpt_null_moe.yaml"), "model.num_layers=2",
         "model.hidden_size=64", "model.ffn_hidden_size=128", "model.moe_ffn_hidden_size=64",
         "parallel.expert=1", f"data.kind={kind}", f"data.path={demo}/text/train{suffix}",
         f"data.valid_path={demo}/text/val{suffix}", f"data.tokenizer={demo}/tokenizer.model",
         "data.seq_length=24", "data.micro_batch_size=8", "data.global_batch_size=8",
         "optim.warmup_steps=3", "logging.progress_bar=false", "logging.tensorboard=false",
         "logging.eval_every=30", "steps=30", f"dir={out}"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_train_loss"] < summary["initial_train_loss"] - 1.5
    assert summary["null_rate_vision"] is None  # text only: no vision tokens were counted
    assert summary["null_rate_text"] > 0


def test_evaluations_follow_eval_every_and_eval_at_and_leave_training_bit_equal(demo, tmp_path):
    """The text study thins its evaluations (eval_every=100, eval_at=[50, 650, 750]) and pairs
    the runs with ones that evaluated every 50 steps: that is exact only if evaluating changes
    nothing in training (no RNG draw, no data position, no optimizer state)."""
    def gpt(out, *extra):
        run(["--config", str(ROOT / "examples/gpt_null_moe.yaml"), "model.num_layers=2",
             "model.hidden_size=64", "model.ffn_hidden_size=128", "model.moe_ffn_hidden_size=64",
             "parallel.expert=1", "data.kind=jsonl", f"data.path={demo}/text/train.jsonl",
             f"data.valid_path={demo}/text/val.jsonl", f"data.tokenizer={demo}/tokenizer.model",
             "data.seq_length=24", "data.micro_batch_size=8", "data.global_batch_size=8",
             "optim.warmup_steps=3", "logging.progress_bar=false", "logging.tensorboard=false",
             "logging.log_every=1", "logging.eval_steps=2", "steps=7", f"dir={out}", *extra])
        records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in records if "val/loss" in r]

    assert gpt(tmp_path / "none", "logging.eval_every=0") == []
    assert gpt(tmp_path / "some", "logging.eval_every=3", "logging.eval_at=[1, 4]") == [1, 3, 4, 6, 7]
    # a step past the run is ignored: a recipe's eval_at survives a shorter steps= override
    assert gpt(tmp_path / "only", "logging.eval_every=0", "logging.eval_at=[2, 650]") == [2]
    trained = {name: losses(tmp_path / name) for name in ("none", "some", "only")}
    assert sorted(trained["none"]) == list(range(1, 8))
    assert trained["some"] == trained["none"] and trained["only"] == trained["none"]  # bit-equal
    # What the run counts as training compute leaves the evaluations out: the rows its experts
    # ran, the realised FLOPs, the routing totals. "mid" logs every 3 steps and evaluates inside
    # those intervals, so the training counts of a half-done interval must survive the evaluation.
    assert gpt(tmp_path / "mid", "logging.log_every=3", "logging.eval_every=0",
               "logging.eval_at=[2, 4, 5]") == [2, 4, 5]
    mid = losses(tmp_path / "mid")
    assert sorted(mid) == [1, 3, 6, 7] and all(mid[s] == trained["none"][s] for s in mid)
    summaries = {n: json.loads((tmp_path / n / "summary.json").read_text())
                 for n in ("none", "some", "only", "mid")}
    for name in ("some", "only", "mid"):
        for key in ("rows_dispatched", "rows_standard_topk", "real_experts_per_token",
                    "null_rate_text", "tokens_total"):
            assert summaries[name][key] == summaries["none"][key], (name, key)
        # a float summed per logging interval: equal up to the order of the sum
        assert summaries[name]["model_flops_total"] == pytest.approx(
            summaries["none"]["model_flops_total"], rel=1e-12)
    assert summaries["none"]["rows_dispatched"] > 0


# ----------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def saved(demo, tmp_path_factory) -> Path:
    """A finished 1-rank run with a checkpoint at step 2, to damage in copies."""
    out = tmp_path_factory.mktemp("saved") / "run"
    run(vlm_args(demo, out, "steps=2"))
    return out


def _copy(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(saved, dst)
    return dst


def test_corrupt_checkpoint_names_the_file_and_keeps_it(demo, saved, tmp_path):
    run_dir = _copy(saved, tmp_path)
    shard = sorted((run_dir / "checkpoints/iter_0000002").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: dist_checkpointing alone loads it
    shard.write_bytes(bytes(data))
    out = run(vlm_args(demo, run_dir, "steps=4"), check=False)
    assert out.returncode != 0
    assert "is corrupt" in out.stderr and shard.name in out.stderr
    assert shard.read_bytes() == bytes(data)  # nothing was overwritten


def test_checkpoint_of_another_model_is_refused_with_the_difference(demo, saved, tmp_path):
    run_dir = _copy(saved, tmp_path)
    config_before = (run_dir / "config.yaml").read_text()
    out = run(vlm_args(demo, run_dir, "steps=4", "model.null_experts.num_null_experts=4"),
              check=False)
    assert out.returncode != 0
    assert "different model config" in out.stderr
    assert "null.num_null_experts: checkpoint 8, this run 4" in out.stderr
    assert (run_dir / "config.yaml").read_text() == config_before  # a refused run writes nothing
    out = run(vlm_args(demo, run_dir, "steps=4", "checkpoint.resume=false"), check=False)
    assert out.returncode != 0 and "already holds checkpoints (newest iter_0000002)" in out.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter_0000002", "latest"]


def test_a_checkpoint_saved_before_a_model_key_existed_resumes_at_its_default(demo, saved,
                                                                              tmp_path):
    """A key added to the recipe later (e.g. model.activation) is absent from older manifests:
    it reads as its default, so old checkpoints resume, and a non-default value is refused."""
    run_dir = _copy(saved, tmp_path)
    manifest_path = run_dir / "checkpoints/iter_0000002/nullmoe.json"
    manifest = json.loads(manifest_path.read_text())
    for key in ("normalization", "position_embedding", "rotary_base", "activation",
                "num_query_groups"):
        manifest["identity"]["model"].pop(key)
    manifest_path.write_text(json.dumps(manifest))
    out = run(vlm_args(demo, run_dir, "steps=4", "model.activation=swiglu"), check=False)
    assert out.returncode != 0
    assert "model.activation: checkpoint 'gelu', this run 'swiglu'" in out.stderr
    out = run(vlm_args(demo, run_dir, "steps=3"))
    assert "resumed from" in out.stdout + out.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3


def test_interrupted_save_leaves_the_last_good_checkpoint(demo, saved, tmp_path):
    run_dir = _copy(saved, tmp_path)
    ckpt = run_dir / "checkpoints"
    half = ckpt / "iter_0000003.tmp"  # what a run killed mid-save leaves
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"partial")
    out = run(vlm_args(demo, run_dir, "steps=3"))
    assert "resumed from" in out.stdout and "iter_0000002" in out.stdout
    assert not half.exists()
    assert (ckpt / "latest").read_text().strip() == "iter_0000003"


@pytest.mark.slow
def test_bad_inputs_fail_fast_with_the_reason(demo, tmp_path):
    cases = {
        "model.num_expert=4": "did you mean 'model.num_experts'",
        "data.path=/nonexistent/ds": "/nonexistent/ds",
        "data.tokenizer=/nonexistent/tok.model": "/nonexistent/tok.model",
        "model.router_topk=40": "moe_router_topk",
        "data.global_batch_size=12": "data.global_batch_size=12",
        "precision=bf16": "needs a GPU",
    }
    for override, expected in cases.items():
        out = run(vlm_args(demo, tmp_path / "bad", "steps=1", override), check=False)
        assert out.returncode != 0, override
        assert expected in out.stderr, (override, out.stderr[-2000:])


def test_gpt_pipeline_parallel_two_stages_learns_and_resumes(demo, tmp_path):
    """PP=2 on 2 ranks: each stage holds 2 of 4 layers (MoE at 0 and 2: one per stage). It must
    learn, report routing stats for the MoE layers of both stages, and resume exactly."""
    args = ["--config", str(ROOT / "examples/gpt_null_moe.yaml"), "model.num_layers=4",
            "model.hidden_size=64", "model.ffn_hidden_size=128", "model.moe_ffn_hidden_size=64",
            "parallel.expert=1", "parallel.pipeline=2", f"data.path={demo}/text/train.jsonl",
            f"data.valid_path={demo}/text/val.jsonl", f"data.tokenizer={demo}/tokenizer.model",
            "data.seq_length=24", "data.micro_batch_size=4", "data.global_batch_size=8",
            "optim.warmup_steps=3", "logging.progress_bar=false", "logging.tensorboard=false",
            "logging.log_every=1", "logging.eval_every=12", "steps=12",
            "checkpoint.save_every=100"]
    run([*args, f"dir={tmp_path / 'full'}"], ranks=2)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["final_train_loss"] < summary["initial_train_loss"] - 1.5
    records = [json.loads(l) for l in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert {"null/layer_1", "null/layer_3"} <= set(records[-2])  # one MoE layer per stage
    assert summary["rows_dispatched"] < summary["rows_standard_topk"]
    run([*args, f"dir={tmp_path / 'split'}", "exit_after_steps=5"], ranks=2)
    run([*args, f"dir={tmp_path / 'split'}"], ranks=2)
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


def test_modality_fixed_control_trains_with_its_fixed_split(demo, tmp_path):
    """The control the null-MoE claim needs: no null slots, vision tokens keep 1 of top-3 experts,
    text tokens all 3. The trainer hands the routers the modality mask, so the realised split is
    exactly the rule: 2/3 of vision picks and none of the text picks go unused."""
    out = tmp_path / "run"
    run(vlm_args(demo, out, "steps=4", "model.router_topk=3",
                 "model.null_experts.num_null_experts=0", "model.null_experts.vision_topk=1",
                 "model.null_experts.text_topk=3"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["null_rate_vision"] == pytest.approx(2 / 3)
    assert summary["null_rate_text"] == 0
    assert 1 < summary["real_experts_per_token"] < 3


# ----------------------------------------------------------------------------- after training
def test_a_vlm_run_captions_images_and_generate_takes_an_image(demo, saved, tmp_path):
    """`make demo`'s picture: greedy captions of validation images by the run's own model, with
    each image's null shares; and `generate --image` captions an image file, the same caption
    the captions command gives for that image."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from megatron_nullmoe.inference.captions import caption_images

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    out = subprocess.run([sys.executable, "-m", "megatron_nullmoe.inference.captions", str(saved),
                          "--images", "3", "--max-new-tokens", "6", "--out",
                          str(tmp_path / "c.png")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if "(reference:" in l]
    assert len(lines) == 3 and (tmp_path / "c.png").stat().st_size > 10_000
    results = caption_images(saved, 1, 6)
    r = results[0]
    assert 0 <= r["null_image"] <= 1 and 0 <= r["null_text"] <= 1 and r["reference"]
    pixels = ((r["image"].permute(1, 2, 0) + 1) / 2 * 255).round().clamp(0, 255).byte().numpy()
    Image.fromarray(np.ascontiguousarray(pixels)).save(tmp_path / "img.png")
    gen = subprocess.run([sys.executable, "-m", "megatron_nullmoe.generate", str(saved), "--image",
                          str(tmp_path / "img.png"), "--max-new-tokens", "6"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip() == r["caption"].strip()
    # the VLM export (NullMoEForConditionalGeneration, KV cache) captions it the same
    exported = subprocess.run([sys.executable, "-m", "megatron_nullmoe.export", "hf", str(saved),
                               "--out", str(tmp_path / "hf")], capture_output=True, text=True,
                              env=env, timeout=300)
    assert exported.returncode == 0, exported.stderr
    gen = subprocess.run([sys.executable, "-m", "megatron_nullmoe.generate", str(tmp_path / "hf"),
                          "--image", str(tmp_path / "img.png"), "--max-new-tokens", "6"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip() == r["caption"].strip() and "real experts per token" in gen.stderr
    bad = subprocess.run([sys.executable, "-m", "megatron_nullmoe.generate", str(saved)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "is a VLM: give --image PATH" in bad.stderr
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    for extra, ok in (([], False), (["--resize"], True)):
        out = subprocess.run([sys.executable, "-m", "megatron_nullmoe.generate", str(saved),
                              "--image", str(tmp_path / "small.png"), "--max-new-tokens", "3",
                              *extra], capture_output=True, text=True, env=env, timeout=300)
        assert (out.returncode == 0) == ok, out.stderr
        if not ok:
            assert "is 24x20; the model takes 32x32 (model.vision.image_size)" in out.stderr
