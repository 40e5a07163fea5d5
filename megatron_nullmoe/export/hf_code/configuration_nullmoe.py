"""NullMoEConfig: a decoder whose MoE layers route top-k over E real experts plus Z null slots.

Written by megatron_nullmoe.export; self-contained (torch and transformers only), loaded with
`trust_remote_code=True`. Field names follow megatron-core's TransformerConfig where they have one.

A vision-language export (megatron-core's LLaVAModel) is the same config with `vision_config`
set: the CLIP ViT and its projector, as a plain dict (see VISION_DEFAULTS), and
`image_token_index`, the placeholder id in `input_ids` that the image's embeddings replace.
A text-only export has `vision_config=None`.
"""

from transformers import PretrainedConfig


# vision_config keys and their defaults. The ViT is megatron-core's CLIPViTModel: a patch
# convolution without bias, `class_token_len` learned class tokens before the patches, learned
# position embeddings over all positions, ln_pre, pre-norm layers (LayerNorm, GELU MLP, no bias),
# attention "causal" (megatron-core's local ViT spec) or "bidirectional" (its TE spec); then the
# class tokens are dropped or kept, and the projector (an MLP: up, GELU or SwiGLU, down) maps each
# image position to the decoder's hidden size.
VISION_DEFAULTS = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": None, "head_dim": None, "intermediate_size": 4096,
    "image_size": 336, "patch_size": 14, "num_channels": 3, "class_token_len": 1,
    "drop_class_token": True, "norm_eps": 1e-5, "normalization": "LayerNorm",
    "activation": "gelu", "attention": "causal", "projector_hidden_size": None,
    "projector_activation": "gelu",
}


class NullMoEConfig(PretrainedConfig):
    model_type = "nullmoe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=None,
        ffn_hidden_size=1024,
        moe_ffn_hidden_size=512,
        moe_layers=None,
        num_experts=8,
        num_null_experts=0,
        null_logits="shared",
        router_topk=2,
        router_score_function="softmax",
        router_pre_softmax=False,
        gate_normalization="renormalize",
        router_topk_scaling_factor=None,
        normalization="LayerNorm",
        norm_eps=1e-5,
        qk_layernorm=False,
        qk_norm_scope="head",
        position_embedding_type="learned_absolute",
        rotary_base=10000,
        rotary_percent=1.0,
        max_position_embeddings=2048,
        activation="gelu",
        tie_word_embeddings=False,
        use_cache=True,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        vision_config=None,
        image_token_index=-200,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.moe_ffn_hidden_size = moe_ffn_hidden_size
        # 1 for a MoE layer, 0 for a dense one, per layer
        self.moe_layers = list(moe_layers) if moe_layers is not None else [1] * num_hidden_layers
        self.num_experts = num_experts
        self.num_null_experts = num_null_experts
        self.null_logits = null_logits
        self.router_topk = router_topk
        self.router_score_function = router_score_function
        self.router_pre_softmax = router_pre_softmax
        self.gate_normalization = gate_normalization
        self.router_topk_scaling_factor = router_topk_scaling_factor
        self.normalization = normalization
        self.norm_eps = norm_eps
        # a norm of `normalization` kind over each query and key head (head_dim channels, one
        # weight shared by the heads) before rotary: megatron-core's qk_layernorm, Qwen3's q/k norm
        self.qk_layernorm = qk_layernorm
        # what each q/k norm spans: "head" (as above), or "projection": all heads of the q or k
        # projection at once, a [heads x head_dim] weight (OLMoE's q/k norm); configs written
        # before the field have per-head norms
        self.qk_norm_scope = qk_norm_scope
        self.position_embedding_type = position_embedding_type
        self.rotary_base = rotary_base
        self.rotary_percent = rotary_percent
        self.max_position_embeddings = max_position_embeddings
        self.activation = activation
        self.use_cache = use_cache
        self.vision_config = self._vision(vision_config, ffn_hidden_size)
        self.image_token_index = image_token_index
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @staticmethod
    def _vision(vision_config, ffn_hidden_size):
        """vision_config with every key filled in (None stays None: a text-only model)."""
        if vision_config is None:
            return None
        if not isinstance(vision_config, dict):
            vision_config = vision_config.to_dict()  # a config object, e.g. from a caller
        unknown = sorted(set(vision_config) - set(VISION_DEFAULTS) - {"image_seq_length"})
        if unknown:
            raise ValueError(f"vision_config has unknown keys {unknown}; valid: "
                             f"{sorted(VISION_DEFAULTS)}")
        v = {**VISION_DEFAULTS, **vision_config}
        v["num_key_value_heads"] = v["num_key_value_heads"] or v["num_attention_heads"]
        v["head_dim"] = v["head_dim"] or v["hidden_size"] // v["num_attention_heads"]
        v["projector_hidden_size"] = v["projector_hidden_size"] or ffn_hidden_size
        if v["image_size"] % v["patch_size"]:
            raise ValueError(f"vision_config: image_size={v['image_size']} is not a multiple of "
                             f"patch_size={v['patch_size']}")
        patches = (v["image_size"] // v["patch_size"]) ** 2
        v["image_seq_length"] = patches + (0 if v["drop_class_token"] else v["class_token_len"])
        if vision_config.get("image_seq_length", v["image_seq_length"]) != v["image_seq_length"]:
            raise ValueError(f"vision_config: image_seq_length={vision_config['image_seq_length']} "
                             f"does not match its image_size, patch_size and class tokens "
                             f"({v['image_seq_length']})")
        return v

    @property
    def image_seq_length(self):
        """Decoder positions one image takes (0 for a text-only model)."""
        return self.vision_config["image_seq_length"] if self.vision_config else 0

    @property
    def num_null_logits(self):
        """Router rows of the null slots: 1 shared, Z per expert, 0 without nulls."""
        if not self.num_null_experts:
            return 0
        return 1 if self.null_logits == "shared" else self.num_null_experts

    def _check(self):
        choices = {"null_logits": ("shared", "per_expert"),
                   "router_score_function": ("softmax", "sigmoid"),
                   "gate_normalization": ("renormalize", "keep_null_share"),
                   "normalization": ("LayerNorm", "RMSNorm"),
                   "qk_norm_scope": ("head", "projection"),
                   "position_embedding_type": ("learned_absolute", "rope"),
                   "activation": ("gelu", "swiglu")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; expected one of {valid}")
        if len(self.moe_layers) != self.num_hidden_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for "
                             f"{self.num_hidden_layers} layers")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if not 1 <= self.router_topk <= self.num_experts + self.num_null_experts:
            raise ValueError(f"router_topk={self.router_topk} must be in [1, num_experts + "
                             f"num_null_experts = {self.num_experts + self.num_null_experts}]")
        v = self.vision_config
        if v is None:
            return
        vision_choices = {"normalization": ("LayerNorm", "RMSNorm"), "activation": ("gelu",),
                          "attention": ("causal", "bidirectional"),
                          "projector_activation": ("gelu", "swiglu")}
        for name, valid in vision_choices.items():
            if v[name] not in valid:
                raise ValueError(f"vision_config[{name!r}]={v[name]!r} is not valid; expected one "
                                 f"of {valid}")
        if v["num_attention_heads"] % v["num_key_value_heads"]:
            raise ValueError(f"vision_config: num_attention_heads={v['num_attention_heads']} is "
                             f"not a multiple of num_key_value_heads={v['num_key_value_heads']}")
        if self.image_token_index >= 0:
            raise ValueError(f"image_token_index={self.image_token_index}: the image placeholder "
                             "must be negative (it is not a vocabulary entry)")
