"""The prepared GPU check: everything this project has not yet run on a GPU, in one call.

    make gpu-check                   # on the GPU machine: offline install from gpu_bundle/, then the steps
    GPU_CHECK_DRY=1 GPU_PYTHON=PY make gpu-check   # here: the same install over PY, the steps on CPU
    make gpu-check-dry               # the same over a stand-in of the GPU machine's venv, built here

Run by the interpreter whose packages the check uses (the GPU machine's `python3`, a venv's). The
install step puts the bundle ($GPU_BUNDLE, default gpu_bundle/) into a venv over that interpreter
($GPU_CHECK_VENV, default .venv-gpu/), offline, in the dry run as in the real one; every later
step runs in that venv.

Steps (launch/gpu_check/steps.py), each run in its own process with a time limit, each recorded
with its status (ok / failed / skipped), its numbers and, where it failed, the error text; a
failed step never stops the next, and gpu_check.json and gpu_check.md are always written to
$GPU_CHECK_OUT (default runs/gpu_check):
  install         the bundle into .venv-gpu (a venv over the machine's torch), no index; a module
                  missing afterwards fails it
  environment     torch, CUDA, device, megatron-core, Transformer Engine
  demo_data       python -m megatron_nullmoe.train.data.demo, offline
  train_gpt       the trainer on examples/gpt_null_moe.yaml: NCCL world 1, bf16, budget control,
  train_vlm       and on examples/demo_vlm.yaml; finite losses, the budget bias, null statistics
  megatron_lm     Megatron-LM's pretrain() through launch/megatron_lm/pretrain_gpt_nullmoe.py, --bf16
  layer_bench     benchmarks/moe_layer_bench.py: top-k_b 4 vs null k=8, Z=64, time, rows, host syncs
  serve_rows      benchmarks/moe_rows_bench.py: the vLLM plugin's MoE block (real picks only), null
                  k=2 over 64 + 64 at 1 real/token vs top-2 and top-1, decode and prefill sizes
  gpu_tests       pytest -m gpu (tests/test_gpu.py), Transformer Engine tests where TE imports
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bundle  # noqa: E402
import steps  # noqa: E402
from megatron_lm_step import megatron_lm  # noqa: E402

STEPS = {"install": steps.install, "environment": steps.environment, "demo_data": steps.demo_data,
         "train_gpt": steps.train_gpt, "train_vlm": steps.train_vlm, "megatron_lm": megatron_lm,
         "layer_bench": steps.layer_bench, "serve_rows": steps.serve_rows,
         "gpu_tests": steps.gpu_tests}

ROOT = bundle.ROOT
BUDGET_S = 8 * 60  # the whole check, on the GPU machine


def run_step(name, fn, ctx) -> dict:
    t0 = time.perf_counter()
    try:
        record = fn(ctx) or {}
        record.setdefault("status", "ok")
    except steps.Skip as why:
        record = {"status": "skipped", "why": str(why)}
    except Exception as err:  # noqa: BLE001 - recorded, and the next step runs
        record = {"status": "failed", "error": f"{type(err).__name__}: {err}"[-4000:],
                  "traceback": traceback.format_exc()[-3000:]}
    record["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[gpu-check] {name}: {record['status']} ({record['seconds']} s)"
          + (f" - {record.get('error') or record.get('why')}"[:300]
             if record["status"] != "ok" else ""), flush=True)
    return record


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({'DRY run on CPU' if report['dry'] else 'GPU'})", "",
             f"{report['started']}, {report['seconds']} s in all. Per step: status, numbers, and "
             "the error where one failed.", ""]
    if report["dry"]:
        lines += ["DRY: CPU and gloo, smaller sizes; the trainer on fp32 (it refuses bf16 on CPU), "
                  "the layer benchmark in bf16. The install is the real run's: the bundle, offline, "
                  f"over {report['python']}.", ""]
    lines += ["| step | status | seconds | summary |", "| --- | --- | --- | --- |"]
    for name, rec in report["steps"].items():
        summary = rec.get("summary") or rec.get("why") or rec.get("error", "")
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']} | "
                     f"{str(summary).splitlines()[0][:200] if summary else ''} |")
    for name, rec in report["steps"].items():
        lines += ["", f"## {name}", "", "```json",
                  json.dumps({k: v for k, v in rec.items() if k != "traceback"}, indent=1,
                             default=str)[:6000], "```"]
        if rec.get("traceback"):
            lines += ["", "```", rec["traceback"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    dry = os.environ.get("GPU_CHECK_DRY", "") not in ("", "0")
    out = Path(os.environ.get("GPU_CHECK_OUT", ROOT / "runs" / "gpu_check")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    only = [s for s in os.environ.get("GPU_CHECK_ONLY", "").split(",") if s]
    # without the install step (GPU_CHECK_ONLY), the steps use the venv an earlier run made
    venv_python = bundle.VENV / "bin" / "python"
    ctx = steps.Context(dry=dry, out=out, python=str(venv_python) if venv_python.exists() and
                        "install" not in (only or STEPS) else sys.executable)
    report = {"dry": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "out": str(out),
              "python": sys.executable, "bundle": str(bundle.BUNDLE), "steps": {}}
    t0 = time.perf_counter()
    for name, fn in STEPS.items():
        if only and name not in only:
            continue
        left = BUDGET_S - (time.perf_counter() - t0)
        ctx.time_left = left
        if report["steps"].get("install", {}).get("status") == "failed" and name != "environment":
            # the steps need the installed venv; `environment` still says what the machine has
            report["steps"][name] = {"status": "skipped", "seconds": 0.0,
                                     "why": "the install step failed (see its error)"}
            print(f"[gpu-check] {name}: skipped (the install step failed)", flush=True)
            continue
        report["steps"][name] = run_step(name, fn, ctx)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    failed = [n for n, r in report["steps"].items() if r["status"] == "failed"]
    print(f"[gpu-check] {len(report['steps']) - len(failed)} of {len(report['steps'])} steps "
          f"not failed; report: {out / 'gpu_check.md'}" + (f"; failed: {', '.join(failed)}"
                                                            if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
