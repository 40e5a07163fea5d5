"""NullMoEForConditionalGeneration: megatron-core's LLaVAModel on the NullMoE decoder, for
Hugging Face transformers.

Written by megatron_nullmoe.export; loaded with `trust_remote_code=True` from the export folder,
where it finds the decoder (modeling_nullmoe.py) beside it. A CLIP ViT (`vision_tower`) and an
MLP projector (`multi_modal_projector`) turn `pixel_values` into image embeddings that replace
the one image placeholder (`config.image_token_index`) in `input_ids`; the decoder classes are
modeling_nullmoe's, so null picks are skipped in the same way.

Shape legend: B batch, L query positions, H hidden, N image positions, C combined positions.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .modeling_nullmoe import (
    _CACHE_FIELD,
    MLP,
    Attention,
    NullMoECausalLMOutput,
    NullMoEForCausalLM,
    NullMoEModel,
    NullMoEPreTrainedModel,
    _norm,
)


class _Fields:
    """Attribute view of the vision config, for the decoder's building blocks (_norm, Attention,
    MLP), which read `config.<field>`."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _vision_fields(v):
    return _Fields(hidden_size=v["hidden_size"], num_attention_heads=v["num_attention_heads"],
                   num_key_value_heads=v["num_key_value_heads"], head_dim=v["head_dim"],
                   normalization=v["normalization"], norm_eps=v["norm_eps"],
                   activation=v["activation"])


class VisionLayer(nn.Module):
    """Pre-norm ViT layer: x + attn(norm(x)), then x + mlp(norm(x)) (megatron-core's
    TransformerLayer with the ViT spec)."""

    def __init__(self, fields, intermediate_size, layer_idx):
        super().__init__()
        self.input_layernorm = _norm(fields)
        self.self_attn = Attention(fields, layer_idx)
        self.post_attention_layernorm = _norm(fields)
        self.mlp = MLP(fields, intermediate_size)

    def forward(self, x, mask):
        x = x + self.self_attn(self.input_layernorm(x), mask, None, None)
        return x + self.mlp(self.post_attention_layernorm(x))


class NullMoEVisionTower(nn.Module):
    """megatron-core's CLIPViTModel: patches (a convolution without bias), class tokens first,
    learned position embeddings, ln_pre, the layers; then the class tokens dropped or kept."""

    def __init__(self, v):
        super().__init__()
        fields = _vision_fields(v)
        H, p = v["hidden_size"], v["patch_size"]
        self.image_size, self.num_channels = v["image_size"], v["num_channels"]
        self.class_token_len, self.drop_class_token = v["class_token_len"], v["drop_class_token"]
        self.causal = v["attention"] == "causal"
        self.patch_embedding = nn.Conv2d(v["num_channels"], H, kernel_size=p, stride=p, bias=False)
        self.class_embedding = (nn.Parameter(torch.zeros(1, self.class_token_len, H))
                                if self.class_token_len else None)
        self.position_embedding = nn.Embedding((v["image_size"] // p) ** 2 + self.class_token_len, H)
        self.pre_layernorm = _norm(fields)
        self.layers = nn.ModuleList([VisionLayer(fields, v["intermediate_size"], i)
                                     for i in range(v["num_hidden_layers"])])

    def forward(self, pixel_values_BCHW):
        """[B, 3, image_size, image_size] in [-1, 1] -> [B, N, vision hidden]."""
        expected = (self.num_channels, self.image_size, self.image_size)
        if pixel_values_BCHW.dim() != 4 or tuple(pixel_values_BCHW.shape[1:]) != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values_BCHW.shape)}; this model "
                             f"takes [batch, {', '.join(map(str, expected))}] (pixels in [-1, 1], "
                             "as NullMoEProcessor makes them)")
        x = self.patch_embedding(pixel_values_BCHW.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, patches, H]
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pre_layernorm(x + self.position_embedding.weight.unsqueeze(0))
        L = x.shape[1]
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device)
        if self.causal:  # megatron-core's local ViT spec: a causal mask over the patches
            mask = torch.tril(mask)
        for layer in self.layers:
            x = layer(x, mask[None, None])
        return x[:, self.class_token_len:] if self.drop_class_token else x


class NullMoEProjector(nn.Module):
    """megatron-core's MultimodalProjector ("mlp"): down(act(up(x))), or SwiGLU."""

    def __init__(self, v, out_size):
        super().__init__()
        ffn = v["projector_hidden_size"]
        self.gated = v["projector_activation"] == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(v["hidden_size"], ffn, bias=False)
        self.up_proj = nn.Linear(v["hidden_size"], ffn, bias=False)
        self.down_proj = nn.Linear(ffn, out_size, bias=False)

    def forward(self, x):
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


def _combined_index(at_B, n, length):
    """For each combined position c < `length`: the text position it comes from (the placeholder
    at at_B stands for n positions) and whether it is an image position."""
    c = torch.arange(length, device=at_B.device).unsqueeze(0)
    at = at_B.unsqueeze(1)
    is_image = (c >= at) & (c < at + n)
    src = torch.where(c < at, c, torch.where(is_image, at, c - (n - 1)))
    return src, is_image, (c - at).clamp(0, n - 1)


def _text_index(at_B, n, length):
    """For each text position t < `length`: its combined position (the placeholder: the first
    image position)."""
    t = torch.arange(length, device=at_B.device).unsqueeze(0)
    at = at_B.unsqueeze(1)
    return torch.where(t <= at, t, t + (n - 1))


class NullMoEForConditionalGeneration(NullMoEForCausalLM):
    """Image + text -> next-token logits, as megatron-core's LLaVAModel computes them.

    `input_ids` hold the image placeholder (`config.image_token_index`, -200) once per row where
    `pixel_values` have an image (the trainer's layout: [placeholder, <s>, text...]); the
    placeholder is replaced by the image's N = config.image_seq_length embeddings, so the
    decoder (and `logits`) run over the combined sequence of len(input_ids) - 1 + N positions.
    As in megatron-core, learned position embeddings are added to the text positions only, at
    their text index (`position_ids`, the image counted as one position), while rotary
    positions count every combined position. `attention_mask` may cover the text (as
    `generate` keeps it) or the combined positions. With a cache the image is read once, at
    the first step (generate passes pixel_values at the first step only).
    `labels` follow input_ids (shifted inside, -100 ignored); image positions predict nothing.
    Without pixel_values (and no placeholder) it is the decoder alone on text.
    """

    _no_split_modules = ["DecoderLayer", "VisionLayer"]

    def __init__(self, config):
        NullMoEPreTrainedModel.__init__(self, config)
        if config.vision_config is None:
            raise ValueError("this config has no vision_config: it is a text-only export; load it "
                             "with AutoModelForCausalLM (NullMoEForCausalLM)")
        self.vision_tower = NullMoEVisionTower(config.vision_config)
        self.multi_modal_projector = NullMoEProjector(config.vision_config, config.hidden_size)
        self.model = NullMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        """The vision tower's own parameters; the rest as the decoder initialises them."""
        if isinstance(module, nn.Conv2d):
            module.weight.data.normal_(0.0, 0.02)
        elif isinstance(module, NullMoEVisionTower) and module.class_embedding is not None:
            module.class_embedding.data.normal_(0.0, 0.02)
        else:
            super()._init_weights(module)

    def get_image_features(self, pixel_values):
        """[B, 3, S, S] in [-1, 1] -> image embeddings [B, N, H] (the decoder's hidden size)."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            inputs.pop("pixel_values", None)  # the image is in the cache already
        return inputs

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, cache=None, return_dict=None, **kwargs):
        if inputs_embeds is not None:
            raise ValueError("NullMoEForConditionalGeneration takes input_ids (with the image "
                             "placeholder) and pixel_values, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids are required")
        cache, use_cache = self._cache(cache, past_key_values, use_cache)
        B, L = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        placeholder = input_ids == self.config.image_token_index
        per_row = placeholder.sum(-1)
        if pixel_values is not None:
            if past:
                raise ValueError("pixel_values with a non-empty cache: the image goes in the first "
                                 "forward only (its embeddings are in the cache after it)")
            if not bool((per_row == 1).all()):
                raise ValueError(f"with pixel_values every row of input_ids needs the image "
                                 f"placeholder {self.config.image_token_index} exactly once; got "
                                 f"{per_row.tolist()} per row (NullMoEProcessor puts it first)")
            if pixel_values.shape[0] != B:
                raise ValueError(f"{pixel_values.shape[0]} images for {B} rows of input_ids: give "
                                 "one image per row")
            image = (placeholder.long().argmax(-1), self.config.image_seq_length)
        elif bool(per_row.any()):
            raise ValueError(f"input_ids hold the image placeholder "
                             f"{self.config.image_token_index} but no pixel_values were given")
        else:
            image = getattr(cache, "nullmoe_image", None) if past else None
        extra = image[1] - 1 if image is not None else 0
        C = L + extra if pixel_values is not None else L  # positions this forward adds
        if past + C > self.config.max_position_embeddings:
            raise ValueError(f"{past + C} decoder positions (image and text) pass the model's "
                             f"max_position_embeddings={self.config.max_position_embeddings}")

        # the attention mask over text positions and over combined positions
        text_len = past - extra + L if pixel_values is None else L
        if attention_mask is None:
            text_mask = torch.ones(B, text_len, dtype=torch.bool, device=input_ids.device)
            comb_mask = None
        elif attention_mask.shape[1] == text_len:
            text_mask = attention_mask.bool()
            comb_mask = text_mask
            if image is not None:
                src, _, _ = _combined_index(image[0], image[1], past + C)
                comb_mask = torch.gather(text_mask, 1, src)
        elif extra and attention_mask.shape[1] == past + C:  # combined already
            comb_mask = attention_mask.bool()
            text_mask = torch.gather(comb_mask, 1, _text_index(image[0], image[1], text_len))
        else:
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} positions; expected "
                             f"{text_len} (the text, the placeholder counted once)"
                             + (f" or {past + C} (with the image's positions)" if extra else ""))
        if position_ids is None:  # learned positions: the text index, as megatron-core's LLaVA
            position_ids = (text_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -L:]

        x = self.model.embed_tokens(input_ids.masked_fill(placeholder, 0))
        if self.model.embed_positions is not None:
            x = x + self.model.embed_positions(position_ids)
        if pixel_values is not None:
            images = self.get_image_features(pixel_values).to(x.dtype)  # [B, N, H]
            src, is_image, img = _combined_index(image[0], image[1], C)
            H = x.shape[-1]
            x = torch.where(is_image.unsqueeze(-1),
                            torch.gather(images, 1, img.unsqueeze(-1).expand(-1, -1, H)),
                            torch.gather(x, 1, src.unsqueeze(-1).expand(-1, -1, H)))
            if cache is not None:
                cache.nullmoe_image = image  # where later steps' text masks get the image
        hidden, cache, per_token = self.model(None, comb_mask, None, cache, x, use_cache,
                                              add_position_embeddings=False)
        logits = self._logits(hidden, logits_to_keep)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels, image if pixel_values is not None else None, C)
        return NullMoECausalLMOutput(loss=loss, logits=logits, real_experts_per_token=per_token,
                                     **{_CACHE_FIELD: cache})

    @staticmethod
    def _loss(logits, labels, image, C):
        if logits.shape[1] != C:
            raise ValueError("labels need the logits of every position (logits_to_keep=0)")
        if image is not None:
            src, is_image, _ = _combined_index(image[0], image[1], C)
            labels = torch.gather(labels, 1, src).masked_fill(is_image, -100)
            # image positions predict nothing (megatron-core's loss mask)
            targets = labels[:, 1:].masked_fill(is_image[:, :-1], -100)
        else:
            targets = labels[:, 1:]
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               targets.reshape(-1), ignore_index=-100)
