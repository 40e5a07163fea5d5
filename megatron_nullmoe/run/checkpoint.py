"""Reading a run's checkpoints: finding them, checking them against their manifest, loading weights.

    <dir>/iter_0000100/            dist_checkpointing (model, optimizer, scheduler, step)
        extra/rank_00000.pt        per rank: data position, RNG states and running totals
        nullmoe.json               manifest: step, model config, sha256 of every file
    <dir>/latest                   name of the newest complete checkpoint

The trainer writes this layout (train/checkpoint.py: atomic saves, resuming, starting from another
run); export, inference and evaluation read it through this module alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from megatron_nullmoe.errors import NullMoEError

MANIFEST = "nullmoe.json"


class CheckpointError(NullMoEError, RuntimeError):
    """A checkpoint that is corrupt, incomplete, or made for a different model."""


def sha256(path: Path) -> str:
    """A file's sha256 (hex): what the manifest records for each file."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(path: Path) -> dict:
    """A checkpoint's manifest (step, identity, file hashes); CheckpointError if it has none."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete or not ours")
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt ({err})") from None


def verify_files(path: Path, manifest: dict) -> Optional[str]:
    """None if every file the manifest lists is there with its recorded sha256, else what is not."""
    for name, digest in manifest["files"].items():
        file = Path(path) / name
        if not file.is_file():
            return f"checkpoint {path} is missing {name}"
        if sha256(file) != digest:
            return f"checkpoint {path} is corrupt: {name} does not match its recorded sha256"
    return None


def dist_load(state: dict, path: Path) -> dict:
    """dist_checkpointing.load, its failures as a CheckpointError with the gist of the cause."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(state, str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch's CheckpointException is a BaseException
        # dist_checkpointing wraps per-rank tracebacks; keep the gist
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} could not be loaded: {first}") from err


def load_model_weights(path: Path, model) -> int:
    """Only the model's weights from checkpoint `path` (verified first), into `model`, whatever
    the parallel layout it was saved with (dist_checkpointing reshards); returns its step."""
    manifest = read_manifest(path)
    problem = verify_files(path, manifest)
    if problem:
        raise CheckpointError(problem)
    model.load_state_dict(dist_load({"model": model.sharded_state_dict()}, path)["model"])
    return int(manifest["step"])


# ------------------------------------------------------------------------ finding one
def newest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint `latest` names in `ckpt_dir`, else its newest complete one; None if none."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        found = ckpt_dir / pointer.read_text().strip()
        if (found / MANIFEST).is_file():
            return found
    done = sorted(c.parent for c in ckpt_dir.glob(f"iter_*/{MANIFEST}")
                  if not c.parent.name.endswith(".tmp"))
    return done[-1] if done else None


def locate(path: str | Path) -> Path:
    """The checkpoint meant by `path`: a checkpoint folder (iter_N), a checkpoints folder (its
    newest), or a run folder (the newest checkpoint of its checkpoint.dir). CheckpointError names
    what was found instead."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{str(p)!r} does not exist or is not a folder; give a run folder, "
                              "its checkpoints folder, or a checkpoint (iter_N)")
    if (p / MANIFEST).is_file():
        return p
    ckpt_dir = p
    if (p / "config.yaml").is_file():
        import yaml

        try:
            named = ((yaml.safe_load((p / "config.yaml").read_text()) or {}).get("checkpoint")
                     or {}).get("dir")
        except yaml.YAMLError as err:
            raise CheckpointError(f"{p / 'config.yaml'} is not valid YAML ({err})") from None
        ckpt_dir = Path(named) if named else p / "checkpoints"
    found = newest_checkpoint(ckpt_dir)
    if found is None:
        raise CheckpointError(f"{p} holds no complete checkpoint (looked in {ckpt_dir}: a "
                              f"checkpoint is an iter_N folder with a {MANIFEST})")
    return found
