"""Random tiny Hugging Face MoE folders for the import tests (test_hf_import_ranks, test_hf_qwen3,
test_hf_olmoe): a transformers model with weights drawn wide and every norm weight away from 1,
so that routing and each norm matter, saved as safetensors beside a sentencepiece tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def save_random(model_class, config, folder: Path, tokenizer: Path, seed: int) -> Path:
    """`model_class(config)` with random weights (norms 1 + 0.3 N(0, 1), the rest N(0, 0.15^2))
    saved to `folder` with `tokenizer` as its tokenizer.model."""
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(str(folder), safe_serialization=True)
    shutil.copyfile(tokenizer, Path(folder) / "tokenizer.model")
    return Path(folder)


def safetensors(folder: Path) -> dict:
    """The folder's tensors by name."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def edited_copy(folder: Path, tmp_path: Path, **edit) -> Path:
    """A copy of `folder` (tmp_path/edited) whose config.json has the keys of `edit` set."""
    import json

    out = Path(tmp_path) / "edited"
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **edit}))
    return out
