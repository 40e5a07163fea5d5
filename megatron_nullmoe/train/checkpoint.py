"""The trainer's checkpoints: saving, resuming, and starting from another run's weights.

Written with megatron-core dist_checkpointing so that a crash never costs one, in the layout that
run/checkpoint.py describes and reads. A checkpoint is written into `iter_N.tmp` and renamed into
place only after every rank has finished and the manifest is written; `latest` is replaced
atomically after that. A run killed
mid-save leaves a `.tmp` folder (removed on the next start) and the previous checkpoint intact.
dist_checkpointing has no checksums (flipped bytes load silently), hence the manifest's hashes,
checked by rank 0 before loading; the verdict is broadcast so that no rank hangs on a bad file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_nullmoe import collectives
from megatron_nullmoe.run.checkpoint import (MANIFEST, CheckpointError, dist_load, read_manifest,
                                             sha256, verify_files)
from megatron_nullmoe.run.config import RunConfig, older_run_defaults


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    collectives.barrier()


def _broadcast_text(text: Optional[str]) -> Optional[str]:
    """Rank 0's verdict to every rank."""
    return collectives.broadcast_object(text, src=0)


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, root: Path, keep_last: int, identity: dict, defaults: Optional[dict] = None):
        """identity: what must match for a checkpoint to load (model and null-expert config);
        defaults: the value of each identity key for a checkpoint saved before that key existed
        (its default then, so old checkpoints still resume; a key absent from both reads None)."""
        self.root, self.keep_last, self.identity = Path(root), keep_last, identity
        self.defaults = _flatten(defaults or {})
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("iter_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)  # a save that never finished
        _barrier()

    # ------------------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, scheduler, data, totals: Optional[dict] = None) -> Path:
        from megatron.core import dist_checkpointing

        final = self.root / f"iter_{step:07d}"
        tmp = self.root / f"iter_{step:07d}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()  # dist_checkpointing needs the (empty) folder on every rank before it starts
        dist_checkpointing.save(_state(model, optimizer, scheduler, step), str(tmp))
        (tmp / "extra").mkdir(exist_ok=True)
        torch.save({"data": data.state(), "rng": _rng_state(), "totals": dict(totals or {})},
                   tmp / "extra" / f"rank_{_rank():05d}.pt")
        _barrier()
        if _rank() == 0:
            files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {"step": step, "identity": self.identity, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            latest_tmp = self.root / "latest.tmp"
            latest_tmp.write_text(final.name + "\n")
            os.replace(latest_tmp, self.root / "latest")
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        found = [p for p in self.root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")
                 and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Optional[Path]:
        pointer = self.root / "latest"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if path.is_dir():
                return path
        done = self.complete()
        return done[-1] if done else None

    # ------------------------------------------------------------------------------ load
    def load(self, path: Path, model, optimizer, scheduler, data) -> tuple[int, dict]:
        """Restores everything saved at `path`; returns (its step, {"totals": running totals}).
        Raises CheckpointError."""
        problem = self._verify(path) if _rank() == 0 else None
        problem = _broadcast_text(problem)
        if problem:
            raise CheckpointError(problem)
        loaded = dist_load(_state(model, optimizer, scheduler, 0, is_loading=True), path)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
        extra_path = path / "extra" / f"rank_{_rank():05d}.pt"
        if not extra_path.is_file():
            raise CheckpointError(f"checkpoint {path} has no {extra_path.name}: it was saved with "
                                  "a different number of ranks")
        extra = torch.load(extra_path, weights_only=False)
        data.restore(extra["data"])
        _set_rng_state(extra["rng"])
        return int(loaded["iteration"]), {"totals": extra.get("totals", {})}

    def _verify(self, path: Path) -> Optional[str]:
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return f"checkpoint {path} has no {MANIFEST}: it is incomplete or not ours"
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            return f"checkpoint {path}: {MANIFEST} is corrupt ({err})"
        # A key the checkpoint lacks (saved before that setting existed) reads as its default.
        diffs = identity_differences(manifest.get("identity") or {}, self.identity, self.defaults)
        if diffs:
            return (f"checkpoint {path} was saved with a different model config; resume needs the "
                    f"same one, or start a fresh run folder. Differences: {'; '.join(diffs)}")
        return verify_files(path, manifest)


# ------------------------------------------------------------------------ starting from another run
def identity_differences(source: dict, target: dict, defaults: Optional[dict] = None,
                         may_differ: tuple[str, ...] = ()) -> list[str]:
    """'key: checkpoint X, this run Y' for each identity key that differs, skipping keys that
    start with one of `may_differ`; a key the source lacks reads as its default."""
    saved = {**_flatten(defaults or {}), **_flatten(source or {})}
    return [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}"
            for k, v in _flatten(target).items()
            if not k.startswith(may_differ) and saved.get(k) != v]


def init_weights_from(path: Path, model, identity: dict, defaults: Optional[dict] = None,
                      may_differ: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """Loads the weights of checkpoint `path` into `model`, a model of the same architecture that
    may add null slots (or change other `may_differ` settings). Tensors the source lacks may only
    be null-slot router state (`upcycle.NULL_STATE`): they keep the values `model` has. An expert bias
    saved for E slots fills the first E of the model's E + Z. Returns (the source's step, the
    state-dict names left as they were). CheckpointError lists every difference otherwise."""
    problem = None
    if _rank() == 0:
        try:
            manifest = read_manifest(path)
            diffs = identity_differences(manifest.get("identity") or {}, identity, defaults,
                                         may_differ)
            problem = (f"checkpoint {path} is of a different model; starting from it needs the "
                       f"same architecture (null slots and router settings may differ). "
                       f"Differences: {'; '.join(diffs)}") if diffs else verify_files(path, manifest)
        except CheckpointError as err:
            problem = str(err)
    problem = _broadcast_text(problem)
    if problem:
        raise CheckpointError(problem)
    from megatron_nullmoe.upcycle import UpcycleError, fit_request, saved_shapes, state_dict_name

    request = model.sharded_state_dict()
    try:
        fit = fit_request(request, saved_shapes(path), where=f"checkpoint {path}")
    except UpcycleError as err:
        raise CheckpointError(str(err)) from None
    loaded = dist_load({"model": request}, path)["model"]
    fit.restore(loaded)
    kept = [state_dict_name(p) for p in fit.absent]
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    extra = sorted(set(missing) - set(kept)) + sorted(unexpected)
    if extra:
        raise CheckpointError(f"checkpoint {path}: state-dict keys did not load: {extra}")
    return int(read_manifest(path).get("step", 0)), kept


def _state(model, optimizer, scheduler, step: int, is_loading: bool = False) -> dict:
    model_sd = model.sharded_state_dict()
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading),
            "opt_param_scheduler": scheduler.state_dict(), "iteration": step}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------ a run's identity
# Identity keys (flattened) that may differ between a run and the checkpoint it starts from
# (checkpoint.init_from): null-expert and router settings, and the parallel layout
# (dist_checkpointing reshards). Everything else is the architecture and must match.
INIT_MAY_DIFFER = ("null.", "model.null_experts.", "model.router_", "model.aux_loss_coeff",
                   "model.z_loss_coeff", "model.token_dispatcher", "world_size", "parallel.")


def run_identity(cfg: RunConfig, vocab_size: int, world_size: int) -> tuple[dict, dict]:
    """(identity, defaults) of a run's checkpoints: what must match for a checkpoint to resume
    (the model, null-expert config, vocabulary and parallel layout), and what a checkpoint that
    does not name a key means (`older_run_defaults`: so that older checkpoints still resume)."""
    identity = {"model": dataclasses.asdict(cfg.model),
                "null": dataclasses.asdict(cfg.model.null_experts),
                "vocab_size": vocab_size, "world_size": world_size,
                "parallel": {k: v for k, v in dataclasses.asdict(cfg.parallel).items()
                             if k != "backend"}}
    older = older_run_defaults()
    return identity, {**older, "null": older["model"]["null_experts"]}
