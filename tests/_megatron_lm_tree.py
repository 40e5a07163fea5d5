"""Finds a Megatron-LM source tree whose release matches the installed megatron-core.

Megatron-LM's training code is not on the package registry. A tree comes from `MEGATRON_LM_PATH`
(a user's checkout), else from an unmodified release archive in `../shared/megatron-lm/`
(`megatron-lm-core_v<X.Y.Z>.tar.gz`, one folder inside), unpacked once into `<repo>/.cache/`.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
ARCHIVES = ROOT.parent / "shared" / "megatron-lm"
CACHE = ROOT / ".cache" / "megatron-lm"


def matching_tag(core_version: str, tags: list[str]) -> Optional[str]:
    """The release tag for a megatron-core version among `tags` (e.g. core_v0.19.0): the same
    version if there is one, else the newest patch of the same minor release, else None."""
    major_minor = ".".join(core_version.split(".")[:2])
    same_minor = [t for t in tags if t.removeprefix("core_v").rsplit(".", 1)[0] == major_minor]
    if f"core_v{core_version}" in same_minor:
        return f"core_v{core_version}"
    return max(same_minor, key=_patch) if same_minor else None


def _patch(tag: str) -> int:
    return int(re.match(r"\d*", tag.rsplit(".", 1)[1]).group() or 0)


def archive_tags(folder: Path = ARCHIVES) -> dict[str, Path]:
    found = folder.glob("megatron-lm-core_v*.tar.gz") if folder.is_dir() else []
    return {p.name.removeprefix("megatron-lm-").removesuffix(".tar.gz"): p for p in found}


def unpack(archive: Path, cache: Path = CACHE) -> Path:
    """Unpacks `megatron-lm-<tag>.tar.gz` into cache/megatron-lm-<tag> once; atomic (a temp
    folder renamed into place), so concurrent or interrupted runs never see half a tree."""
    name = archive.name.removesuffix(".tar.gz")
    dest = cache / name
    if (dest / "pretrain_gpt.py").is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-"))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.rename(tmp / name, dest)
        except OSError:  # another process got there first
            if not (dest / "pretrain_gpt.py").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def find_megatron_lm() -> tuple[Optional[Path], str]:
    """(tree, "") or (None, why not and what to set)."""
    core = version("megatron-core")
    env = os.environ.get("MEGATRON_LM_PATH")
    if env:
        tree = Path(env)
        if (tree / "pretrain_gpt.py").is_file() and (tree / "megatron" / "training").is_dir():
            return tree, ""
        return None, f"MEGATRON_LM_PATH={env} is not a Megatron-LM checkout (no pretrain_gpt.py)"
    archives = archive_tags()
    tag = matching_tag(core, list(archives))
    if tag is None:
        return None, (
            f"no Megatron-LM tree for megatron-core {core}: set MEGATRON_LM_PATH to a checkout of "
            f"the matching release (git clone -b core_v{core} https://github.com/NVIDIA/Megatron-LM) "
            f"or put megatron-lm-core_v{core}.tar.gz in {ARCHIVES}")
    return unpack(archives[tag]), ""
