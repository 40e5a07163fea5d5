"""Continuations and captions, from a megatron-core model or a NullMoEForCausalLM.

`mcore_generate` is a plain loop over the megatron-core model (GPTModel or LLaVAModel): each step
runs the whole sequence again (megatron.core.inference needs CUDA; these models are small).
`hf_generate` calls transformers' `generate` with its KV cache. Greedy decoding from the two is
the same token for token on the same weights (tests/test_export.py); sampling draws from
`Sampling.seed`, so each backend repeats itself but the two do not match each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_nullmoe.errors import NullMoEError
from megatron_nullmoe.run.tokenizer import EOS, IMAGE_TOKEN


class GenerationError(NullMoEError, ValueError):
    """A request the model cannot serve (too long, an image for a text model, ...)."""


@dataclass(frozen=True)
class Sampling:
    """None of these: greedy. temperature > 0; top_k 0 = all; top_p 1.0 = all."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature > 0:
            raise GenerationError(f"--temperature {self.temperature}: give a number > 0")
        if self.top_k < 0:
            raise GenerationError(f"--top-k {self.top_k}: give 0 (all tokens) or more")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"--top-p {self.top_p}: give a number in (0, 1]")


def prompt_ids(tokenizer, prompt: str, image: bool = False) -> list[int]:
    """What the trainer's data puts before a text: the tokenizer's bos if it has one (after the
    image placeholder for a VLM)."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return ([IMAGE_TOKEN] if image else []) + bos + tokenizer.encode(prompt)


def _pick(logits_V: torch.Tensor, sampling: Optional[Sampling], g: Optional[torch.Generator]) -> int:
    if sampling is None:
        return int(torch.argmax(logits_V))
    logits = logits_V.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) >= sampling.top_p  # keep the first
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))


@torch.no_grad()
def mcore_generate(model, ids: list[int], max_new_tokens: int, max_positions: int,
                   image: Optional[torch.Tensor] = None, image_tokens: int = 0,
                   sampling: Optional[Sampling] = None, stop_at_eos: bool = True,
                   eos_id: int = EOS) -> list[int]:
    """New token ids after `ids` (stopping after `eos_id`, the tokenizer's, which is not
    returned). `image` [3, H, W] in [-1, 1] for a LLaVAModel, whose first id is the image
    placeholder."""
    _check_length(len(ids) - (1 if image is not None else 0) + image_tokens, max_new_tokens,
                  max_positions)
    g = torch.Generator().manual_seed(sampling.seed) if sampling else None
    seq, new = list(ids), []
    for _ in range(max_new_tokens):
        tokens = torch.tensor([seq])
        positions = torch.arange(len(seq)).unsqueeze(0)
        if image is None:
            logits = model(tokens, positions, None)
        else:
            logits = model(image.unsqueeze(0), tokens, positions, None)
            logits = logits[0] if isinstance(logits, tuple) else logits
        token = _pick(logits[0, -1], sampling, g)
        if stop_at_eos and token == eos_id:
            break
        seq.append(token)
        new.append(token)
    return new


@torch.no_grad()
def hf_generate(hf_model, ids: list[int], max_new_tokens: int,
                sampling: Optional[Sampling] = None, stop_at_eos: bool = True,
                pixel_values: Optional[torch.Tensor] = None, eos_id: int = EOS) -> list[int]:
    """New token ids after `ids` through transformers' generate (KV cache); `pixel_values`
    [1, 3, H, W] in [-1, 1] for a VLM export, whose `ids` begin with the image placeholder."""
    image_positions = hf_model.config.image_seq_length - 1 if pixel_values is not None else 0
    _check_length(len(ids) + image_positions, max_new_tokens,
                  hf_model.config.max_position_embeddings)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling is not None,
                  eos_token_id=eos_id if stop_at_eos else None, pad_token_id=eos_id)
    if sampling is not None:
        torch.manual_seed(sampling.seed)
        kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k or None,
                      top_p=sampling.top_p)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values
    out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                           dtype=torch.long),
                            **kwargs)
    new = out[0, len(ids):].tolist()
    if stop_at_eos and eos_id in new:
        new = new[: new.index(eos_id)]
    return new


def _check_length(prompt: int, max_new_tokens: int, max_positions: int) -> None:
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens {max_new_tokens}: give 1 or more")
    if prompt + max_new_tokens > max_positions:
        raise GenerationError(
            f"the prompt ({prompt} positions) plus --max-new-tokens {max_new_tokens} pass the "
            f"model's {max_positions} positions (max_position_embeddings): shorten one of them "
            f"(at most {max(max_positions - prompt, 0)} new tokens for this prompt)")
