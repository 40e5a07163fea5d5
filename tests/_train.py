"""Helpers for tests that run the trainer as real processes (python -m / torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.moe_ffn_hidden_size=64", "model.vision.num_layers=1", "model.vision.hidden_size=32",
    "model.vision.ffn_hidden_size=64", "model.vision.image_size=32", "model.vision.patch_size=8",
    "data.micro_batch_size=8", "data.global_batch_size=16", "data.seq_length=12",
    "optim.warmup_steps=3", "logging.progress_bar=false", "logging.tensorboard=false",
    "logging.log_every=1", "logging.eval_every=0", "parallel.expert=1",
]


def tiny_demo(path: Path, train_samples: int = 512) -> Path:
    """The demo dataset at test size (32 px images, 128-sample shards)."""
    from megatron_nullmoe.train.data.demo import prepare_demo_data

    return prepare_demo_data(path, seed=0, train_samples=train_samples, val_samples=32,
                             image_size=32, samples_per_shard=128)


def run(args: list[str], ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if ranks == 1:
        cmd = [sys.executable, "-m", "megatron_nullmoe.train", *args]
        # the process takes a free port of its own; this one's (conftest) is taken by its store
        env.pop("MASTER_PORT", None)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", "-m", "megatron_nullmoe.train", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"training failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                             f"{out.stderr[-5000:]}")
    return out


def vlm_args(demo: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "examples/demo_vlm.yaml"), *TINY, f"data.path={demo}",
            f"dir={run_dir}", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


WORDS = ("the cat sat on a mat while dogs run far away from home and birds sing in trees over "
         "the river").split()


def tiny_text(root: Path, train_docs: int, val_docs: int, words_per_doc: int) -> Path:
    """root/train.jsonl, root/val.jsonl of random sentences over a small vocabulary, and a
    sentencepiece tokenizer root/tok.model trained on them; returns root."""
    import torch

    from megatron_nullmoe.run.tokenizer import train_tokenizer

    g = torch.Generator().manual_seed(0)
    for name, n in (("train", train_docs), ("val", val_docs)):
        with (root / f"{name}.jsonl").open("w") as f:
            for _ in range(n):
                idx = torch.randint(len(WORDS), (words_per_doc,), generator=g).tolist()
                f.write(json.dumps({"text": " ".join(WORDS[i] for i in idx)}) + "\n")
    texts = [json.loads(l)["text"] for l in (root / "train.jsonl").read_text().splitlines()]
    train_tokenizer(texts, root / "tok.model", vocab_size=80)
    return root
