"""Megatron-LM's pretrain_vlm.py (LLaVA) with null experts, and with its two MoE bugs fixed.

    export PYTHONPATH=/path/to/Megatron-LM:$PYTHONPATH   # tag core_v0.16.1 ... core_v0.19.0
    torchrun ... launch/megatron_lm/pretrain_vlm_nullmoe.py <pretrain_vlm.py flags> \
        --num-experts 8 --moe-router-topk 4 --num-null-experts 8 --moe-token-dispatcher-type alltoall

With --num-experts, pretrain_vlm.py builds the projector from the language layer's MoE submodules
(it fails) and its TE llava layer spec has no pre-MLP layernorm for MoE layers. This script's model
provider builds both from megatron_nullmoe.megatron_lm.llava_builder instead and reuses everything
else of pretrain_vlm.py (flags, data, forward step, embedding ranks).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_if_no_cuda, require_megatron_lm, run_pretrain  # noqa: E402


def model_provider(pre_process=True, post_process=True, add_encoder=True, add_decoder=True,
                   parallel_output=True, config=None, pg_collection=None):
    """pretrain_vlm.py's sequence-length bookkeeping, then our LLaVA builder."""
    from megatron.core import parallel_state
    from megatron.core.models.multimodal import context_parallel
    from megatron.core.models.vision.clip_vit_model import get_num_image_embeddings
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_nullmoe.megatron_lm import llava_builder

    args = get_args()
    image_tokens = get_num_image_embeddings(
        args.img_h, args.img_w, args.patch_dim, "clip", args.disable_vision_class_token,
        class_token_len=1, pixel_shuffle=False, use_tile_tags=False)
    if args.dataloader_seq_length is None:
        args.dataloader_seq_length = args.seq_length
    decoder_seq = args.dataloader_seq_length + image_tokens
    args.seq_length = args.encoder_seq_length = image_tokens  # the ViT's sequence
    padding = context_parallel.get_padding(
        decoder_seq, args.context_parallel_size, args.tensor_model_parallel_size,
        args.sequence_parallel, args.decoder_tp_comm_overlap, args.decoder_seq_length)
    if padding:
        raise SystemExit("pretrain_vlm_nullmoe.py: this layout needs padded sequences "
                         f"({padding} tokens); pick sizes that need none (CP=1, or SP with "
                         "decoder length divisible by TP)")
    args.decoder_seq_length = decoder_seq
    args.max_position_embeddings = max(args.max_position_embeddings, decoder_seq)
    language = config if config is not None else core_transformer_config_from_args(args)
    language.num_layers = args.decoder_num_layers or args.num_layers
    first = parallel_state.is_pipeline_first_stage()
    model = llava_builder(args, language, pre_process=first,
                          post_process=parallel_state.is_pipeline_last_stage(),
                          add_encoder=first, add_decoder=True, parallel_output=parallel_output,
                          pg_collection=pg_collection)
    model.freeze(freeze_language_model=args.freeze_LM, freeze_vision_model=args.freeze_ViT,
                 freeze_vision_projection=False)
    return model


def main() -> None:
    pretrain_vlm = require_megatron_lm("pretrain_vlm")
    cpu_if_no_cuda()
    from megatron.training import checkpointing as megatron_checkpointing
    from megatron.training import training as megatron_training

    from megatron_nullmoe.megatron_lm import entry_args_provider, install

    # step hooks, loading checkpoints without null slots, the resume check
    hooks = install(megatron_training, megatron_checkpointing)
    pretrain_vlm.train_valid_test_datasets_provider.is_distributed = True
    run_pretrain(
        pretrain_vlm.train_valid_test_datasets_provider, model_provider,
        hooks.forward_step(pretrain_vlm.forward_step),
        extra_args_provider=entry_args_provider(sys.argv[1:], pretrain_vlm.add_vlm_extra_args),
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        get_embedding_ranks=pretrain_vlm.llava_embedding_ranks,
        get_position_embedding_ranks=pretrain_vlm.llava_position_embedding_ranks,
    )


if __name__ == "__main__":
    main()
