"""The GPU check's Megatron-LM step: `pretrain()` through launch/megatron_lm/pretrain_gpt_nullmoe.py
on one device, as a user runs it (the release tree of the installed megatron-core first on
PYTHONPATH), mock data, null experts with budget control; 10 iterations in bf16 on the GPU, 3 in
fp32 on CPU under DRY (the CPU flags of tests/test_megatron_lm_pretrain.py).

The tree comes from MEGATRON_LM_PATH, else from the release archive carried in gpu_bundle/ (or
../shared/megatron-lm/ here), unpacked once into .cache/. Two things a bare GPU machine lacks, and
how the check supplies them without touching Megatron-LM (both are said in the record):
- Megatron-LM builds its dataset helper with `make` at start. The megatron-core wheel of the same
  release carries that helper compiled for this Python: it is copied into the tree (only when
  the two helpers.cpp are identical), so make finds it up to date; the venv's python3-config
  (bundle.py install) names its suffix.
- `fused_kernels.load` reads `$CUDA_HOME/bin/nvcc -V` for arch flags and, at these tags, builds
  nothing. Where torch's CUDA_HOME has no `bin/nvcc` (no toolkit, or a `/usr/local/cuda` holding
  only runtime libraries), a stand-in nvcc reports the CUDA release torch was built with.
The dry run does the same (the helper from the installed wheel), except the nvcc stand-in: a CPU
torch has no CUDA release to report.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sys
from pathlib import Path

from steps import ROOT, Context, Skip, run

sys.path.insert(0, str(ROOT))
from tests._megatron_lm_tree import ARCHIVES, CACHE, archive_tags, matching_tag, unpack  # noqa: E402

import bundle  # noqa: E402


def _load_logs():
    """megatron_nullmoe/megatron_lm/logs.py, loaded by its path: this driver runs on the machine's
    interpreter, where megatron-core (which the package's __init__ imports) may be missing."""
    path = ROOT / "megatron_nullmoe" / "megatron_lm" / "logs.py"
    spec = importlib.util.spec_from_file_location("megatron_lm_logs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


iterations = _load_logs().iterations

MODEL = [
    "--num-layers", "2", "--num-attention-heads", "4", "--micro-batch-size", "4",
    "--global-batch-size", "8", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
    "--lr-warmup-iters", "0", "--num-experts", "8", "--moe-router-topk", "4",
    "--num-null-experts", "8", "--moe-token-dispatcher-type", "alltoall",
    "--moe-aux-loss-coeff", "0.01", "--null-expert-target-real-per-token", "1.5",
    "--null-expert-budget-update-rate", "0.05",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024",
    "--eval-iters", "0", "--eval-interval", "1000", "--num-workers", "0", "--log-interval", "1",
    "--seed", "1234", "--disable-bias-linear", "--transformer-impl", "local",
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
    "--no-rope-fusion", "--no-persist-layer-norm",
]
GPU = ["--hidden-size", "256", "--seq-length", "256", "--max-position-embeddings", "256",
       "--train-iters", "10", "--bf16"]
CPU = ["--hidden-size", "64", "--seq-length", "64", "--max-position-embeddings", "64",
       "--train-iters", "3", "--distributed-backend", "gloo", "--use-cpu-initialization"]


def find_tree(core_version: str) -> Path:
    env = os.environ.get("MEGATRON_LM_PATH")
    if env:
        return Path(env)
    archives = {**archive_tags(ARCHIVES), **archive_tags(bundle.BUNDLE)}
    tag = matching_tag(core_version, list(archives))
    if tag is None:
        raise Skip(f"no Megatron-LM release archive for megatron-core {core_version} in "
                   f"{bundle.BUNDLE} or {ARCHIVES}, and MEGATRON_LM_PATH is not set")
    return unpack(archives[tag], CACHE)


def seed_dataset_helper(ctx: Context, tree: Path) -> str:
    theirs = Path(ctx.info["mcore_datasets"])
    ours = tree / "megatron" / "core" / "datasets"
    built = ctx.info["ext_suffix"]
    if (ours / f"helpers_cpp{built}").is_file():
        return "already built in the tree"
    if not (theirs / f"helpers_cpp{built}").is_file():
        return "the wheel has no built helper: make will compile it"
    if (theirs / "helpers.cpp").read_bytes() != (ours / "helpers.cpp").read_bytes():
        return "the wheel's helpers.cpp differs from the tree's: make will compile it"
    tmp = ours / f".helpers_cpp{built}.{os.getpid()}"
    shutil.copy(theirs / f"helpers_cpp{built}", tmp)  # mtime: now, so make finds it up to date
    os.replace(tmp, ours / f"helpers_cpp{built}")  # whole, for a run beside this one
    return f"copied helpers_cpp{built} from the megatron-core wheel"


def has_nvcc(cuda_home: str | None) -> bool:
    """Whether `cuda_home` (torch's CUDA_HOME) holds the nvcc Megatron-LM runs: the file, not
    the folder (`/usr/local/cuda` often exists with runtime libraries only)."""
    nvcc = Path(cuda_home or "/nonexistent") / "bin" / "nvcc"
    return nvcc.is_file() and os.access(nvcc, os.X_OK)


def nvcc_stand_in(ctx: Context) -> str | None:
    if has_nvcc(ctx.info.get("cuda_home")):
        return None
    home = ctx.out / "nvcc-stand-in"
    (home / "bin").mkdir(parents=True, exist_ok=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n# stand-in for Megatron-LM's fused_kernels.load (reads the release)\n"
                    f"echo 'Cuda compilation tools, release {ctx.info['cuda']}, V{ctx.info['cuda']}'\n")
    nvcc.chmod(0o755)
    return str(home)


def megatron_lm(ctx: Context) -> dict:
    if not ctx.info.get("megatron_core"):
        raise Skip("the environment step did not run or found no megatron-core")
    tree = find_tree(ctx.info["megatron_core"])
    record = {"tree": str(tree)}
    extra = {"PYTHONPATH": os.pathsep.join((str(tree), str(ROOT)))}
    record["dataset_helper"] = seed_dataset_helper(ctx, tree)
    if not ctx.dry:
        record["nvcc_stand_in"] = nvcc_stand_in(ctx)
        if record["nvcc_stand_in"]:
            extra["CUDA_HOME"] = record["nvcc_stand_in"]
    folder = ctx.out / "megatron_lm"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    flags = [*MODEL, *(CPU if ctx.dry else GPU)]
    cmd = [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(ROOT / "launch" / "megatron_lm" / "pretrain_gpt_nullmoe.py"), *flags]
    log = run(ctx, "megatron_lm", cmd, 360, cwd=folder, env=ctx.env(**extra))
    lines = iterations(log)
    want = int(flags[flags.index("--train-iters") + 1])
    loss = [float(lines[i]["lm loss"]) for i in sorted(lines)]
    real = [float(lines[i].get("real_experts_per_token", "nan")) for i in sorted(lines)]
    null = [float(lines[i].get("null_slot_fraction", "nan")) for i in sorted(lines)]
    record.update(precision="fp32" if ctx.dry else "bf16", iterations=sorted(lines), lm_loss=loss,
                  real_experts_per_token=real, null_slot_fraction=null,
                  summary=f"{len(lines)} of {want} iterations, lm loss {loss[0]:.3f} -> "
                          f"{loss[-1]:.3f}, real/token {real[0]:.2f} -> {real[-1]:.2f}, null "
                          f"fraction {null[-1]:.2f}" if loss else "no iteration lines")
    if sorted(lines) != list(range(1, want + 1)) or not all(map(math.isfinite, loss + real + null)):
        record.update(status="failed", error=f"expected {want} iterations with finite loss and "
                                             f"null metrics; got {lines}")
    return record
