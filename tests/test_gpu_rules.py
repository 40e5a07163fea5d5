"""The GPU code path run here under the GPU's rules (`NULLMOE_GPU_RULES=1`,
megatron_nullmoe/_mcore/gpu_rules.py), over both front ends: the trainer (GPT with expert and
pipeline parallelism, the VLM) and Megatron-LM's GPT and VLM entries, each as real processes on 2
ranks. A run fails here where a GPU run would: a parameter or buffer left on the CPU when the
model is wrapped, a CPU tensor handed to a collective NCCL would serve, CPU and GPU tensors mixed
in one operation. First, that the rules themselves catch each of these.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from megatron_nullmoe.megatron_lm.logs import iterations
from tests._megatron_lm_run import CPU_FLAGS, TINY as MLM_TINY, pretrain
from tests._train import ROOT, TINY, losses, tiny_demo, tiny_text

RULES = {"NULLMOE_GPU_RULES": "1"}


def _python(code: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK",
                                                                         "WORLD_"))}
    environ.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=timeout)


def test_the_rules_catch_what_a_gpu_refuses():
    out = _python("""
        import json, torch, torch.distributed as dist
        from megatron_nullmoe import collectives, parallel
        from megatron_nullmoe._mcore import gpu_rules

        parallel.init_distributed(rank=0, world_size=1)
        gpu, host = torch.ones(4, device="cuda"), torch.ones(4)
        seen = {"available": torch.cuda.is_available(), "gpu": str(gpu.device),
                "host": str(host.device), "moved": str(host.cuda().device),
                "back": str(gpu.cpu().device), "computed": str((gpu * 2 + 1).sum().device),
                "control": str(collectives.group_device(None))}

        def check(name, fn):
            try:
                fn()
                seen[name] = None
            except gpu_rules.GpuRuleError as err:
                seen[name] = str(err)

        gloo = dist.new_group([0], backend="gloo")
        check("collective_host", lambda: dist.all_reduce(host))
        check("collective_gpu", lambda: dist.all_reduce(gpu))
        check("gloo_host", lambda: dist.all_reduce(host, group=gloo))
        check("mixed", lambda: gpu + host)
        check("scalar", lambda: gpu + torch.tensor(2.0))
        check("host_index", lambda: gpu[torch.tensor([0, 2])])
        check("placed_host", lambda: gpu_rules.audit_placement(torch.nn.LayerNorm(4), "wrap"))
        check("placed_gpu", lambda: gpu_rules.audit_placement(torch.nn.LayerNorm(4).cuda(), "w"))
        print(json.dumps(seen))
    """, RULES)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["available"] and seen["control"] == "cuda:0"
    assert (seen["gpu"], seen["host"], seen["moved"], seen["back"], seen["computed"]) == \
        ("cuda:0", "cpu", "cuda:0", "cpu", "cuda:0")
    assert "No backend type associated with device type cpu" in seen["collective_host"]
    assert "same device" in seen["mixed"] and "(4,)" in seen["mixed"]
    assert "2 parameter(s)/buffer(s) still on the CPU: weight, bias" in seen["placed_host"]
    assert "model.cuda(" in seen["placed_host"]
    for allowed in ("collective_gpu", "gloo_host", "scalar", "host_index", "placed_gpu"):
        assert seen[allowed] is None, (allowed, seen[allowed])


def test_a_rank_that_skips_a_collective_is_named_at_the_next_one():
    """Rule 4 on 2 real ranks: rank 1 skips an all-reduce the other enters (as a pipeline stage
    without null routers did in Megatron-LM's loop hooks); both ranks stop at the next
    collective with what each entered, instead of pairing the wrong collectives or hanging."""
    from megatron_nullmoe.parallel import free_port

    code = textwrap.dedent("""
        import torch, torch.distributed as dist
        from megatron_nullmoe import parallel
        from megatron_nullmoe._mcore import gpu_rules

        parallel.init_distributed(timeout_s=60)
        x = torch.ones(2, device="cuda")
        dist.all_reduce(x)  # both ranks: fine
        try:
            if dist.get_rank() == 0:
                dist.all_reduce(x)  # rank 1 skips this one
            dist.all_gather_into_tensor(torch.empty(4, device="cuda"), x)
        except gpu_rules.GpuRuleError as err:
            print("RULE", err, flush=True)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port()),
               WORLD_SIZE="2", **RULES)
    ranks = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in ranks]
    for out, err in outs:
        assert "RULE" in out, err[-3000:]
        assert "rank 0: all_reduce(float32); rank 1: all_gather_into_tensor(float32" in out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_rules_data")
    (root / "text").mkdir()
    return {"demo": tiny_demo(root / "demo", train_samples=256),
            "text": tiny_text(root / "text", train_docs=200, val_docs=20, words_per_doc=30)}


def _train(args: list[str], ranks: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **RULES)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", "-m", "megatron_nullmoe.train", *args,
           "faults.collective_timeout_s=120"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _gpt(data, run_dir, *extra):
    text = data["text"]
    return ["--config", str(ROOT / "examples/gpt_null_moe.yaml"), *TINY, "data.seq_length=16",
            f"data.path={text / 'train.jsonl'}", f"data.valid_path={text / 'val.jsonl'}",
            f"data.tokenizer={text / 'tok.model'}", "model.max_position_embeddings=32",
            "steps=3", "logging.eval_every=2", f"dir={run_dir}", *extra]


RUNS = {
    # the recipe's own layout: experts split over 2 ranks (the all-to-all crosses ranks)
    "gpt_expert_parallel": lambda d, r: _gpt(d, r, "parallel.expert=2"),
    # a pipeline of 2 stages (activations cross stages; losses reach every stage)
    "gpt_pipeline": lambda d, r: _gpt(d, r, "parallel.pipeline=2", "model.num_layers=4"),
    "vlm_expert_parallel": lambda d, r: [
        "--config", str(ROOT / "examples/demo_vlm.yaml"), *TINY, f"data.path={d['demo']}",
        "parallel.expert=2", "steps=3", "logging.eval_every=2", f"dir={r}"],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_the_trainer_follows_the_gpu_rules(data, tmp_path, name):
    """The trainer as it runs on a GPU: built without CPU initialisation, bf16 (`precision:
    auto`), moved to the device before Float16Module and DDP wrap it, every collective on
    device tensors; it trains, evaluates and saves."""
    run_dir = tmp_path / "run"
    out = _train(RUNS[name](data, run_dir))
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "torch.bfloat16 on cuda" in log
    assert "GpuRuleError" not in log
    steps = losses(run_dir)
    assert sorted(steps) == [1, 2, 3] and all(math.isfinite(v) for v in steps.values())
    assert (run_dir / "checkpoints" / "iter_0000003").is_dir()


def _megatron_lm_gpu_flags(**values: str) -> list[str]:
    """The tests' tiny Megatron-LM flags as a GPU user gives them: no CPU initialisation, the
    default (NCCL) backend, bf16; `values` replace flags' values (num_layers="4")."""
    flags = [f for f in MLM_TINY if f != "--use-cpu-initialization"]
    at = flags.index("--distributed-backend")
    del flags[at:at + 2]
    for name, value in values.items():
        flags[flags.index("--" + name.replace("_", "-")) + 1] = value
    return [*flags, "--bf16", "--train-iters", "2", "--disable-bias-linear"]


VLM = ["--img-h", "32", "--img-w", "32", "--patch-dim", "16", "--dataloader-seq-length", "64"]
ENTRIES = {
    "gpt": ("pretrain_gpt_nullmoe.py", _megatron_lm_gpu_flags()),
    "vlm": ("pretrain_vlm_nullmoe.py", [*_megatron_lm_gpu_flags(), *VLM]),
    # 2 pipeline stages, the first dense (no null routers): every rank still enters the hooks'
    # collectives (issue 31, defect 2)
    "gpt_dense_first_stage": ("pretrain_gpt_nullmoe.py", [
        *_megatron_lm_gpu_flags(num_layers="4", expert_model_parallel_size="1"),
        "--pipeline-model-parallel-size", "2", "--moe-layer-freq", "[0,0,1,1]",
        "--distributed-timeout-minutes", "2"]),
}


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_megatron_lm_entries_follow_the_gpu_rules(tree, tmp_path, monkeypatch, name):
    """Megatron-LM's own pretrain() through our entries on its GPU path: its get_model moves the
    model before wrapping, our hooks' collectives run on device tensors."""
    assert "--use-cpu-initialization" in CPU_FLAGS  # what the GPU flags leave out
    monkeypatch.setenv("NULLMOE_GPU_RULES", "1")
    script, flags = ENTRIES[name]
    log = pretrain(tree, script, tmp_path, *flags)
    assert "GpuRuleError" not in log, log[-6000:]
    found = iterations(log)
    assert sorted(found) == [1, 2], log[-6000:]
    assert all(math.isfinite(float(found[i]["lm loss"])) for i in found)
    assert "null_slot_fraction" in found[2]


def test_the_vlm_builds_without_transformer_engine_on_any_device():
    """Without TE, megatron-core's CLIP builds its norms as torch.nn.LayerNorm(config=...), a
    TypeError on a GPU too: the substitution applies at import, not with the CPU layer only."""
    out = _python("""
        import torch
        import megatron_nullmoe
        from megatron.core.models.vision.clip_vit_model import CLIPViTModel
        from megatron_nullmoe._mcore import cpu
        assert not cpu._STATE["enabled"]
        print(torch.nn.LayerNorm in CLIPViTModel.__init__.__defaults__)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_two_single_process_runs_on_one_machine_take_different_ports():
    """No launcher, no MASTER_PORT: each single process takes a free port (a fixed 29500 made
    the second run die with EADDRINUSE)."""
    hold = """
        import os, sys, time
        from megatron_nullmoe import parallel
        parallel.init_distributed(rank=0, world_size=1)
        print(os.environ["MASTER_PORT"], flush=True)
        time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_"))}
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(hold), "30"], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = first.stdout.readline().strip()
        assert port.isdigit(), first.stderr.read()[-2000:]
        second = _python(hold)
        assert second.returncode == 0, second.stderr[-2000:]
        assert second.stdout.strip() != port
    finally:
        first.kill()
        first.wait()
