"""The prepared GPU check (launch/gpu_check/), tested here on CPU: the bundle's manifest, size
limit and offline install commands, and a DRY run of every step (GPU_CHECK_DRY=1: gloo, CPU,
smaller sizes), asserting on what gpu_check.json records for each."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch" / "gpu_check"))
import bundle  # noqa: E402


def test_size_limit_names_the_parts():
    bundle.check_size({"checkout": 10, "bundle": 20}, limit=30)
    with pytest.raises(SystemExit, match=r"\(checkout 0.0 MiB, bundle 0.0 MiB\), over the"):
        bundle.check_size({"checkout": 10, "bundle": 21}, limit=30)


def test_manifest_verifies_and_catches_a_changed_or_missing_file(tmp_path):
    (tmp_path / "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"w")
    manifest = bundle.write_manifest(tmp_path)
    assert manifest["bytes"] == 1 and manifest["files"][0]["sha256"] == bundle.sha256(
        tmp_path / manifest["files"][0]["name"])
    problems = bundle.verify(tmp_path)
    assert "no file for megatron-core==0.16.1" not in problems  # that one is there
    assert "no file for einops" in problems
    (tmp_path / manifest["files"][0]["name"]).write_bytes(b"x")
    assert any("differs from the manifest" in p for p in bundle.verify(tmp_path))
    assert bundle.verify(tmp_path / "none")[0].startswith("no ")


def test_download_and_install_commands_are_offline_and_by_name(tmp_path):
    down = bundle.download_command("einops", tmp_path)
    assert down[-1] == "einops" and "--no-deps" in down and "--only-binary=:all:" in down
    assert down[down.index("--python-version") + 1] == "3.12"
    venv, pip = bundle.install_commands(tmp_path, tmp_path / "venv", "python3")
    assert venv[:4] == ["python3", "-m", "venv", "--system-site-packages"]
    assert {"--no-index", "--no-deps", "--find-links"} <= set(pip)
    assert pip[pip.index("--find-links") + 1] == str(tmp_path)
    assert f"megatron-core=={bundle.MEGATRON_CORE}" in pip and "torch" not in pip
    assert not any(p.startswith(("torch", "nvidia", "numpy")) for p in bundle.PACKAGES)


def test_the_measured_bundle_fits_when_present():
    if not (bundle.BUNDLE / "manifest.json").is_file():
        pytest.skip("no gpu_bundle/ here (make gpu-wheels fills it)")
    assert bundle.verify(bundle.BUNDLE) == []
    sizes = bundle.carried_bytes()
    assert sum(sizes.values()) <= bundle.LIMIT, sizes


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_", "MASTER_"))}
    env.update(GPU_CHECK_DRY="1", GPU_CHECK_OUT=str(out), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_check" / "check.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((out / "gpu_check.json").read_text())
    return report, done.stdout + done.stderr, out


@pytest.mark.slow
def test_dry_check_writes_both_reports_with_every_step(dry):
    report, log, out = dry
    assert report["dry"] is True
    assert list(report["steps"]) == ["install", "environment", "demo_data", "train_gpt",
                                     "train_vlm", "megatron_lm", "layer_bench", "gpu_tests"]
    assert report["steps"]["install"]["status"] == "skipped"
    assert "| train_vlm |" in (out / "gpu_check.md").read_text()
    for name, step in report["steps"].items():
        assert step["status"] in ("ok", "failed", "skipped"), name
        assert step["status"] != "failed" or step["error"], name


def _ok(report, name):
    step = report["steps"][name]
    assert step["status"] == "ok", f"{name}: {step.get('error') or step.get('why')}"
    return step


@pytest.mark.parametrize("name", ["train_gpt", "train_vlm"])
@pytest.mark.slow
def test_dry_trainer_runs_with_budget_control_moving(dry, name):
    step = _ok(dry[0], name)
    assert step["steps"] == 30 and all(math.isfinite(x) for x in step["losses"])
    assert step["losses"][-1] < step["losses"][0]
    assert step["budget_bias"]["dtypes"] == ["float32"]
    assert any(v != 0 for v in step["budget_bias"]["values"].values())
    assert 0 < step["rows_dispatched"] < step["rows_standard_topk"]


@pytest.mark.slow
def test_dry_megatron_lm_pretrain(dry):
    report = dry[0]
    if report["steps"]["megatron_lm"]["status"] == "skipped":
        pytest.skip(report["steps"]["megatron_lm"]["why"])
    step = _ok(report, "megatron_lm")
    assert step["iterations"] == [1, 2, 3] and all(map(math.isfinite, step["lm_loss"]))
    assert all(0 < r < 4 for r in step["real_experts_per_token"])


@pytest.mark.slow
def test_dry_layer_bench_counts_rows_and_host_syncs(dry):
    step = _ok(dry[0], "layer_bench")
    a, b, c = (step["variants"][v] for v in "abc")
    T = step["tokens"]
    assert a["rows_dispatched_per_step"] == T * 4 and c["rows_dispatched_per_step"] == T * 8
    assert 0 < b["rows_dispatched_per_step"] < c["rows_dispatched_per_step"]
    for v in (a, b, c):
        assert v["ms_fwd_bwd"] > 0
    # megatron-core's own router + dispatcher read the device several times; ours once
    assert b["host_syncs_per_forward"]["total"] <= 1 < a["host_syncs_per_forward"]["total"]


@pytest.mark.slow
def test_dry_gpu_tests_are_collected_and_skip_without_cuda(dry):
    step = dry[0]["steps"]["gpu_tests"]
    assert step["status"] == "skipped" and step["counts"]["skipped"] >= 4
    assert step["transformer_engine"].startswith("skipped")
