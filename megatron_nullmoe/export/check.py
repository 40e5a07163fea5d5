"""The export's own check: its logits against the megatron-core model's, on the same tokens
(and for a VLM, the same images)."""

from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def mcore_logits(model, ids_BL: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] of a megatron-core GPT (eval mode, causal, positions 0..L-1)."""
    B, L = ids_BL.shape
    position_ids = torch.arange(L).expand(B, L)
    return model(ids_BL, position_ids, None).float()


def sample_tokens(vocab_size: int, length: int, batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (batch, length), generator=g)


@torch.no_grad()
def max_logit_difference(model, export_dir: Path, length: int = 32) -> float:
    from megatron_nullmoe.export.source import load_hf

    hf_model, _ = load_hf(export_dir)  # remote code only where the folder has it
    ids = sample_tokens(hf_model.config.vocab_size,
                        min(length, hf_model.config.max_position_embeddings))
    ref = mcore_logits(model, ids)
    got = hf_model(ids, use_cache=False).logits.float()
    return float((got - ref).abs().max())


@torch.no_grad()
def max_logit_difference_vlm(model, export_dir: Path, length: int = 12) -> float:
    """|logits(export folder) - logits(LLaVAModel)|, max over random images and tokens (the
    export command's check for a VLM)."""
    from megatron_nullmoe.export.source import load_hf
    from megatron_nullmoe.export.vlm import mcore_vlm_logits, sample_inputs

    hf_model = load_hf(export_dir)[0]  # the folder's own class
    room = hf_model.config.max_position_embeddings - hf_model.config.image_seq_length + 1
    images, ids = sample_inputs(model, min(length, room))
    ref = mcore_vlm_logits(model, images, ids)
    got = hf_model(input_ids=ids, pixel_values=images, use_cache=False).logits.float()
    return float((got - ref).abs().max())
