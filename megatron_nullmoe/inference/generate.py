"""`python -m megatron_nullmoe.generate SOURCE --prompt TEXT --max-new-tokens N`: a continuation.

    python -m megatron_nullmoe.generate runs/gpt_null_moe --prompt "def forward(self" --max-new-tokens 32
    python -m megatron_nullmoe.generate exports/gpt_null_moe --prompt "..." --sample --temperature 0.8
    python -m megatron_nullmoe.generate runs/demo_vlm --image picture.png --max-new-tokens 24

SOURCE is a run folder, a checkpoint folder or an export folder. Greedy unless --sample. Only the
continuation (or the caption) is printed on stdout, so that scripts can compare outputs; the
real experts per token it ran go to stderr. A run or checkpoint is decoded by its megatron-core
model (`--backend megatron`, the default there) or by the same weights converted in memory to the
export's model with a KV cache (`--backend hf`); an export folder by transformers. On CPU.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from megatron_nullmoe.errors import NullMoEError
from megatron_nullmoe.export.source import (hf_from_megatron, is_vlm_export, load_hf, load_megatron,
                                            resolve)
from megatron_nullmoe.inference.decode import (GenerationError, Sampling, hf_generate,
                                               mcore_generate, prompt_ids)
from megatron_nullmoe.run.tokenizer import load_tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_nullmoe.generate",
                                description=__doc__.split("\n")[0])
    p.add_argument("source", help="a run folder, a checkpoint folder (iter_NNNNNNN) or an export")
    p.add_argument("--prompt", default="", help="the text to continue (a VLM: the caption's start)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--image", help="an image file to caption (VLM runs)")
    p.add_argument("--resize", action="store_true",
                   help="resize an --image of another size to the model's (else it is refused)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="with --sample: keep the k best (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample: nucleus mass")
    p.add_argument("--seed", type=int, default=0, help="with --sample: the random seed")
    p.add_argument("--backend", choices=("auto", "megatron", "hf"), default="auto",
                   help="auto: megatron-core for runs and checkpoints, transformers for exports")
    p.add_argument("--config", help="the run's config.yaml (default: the run folder's)")
    p.add_argument("--tokenizer", help="the run's sentencepiece .model or tokenizer.json "
                                       "(default: the run folder's)")
    return p


def load_image(path: str, size: int, resize: bool = False):
    """[3, size, size] in [-1, 1], as the trainer feeds images. An image of another size is
    refused unless `resize` (bilinear), so that nothing is captioned other than what was given."""
    if not Path(path).is_file():
        raise GenerationError(f"--image {path!r} does not exist")
    try:
        image = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise GenerationError(f"--image {path!r} is not an image file: {err}") from None
    if image.size != (size, size):
        if not resize:
            raise GenerationError(f"--image {path!r} is {image.size[0]}x{image.size[1]}; the model "
                                  f"takes {size}x{size} (model.vision.image_size): give an image "
                                  "of that size, or --resize to resize it")
        image = image.resize((size, size), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return pixels * 2 - 1


def run(a) -> tuple[str, dict]:
    """(the continuation's text, what it ran: backend, new tokens, real experts per token)."""
    sampling = (Sampling(a.temperature, a.top_k, a.top_p, a.seed) if a.sample else None)
    source = resolve(a.source, a.config, a.tokenizer)
    backend = a.backend
    if backend == "auto":
        backend = "hf" if source.kind == "export" else "megatron"
    if source.kind == "export" and backend == "megatron":
        raise GenerationError(f"--backend megatron needs a run or checkpoint; {a.source} is an export")
    vlm = (source.cfg.model.kind == "vlm" if source.kind == "checkpoint"
           else is_vlm_export(source.path))
    if a.image and not vlm:
        raise GenerationError(f"--image: {a.source} is a text-only model (GPT); captions need a "
                              "VLM run (model.kind: vlm)")
    if vlm and not a.image:
        raise GenerationError(f"{a.source} is a VLM: give --image PATH to caption")
    info: dict = {"backend": backend}
    if source.kind == "export":
        hf_model, _ = load_hf(source.path)
        tokenizer = load_tokenizer(source.path)  # its tokenizer.json, else tokenizer.model
    else:
        tokenizer = load_tokenizer(source.tokenizer)
        model = load_megatron(source)
        if backend == "hf":
            hf_model, _ = hf_from_megatron(model, source.tokenizer)
    ids = prompt_ids(tokenizer, a.prompt, image=vlm)
    if backend == "hf":
        counts = hasattr(hf_model, "routing_totals")  # a --format mixtral export has none
        if counts:
            hf_model.reset_routing_totals()
        pixels = (load_image(a.image, hf_model.config.vision_config["image_size"], a.resize)[None]
                  if vlm else None)
        new = hf_generate(hf_model, ids, a.max_new_tokens, sampling, pixel_values=pixels,
                          eos_id=tokenizer.eos_id)
        if counts:
            info["real_experts_per_token"] = hf_model.routing_totals()["real_experts_per_token"]
    else:
        image = (load_image(a.image, source.cfg.model.vision.image_size, a.resize) if vlm
                 else None)
        new = mcore_generate(model, ids, a.max_new_tokens, source.cfg.model.max_position_embeddings,
                             image=image, image_tokens=source.cfg.image_tokens,
                             sampling=sampling, eos_id=tokenizer.eos_id)
    info["new_tokens"] = len(new)
    return tokenizer.decode(new), info


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        text, info = run(a)
    except NullMoEError as err:
        sys.exit(f"generate error: {err}")
    print(text)
    real = info.get("real_experts_per_token")
    print(f"[{info['backend']}] {info['new_tokens']} new tokens"
          + (f", {real:.3f} real experts per token (MoE layer mean)" if real is not None else ""),
          file=sys.stderr)


if __name__ == "__main__":
    main()
