"""Perplexity on packed windows (GPT) or on image + caption samples (VLM), and the real experts
per token inference ran on them.

GPT. A window is seq_length + 1 tokens (as the trainer's jsonl data cuts them, run/data/text.py):
the model reads its first L tokens at positions 0..L-1 and predicts its last L, so every window
contributes L predictions and there is no padding. The mean negative log-likelihood is over all
predicted positions of all windows (natural log); perplexity is its exponential.

VLM. A sample is what the trainer feeds megatron-core's LLaVAModel (run/data/energon.py,
`to_model_inputs`): the image, input_ids = [placeholder, <s>, caption, </s>, <pad>...] (L + 1),
labels = the text shifted (L + 1) and loss_mask = labels != <pad>. The decoder runs over the
combined sequence of N image positions and L text positions; the text position of input_ids[k]
predicts labels[k], and the image positions predict nothing (<s> is never predicted). The mean
NLL is over the caption tokens the loss mask counts at those positions, summed over all samples
and divided by their count: exp of it is exp of the trainer's validation loss on the same samples.

`evaluate` and `evaluate_vlm` run the exported model (NullMoEForCausalLM or
NullMoEForConditionalGeneration, from an export folder or converted in memory) without a KV cache
and read the real experts per token from the model's own routing totals: the real (non-null)
picks its MoE layers made, per token and MoE layer (a VLM: image positions and text positions
other than padding; the image positions' share comes from a second forward over the image alone,
which a causal decoder routes exactly as in the full forward). `mcore_mean_nll` and
`mcore_vlm_mean_nll` compute the same means through megatron-core's GPTModel / LLaVAModel
per-token loss, for comparison.

Shape legend: N windows (GPT) or image positions (VLM), B windows or samples per batch, L predicted
(GPT) or text (VLM) positions, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_nullmoe.errors import NullMoEError


class EvaluationError(NullMoEError, ValueError):
    """A request that cannot be evaluated (no data, windows too long or too few, ...)."""


def _check(windows_NL: torch.Tensor, batch_size: int) -> None:
    if windows_NL.dim() != 2 or windows_NL.shape[0] < 1 or windows_NL.shape[1] < 2:
        raise EvaluationError(f"windows must be [N >= 1, seq_length + 1 >= 2] token ids; got shape "
                         f"{tuple(windows_NL.shape)}")
    if batch_size < 1:
        raise EvaluationError(f"--batch-size {batch_size}: give 1 or more")


def _summary(nll_sum: float, tokens: int, windows: int) -> dict:
    mean = nll_sum / tokens
    perplexity = math.exp(mean) if mean < 700 else float("inf")
    return {"mean_nll": mean, "perplexity": perplexity, "tokens": tokens, "windows": windows}


@torch.no_grad()
def evaluate(hf_model, windows_NL: torch.Tensor, batch_size: int = 8) -> dict:
    """Mean NLL, perplexity, predicted tokens and windows through a NullMoEForCausalLM, plus
    `real_experts_per_token` (MoE-layer mean over every input token; None without MoE layers),
    `real_picks` and `token_layers`. Resets the model's routing totals first."""
    _check(windows_NL, batch_size)
    hf_model.reset_routing_totals()
    nll_sum, tokens = 0.0, 0
    for start in range(0, windows_NL.shape[0], batch_size):
        batch_BL1 = windows_NL[start:start + batch_size].long()
        inputs_BL, targets_BL = batch_BL1[:, :-1], batch_BL1[:, 1:]
        logits_BLV = hf_model(input_ids=inputs_BL, use_cache=False).logits.float()
        nll = F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]),
                              targets_BL.reshape(-1), reduction="none")
        nll_sum += float(nll.double().sum())
        tokens += targets_BL.numel()
    out = _summary(nll_sum, tokens, windows_NL.shape[0])
    totals = hf_model.routing_totals()
    real = totals["real_experts_per_token"]
    out.update(real_experts_per_token=None if math.isnan(real) else real,
               real_picks=totals["real_picks"], token_layers=totals["token_layers"])
    return out


@torch.no_grad()
def mcore_mean_nll(model, windows_NL: torch.Tensor, batch_size: int = 8) -> dict:
    """The same mean NLL (and perplexity, tokens, windows) through a megatron-core GPTModel in
    eval mode: its forward with labels returns the per-token loss [B, L]."""
    _check(windows_NL, batch_size)
    nll_sum, tokens = 0.0, 0
    for start in range(0, windows_NL.shape[0], batch_size):
        batch_BL1 = windows_NL[start:start + batch_size].long()
        inputs_BL, labels_BL = batch_BL1[:, :-1], batch_BL1[:, 1:].contiguous()
        B, L = inputs_BL.shape
        position_ids = torch.arange(L).expand(B, L)
        loss_BL = model(inputs_BL, position_ids, None, labels=labels_BL)
        nll_sum += float(loss_BL.double().sum())
        tokens += labels_BL.numel()
    return _summary(nll_sum, tokens, windows_NL.shape[0])


# ----------------------------------------------------------------------------- VLM
def _vlm_summary(nll_sum: float, tokens: int, samples: int) -> dict:
    if tokens == 0:
        raise EvaluationError(f"the {samples} samples hold no caption token the loss mask counts")
    out = _summary(nll_sum, tokens, samples)
    del out["windows"]
    out["samples"] = samples
    return out


def _per_token(real: float, tokens: float):
    return real / tokens if tokens else None


@torch.no_grad()
def evaluate_vlm(hf_model, batches) -> dict:
    """Mean NLL, perplexity, caption tokens and samples through a NullMoEForConditionalGeneration
    on trainer batches (dicts with images [B, 3, S, S] in [-1, 1], input_ids [B, L + 1] with the
    image placeholder first, labels [B, L + 1] and loss_mask [B, L + 1]; see the module doc),
    plus the real experts per token over image and non-padding text positions
    (`real_experts_per_token`, `_image_token`, `_text_token`: MoE-layer means, None without MoE
    layers) and their counts (`real_picks`, `token_layers`, `image_real_picks`,
    `image_token_layers`). Resets the model's routing totals."""
    from megatron_nullmoe.run.tokenizer import PAD

    c = hf_model.config
    n_img = int(c.image_seq_length)
    nll_sum, tokens, samples = 0.0, 0, 0
    real = counted = image_real = image_counted = 0.0
    for batch in batches:
        ids_BL1 = batch["input_ids"].long()
        placeholder = ids_BL1 == c.image_token_index
        if (ids_BL1.dim() != 2 or ids_BL1.shape[1] < 2 or not bool(placeholder[:, 0].all())
                or bool(placeholder[:, 1:].any())):
            raise EvaluationError(f"VLM samples need input_ids [B, L + 1 >= 2] with the image "
                                  f"placeholder {c.image_token_index} first and only there; got "
                                  f"shape {tuple(ids_BL1.shape)}")
        B, L = ids_BL1.shape[0], ids_BL1.shape[1] - 1
        images = batch["images"].float()
        labels_BL, mask_BL = batch["labels"][:, 1:].long(), batch["loss_mask"][:, 1:].double()
        hf_model.reset_routing_totals()
        # padding (after the text) masked: the same logits elsewhere, and left out of the routing
        # totals as the trainer leaves it out of its routing statistics
        out = hf_model(input_ids=ids_BL1, pixel_values=images,
                       attention_mask=(ids_BL1 != PAD).long(), use_cache=False)
        full = hf_model.routing_totals()
        # text position of input_ids[k] (k = 1..L) predicts labels[k]
        if out.logits.shape[1] != n_img + L:
            raise EvaluationError(f"the model returned {out.logits.shape[1]} positions for "
                                  f"{n_img} image + {L} text positions")
        logits_BLV = out.logits[:, n_img:].float()
        nll_BL = F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]),
                                 labels_BL.reshape(-1), reduction="none").view(B, L)
        nll_sum += float((nll_BL.double() * mask_BL).sum())
        tokens += int(mask_BL.sum())
        samples += B
        if full["token_layers"]:
            # the image alone: it comes first and the decoder is causal, so its positions are
            # routed as in the forward above; the text's picks are the difference
            hf_model.reset_routing_totals()
            hf_model(input_ids=ids_BL1[:, :1], pixel_values=images, use_cache=False)
            image = hf_model.routing_totals()
            real += full["real_picks"]
            counted += full["token_layers"]
            image_real += image["real_picks"]
            image_counted += image["token_layers"]
    if samples == 0:
        raise EvaluationError("no samples to evaluate")
    out = _vlm_summary(nll_sum, tokens, samples)
    out.update(real_experts_per_token=_per_token(real, counted),
               real_experts_per_image_token=_per_token(image_real, image_counted),
               real_experts_per_text_token=_per_token(real - image_real, counted - image_counted),
               real_picks=real, token_layers=counted, image_real_picks=image_real,
               image_token_layers=image_counted)
    return out


@torch.no_grad()
def mcore_vlm_mean_nll(model, batches) -> dict:
    """The same mean NLL (perplexity, caption tokens, samples) through a megatron-core LLaVAModel
    in eval mode, as the trainer's validation loss: forward(images, input_ids, position_ids, None,
    labels, loss_mask) returns the per-token loss and the loss mask over the combined positions,
    summed and divided by the mask's sum. With null-expert routers, also the real experts per
    token overall and per image / text token from the routers' statistics (vision and padding
    masks as the trainer sets them)."""
    from megatron_nullmoe.model_utils import null_routers, routing_stats, set_vision_mask

    routing_stats(model, reset=True)
    nll_sum, tokens, samples = 0.0, 0, 0
    try:
        for b in batches:
            if "vision_BS" in b:
                set_vision_mask(model, b["vision_BS"], b.get("pad_BS"))
            loss_BC, mask_BC = model(b["images"], b["input_ids"], b["position_ids"], None,
                                     labels=b["labels"], loss_mask=b["loss_mask"])
            nll_sum += float((loss_BC.double() * mask_BC.double()).sum())
            tokens += int(mask_BC.sum())
            samples += b["input_ids"].shape[0]
    finally:
        set_vision_mask(model, None)
    if samples == 0:
        raise EvaluationError("no samples to evaluate")
    out = _vlm_summary(nll_sum, tokens, samples)
    stats = routing_stats(model, reset=True).get("all") if null_routers(model) else None
    if stats is not None:
        by = stats.null_fraction_by_modality()
        k = stats.topk
        out.update(real_experts_per_token=stats.real_per_token,
                   real_experts_per_image_token=None if by["vision"] is None
                   else k * (1 - by["vision"]),
                   real_experts_per_text_token=None if by["text"] is None
                   else k * (1 - by["text"]))
    return out
