"""The GPU check's steps (see check.py). Each takes the Context, runs its work in a child process
(a crash or hang there is that step's failure, not the check's), and returns its record: a
one-line `summary` and the numbers behind it. Raise Skip for a step that cannot apply here."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import bundle

ROOT = bundle.ROOT
TARGET = 1.5  # real experts per token asked of budget control; the recipes' balanced rate is 2
RATE = 0.05   # its bias step: 30 steps move the bias by up to 1.5


class Skip(Exception):
    """This step does not apply on this machine; the message says why."""


@dataclass
class Context:
    dry: bool
    out: Path
    python: str
    time_left: float = 480.0
    info: dict = field(default_factory=dict)  # what `environment` found
    data: Path | None = None

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK", "GPU_CHECK"))}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env["PATH"] = os.pathsep.join((str(Path(self.python).parent), env.get("PATH", "")))
        env.setdefault("OMP_NUM_THREADS", "1" if self.dry else "8")
        env.update(extra)
        return env


def run(ctx: Context, name: str, cmd: list[str], timeout: float, cwd: Path = ROOT,
        env: dict | None = None, check: bool = True) -> str:
    """Runs cmd, logs its output to OUT/logs/NAME.log, returns it; raises with its tail if it
    fails (and `check`)."""
    logs = ctx.out / "logs"
    logs.mkdir(exist_ok=True)
    timeout = max(10.0, min(timeout, ctx.time_left))
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env or ctx.env(), capture_output=True, text=True,
                              timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output, code = f"{err.stdout or ''}{err.stderr or ''}\n[timed out after {timeout:.0f} s]", -1
        output = output if isinstance(output, str) else output.decode(errors="replace")
    (logs / f"{name}.log").write_text(" ".join(map(str, cmd)) + "\n\n" + output)
    if code != 0 and check:
        raise RuntimeError(f"{Path(str(cmd[0])).name} exited with {code}; log "
                           f"{logs / (name + '.log')}; tail:\n{_tail(output)}")
    return output


def _tail(text: str, n: int = 25) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and "Warning" not in ln]
    return "\n".join(lines[-n:])


# ----------------------------------------------------------------------------- the steps
def install(ctx: Context) -> dict:
    """The bundle, offline, into a venv over the interpreter running the check (the dry run's
    too); the steps after it run in that venv."""
    venv_python = bundle.VENV / "bin" / "python"
    try:
        record = bundle.install(bundle.BUNDLE, bundle.VENV)
    except SystemExit as err:  # bundle.py's errors are for its command line; here, a failure
        if venv_python.exists():  # made, but incomplete: `environment` says what it holds
            ctx.python = str(venv_python)
        raise RuntimeError(str(err)) from None
    ctx.python = str(venv_python)
    return {"summary": f"{bundle.BUNDLE.name} installed into {bundle.VENV} over {record['parent']}"
                       f" (torch from {Path(record['torch']).parent.parent})", **record}


PROBE = """
import importlib.util as u, json, os, platform, sys, sysconfig, torch
from importlib.metadata import PackageNotFoundError, version
from torch.utils import cpp_extension
def version_or_none(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
try:
    core = u.find_spec("megatron.core.datasets")
except ModuleNotFoundError:  # no megatron package at all
    core = None
out = dict(python=platform.python_version(), executable=sys.executable, torch=torch.__version__,
           torch_file=torch.__file__, cuda=torch.version.cuda,
           cuda_available=torch.cuda.is_available(), cuda_home=cpp_extension.CUDA_HOME,
           megatron_core=version_or_none("megatron-core"),
           transformer_engine=u.find_spec("transformer_engine") is not None,
           mcore_datasets=os.path.dirname(core.origin) if core else None,
           ext_suffix=sysconfig.get_config_var("EXT_SUFFIX"))
if out["cuda_available"]:
    out["device"] = torch.cuda.get_device_name(0)
    out["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
print("GPU_CHECK_INFO", json.dumps(out))
"""


def environment(ctx: Context) -> dict:
    output = run(ctx, "environment", [ctx.python, "-c", PROBE], 120)
    ctx.info = json.loads(output.split("GPU_CHECK_INFO", 1)[1].splitlines()[0])
    if not ctx.dry and not ctx.info["cuda_available"]:
        raise RuntimeError("no CUDA device visible: run with GPU_CHECK_DRY=1 on a CPU machine")
    where = ctx.info.get("device", "CPU")
    record = {"summary": f"{where}, torch {ctx.info['torch']} (CUDA {ctx.info['cuda']}), Python "
                         f"{ctx.info['python']}, megatron-core {ctx.info['megatron_core']}, "
                         f"Transformer Engine {'yes' if ctx.info['transformer_engine'] else 'no'}",
              **ctx.info}
    if ctx.info["megatron_core"] is None or ctx.info["mcore_datasets"] is None:
        record.update(status="failed", error=f"megatron-core is not importable in {ctx.python}: "
                                             "the install step put it there (did it fail?)")
    return record


def demo_data(ctx: Context) -> dict:
    ctx.data = ctx.out / "data"
    samples = 256 if ctx.dry else 1024
    run(ctx, "demo_data", [ctx.python, "-m", "megatron_nullmoe.train.data.demo", "--out",
                           str(ctx.data), "--train-samples", str(samples), "--val-samples", "64",
                           "--samples-per-shard", "128"], 300)
    made = json.loads((ctx.data / "demo.json").read_text())
    return {"summary": f"{made['train_samples']} train / {made['val_samples']} val samples in "
                       f"{ctx.data}", "params": made}


def _train(ctx: Context, name: str, recipe: str, data: list[str]) -> dict:
    if ctx.data is None:
        raise Skip("no demo data (the demo_data step did not run)")
    run_dir = ctx.out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a finished run would be found and not rerun
    steps, precision = 30, "fp32" if ctx.dry else "bf16"
    cmd = [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "megatron_nullmoe.train", "--config", str(ROOT / recipe), f"dir={run_dir}",
           f"steps={steps}", f"precision={precision}", "parallel.expert=1",
           "logging.tensorboard=false", "logging.progress_bar=false", "logging.log_every=5",
           "logging.eval_every=0", "checkpoint.save_every=0",
           f"model.null_experts.target_real_per_token={TARGET}",
           f"model.null_experts.budget_update_rate={RATE}", *data]
    run(ctx, name, cmd, 240)
    train = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [r["train/loss"] for r in train]
    real = [r.get("moe/real_per_token") for r in train]
    bias = budget_bias(run_dir / "checkpoints" / f"iter_{steps:07d}")
    record = {"precision": precision, "steps": summary["steps"], "losses": losses,
              "real_per_token": real, "target_real_per_token": TARGET,
              "budget_bias": bias, "null_rate_vision": summary.get("null_rate_vision"),
              "null_rate_text": summary.get("null_rate_text"),
              "rows_dispatched": summary.get("rows_dispatched"),
              "rows_standard_topk": summary.get("rows_standard_topk"),
              "tokens_per_s": summary.get("tokens_per_s")}
    moved = any(abs(v) > 1e-6 for v in bias["values"].values())
    record["summary"] = (f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; real/token {real[0]:.2f} -> "
                         f"{real[-1]:.2f} (target {TARGET}); budget bias {bias['dtypes']} "
                         f"{_range(bias['values'])}; null rate vision {_num(summary.get('null_rate_vision'))}"
                         f" text {_num(summary.get('null_rate_text'))}")
    if summary["steps"] != steps or not all(math.isfinite(x) for x in losses):
        record.update(status="failed", error=f"losses not finite or steps short: {losses}")
    elif not moved:
        record.update(status="failed", error="budget control did not move: every null_budget_bias is 0")
    return record


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _range(values: dict) -> str:
    return f"[{min(values.values()):+.3f}, {max(values.values()):+.3f}]" if values else "[]"


def budget_bias(checkpoint: Path) -> dict:
    """Each router's null_budget_bias as saved in the run's final checkpoint, and its dtype."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader, load

    reader = FileSystemReader(str(checkpoint))
    meta = reader.read_metadata().state_dict_metadata
    keys = [k for k in meta if k.endswith("null_budget_bias")]
    state = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in keys}
    load(state, storage_reader=reader, no_dist=True)
    return {"values": {k: float(v) for k, v in state.items()},
            "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})}


def train_gpt(ctx: Context) -> dict:
    text = ctx.data / "text" if ctx.data else Path()
    return _train(ctx, "train_gpt", "examples/gpt_null_moe.yaml", [
        f"data.path={text / 'train.jsonl'}", f"data.valid_path={text / 'val.jsonl'}",
        f"data.tokenizer={ctx.data / 'tokenizer.model' if ctx.data else ''}"])


def train_vlm(ctx: Context) -> dict:
    return _train(ctx, "train_vlm", "examples/demo_vlm.yaml", [f"data.path={ctx.data}"])


def layer_bench(ctx: Context) -> dict:
    sizes = (["--hidden", "64", "--ffn", "64", "--tokens", "512", "--warmup", "5", "--rounds", "3"]
             if ctx.dry else ["--hidden", "2048", "--ffn", "1024", "--tokens", "16384",
                              "--warmup", "20", "--rounds", "10"])
    result_path = ctx.out / "layer_bench.json"
    device = "cpu" if ctx.dry else "cuda"
    run(ctx, "layer_bench", [ctx.python, str(ROOT / "benchmarks" / "moe_layer_bench.py"),
                             "--device", device, "--dtype", "bf16", "--experts", "64",
                             "--topk-base", "4", "--topk", "8", "--nulls", "64", "--batch", "4",
                             "--json", str(result_path), *sizes], 300)
    result = json.loads(result_path.read_text())
    parts = []
    for v, r in result["variants"].items():
        syncs = r["host_syncs_per_forward"]
        cuda = f"/{syncs['cuda_sync_warnings']} CUDA" if "cuda_sync_warnings" in syncs else ""
        parts.append(f"({v}) {r['ms_fwd_bwd']:.1f} ms, {r['rows_dispatched_per_step']:.0f} rows, "
                     f"{syncs['total']}{cuda} syncs")
    return {"summary": f"H={result['hidden']} E=64 T={result['tokens']} {device} bf16: "
                       + "; ".join(parts), **result}


def serve_rows(ctx: Context) -> dict:
    """Issue 33's serving step: the vLLM plugin's MoE block (only real picks computed) at
    H=2048, E=64, bf16, null k=2 over 64 + 64 at 1 real per token against top-2 and top-1, forward
    at decode and prefill batch sizes (benchmarks/moe_rows_bench.py, torch only: the GPU machine
    has no vLLM and no network to install it; `make bench-serve` measures vLLM end to end)."""
    sizes = (["--hidden", "64", "--ffn", "64", "--experts", "8", "--nulls", "8",
              "--tokens", "16,256", "--iters", "3", "--rounds", "2"] if ctx.dry else
             ["--hidden", "2048", "--ffn", "1024", "--experts", "64", "--nulls", "64",
              "--tokens", "16,64,256,4096", "--iters", "50", "--rounds", "3"])
    result_path = ctx.out / "serve_rows.json"
    device = "cpu" if ctx.dry else "cuda"
    run(ctx, "serve_rows", [ctx.python, str(ROOT / "benchmarks" / "moe_rows_bench.py"),
                            "--device", device, "--dtype", "bf16", "--target-real", "1.0",
                            "--json", str(result_path), *sizes], 180)
    result = json.loads(result_path.read_text())
    parts = []
    for T, entry in result["batches"].items():
        null, top1 = entry["null"], entry["top1"]
        parts.append(f"T={T}: null {null['rows_per_token']:.2f} rows/token "
                     f"{_median(null['speedup_vs_base']):.2f}x top-2 (top-1 "
                     f"{_median(top1['speedup_vs_base']):.2f}x)")
    return {"summary": f"{result['device']} bf16, experts by {result['experts_by']}: "
                       + "; ".join(parts), **result}


def _median(values: list) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def gpu_tests(ctx: Context) -> dict:
    xml = ctx.out / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    output = run(ctx, "gpu_tests", [ctx.python, "-m", "pytest", "-m", "gpu", str(ROOT / "tests"),
                                    "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"],
                 300, check=False)
    if not xml.is_file():
        raise RuntimeError(f"pytest wrote no report:\n{_tail(output)}")
    cases = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        detail = next((c.get("message", "") for c in case if c.tag != "system-out"), "")
        cases[case.get("name")] = {"outcome": outcome, "detail": detail[:300]}
    counts = {o: sum(c["outcome"] == o for c in cases.values())
              for o in ("passed", "failure", "error", "skipped")}
    te = {n: c for n, c in cases.items() if "_te" in n}
    record = {"summary": ", ".join(f"{n} {o}" for o, n in counts.items() if n), "counts": counts,
              "cases": cases,
              "transformer_engine": ("ran" if ctx.info.get("transformer_engine") else
                                     "skipped: Transformer Engine is not importable here")
              + f" ({len(te)} TE tests)"}
    bad = [n for n, c in cases.items() if c["outcome"] in ("failure", "error")]
    if bad:
        record.update(status="failed", error=f"failed: {', '.join(bad)}\n{_tail(output, 40)}")
    elif counts["passed"] == 0 and counts["skipped"]:
        record.update(status="skipped", why=f"all {counts['skipped']} gpu tests skipped "
                                            f"(no CUDA here)" if ctx.dry else "all skipped")
    return record

