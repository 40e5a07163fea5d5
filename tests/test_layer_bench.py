"""The layer benchmark times null-MoE at the iso-FLOP point it names (issue 31, defect 12).

Runs benchmarks/moe_layer_bench.py at a tiny size in a subprocess (its own process group) and
reads its JSON. Nothing here asserts a timing: only the rows the timed steps dispatched.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "32", "--ffn", "32", "--tokens", "256", "--warmup", "1", "--rounds", "2",
        "--threads", "1"]


def _bench(tmp_path, *extra) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_layer_bench.py"),
                           "--device", "cpu", "--json", str(out), *TINY, *extra],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    return proc, (json.loads(out.read_text()) if out.exists() else {})


def test_timed_rows_are_at_the_budget_target(tmp_path):
    # k = 4 of E + Z = 16 slots at budget k_b = 2: T * k_b = 512 real rows, not "about" 512;
    # bf16, where router values are coarse (as on the GPU check), is the harder case
    proc, result = _bench(tmp_path, "--dtype", "bf16")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    target = 256 * 2
    assert result["rows_target_per_step"] == target
    b = result["variants"]["b"]
    assert abs(b["rows_dispatched_per_step"] / target - 1) <= 0.01, b
    assert result["rows_on_target"] and abs(result["rows_off_target"]) <= 0.01
    assert result["variants"]["c"]["rows_dispatched_per_step"] == 256 * 4  # Z = 0: all k real
    per_row = b["ms_fwd_bwd"] * 1e3 / b["rows_dispatched_per_step"]
    assert b["us_per_real_row"] == pytest.approx(per_row)
    assert "OFF TARGET" not in proc.stdout


def test_rows_off_target_fail_loudly(tmp_path):
    # the report alone, in-process (no process group): (b) 3% over its target must print
    # OFF TARGET, write a JSON that says so, and exit non-zero
    spec = importlib.util.spec_from_file_location("moe_layer_bench",
                                                  ROOT / "benchmarks" / "moe_layer_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(tokens=256, batch=4, hidden=32, ffn=32, experts=8, topk_base=2,
                              topk=4, nulls=8, rounds=2, dtype="fp32", rows_tolerance=0.01,
                              json=str(tmp_path / "off.json"))
    times = {v: [0.01, 0.01] for v in "abc"}
    counted = {"a": None, "b": [512 * 1.03, 512 * 1.03], "c": [1024.0, 1024.0]}
    syncs = {v: {"total": 0} for v in "abc"}
    with pytest.raises(SystemExit, match="not at the iso-FLOP point"):
        bench.report(args, 1, torch.device("cpu"), times, counted, syncs, 512, 527)
    result = json.loads((tmp_path / "off.json").read_text())
    assert result["rows_on_target"] is False
    assert result["rows_off_target"] == pytest.approx(0.03)
    counted["b"] = [512.0, 512.0]
    assert bench.report(args, 1, torch.device("cpu"), times, counted, syncs, 512, 512)[
        "rows_on_target"]
